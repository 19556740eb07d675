"""Cityscapes data: class table, curriculum profiles, cached datasets, loaders and on-device batch preparation.

The official layout is read, the same as torchvision's ``Cityscapes``::

    <data_dir>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <data_dir>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png   used when present
    <data_dir>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png        otherwise

Why a cache: decoding one 2048×1024 PNG costs ~35 ms of CPU, which made every epoch of every stage
decode-bound. Each split is decoded once per profile into uint8 arrays already resized to the profile
(images 3×H×W, labels as train ids), stored as ``.npy`` files that the loader workers memory-map; a train
sample is then a slice, a flip and a copy. Colour jitter and normalisation run on the device in
:func:`prepare_batch`, on uint8 batches that are 4× cheaper to move than floats.

Cache location: ``cache_dir`` argument, else ``$FASTSEG_CACHE_DIR``, else ``<data_dir>/.cache/fastseg`` when
writable, else ``~/.cache/fastseg``. Inside it, ``<data name>-<hash of its path>/<split>-<hash of the
source files' paths, sizes and mtimes>/`` holds one file per array, so an edited, added or removed
source file gives a new key and a rebuild (older entries of the split are removed then).

Determinism: the crop, flip and scale of a training sample come from an RNG seeded by (seed, epoch,
index). The epoch travels with each index from the sampler (see :class:`EpochSampler`), so persistent
workers see it, and a run resumed at epoch ``e`` draws what an uninterrupted run drew there, whatever
the number of workers.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import math
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.datasets import Cityscapes
from tqdm import tqdm

from fastseg.errors import UserError

# ---------------------------------------------------------------------------------------------------------
# Class table: everything derived from torchvision's Cityscapes table, never typed in by hand.

NUM_CLASSES = 19
IGNORE_INDEX = 255

_TRAIN_CLASSES = sorted(
    (c for c in Cityscapes.classes if 0 <= c.train_id < IGNORE_INDEX), key=lambda c: c.train_id
)
if [c.train_id for c in _TRAIN_CLASSES] != list(range(NUM_CLASSES)):
    raise RuntimeError("torchvision's Cityscapes class table no longer has train ids 0..18")

CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in _TRAIN_CLASSES)

# uint8 label files store id -1 ("license plate") as 255; `% 256` maps it there, and train id -1 to 255.
ID_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, dtype=np.uint8)
VALID_LABEL_IDS = np.zeros(256, dtype=bool)
for _c in Cityscapes.classes:
    ID_TO_TRAIN_ID[_c.id % 256] = _c.train_id % 256
    VALID_LABEL_IDS[_c.id % 256] = True

VALID_TRAIN_IDS = np.zeros(256, dtype=bool)
VALID_TRAIN_IDS[:NUM_CLASSES] = True
VALID_TRAIN_IDS[IGNORE_INDEX] = True

# Predictions written for the official tools: train id -> label id; the ignore value becomes 0 ("unlabeled").
TRAIN_ID_TO_ID = np.zeros(256, dtype=np.uint8)
TRAIN_ID_COLORS = np.zeros((256, 3), dtype=np.uint8)
for _c in _TRAIN_CLASSES:
    TRAIN_ID_TO_ID[_c.train_id] = _c.id
    TRAIN_ID_COLORS[_c.train_id] = _c.color
del _c

# ImageNet statistics on the 0-1 scale: the convention of Fast-SCNN and torchvision backbones. Fixed on
# purpose, so every stage, checkpoint and export sees the same input scaling.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# The train transform's colour jitter, as torchvision's ColorJitter(0.3, 0.3, 0.3, 0.1).
JITTER_BRIGHTNESS = 0.3
JITTER_CONTRAST = 0.3
JITTER_SATURATION = 0.3
JITTER_HUE = 0.1

# The paper's random scale range, behind `scale_aug`.
SCALE_RANGE = (0.5, 2.0)


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """Colour image (H×W×3 uint8) of a train-id map, with the ignore value black."""
    return TRAIN_ID_COLORS[np.asarray(train_ids, dtype=np.uint8)]


# ---------------------------------------------------------------------------------------------------------
# Curriculum profiles: the one home of the sizes every script uses.


@dataclass(frozen=True)
class Profile:
    """A curriculum stage's input sizes: images resized to ``resize``, training crops of ``patch`` (W, H)."""

    index: int
    resize: tuple[int, int]
    patch: tuple[int, int]

    @property
    def resize_hw(self) -> tuple[int, int]:
        return self.resize[1], self.resize[0]

    @property
    def patch_hw(self) -> tuple[int, int]:
        return self.patch[1], self.patch[0]


