"""fastseg.cityscapes, .cache, .augment and .data on tiny Cityscapes-layout folders made here with PIL
(a few 96×48 images, seconds in all)."""

from __future__ import annotations

import multiprocessing as mp
import os
import runpy
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import fastseg.augment
import fastseg.cache
from fastseg.augment import (
    _affine_bmm,
    _affine_cpu,
    _channel_means_cpu,
    _jitter_affine,
    prepare_batch,
    train_crop,
)
from fastseg.cache import CACHE_ENV
from fastseg.cityscapes import (
    CLASS_NAMES,
    ID_TO_TRAIN_ID,
    MEAN,
    NUM_CLASSES,
    PROFILES,
    STD,
    TRAIN_ID_COLORS,
    TRAIN_ID_TO_ID,
    VALID_LABEL_IDS,
    Profile,
    colorize,
    get_profile,
    list_samples,
    load_sample,
    read_image,
)
from fastseg.data import EpochSampler, SegmentationDataset, build_loader
from fastseg.errors import UserError

SIZE = (96, 48)  # W, H of the source files
BLOCK = 16
PROFILE = Profile(0, resize=(48, 24), patch=(32, 16))  # a 2× downscale, then a crop
# Label ids drawn for the blocks: trained classes and ignored ones (0 unlabeled, 4 static, 9 parking).
IDS = np.array([0, 4, 7, 8, 9, 11, 17, 21, 23, 24, 26, 33], dtype=np.uint8)

# A colour per train id (and the ignore value) so that the image says which label each pixel must have.
_rng = np.random.default_rng(1234)
PALETTE = np.zeros((256, 3), dtype=np.uint8)
PALETTE[list(range(19)) + [255]] = _rng.integers(20, 236, (20, 3))


