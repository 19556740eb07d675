"""Datasets and loaders: a split at a curriculum profile served from the cache, and its sampler.

Determinism: the crop, flip and scale of a training sample come from an RNG seeded by (seed, epoch,
index). The epoch travels with each index from the sampler (see :class:`EpochSampler`), so persistent
workers see it, and a run resumed at epoch ``e`` draws what an uninterrupted run drew there, whatever
the number of workers.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from fastseg.augment import train_crop
from fastseg.cache import open_cache
from fastseg.cityscapes import Profile, get_profile, list_samples
from fastseg.errors import UserError

# ---------------------------------------------------------------------------------------------------------
# Dataset.

SampleKey = tuple[int, int, int]  # (seed, epoch, index), as yielded by EpochSampler


class SegmentationDataset(Dataset):
    """Cityscapes-layout split at a curriculum profile, served from the cache.

    Item: ``(image uint8 3×h×w, label uint8 h×w train ids, index)``.
    Train: random crop to the profile's patch from the resized image (optionally after a random scale in
    0.5-2.0), then a random horizontal flip; geometric only, on uint8 (colour jitter is in
    :func:`fastseg.augment.prepare_batch`). Val/test: the image resized to the profile, the label at full
    resolution (``label_resolution="full"``) or nearest-resized to the profile (``"resized"``).

    Indexed by an int (using the ``seed`` and ``epoch`` attributes) or by a ``(seed, epoch, index)`` key.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        profile: int | Profile,
        train: bool,
        cache_dir: str | Path | None = None,
        label_resolution: str = "full",
        scale_aug: bool = False,
        cache_workers: int | None = None,
    ) -> None:
        if label_resolution not in ("full", "resized"):
            raise UserError(f"--label-resolution {label_resolution}: choose 'full' or 'resized'")
        self.profile = get_profile(profile)
        self.train = train
        self.scale_aug = scale_aug
        self.label_resolution = label_resolution
        self.samples = list_samples(data_dir, split)
        self.seed = 0
        self.epoch = 0
        resized = open_cache(data_dir, split, self.samples, self.profile.resize_hw, cache_dir, cache_workers)
        self._image_path = resized[0]
        if train or label_resolution == "resized":
            self._label_paths = resized[1:]
        else:
            self._label_paths = open_cache(data_dir, split, self.samples, None, cache_dir, cache_workers)
        self._arrays: tuple[np.ndarray, ...] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self) -> dict:
        # Memory maps are opened lazily per process; pickling one would copy the whole array.
        return {**self.__dict__, "_arrays": None}

    def _open(self) -> tuple[np.ndarray, ...]:
        if self._arrays is None:
            self._arrays = tuple(np.load(p, mmap_mode="r") for p in (self._image_path, *self._label_paths))
        return self._arrays

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, torch.Tensor, int]:
        if isinstance(key, tuple):
            seed, epoch, index = key
        else:
            seed, epoch, index = self.seed, self.epoch, key
        index = range(len(self.samples))[int(index)]
        arrays = self._open()
        if self.train:
            rng = np.random.default_rng([seed, epoch, index])
            image, label = train_crop(
                arrays[0][index], arrays[1][index], self.profile.patch_hw, rng, self.scale_aug
            )
        elif self.label_resolution == "resized":
            image, label = np.array(arrays[0][index]), np.array(arrays[1][index])
        else:
            offset, h, w = (int(v) for v in arrays[2][index])
            image, label = (
                np.array(arrays[0][index]),
                np.array(arrays[1][offset : offset + h * w]).reshape(h, w),
            )
        return torch.from_numpy(image), torch.from_numpy(label), index


# ---------------------------------------------------------------------------------------------------------
# Sampling and loaders.


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` whose items are ``(seed, epoch, index)`` keys instead of bare indices.

    The order is a permutation seeded by ``seed + epoch`` (as DistributedSampler's), and the key carries
    the epoch to the dataset: attributes set on the dataset in the main process never reach persistent
    workers, but the indices do. Training (shuffle) pads every rank to the same length, as DDP needs;
    evaluation (no shuffle) splits ``rank::world`` without duplicates, so metrics are exact (ranks may
    differ by one sample, so evaluate without collectives inside the loop).

    ``set_epoch(e)`` selects epoch ``e``; an iteration without it moves on to the next epoch, so forgetting
    it never repeats the same crops. Every item's crop and flip depend on its key only, so a run resumed at
    epoch ``e`` sees exactly the items of an uninterrupted one.
    """

    def __init__(
        self, dataset: Dataset, seed: int, shuffle: bool, num_replicas: int = 1, rank: int = 0
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self._epoch_chosen = True
        self._started = False

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._epoch_chosen = True

    def _indices(self) -> list[int]:
        if self.shuffle:
            return list(super().__iter__())
        return list(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return super().__len__() if self.shuffle else len(range(self.rank, len(self.dataset), self.num_replicas))

    def __iter__(self) -> Iterator[SampleKey]:
        if self._started and not self._epoch_chosen:
            self.epoch += 1
        self._started, self._epoch_chosen = True, False
        return iter([(self.seed, self.epoch, i) for i in self._indices()])


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random follow it, for any code that
    # uses them (the dataset's crops and flips use their own per-sample RNG).
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    shuffle: bool,
    seed: int,
    distributed: bool = False,
    drop_last: bool | None = None,
) -> DataLoader:
    """A loader yielding ``(images uint8 N×3×h×w, labels uint8 N×h×w, indices)``, deterministic for ``seed``.

    ``batch_size`` is per process. ``drop_last`` defaults to ``shuffle`` (training drops the short last
    batch, which a BatchNorm batch of one would break). Call ``loader.sampler.set_epoch(epoch)`` at the start of each epoch.
    """
    if drop_last is None:
        drop_last = shuffle
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    sampler = EpochSampler(dataset, seed=seed, shuffle=shuffle, num_replicas=world, rank=rank)
    if drop_last and len(sampler) < batch_size:
        raise UserError(
            f"--batch-size: {batch_size} per process is more than the {len(sampler)} images each process "
            f"gets from this split; use a smaller --batch-size"
        )
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        worker_init_fn=_seed_worker,
        generator=generator,
    )