PROFILES: dict[int, Profile] = {
    1: Profile(1, (576, 288), (448, 224)),
    2: Profile(2, (768, 384), (576, 288)),
    3: Profile(3, (1024, 512), (768, 384)),
    4: Profile(4, (1536, 768), (1152, 576)),
    5: Profile(5, (2048, 1024), (1536, 768)),
}


def get_profile(k: int | Profile) -> Profile:
    """The profile with index ``k`` (a :class:`Profile` is returned as is)."""
    if isinstance(k, Profile):
        return k
    if k not in PROFILES:
        raise UserError(
            f"--profile {k}: no such profile; choose one of {', '.join(map(str, sorted(PROFILES)))}"
        )
    return PROFILES[k]


# ---------------------------------------------------------------------------------------------------------
# Listing the official layout.

_IMAGE_SUFFIX = "_leftImg8bit.png"
_TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"
_LABEL_ID_SUFFIX = "_gtFine_labelIds.png"


@dataclass(frozen=True)
class Sample:
    """One image and its label file; ``name`` is ``<city>_<seq>_<frame>``."""

    image: Path
    label: Path
    name: str
    city: str

    @property
    def label_is_train_ids(self) -> bool:
        return self.label.name.endswith(_TRAIN_ID_SUFFIX)


def _missing_data_dir(data_dir: Path) -> UserError:
    return UserError(
        f"{data_dir}: data directory not found; point --data-dir at a Cityscapes copy (with leftImg8bit/ and "
        f"gtFine/) or make a synthetic one with `python -m fastseg.synthetic {data_dir}`"
    )