def _block_labels(rng: np.random.Generator) -> np.ndarray:
    w, h = SIZE
    grid = rng.choice(IDS, size=(h // BLOCK, w // BLOCK))
    return np.kron(grid, np.ones((BLOCK, BLOCK), dtype=np.uint8))


def make_split(
    root: Path, split: str, n: int, seed: int = 0, city: str = "aachen"
) -> list[tuple[Path, Path]]:
    """``n`` samples whose image colour encodes the label: PALETTE[train id of each pixel]."""
    rng = np.random.default_rng(seed)
    (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
    (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        name = f"{city}_{i:06d}_000019"
        ids = _block_labels(rng)
        image_path = root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png"
        label_path = root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png"
        Image.fromarray(PALETTE[ID_TO_TRAIN_ID[ids]]).save(image_path)
        Image.fromarray(ids).save(label_path)
        files.append((image_path, label_path))
    return files


@pytest.fixture
def cityscapes(tmp_path: Path) -> Path:
    root = tmp_path / "cityscapes"
    make_split(root, "train", 6, seed=0)
    make_split(root, "val", 3, seed=1)
    return root


@pytest.fixture(autouse=True)
def _own_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))


def consistent(image: np.ndarray, label: np.ndarray, tol: int = 10) -> tuple[int, int]:
    """(checked, wrong) pixels: where the 5×5 label neighbourhood is constant, is the colour the label's?

    Block edges are skipped (bilinear blends colours there); padding (label 255, image 0) counts as right.
    """
    image = np.asarray(image).transpose(1, 2, 0).astype(int)
    label = np.asarray(label)
    h, w = label.shape
    inner = np.zeros((h, w), dtype=bool)
    inner[2:-2, 2:-2] = True
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            shifted = np.roll(np.roll(label, dy, 0), dx, 1)
            inner &= shifted == label
    expect = PALETTE[label].astype(int)
    padding = (label == 255) & (image.sum(-1) == 0)
    ok = (np.abs(image - expect).max(-1) <= tol) | padding
    return int(inner.sum()), int((inner & ~ok).sum())


# ---------------------------------------------------------------------------------------------------------
# Class table and profiles


# The 19 evaluated classes of the Cityscapes definition (cityscapesScripts' labels.py), typed here from that
# table: (label id, name), in train-id order 0..18. Every other label id is ignored (train id 255).
CITYSCAPES_TRAIN_CLASSES = [
    (7, "road"), (8, "sidewalk"), (11, "building"), (12, "wall"), (13, "fence"), (17, "pole"),
    (19, "traffic light"), (20, "traffic sign"), (21, "vegetation"), (22, "terrain"), (23, "sky"),
    (24, "person"), (25, "rider"), (26, "car"), (27, "truck"), (28, "bus"), (31, "train"),
    (32, "motorcycle"), (33, "bicycle"),
]


def test_lookup_table_follows_the_cityscapes_definition():
    for label_id, train_id in ((7, 0), (8, 1), (11, 2), (26, 13), (33, 18)):  # road, sidewalk, building, car, bicycle
        assert ID_TO_TRAIN_ID[label_id] == train_id
    for label_id in (0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30):  # void ids, parking, guard rail, …
        assert ID_TO_TRAIN_ID[label_id] == 255, label_id
    # license plate has label id -1, which a uint8 label file stores as 255
    assert ID_TO_TRAIN_ID[255] == 255 and VALID_LABEL_IDS[255]
    # exactly 19 label ids map to the train ids 0..18, one each, as typed above
    trained = {label_id: int(ID_TO_TRAIN_ID[label_id]) for label_id in range(256) if ID_TO_TRAIN_ID[label_id] != 255}
    assert trained == {label_id: train_id for train_id, (label_id, _) in enumerate(CITYSCAPES_TRAIN_CLASSES)}
    assert list(CLASS_NAMES) == [name for _, name in CITYSCAPES_TRAIN_CLASSES] and NUM_CLASSES == 19
    assert [int(TRAIN_ID_TO_ID[t]) for t in range(19)] == [label_id for label_id, _ in CITYSCAPES_TRAIN_CLASSES]
    # label ids 0..33 (and -1) exist; anything else in a label file is not a Cityscapes id
    assert VALID_LABEL_IDS[:34].all() and not VALID_LABEL_IDS[34:255].any()
    assert tuple(TRAIN_ID_COLORS[0]) == (128, 64, 128) and tuple(TRAIN_ID_COLORS[10]) == (70, 130, 180)
    assert tuple(TRAIN_ID_COLORS[18]) == (119, 11, 32) and tuple(TRAIN_ID_COLORS[255]) == (0, 0, 0)
    ids = np.array([[7, 26], [0, 255]], dtype=np.uint8)
    assert np.array_equal(colorize(ID_TO_TRAIN_ID[ids]), [[(128, 64, 128), (0, 0, 142)], [(0, 0, 0)] * 2])


def test_profiles_and_unknown_profile():
    sizes = {k: (p.resize, p.patch) for k, p in PROFILES.items()}
    assert sizes == {
        1: ((576, 288), (448, 224)),
        2: ((768, 384), (576, 288)),
        3: ((1024, 512), (768, 384)),
        4: ((1536, 768), (1152, 576)),
        5: ((2048, 1024), (1536, 768)),
    }
    assert get_profile(1).resize_hw == (288, 576) and get_profile(1).patch_hw == (224, 448)
    with pytest.raises(UserError, match="--profile 6"):
        get_profile(6)


# ---------------------------------------------------------------------------------------------------------
# Layout and cache


def test_label_train_ids_preferred_when_present(cityscapes: Path):
    sample = list_samples(cityscapes, "val")[0]
    assert not sample.label_is_train_ids and sample.name == "aachen_000000_000019" and sample.city == "aachen"
    # A trainIds file that disagrees with the labelIds one: its content must win.
    train_ids = np.full((SIZE[1], SIZE[0]), 5, dtype=np.uint8)
    train_ids[:, :10] = 255
    path = sample.label.with_name(f"{sample.name}_gtFine_labelTrainIds.png")
    Image.fromarray(train_ids).save(path)
    sample = list_samples(cityscapes, "val")[0]
    assert sample.label_is_train_ids and sample.label == path
    ds = SegmentationDataset(cityscapes, "val", PROFILE, train=False, label_resolution="full")
    assert np.array_equal(ds[0][1].numpy(), train_ids)


def test_cache_returns_the_same_as_direct_decoding(cityscapes: Path):
    samples = list_samples(cityscapes, "val")
    full = SegmentationDataset(cityscapes, "val", PROFILE, train=False, label_resolution="full")
    resized = SegmentationDataset(cityscapes, "val", PROFILE, train=False, label_resolution="resized")
    assert [s.name for s in full.samples] == [s.name for s in samples]
    for i, sample in enumerate(samples):
        pil_image = np.asarray(Image.open(sample.image).convert("RGB")).transpose(2, 0, 1)
        pil_label = ID_TO_TRAIN_ID[np.asarray(Image.open(sample.label))]
        assert np.array_equal(read_image(sample.image).numpy(), pil_image)
        image, label = load_sample(sample, PROFILE.resize_hw)
        assert image.shape == (3, 24, 48) and label.shape == (24, 48)
        got_image, got_label, index = full[i]
        assert index == i and got_image.dtype == torch.uint8 and got_label.dtype == torch.uint8
        assert torch.equal(got_image, image)
        assert np.array_equal(got_label.numpy(), pil_label)
        assert torch.equal(resized[i][0], image) and torch.equal(resized[i][1], label)
        # Nearest resize of a 2× downscale picks one source pixel per 2×2 block.
        assert np.array_equal(label.numpy(), pil_label[1::2, 1::2])


def test_cache_rebuilt_when_a_source_changes(cityscapes: Path, tmp_path: Path):
    ds = SegmentationDataset(cityscapes, "val", PROFILE, train=False)
    before = ds[1][1].numpy().copy()
    entries = sorted((tmp_path / "cache").glob("*/val-*/"))
    assert len(entries) == 1
    # Same size and maybe the same mtime tick: the content differs, the cache must notice via size or mtime.
    label = ds.samples[1].label
    changed = np.full_like(before, 26)
    Image.fromarray(changed).save(label)
    os.utime(label, ns=(time.time_ns(), time.time_ns() + 10**9))
    again = SegmentationDataset(cityscapes, "val", PROFILE, train=False)
    assert np.array_equal(again[1][1].numpy(), ID_TO_TRAIN_ID[changed])
    assert np.array_equal(again[0][1].numpy(), ds[0][1].numpy())
    now = sorted((tmp_path / "cache").glob("*/val-*/"))
    assert len(now) == 1 and now != entries  # the stale entry is gone


def test_cache_location_default_env_and_argument(cityscapes: Path, tmp_path: Path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV)
    SegmentationDataset(cityscapes, "val", PROFILE, train=False)
    assert list((cityscapes / ".cache" / "fastseg").glob("*/val-*/images-48x24.npy"))
    SegmentationDataset(cityscapes, "val", PROFILE, train=False, cache_dir=tmp_path / "mine")
    assert list((tmp_path / "mine").glob("*/val-*/images-48x24.npy"))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    SegmentationDataset(cityscapes, "val", PROFILE, train=False)
    assert list((tmp_path / "env").glob("*/val-*/images-48x24.npy"))


def _build_and_digest(root: str, cache: str, workers: int, queue) -> None:
    try:
        ds = SegmentationDataset(
            root,
            "train",
            PROFILE,
            train=False,
            label_resolution="resized",
            cache_dir=cache,
            cache_workers=workers,
        )
        queue.put(b"".join(ds[i][0].numpy().tobytes() + ds[i][1].numpy().tobytes() for i in range(len(ds))))
    except BaseException as exc:  # report, never hang the test
        queue.put(repr(exc))


def test_concurrent_builders_both_succeed_with_identical_data(cityscapes: Path, tmp_path: Path):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    cache = str(tmp_path / "shared")
    procs = [ctx.Process(target=_build_and_digest, args=(str(cityscapes), cache, w, queue)) for w in (1, 2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(isinstance(r, bytes) for r in results), results
    assert results[0] == results[1]
    entries = list(Path(cache).glob("*/train-*/"))
    assert len(entries) == 1 and not list(entries[0].glob(".*tmp*"))
    # And the same as a build in this process (serial path).
    ds = SegmentationDataset(
        cityscapes,
        "train",
        PROFILE,
        train=False,
        label_resolution="resized",
        cache_dir=tmp_path / "serial",
        cache_workers=1,
    )
    assert results[0] == b"".join(
        ds[i][0].numpy().tobytes() + ds[i][1].numpy().tobytes() for i in range(len(ds))
    )


_BUILD_ONE = fastseg.cache._build_one


def _signalling_build_one(i: int) -> int:
    import signal

    if i == 0:
        os.killpg(os.getpgrp(), signal.SIGTERM)
    return _BUILD_ONE(i)


def _build_under_signal(root: str, cache: str, queue) -> None:
    """A trainer's situation: its SIGUSR1/SIGTERM handler installed, then Slurm signals the whole process
    group (trainer and cache builders) while the cache is being built."""
    from fastseg.stopping import StopFlag

    try:
        os.setpgrp()  # the group signalled below is this process and its builders, never pytest
        stop = StopFlag()
        stop.install()
        # The forked builders run this process's copy of the module.
        fastseg.cache._build_one = _signalling_build_one
        ds = SegmentationDataset(root, "train", PROFILE, train=False, label_resolution="resized",
                                   cache_dir=cache, cache_workers=2)
        digest = b"".join(ds[i][0].numpy().tobytes() + ds[i][1].numpy().tobytes() for i in range(len(ds)))
        queue.put((stop.signal_name, digest))
    except BaseException as exc:
        queue.put(repr(exc))


def test_builders_finish_when_the_process_group_is_signalled(cityscapes: Path, tmp_path: Path):
    # The builders must neither hang the trainer (a pool whose workers ignore the signal that ends them)
    # nor die and lose work: the build completes, the trainer holds the signal and decides.
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_build_under_signal, args=(str(cityscapes), str(tmp_path / "c"), queue))
    proc.start()
    try:
        result = queue.get(timeout=60)
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    assert isinstance(result, tuple), result
    signal_name, digest = result
    assert signal_name == "SIGTERM" and proc.exitcode == 0
    serial = SegmentationDataset(cityscapes, "train", PROFILE, train=False, label_resolution="resized",
                                   cache_dir=tmp_path / "serial", cache_workers=1)
    assert digest == b"".join(serial[i][0].numpy().tobytes() + serial[i][1].numpy().tobytes()
                              for i in range(len(serial)))


# ---------------------------------------------------------------------------------------------------------
# Train transforms


def test_train_crop_and_flip_are_exact_aligned_slices(cityscapes: Path):
    full = SegmentationDataset(cityscapes, "train", PROFILE, train=False, label_resolution="resized")
    train = SegmentationDataset(cityscapes, "train", PROFILE, train=True)
    ph, pw = PROFILE.patch_hw
    flips = set()
    for key in [(0, e, i) for e in range(3) for i in range(len(train))]:
        image, label, index = train[key]
        assert image.shape == (3, ph, pw) and label.shape == (ph, pw) and image.is_contiguous()
        src_image, src_label = full[index][0].numpy(), full[index][1].numpy()
        found = []
        for flip in (False, True):
            img = src_image[:, :, ::-1] if flip else src_image
            lbl = src_label[:, ::-1] if flip else src_label
            for y in range(src_label.shape[0] - ph + 1):
                for x in range(src_label.shape[1] - pw + 1):
                    if np.array_equal(img[:, y : y + ph, x : x + pw], image.numpy()):
                        found.append((flip, y, x, np.array_equal(lbl[y : y + ph, x : x + pw], label.numpy())))
        assert found and all(
            same for *_, same in found
        )  # wherever the image crop came from, so did the label
        flips.add(found[0][0])
    assert flips == {False, True}


@pytest.mark.parametrize("scale_aug", [False, True])
def test_train_items_keep_image_and_label_aligned(cityscapes: Path, scale_aug: bool):
    ds = SegmentationDataset(cityscapes, "train", PROFILE, train=True, scale_aug=scale_aug)
    checked = 0
    for key in [(3, e, i) for e in range(4) for i in range(len(ds))]:
        image, label, _ = ds[key]
        assert image.shape == (3, 16, 32) and label.shape == (16, 32)
        n, wrong = consistent(image.numpy(), label.numpy())
        assert wrong == 0, key
        checked += n
        # The check has teeth: a label flipped on its own no longer matches (unless symmetric by chance).
        if n > 40 and not np.array_equal(label.numpy(), label.numpy()[:, ::-1]):
            assert consistent(image.numpy(), label.numpy()[:, ::-1].copy())[1] > 0
    assert checked > 500


def test_scale_aug_items_are_patches_of_train_ids_padded_at_bottom_right(cityscapes: Path):
    ds = SegmentationDataset(
        cityscapes, "train", Profile(0, (48, 24), (40, 20)), train=True, scale_aug=True
    )
    valid = set(range(NUM_CLASSES)) | {255}
    padded = 0
    for key in [(0, e, i) for e in range(10) for i in range(len(ds))]:
        image, label, _ = ds[key]
        image, label = image.numpy(), label.numpy()
        assert image.shape == (3, 20, 40) and label.shape == (20, 40) and image.dtype == label.dtype == np.uint8
        assert set(np.unique(label).tolist()) <= valid, key
        # The source colours are never black, so black pixels are exactly the padding: a band at the
        # bottom and/or right, labelled 255.
        pad = image.sum(0) == 0
        rows, cols = (~pad).any(1).sum(), (~pad).any(0).sum()
        inside = np.zeros_like(pad)
        inside[:rows, :cols] = True
        assert np.array_equal(pad, ~inside), key
        assert (label[pad] == 255).all(), key
        padded += int(pad.any())
    assert padded > 0  # scales below 20/24 leave a border


@pytest.mark.parametrize("scale", [0.5, 0.8, 1.0, 1.45, 2.0])
def test_scale_aug_patch_is_a_crop_of_the_rescaled_sample(monkeypatch, scale: float):
    """On a ramp image (red = x, green = 2y), every patch pixel must hold the colour of its place in the
    rescaled sample and the label of the source pixel nearest to it; the patch must lie inside the sample."""
    monkeypatch.setattr(fastseg.augment, "SCALE_RANGE", (scale, scale))
    h, w, ph, pw = 64, 128, 48, 96
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([xx, 2 * yy, np.full_like(xx, 7)]).astype(np.uint8)
    label = (xx // 16 + 8 * (yy // 32)).astype(np.uint8)  # 16 blocks of 16×32 source pixels, ids 0-15
    out_h, out_w = min(ph, round(h * scale)), min(pw, round(w * scale))
    flips = set()
    for k in range(12):
        patch, patch_label = train_crop(image, label, (ph, pw), np.random.default_rng([5, 0, k]), True)
        assert patch.shape == (3, ph, pw) and patch_label.shape == (ph, pw)
        assert patch.flags.c_contiguous and patch_label.flags.c_contiguous
        # Below the patch size the rescaled sample is all there is, padded at the bottom and right.
        assert (patch[:, out_h:] == 0).all() and (patch[:, :, out_w:] == 0).all()
        assert (patch_label[out_h:] == 255).all() and (patch_label[:, out_w:] == 255).all()
        patch, patch_label = patch[:, :out_h, :out_w].astype(float), patch_label[:out_h, :out_w]
        flip = patch[0, :, -1].mean() < patch[0, :, 0].mean()
        flips.add(flip)
        if flip:
            patch, patch_label = patch[:, :, ::-1], patch_label[:, ::-1]
        # Source coordinates of each patch pixel: x0 + j / scale, y0 + i / scale; the offsets fitted on the
        # interior (the borders of a resized region are clamped).
        i, j = np.arange(out_h), np.arange(out_w)
        m = 2  # margin, in patch pixels
        x0 = np.mean(patch[0, m:-m, m:-m] - j[m:-m] / scale)
        y0 = np.mean(patch[1, m:-m, m:-m] / 2 - i[m:-m, None] / scale)
        src_x, src_y = x0 + j / scale, y0 + i / scale
        assert np.abs(patch[0, m:-m, m:-m] - src_x[m:-m]).max() <= 1.0
        assert np.abs(patch[1, m:-m, m:-m] / 2 - src_y[m:-m, None]).max() <= 1.0
        assert (patch[2] == 7).all()
        assert src_x[0] >= -0.5 and src_x[-1] <= w - 0.5 and src_y[0] >= -0.5 and src_y[-1] <= h - 0.5
        # Nearest labels: the block of the source pixel under each patch pixel, away from block edges.
        expect = (np.round(src_x) // 16)[None, :] + 8 * (np.round(src_y) // 32)[:, None]
        clear_x = np.abs((src_x + 0.5) / 16 - np.round((src_x + 0.5) / 16)) * 16 > 1
        clear_y = np.abs((src_y + 0.5) / 32 - np.round((src_y + 0.5) / 32)) * 32 > 1
        clear = clear_y[:, None] & clear_x[None, :]
        assert clear.mean() > 0.6 and np.array_equal(patch_label[clear], expect[clear]), k
        # Class proportions follow: a block wholly inside the patch is 16 × scale pixels wide.
        for c in np.unique(patch_label[0])[1:-1]:
            assert abs((patch_label[0] == c).sum() - 16 * scale) <= 1
    assert flips == {False, True}


def test_scale_aug_item_depends_only_on_its_key(cityscapes: Path):
    keys = [(s, e, i) for s in (0, 1) for e in range(3) for i in range(6)]
    first = SegmentationDataset(cityscapes, "train", PROFILE, train=True, scale_aug=True)
    again = SegmentationDataset(cityscapes, "train", PROFILE, train=True, scale_aug=True)
    items = {key: first[key] for key in keys}
    for key in reversed(keys):  # another order, another dataset object: the same item
        image, label, index = again[key]
        assert torch.equal(image, items[key][0]) and torch.equal(label, items[key][1]) and index == key[2]
    distinct = {items[key][0].numpy().tobytes() for key in keys}
    assert len(distinct) == len(keys)  # and every key its own crop


# ---------------------------------------------------------------------------------------------------------
# Loaders


def _batches(loader, epochs):
    out = []
    for e in epochs:
        loader.sampler.set_epoch(e)
        out.append([(b[0].clone(), b[1].clone(), b[2].clone()) for b in loader])
    return out


def _same(a, b) -> bool:
    return len(a) == len(b) and all(all(torch.equal(x, y) for x, y in zip(p, q)) for p, q in zip(a, b))


@pytest.mark.parametrize("scale_aug", [False, True])
def test_loaders_are_deterministic_and_epochs_differ(cityscapes: Path, scale_aug: bool):
    ds = SegmentationDataset(cityscapes, "train", PROFILE, train=True, scale_aug=scale_aug)
    first = _batches(build_loader(ds, 2, 0, shuffle=True, seed=7), [0, 1, 2])
    again = _batches(build_loader(ds, 2, 0, shuffle=True, seed=7), [0, 1, 2])
    assert all(_same(a, b) for a, b in zip(first, again))
    assert not _same(first[0], first[1]) and not _same(first[1], first[2])
    assert not _same(first[0], _batches(build_loader(ds, 2, 0, shuffle=True, seed=8), [0])[0])
    # A resumed run (fresh loader, straight to epoch 2) draws what the uninterrupted run drew, and worker
    # processes (persistent, so they never see attributes set later) change nothing.
    workers = build_loader(ds, 2, 2, shuffle=True, seed=7)
    assert workers.persistent_workers
    assert _same(_batches(workers, [2])[0], first[2])
    assert _same(_batches(workers, [0])[0], first[0])
    assert (
        len(first[0]) == 3 and first[0][0][0].shape == (2, 3, 16, 32) and first[0][0][1].dtype == torch.uint8
    )


def test_epoch_advances_without_set_epoch(cityscapes: Path):
    ds = SegmentationDataset(cityscapes, "train", PROFILE, train=True)
    loader = build_loader(ds, 2, 0, shuffle=True, seed=7)
    plain = [[b[0].clone() for b in loader] for _ in range(2)]
    chosen = _batches(build_loader(ds, 2, 0, shuffle=True, seed=7), [0, 1])
    assert all(torch.equal(x, y[0]) for x, y in zip(plain[1], chosen[1]))


def test_eval_loader_is_ordered_and_complete(cityscapes: Path):
    ds = SegmentationDataset(cityscapes, "val", PROFILE, train=False)
    loader = build_loader(ds, 2, 0, shuffle=False, seed=0)
    indices = torch.cat([b[2] for b in loader]).tolist()
    assert indices == [0, 1, 2]
    shards = [list(EpochSampler(ds, seed=0, shuffle=False, num_replicas=2, rank=r)) for r in (0, 1)]
    assert sorted(i for s in shards for _, _, i in s) == [0, 1, 2]
    with pytest.raises(UserError, match="--batch-size"):
        build_loader(ds, 8, 0, shuffle=True, seed=0)


# ---------------------------------------------------------------------------------------------------------
# prepare_batch


def test_prepare_batch_normalises_and_jitter_off_is_identity():
    images = torch.randint(0, 256, (2, 3, 8, 12), dtype=torch.uint8)
    labels = torch.randint(0, 19, (2, 8, 12), dtype=torch.uint8)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    expect = (images.float() / 255 - mean) / std
    for train, jitter in ((False, True), (True, False)):
        x, y = prepare_batch(images, labels, "cpu", train=train, jitter=jitter)
        assert x.dtype == torch.float32 and x.shape == (2, 3, 8, 12) and y.dtype == torch.int64
        torch.testing.assert_close(x, expect)
        assert torch.equal(y, labels.long())
    x, _ = prepare_batch(images, labels, "cpu", train=False, channels_last=True)
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, expect)


def test_prepare_batch_jitter_is_seeded_per_image_and_bounded():
    images = torch.randint(0, 256, (4, 3, 8, 12), dtype=torch.uint8)
    labels = torch.zeros(4, 8, 12, dtype=torch.uint8)
    a, _ = prepare_batch(images, labels, "cpu", train=True, generator=torch.Generator().manual_seed(1))
    b, _ = prepare_batch(images, labels, "cpu", train=True, generator=torch.Generator().manual_seed(1))
    c, _ = prepare_batch(images, labels, "cpu", train=True, generator=torch.Generator().manual_seed(2))
    plain, _ = prepare_batch(images, labels, "cpu", train=False)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.allclose(a, plain, atol=1e-3)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    back = a * std + mean
    assert back.min() >= -1e-5 and back.max() <= 1 + 1e-5
    # Each image gets its own factors: the same picture twice in a batch comes out different.
    twin = images[:1].repeat(2, 1, 1, 1)
    d, _ = prepare_batch(twin, labels[:2], "cpu", train=True, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(d[0], d[1])


def _affine(x: torch.Tensor, factors: list[float]) -> torch.Tensor:
    a, t = _jitter_affine(x.mean(dim=(2, 3)), torch.tensor([factors]))
    return torch.einsum("nij,njhw->nihw", a, x) + t[:, :, None, None]


def test_jitter_matches_torchvision_for_brightness_contrast_saturation():
    x = torch.rand(1, 3, 6, 7) * 0.5 + 0.25  # mid-range: no clamping in either implementation
    # A draw u maps to factor 1 + 0.3 (2u - 1); u = 0.5 is neutral, u = 0.25 gives 0.85, u = 0.75 1.15.
    torch.testing.assert_close(_affine(x, [0.5, 0.5, 0.5, 0.5]), x)
    torch.testing.assert_close(_affine(x, [0.25, 0.5, 0.5, 0.5]), TF.adjust_brightness(x, 0.85))
    torch.testing.assert_close(_affine(x, [0.5, 0.75, 0.5, 0.5]), TF.adjust_contrast(x, 1.15))
    torch.testing.assert_close(_affine(x, [0.5, 0.5, 0.25, 0.5]), TF.adjust_saturation(x, 0.85))
    # Hue turns colour like torchvision's (red towards yellow for a positive shift) and leaves greys alone.
    red = torch.tensor([0.8, 0.2, 0.1]).view(1, 3, 1, 1)
    assert _affine(red, [0.5, 0.5, 0.5, 0.9])[0, 1] > red[0, 1] + 0.05
    assert TF.adjust_hue(red, 0.08)[0, 1] > red[0, 1] + 0.05
    grey = torch.full((1, 3, 2, 2), 0.4)
    torch.testing.assert_close(_affine(grey, [0.5, 0.5, 0.5, 0.9]), grey)


# ---------------------------------------------------------------------------------------------------------
# Bad input: each names the file and says what to do.


def _corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:60])


def _ids_outside_table(path: Path) -> None:
    ids = np.asarray(Image.open(path)).copy()
    ids[3, 5] = 40
    Image.fromarray(ids).save(path)


def _wrong_size(path: Path) -> None:
    Image.fromarray(np.zeros((SIZE[1], SIZE[0] - 8), dtype=np.uint8)).save(path)


def _colour_label(path: Path) -> None:
    Image.fromarray(np.zeros((SIZE[1], SIZE[0], 3), dtype=np.uint8)).save(path)


@pytest.mark.parametrize(
    "breakage, which, message",
    [
        (_corrupt, "image", "corrupt PNG"),
        (_corrupt, "label", "corrupt PNG"),
        (lambda p: p.write_bytes(b"not a png at all"), "image", "corrupt PNG"),
        (_ids_outside_table, "label", "label values 40 are not in the class table"),
        (_wrong_size, "label", "same size"),
        (_colour_label, "label", "single-channel"),
        (lambda p: p.unlink(), "label", "no label"),
    ],
)
def test_bad_inputs_name_the_file(cityscapes: Path, breakage, which: str, message: str):
    sample = list_samples(cityscapes, "val")[1]
    path = sample.image if which == "image" else sample.label
    breakage(path)
    with pytest.raises(UserError, match=message) as err:
        SegmentationDataset(cityscapes, "val", PROFILE, train=False)
    assert str(sample.image if message == "no label" else path) in str(err.value)


def test_bad_data_dir_and_empty_split(tmp_path: Path, cityscapes: Path):
    with pytest.raises(UserError, match="python tools/synthetic.py") as err:
        list_samples(tmp_path / "nowhere", "train")
    assert str(tmp_path / "nowhere") in str(err.value)
    with pytest.raises(UserError, match="no such directory"):
        list_samples(cityscapes, "test")
    (cityscapes / "leftImg8bit" / "test" / "aachen").mkdir(parents=True)
    with pytest.raises(UserError, match="has no images") as err:
        list_samples(cityscapes, "test")
    assert str(cityscapes / "leftImg8bit" / "test") in str(err.value)
    with pytest.raises(UserError, match="--label-resolution"):
        SegmentationDataset(cityscapes, "val", PROFILE, train=False, label_resolution="half")


def test_cpu_and_accelerator_colour_paths_agree():
    images = torch.randint(0, 256, (3, 3, 5, 9), dtype=torch.uint8)
    a, t = torch.randn(3, 3, 3) / 100, torch.randn(3, 3)
    torch.testing.assert_close(_affine_cpu(images, a, t), _affine_bmm(images.float(), a, t))
    torch.testing.assert_close(_channel_means_cpu(images), images.float().mean(dim=(2, 3)) / 255)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prepare_batch_on_cuda_matches_cpu():
    images = torch.randint(0, 256, (2, 3, 16, 24), dtype=torch.uint8).pin_memory()
    labels = torch.randint(0, 19, (2, 16, 24), dtype=torch.uint8).pin_memory()
    cpu, cpu_labels = prepare_batch(images, labels, "cpu", train=False)
    gpu, gpu_labels = prepare_batch(images, labels, "cuda", train=False, channels_last=True)
    assert gpu.is_cuda and gpu.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(gpu.cpu(), cpu)
    assert torch.equal(gpu_labels.cpu(), cpu_labels)
    gen = torch.Generator(device="cuda")
    first, _ = prepare_batch(images, labels, "cuda", train=True, generator=gen.manual_seed(5))
    again, _ = prepare_batch(images, labels, "cuda", train=True, generator=gen.manual_seed(5))
    assert torch.equal(first, again) and not torch.allclose(first, gpu)
    mean, std = (
        torch.tensor(MEAN, device="cuda").view(1, 3, 1, 1),
        torch.tensor(STD, device="cuda").view(1, 3, 1, 1),
    )
    back = first * std + mean
    assert back.min() >= -1e-5 and back.max() <= 1 + 1e-5


def test_bench_data_runs_both_modes(cityscapes: Path, monkeypatch, capsys):
    bench = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "bench_data.py"))
    argv = [
        "bench_data.py",
        "--data-dir",
        str(cityscapes),
        "--profile",
        "1",
        "--batches",
        "1",
        "--warmup",
        "1",
        "--workers",
        "0",
        "--batch-size",
        "2",
        "--threads",
        "1",
        "--scale-aug",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    threads = torch.get_num_threads()
    try:
        assert bench["main"]() == 0
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("images/s ") and float(lines[-1].split()[1]) > 0
    assert any(line.startswith("cache: built") for line in lines)
    for prefix in (
        "fast item CPU (1 thread): ",
        "fast loader alone (uint8 batches): ",
        "fast loader alone (uint8 batches), scale aug: ",
        "fast: ",
        "fast, scale aug: ",
        "plain: ",
        "ratio fast/plain",
    ):
        assert any(line.startswith(prefix) for line in lines), prefix
    assert any(line.startswith("plain:") for line in lines) and any(
        line.startswith("ratio") for line in lines
    )
