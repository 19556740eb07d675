"""The synthetic dataset: exact Cityscapes layout and label ids, determinism, safety of the output directory, CLI,
and a task that colour alone does not solve."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import Cityscapes

from fastseg.errors import UserError
from fastseg.synthetic import MARKER, ensure_dataset, generate, render

ROOT = Path(__file__).resolve().parents[1]
PARAMS = dict(train=4, val=2, test=1, width=128, height=64, seed=0, train_ids=True)
COUNTS = {"train": 4, "val": 2, "test": 1}
NAME = re.compile(r"^(?P<city>[a-z]+)_\d{6}_\d{6}$")

# The official tables, straight from torchvision, independent of the package's own lookup.
TABLE_IDS = {c.id for c in Cityscapes.classes if c.id >= 0}
TRAIN_LUT = np.full(256, 255, dtype=np.uint8)
for _c in Cityscapes.classes:
    if _c.id >= 0 and 0 <= _c.train_id < 255:
        TRAIN_LUT[_c.id] = _c.train_id


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synthetic") / "cityscapes", **PARAMS)


@pytest.fixture(scope="module")
def scenes() -> list[tuple[np.ndarray, np.ndarray]]:
    return [render(128, 64, seed=0, split="train", index=i) for i in range(16)]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != ".synthetic.lock"}


def test_layout_names_and_modes_are_those_of_cityscapes(dataset):
    cities = {}
    for split, n in COUNTS.items():
        images = sorted((dataset / "leftImg8bit" / split).glob("*/*"))
        assert len(images) == n
        cities[split] = {p.parent.name for p in images}
        for image in images:
            stem = image.name.removesuffix("_leftImg8bit.png")
            match = NAME.match(stem)
            assert match and match["city"] == image.parent.name, image.name
            gt = dataset / "gtFine" / split / image.parent.name
            assert sorted(p.name for p in gt.glob(f"{stem}_*")) == [
                f"{stem}_gtFine_labelIds.png", f"{stem}_gtFine_labelTrainIds.png"]
            with Image.open(image) as im:
                assert (im.format, im.mode, im.size) == ("PNG", "RGB", (128, 64))
            with Image.open(gt / f"{stem}_gtFine_labelIds.png") as lab:
                assert (lab.format, lab.mode, lab.size) == ("PNG", "L", (128, 64))
    assert cities["train"].isdisjoint(cities["val"]) and cities["val"].isdisjoint(cities["test"])
    assert json.loads((dataset / MARKER).read_text())["complete"] is True
    # torchvision's own reader finds every image and its label.
    ds = Cityscapes(str(dataset), split="train", mode="fine", target_type="semantic")
    assert len(ds) == COUNTS["train"]
    image, target = ds[0]
    assert image.size == target.size == (128, 64)


def test_labels_hold_table_ids_and_most_classes(scenes):
    seen = set()
    for rgb, label in scenes:
        assert rgb.shape == (64, 128, 3) and rgb.dtype == np.uint8
        assert label.shape == (64, 128) and label.dtype == np.uint8
        ids = set(np.unique(label).tolist())
        assert ids <= TABLE_IDS
        train = set(np.unique(TRAIN_LUT[label]).tolist()) - {255}
        assert len(train) >= 6  # every street has road, buildings, sky or trees, cars, people, poles...
        seen |= train
    assert len(seen) >= 15, sorted(seen)


@pytest.mark.parametrize("size", [(16, 16), (100, 300), (333, 77)])
def test_any_size(size):
    rgb, label = render(*size, seed=3, split="val", index=5)
    assert rgb.shape == (size[1], size[0], 3) and label.shape == (size[1], size[0])


def test_train_ids_are_the_official_mapping_and_test_labels_are_empty(dataset):
    for ids_path in sorted(dataset.glob("gtFine/*/*/*_gtFine_labelIds.png")):
        ids = np.asarray(Image.open(ids_path))
        train = np.asarray(Image.open(str(ids_path).replace("_labelIds", "_labelTrainIds")))
        np.testing.assert_array_equal(train, TRAIN_LUT[ids])
        if ids_path.parts[-3] == "test":  # Cityscapes ships no test annotations
            assert not ids.any()
        else:
            assert len(np.unique(ids)) >= 5


def test_same_seed_same_bytes_with_any_number_of_workers(dataset, tmp_path):
    again = generate(tmp_path / "again", **PARAMS, workers=2)
    assert files(again) == files(dataset)
    other = files(generate(tmp_path / "other", **{**PARAMS, "seed": 1}))
    for name, data in files(dataset).items():
        if name.endswith("_leftImg8bit.png"):
            assert other[name] != data, name


def test_same_parameters_are_a_no_op_and_other_parameters_are_refused(dataset):
    before = {p: p.stat().st_mtime_ns for p in dataset.rglob("*")}
    assert generate(dataset, **PARAMS) == dataset
    assert {p: p.stat().st_mtime_ns for p in dataset.rglob("*")} == before
    with pytest.raises(UserError, match="other parameters"):
        generate(dataset, **{**PARAMS, "train": 5})


def test_an_interrupted_run_is_finished_with_the_same_bytes(dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    marker = json.loads((copy / MARKER).read_text())
    (copy / MARKER).write_text(json.dumps({**marker, "complete": False}))
    victim = next(copy.glob("leftImg8bit/val/*/*.png"))
    victim.unlink()
    (victim.parent / f".{victim.name}.tmp-999").write_bytes(b"half a png")  # left by a killed writer
    generate(copy, **PARAMS)
    assert files(copy) == files(dataset)


def test_refuses_a_directory_that_is_not_a_synthetic_dataset(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a synthetic dataset") as err:
        generate(foreign, train=1, val=1, width=32, height=16)
    assert str(foreign) in str(err.value)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]  # untouched, not even a lock file
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        generate(tmp_path / "file", train=1, val=1, width=32, height=16)


@pytest.mark.parametrize("kwargs, flag", [
    (dict(width=0), "--width"), (dict(height=9000), "--height"), (dict(train=-1), "--train"),
    (dict(train=0, val=0), "--train/--val/--test"), (dict(seed=-2), "--seed"), (dict(workers=0), "--workers"),
    (dict(width=64.5), "--width"),
])
def test_bad_parameters_name_the_flag(tmp_path, kwargs, flag):
    with pytest.raises(UserError) as err:
        generate(tmp_path / "out", **{"train": 1, "val": 1, "width": 32, "height": 16, **kwargs})
    assert str(err.value).startswith(flag + ":")
    assert not (tmp_path / "out").exists()


def test_concurrent_callers_share_one_dataset(tmp_path):
    root = tmp_path / "shared"
    barrier = threading.Barrier(2)
    results, errors = [], []

    def call():
        barrier.wait()
        try:
            results.append(ensure_dataset(root, train=3, val=1, width=64, height=32))
        except Exception as exc:  # collected so the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [root, root]
    assert json.loads((root / MARKER).read_text())["complete"] is True
    assert len(list(root.glob("leftImg8bit/*/*/*.png"))) == 4
    assert not list(root.rglob(".*.tmp-*"))


def test_cli_writes_a_dataset_and_a_bad_flag_is_one_line_with_status_2(tmp_path):
    cmd = [sys.executable, "-m", "fastseg.synthetic"]
    # Both at once: each pays for importing torch, and there are two cores.
    good = subprocess.Popen([*cmd, str(tmp_path / "good"), "--train", "2", "--val", "1", "--width", "64",
                             "--height", "32", "--train-ids", "--workers", "2"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    bad = subprocess.Popen([*cmd, str(tmp_path / "bad"), "--width", "0"], cwd=ROOT, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = good.communicate(timeout=120)
    assert good.returncode == 0, err
    assert "synthetic Cityscapes" in out
    assert len(list((tmp_path / "good").glob("gtFine/*/*/*_gtFine_labelTrainIds.png"))) == 3
    out, err = bad.communicate(timeout=120)
    assert bad.returncode == 2
    assert err.strip().splitlines() == [err.strip()] and err.startswith("error: --width:")
    assert not (tmp_path / "bad").exists()


def test_colour_alone_does_not_decide_the_class_but_context_helps(scenes):
    """Best per-colour guess (a lookup table fitted on half the scenes) against the same with the image row."""
    rgb = np.stack([s[0] for s in scenes])
    label = TRAIN_LUT[np.stack([s[1] for s in scenes])]
    n, h, w, _ = rgb.shape
    q = (rgb >> 5).astype(np.int64)  # 8 levels per channel
    colour = (q[..., 0] << 6) | (q[..., 1] << 3) | q[..., 2]
    row = np.broadcast_to(np.arange(h)[None, :, None] // 8, (n, h, w))

    def lookup_accuracy(key: np.ndarray, bins: int) -> float:
        fit, held = slice(0, n // 2), slice(n // 2, n)
        k, y = key[fit].ravel(), label[fit].ravel()
        counts = np.zeros((bins, 256), dtype=np.int64)
        np.add.at(counts, (k[y < 255], y[y < 255]), 1)
        k, y = key[held].ravel(), label[held].ravel()
        return float((counts.argmax(1)[k[y < 255]] == y[y < 255]).mean())

    by_colour = lookup_accuracy(colour, 512)
    by_colour_and_row = lookup_accuracy(colour * 8 + row, 512 * 8)
    majority = float((label[label < 255] == np.bincount(label[label < 255]).argmax()).mean())
    assert majority < by_colour < 0.75, (majority, by_colour)
    assert by_colour_and_row > by_colour + 0.05, (by_colour, by_colour_and_row)