def list_samples(data_dir: str | Path, split: str) -> list[Sample]:
    """Every image of ``split`` with its label, sorted by city and name; a missing label is an error."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise _missing_data_dir(data_dir)
    data_dir = data_dir.resolve()
    image_root = data_dir / "leftImg8bit" / split
    label_root = data_dir / "gtFine" / split
    if not image_root.is_dir():
        raise UserError(
            f"{image_root}: no such directory; --data-dir must hold the Cityscapes layout "
            f"leftImg8bit/{split}/<city>/*{_IMAGE_SUFFIX} (or make one with `python -m fastseg.synthetic`)"
        )
    images = sorted(image_root.glob(f"*/*{_IMAGE_SUFFIX}"))
    if not images:
        raise UserError(
            f"{image_root}: split '{split}' has no images; expected <city>/<name>{_IMAGE_SUFFIX} files there"
        )
    samples, missing = [], []
    for image in images:
        city = image.parent.name
        name = image.name[: -len(_IMAGE_SUFFIX)]
        label = label_root / city / f"{name}{_TRAIN_ID_SUFFIX}"
        if not label.is_file():
            label = label_root / city / f"{name}{_LABEL_ID_SUFFIX}"
            if not label.is_file():
                missing.append((image, label))
                continue
        samples.append(Sample(image=image, label=label, name=name, city=city))
    if missing:
        image, label = missing[0]
        more = f" (and {len(missing) - 1} more images without labels)" if len(missing) > 1 else ""
        raise UserError(
            f"{image}: no label; expected {label}{more}; add the gtFine files or remove the image"
        )
    return samples


# ---------------------------------------------------------------------------------------------------------
# Decoding one sample. PIL decodes (libpng through zlib, the stable path); torch's uint8 resize (AVX2,
# antialiased) is ~6× faster than PIL's. Resizes use half-pixel centres for both image (bilinear) and
# label (nearest-exact), so the two stay aligned.

_PNG_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error)


def _open_png(path: Path) -> Image.Image:
    im = None
    try:
        im = Image.open(path)
        im.load()
        return im
    except _PNG_ERRORS as exc:
        if im is not None:
            im.close()
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{path}: unreadable or corrupt PNG ({reason}); replace it with a good copy"
        ) from None


def read_image(path: str | Path) -> torch.Tensor:
    """An image file as a uint8 3×H×W tensor (a channels-last view of the decoded pixels)."""
    with _open_png(Path(path)) as im:
        rgb = np.array(im if im.mode == "RGB" else im.convert("RGB"))
    return torch.from_numpy(rgb).permute(2, 0, 1)


def read_label(path: str | Path) -> np.ndarray:
    """A label file as a uint8 H×W array of train ids (labelIds mapped through the table), checked."""
    path = Path(path)
    with _open_png(path) as im:
        if im.mode not in ("L", "P"):
            raise UserError(
                f"{path}: a label must be a single-channel 8-bit id image, this one is {im.mode}; use the "
                f"*{_LABEL_ID_SUFFIX} (or *{_TRAIN_ID_SUFFIX}) files, not the colour ones"
            )
        ids = np.array(im)
    train_ids = path.name.endswith(_TRAIN_ID_SUFFIX)
    valid = VALID_TRAIN_IDS if train_ids else VALID_LABEL_IDS
    bad = ~valid[ids]
    if bad.any():
        values = np.unique(ids[bad])
        allowed = "0-18 and 255" if train_ids else "the Cityscapes label ids 0-33 (and 255)"
        shown = ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")
        raise UserError(
            f"{path}: label values {shown} are not in the class table (allowed: {allowed}); "
            "regenerate the file from the annotations or remove the sample"
        )
    return ids if train_ids else ID_TO_TRAIN_ID[ids]


def resize_image(image: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """uint8 C×H×W → C×h×w, bilinear with antialiasing (no-op at the same size)."""
    if tuple(image.shape[-2:]) == tuple(size_hw):
        return image.contiguous()
    out = F.interpolate(image[None], size=size_hw, mode="bilinear", antialias=True, align_corners=False)[0]
    return out.contiguous()


def resize_label(label: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """uint8 H×W → h×w, nearest with half-pixel centres (the same grid as :func:`resize_image`)."""
    if tuple(label.shape[-2:]) == tuple(size_hw):
        return label
    return F.interpolate(label[None, None], size=size_hw, mode="nearest-exact")[0, 0]


def load_sample(
    sample: Sample, resize_hw: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one sample directly (no cache): uint8 image 3×H×W and train-id label H×W, optionally resized.

    This is what the cache stores, pixel for pixel."""
    image = read_image(sample.image)
    label = torch.from_numpy(read_label(sample.label))
    if tuple(image.shape[1:]) != tuple(label.shape):
        raise _size_mismatch(sample, tuple(image.shape[1:]), tuple(label.shape))
    if resize_hw is not None:
        image, label = resize_image(image, resize_hw), resize_label(label, resize_hw)
    return image.contiguous(), label


def _size_mismatch(sample: Sample, image_hw, label_hw) -> UserError:
    return UserError(
        f"{sample.label}: label is {label_hw[1]}x{label_hw[0]} but its image {sample.image.name} is "
        f"{image_hw[1]}x{image_hw[0]}; image and label must have the same size"
    )


# ---------------------------------------------------------------------------------------------------------
# Cache.

# Bumped whenever what is stored changes (decoder, resize method, layout): old entries then no longer match.
CACHE_VERSION = 1
CACHE_ENV = "FASTSEG_CACHE_DIR"


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            return True
    except OSError:
        return False


def cache_root(data_dir: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where the cache of ``data_dir`` lives (before the per-dataset subdirectory)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    beside = Path(data_dir).expanduser() / ".cache" / "fastseg"
    if _writable_dir(beside):
        return beside
    home_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return home_cache / "fastseg"


def _array_names(resize_hw: tuple[int, int] | None) -> tuple[str, ...]:
    if resize_hw is None:
        return ("labels-full.npy", "labels-full-index.npy")
    h, w = resize_hw
    return (f"images-{w}x{h}.npy", f"labels-{w}x{h}.npy")


@dataclass(frozen=True)
class _BuildJob:
    samples: tuple[Sample, ...]
    resize_hw: tuple[int, int] | None  # None: full-resolution labels only
    paths: tuple[Path, ...]  # temporary files the arrays are written to
    index: np.ndarray | None  # full labels: (offset, h, w) per sample


_JOB: _BuildJob | None = None
_OUT: tuple[np.ndarray, ...] = ()


def _init_builder(job: _BuildJob, parent: int | None = None) -> None:
    global _JOB, _OUT
    if parent is not None:  # a builder process
        _detach_from_signals(parent)
    torch.set_num_threads(1)  # one decode per process; processes are the parallelism
    _JOB = job
    _OUT = tuple(np.load(p, mmap_mode="r+") for p in job.paths[: 1 if job.resize_hw is None else 2])


def _detach_from_signals(parent: int) -> None:
    """Builders leave signals to the process that started them and die with it.

    They inherit the trainer's SIGUSR1/SIGTERM handler (which only sets a flag) and would otherwise ignore
    the signal that ends them. Slurm and Ctrl-C signal the whole process group; the trainer decides: it
    lets the build finish (the cache is kept for the next run) and then stops, or, after a second Ctrl-C,
    drops the build. A builder left without its parent (killed with SIGKILL) is killed too.
    """
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):  # Linux only; elsewhere builders exit with the pool
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _build_one(i: int) -> int:
    job = _JOB
    sample = job.samples[i]
    if job.resize_hw is None:
        label = read_label(sample.label)
        offset, h, w = job.index[i]
        if label.shape != (h, w):  # the file changed between the header scan and now
            raise UserError(f"{sample.label}: changed while the cache was being built; run again")
        _OUT[0][offset : offset + h * w] = label.reshape(-1)
    else:
        image, label = load_sample(sample, job.resize_hw)
        _OUT[0][i] = image.numpy()
        _OUT[1][i] = label.numpy()
    return i


def _header_sizes(samples: Sequence[Sample]) -> list[tuple[int, int]]:
    """(H, W) of every label from the PNG headers, checked against its image: cheap, and it fails early."""
    sizes = []
    for s in samples:
        hw = []
        for path in (s.image, s.label):
            try:
                with Image.open(path) as im:
                    hw.append((im.height, im.width))
            except _PNG_ERRORS as exc:
                raise UserError(
                    f"{path}: unreadable or corrupt PNG ({exc}); replace it with a good copy"
                ) from None
        if hw[0] != hw[1]:
            raise _size_mismatch(s, hw[0], hw[1])
        sizes.append(hw[1])
    return sizes


def _build_workers(n: int, pixels: int, workers: int | None) -> int:
    if workers is None:
        # Small sets decode faster than a pool starts; below ~8 full-size frames stay in this process.
        workers = 1 if pixels < 16_000_000 else min(len(os.sched_getaffinity(0)), 32)
    if mp.current_process().daemon:  # a daemonic process (e.g. a loader worker) may not have children
        workers = 1
    return max(1, min(workers, n))


def _build(entry: Path, samples: Sequence[Sample], resize_hw, split: str, workers: int | None) -> None:
    """Decode ``samples`` into the arrays of ``entry`` (temp files, then renamed)."""
    sizes = _header_sizes(samples)
    n = len(samples)
    names = _array_names(resize_hw)
    tmp = [entry / f".{name}.tmp-{socket.gethostname()}-{os.getpid()}" for name in names]
    index = None
    if resize_hw is None:
        counts = np.array([h * w for h, w in sizes], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        index = np.stack([offsets, [h for h, _ in sizes], [w for _, w in sizes]], axis=1).astype(np.int64)
        need = int(counts.sum())
        shapes = [(need,)]
    else:
        h, w = resize_hw
        shapes = [(n, 3, h, w), (n, h, w)]
        need = 4 * n * h * w
    free = shutil.disk_usage(entry).free
    if need > free:
        raise UserError(
            f"{entry}: the data cache needs {need / 1e9:.1f} GB but the disk has {free / 1e9:.1f} GB free; "
            f"set {CACHE_ENV} (or --cache-dir) to a larger disk"
        )
    for path, shape in zip(tmp, shapes):
        np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape).flush()
    if index is not None:
        with open(tmp[1], "wb") as f:  # a file object: np.save would append ".npy" to a path
            np.save(f, index)

    job = _BuildJob(tuple(samples), resize_hw, tuple(tmp), index)
    what = "full-size labels" if resize_hw is None else f"{resize_hw[1]}x{resize_hw[0]}"
    pixels = sum(h * w for h, w in sizes)
    procs = _build_workers(n, pixels, workers)
    print(
        f"building the {split} data cache ({n} images, {what}, {need / 1e9:.2f} GB) in {entry}",
        file=sys.stderr,
        flush=True,
    )
    global _OUT
    try:
        with tqdm(total=n, desc=f"cache {split} {what}", unit="img", file=sys.stderr) as bar:
            if procs == 1:
                threads = torch.get_num_threads()
                _init_builder(job)
                torch.set_num_threads(threads)
                for i in range(n):
                    _build_one(i)
                    bar.update()
            else:
                # fork: children only run libpng and tensor resizes on fresh single-thread pools; spawn
                # would re-import torch in each of them for no benefit.
                pool = ProcessPoolExecutor(procs, mp_context=mp.get_context("fork"), initializer=_init_builder,
                                           initargs=(job, os.getpid()))
                try:
                    for _ in pool.map(_build_one, range(n), chunksize=4):
                        bar.update()
                except BrokenProcessPool:
                    raise UserError(
                        f"{entry}: a process building the data cache was killed (out of memory, or SIGKILL); run again, "
                        f"or set {CACHE_ENV} / --cache-dir to build it elsewhere"
                    ) from None
                finally:  # on an error, the chunks not started are dropped rather than decoded for nothing
                    pool.shutdown(wait=True, cancel_futures=True)
        _OUT = ()
        for path in tmp:
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
    except BaseException:
        _OUT = ()
        for path in tmp:
            path.unlink(missing_ok=True)
        raise
    # The index goes in place before the data, so the data file's presence means both are complete.
    for path, name in sorted(zip(tmp, names), key=lambda pn: "index" not in pn[1]):
        os.replace(path, entry / name)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[bool]:
    """Hold an exclusive flock on ``path``; yields False where the file system has no flock (some
    Lustre mounts): building stays correct then (unique temp names, atomic renames), only not shared."""
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"waiting for another process building the data cache ({path})", file=sys.stderr, flush=True
            )
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as exc:
            print(f"note: no file locking on {path.parent} ({exc}); building without it", file=sys.stderr)
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _source_key(data_dir: Path, split: str, samples: Sequence[Sample]) -> str:
    files = []
    for s in samples:
        for path in (s.image, s.label):
            st = path.stat()
            files.append([str(path), st.st_size, st.st_mtime_ns])
    return _sha({"version": CACHE_VERSION, "data_dir": str(data_dir), "split": split, "files": files})


def open_cache(
    data_dir: str | Path,
    split: str,
    samples: Sequence[Sample],
    resize_hw: tuple[int, int] | None,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    build: bool = True,
) -> tuple[Path, ...] | None:
    """Paths of the cached arrays of ``samples``, built first if missing or stale (``None`` then, when
    not ``build``).

    ``resize_hw`` given: ``images-WxH.npy`` (N×3×H×W) and ``labels-WxH.npy`` (N×H×W train ids).
    ``None``: full-resolution labels, ``labels-full.npy`` (all labels flattened one after another) and
    ``labels-full-index.npy`` (offset, h, w per sample).

    Readers of a complete entry take no lock: every file appears by an atomic rename once complete.
    Builders hold an exclusive ``flock`` per entry, so concurrent processes (DDP ranks, two jobs) build
    it once and the others wait, then read.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    key = _source_key(data_dir, split, samples)
    group = f"{data_dir.name or 'data'}-{_sha(str(data_dir))[:8]}"
    entry_name = f"{split}-{key[:16]}"
    names = _array_names(resize_hw)

    roots = [cache_root(data_dir, cache_dir)]
    if cache_dir is None and not os.environ.get(CACHE_ENV):
        # A cache already built beside a read-only data copy (e.g. by whoever shares it) is used as is.
        roots.insert(0, data_dir / ".cache" / "fastseg")
    for root in roots:
        entry = root / group / entry_name
        if all((entry / name).is_file() for name in names):
            return tuple(entry / name for name in names)
    if not build:
        return None

    root = roots[-1]
    entry = root / group / entry_name
    try:
        entry.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"{root}: cannot create the data cache there ({exc}); set {CACHE_ENV} or --cache-dir"
        ) from None
    with _locked(root / group / f"{entry_name}.lock") as exclusive:
        if not all((entry / name).is_file() for name in names):
            if exclusive:  # temp files left by a builder that was killed
                for leftover in entry.glob(".*.tmp-*"):
                    leftover.unlink(missing_ok=True)
            t0 = time.perf_counter()
            _build(entry, samples, resize_hw, split, workers)
            print(f"data cache ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            _remove_stale(root / group, split, entry_name)
    return tuple(entry / name for name in names)


def _remove_stale(group_dir: Path, split: str, keep: str) -> None:
    """Entries of this split for other source sets are out of date: free their space.

    A process still reading one keeps its open memory maps valid (POSIX unlink semantics).
    """
    pattern = re.compile(rf"^{re.escape(split)}-[0-9a-f]{{16}}$")
    for old in group_dir.iterdir():
        if old.name != keep and old.is_dir() and pattern.match(old.name):
            shutil.rmtree(old, ignore_errors=True)
            (group_dir / f"{old.name}.lock").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------
# Dataset.

SampleKey = tuple[int, int, int]  # (seed, epoch, index), as yielded by EpochSampler


class SegmentationDataset(Dataset):
    """Cityscapes-layout split at a curriculum profile, served from the cache.

    Item: ``(image uint8 3×h×w, label uint8 h×w train ids, index)``.
    Train: random crop to the profile's patch from the resized image (optionally after a random scale in
    0.5-2.0), then a random horizontal flip; geometric only, on uint8 (colour jitter is in
    :func:`prepare_batch`). Val/test: the image resized to the profile, the label at full resolution
    (``label_resolution="full"``) or nearest-resized to the profile (``"resized"``).

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
        self.split = split
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
            image, label = _train_crop(
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


def _train_crop(
    image: np.ndarray, label: np.ndarray, patch_hw: tuple[int, int], rng: np.random.Generator, scale_aug: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Random (scale,) crop and flip of one cached sample; returns fresh C-contiguous arrays of the patch size.

    Without scale the crop is a slice of the memory map, so only the patch's pixels are read.
    """
    ph, pw = patch_hw
    h, w = label.shape
    flip = rng.random() < 0.5
    if scale_aug:
        scale = rng.uniform(*SCALE_RANGE)
        # Resizing only the source region the patch covers gives the crop of the rescaled image (up to the
        # rounding of the region's borders) for a fraction of the work of rescaling everything.
        out_h, out_w = min(ph, max(1, round(h * scale))), min(pw, max(1, round(w * scale)))
        src_h, src_w = min(h, max(1, round(out_h / scale))), min(w, max(1, round(out_w / scale)))
        y, x = int(rng.integers(0, h - src_h + 1)), int(rng.integers(0, w - src_w + 1))
        region = torch.from_numpy(np.array(image[:, y : y + src_h, x : x + src_w]))
        region_label = torch.from_numpy(np.array(label[y : y + src_h, x : x + src_w]))
        image = resize_image(region, (out_h, out_w)).numpy()
        label = resize_label(region_label, (out_h, out_w)).numpy()
    else:
        y, x = int(rng.integers(0, max(h - ph, 0) + 1)), int(rng.integers(0, max(w - pw, 0) + 1))
        image, label = image[:, y : y + ph, x : x + pw], label[y : y + ph, x : x + pw]
    if flip:
        image, label = image[:, :, ::-1], label[:, ::-1]
    if label.shape != (ph, pw):  # smaller than the patch: pad bottom/right, labels with the ignore value
        padded_image = np.zeros((3, ph, pw), dtype=np.uint8)
        padded_label = np.full((ph, pw), IGNORE_INDEX, dtype=np.uint8)
        padded_image[:, : label.shape[0], : label.shape[1]] = image
        padded_label[: label.shape[0], : label.shape[1]] = label
        return padded_image, padded_label
    return np.array(image, order="C"), np.array(label, order="C")


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
    it never repeats the same crops. ``set_epoch(e, skip=n)`` starts that epoch's order at its n-th item
    (a run resumed inside an epoch): every item's crop and flip depend on its key only, so the items that
    follow are exactly those of an uninterrupted epoch, and the skipped ones are never loaded.
    """

    def __init__(
        self, dataset: Dataset, seed: int, shuffle: bool, num_replicas: int = 1, rank: int = 0
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self._epoch_chosen = True
        self._started = False
        self._skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self._epoch_chosen = True
        self._skip = skip

    def _indices(self) -> list[int]:
        if self.shuffle:
            return list(super().__iter__())
        return list(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        full = super().__len__() if self.shuffle else len(range(self.rank, len(self.dataset), self.num_replicas))
        return max(0, full - self._skip)

    def __iter__(self) -> Iterator[SampleKey]:
        if self._started and not self._epoch_chosen:
            self.epoch, self._skip = self.epoch + 1, 0
        self._started, self._epoch_chosen = True, False
        epoch = self.epoch
        return iter([(self.seed, epoch, i) for i in self._indices()[self._skip :]])


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random follow it, for any code that
    # uses them (this module's augmentation uses its own per-sample RNG).
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
    batch, which a BatchNorm batch of one would break). Call :func:`set_epoch` at the start of each epoch.
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


def set_epoch(loader: DataLoader, epoch: int, start_step: int = 0) -> None:
    """Select the epoch whose order and augmentation the loader's next iteration yields, from its batch
    ``start_step`` on (a resumed run; the loader must come from :func:`build_loader`)."""
    sampler = loader.sampler if hasattr(loader.sampler, "set_epoch") else getattr(loader.batch_sampler, "sampler", None)
    if start_step:
        if not isinstance(sampler, EpochSampler):
            raise TypeError("set_epoch: starting inside an epoch needs a loader made by build_loader")
        sampler.set_epoch(epoch, skip=start_step * loader.batch_size)
    elif sampler is not None and hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


# ---------------------------------------------------------------------------------------------------------
# Batch preparation on the device.
#
# Colour jitter is folded into one 3×3 colour matrix and offset per image: brightness (scale), contrast
# (blend with the image's mean grey, known from the channel means), saturation (blend with grey) and hue
# are all linear in RGB. Hue is a rotation of the chroma plane in YIQ space (the choice of NVIDIA DALI's
# hue op): a close, cheap stand-in for torchvision's HSV shift, with no per-pixel branches. The ops are
# applied in a fixed order, brightness, contrast, saturation, hue, and clamped once at the end rather
# than after each (torchvision's ColorJitter picks a random order and clamps in between). A batch costs
# one batched 3×3 matrix product, one clamp and the normalisation.

_GREY = (0.2989, 0.587, 0.114)  # the luma weights of torchvision's rgb_to_grayscale
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.5959, -0.2746, -0.3213], [0.2115, -0.5227, 0.3112]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def _jitter_affine(means: torch.Tensor, factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image colour matrix A (N×3×3) and offset t (N×3) on the 0-1 scale, from channel means (N×3)
    and four uniform draws in [0, 1) per image (N×4)."""
    dev, dt = means.device, means.dtype
    n = means.shape[0]
    u = factors.to(dev, dt) * 2 - 1
    b = 1 + JITTER_BRIGHTNESS * u[:, 0]
    c = 1 + JITTER_CONTRAST * u[:, 1]
    s = 1 + JITTER_SATURATION * u[:, 2]
    theta = (JITTER_HUE * u[:, 3]) * 2 * math.pi
    eye = torch.eye(3, device=dev, dtype=dt).expand(n, 3, 3)
    grey = torch.tensor(_GREY, device=dev, dtype=dt)
    to_grey = grey.expand(3, 3)  # every row the luma weights: x -> (grey, grey, grey)

    a = b[:, None, None] * eye
    t = torch.zeros(n, 3, device=dev, dtype=dt)
    mean_grey = (a @ means[:, :, None])[:, :, 0] @ grey  # the image's mean grey after brightness
    a = c[:, None, None] * a
    t = c[:, None] * t + ((1 - c) * mean_grey)[:, None]
    sat = s[:, None, None] * eye + (1 - s)[:, None, None] * to_grey
    a, t = sat @ a, (sat @ t[:, :, None])[:, :, 0]
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(n, 3, 3, device=dev, dtype=dt)
    rot[:, 0, 0] = 1
    # This direction matches torchvision's: a positive hue factor turns red towards yellow.
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, sin, -sin, cos
    to_yiq = torch.as_tensor(_RGB_TO_YIQ, device=dev, dtype=dt)
    from_yiq = torch.as_tensor(_YIQ_TO_RGB, device=dev, dtype=dt)
    hue = from_yiq @ rot @ to_yiq
    return hue @ a, (hue @ t[:, :, None])[:, :, 0]


def _channel_means_cpu(x: torch.Tensor) -> torch.Tensor:
    """Per-image channel means (N×3, 0-1 scale) of a CPU uint8 batch, exact: numpy sums uint8 into
    uint64 without a float copy of the batch (torch's uint8 sums are ~7× slower)."""
    sums = x.contiguous().numpy().reshape(x.shape[0], 3, -1).sum(-1, dtype=np.uint64)
    return torch.from_numpy(sums / (255.0 * x[0, 0].numel())).float()


def _affine_cpu(x: torch.Tensor, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``a @ x + t`` per image on a CPU uint8 batch, one output plane at a time with scalar factors.

    One float buffer in all and in-place passes over it: on the CPU, freshly allocated batch-sized
    buffers cost more (page faults) than the arithmetic, so this is ~2× faster than float() then bmm.
    """
    out = torch.empty(x.shape, dtype=torch.float32)
    for i, (rows, offsets) in enumerate(zip(a.tolist(), t.tolist())):
        for c, (row, offset) in enumerate(zip(rows, offsets)):
            plane = out[i, c]
            torch.mul(x[i, 0], row[0], out=plane)
            for j in (1, 2):
                if row[j] != 0:
                    plane.add_(x[i, j], alpha=row[j])
            plane.add_(offset)
    return out


def _affine_bmm(xf: torch.Tensor, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``a @ x + t`` per image as one batched matrix product (the accelerator path)."""
    n = xf.shape[0]
    return torch.bmm(a, xf.view(n, 3, -1)).view_as(xf).add_(t[:, :, None, None])


def prepare_batch(
    images_u8: torch.Tensor,
    labels_u8: torch.Tensor,
    device: torch.device | str,
    train: bool,
    jitter: bool = True,
    channels_last: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 batch → (normalised float32 images N×3×h×w, int64 labels N×h×w), both on ``device``.

    When ``train`` and ``jitter``: per-image colour jitter (brightness, contrast, saturation 0.3, hue 0.1)
    drawn from ``generator`` (on the device's kind), vectorised over the batch.
    """
    if images_u8.dtype != torch.uint8:
        raise TypeError(f"prepare_batch expects uint8 images, got {images_u8.dtype}")
    device = torch.device(device)
    x = images_u8.to(device, non_blocking=True)
    labels = labels_u8.to(device, non_blocking=True).long()
    n = x.shape[0]
    on_cpu = x.device.type == "cpu"
    xf = None if on_cpu else x.float()
    jittered = train and jitter
    if jittered:
        gen_device = generator.device if generator is not None else device
        factors = torch.rand(n, 4, generator=generator, device=gen_device)
        means = _channel_means_cpu(x) if on_cpu else xf.mean(dim=(2, 3)) / 255
        a, t = _jitter_affine(means, factors)
    else:
        a = torch.eye(3, device=x.device).expand(n, 3, 3)
        t = torch.zeros(n, 3, device=x.device)
    # Normalisation folded in: normalise(clamp(A x + t, 0, 1)) == clamp(A' x + t', lo, hi) per channel,
    # with A' = diag(1/std) A / 255 and t' = (t - mean) / std.
    mean = torch.tensor(MEAN, device=x.device)
    inv_std = 1 / torch.tensor(STD, device=x.device)
    a = inv_std[None, :, None] * a / 255
    t = (t - mean) * inv_std
    if on_cpu:
        out = _affine_cpu(x, a, t)
    else:
        out = _affine_bmm(xf, a, t)
    if jittered:  # (without jitter the values are in range already)
        # One channel at a time with scalar bounds: ~8× faster on the CPU than per-channel bound tensors.
        for c, (m, s) in enumerate(zip(MEAN, STD)):
            out[:, c].clamp_(-m / s, (1 - m) / s)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out, labels
