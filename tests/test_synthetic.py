"""The synthetic dataset (tools/synthetic.py): the Cityscapes layout and label ids, all 19 training classes,
determinism, reuse and refusal of the output directory, the command line, and cues a model can learn."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import Cityscapes

from fastseg.errors import UserError
from tools.synthetic import MARKER, generate, render

ROOT = Path(__file__).resolve().parents[1]
PARAMS = dict(train=4, val=2, width=128, height=64, seed=0, train_ids=True)
NAME = re.compile(r"^(?P<city>[a-z]+)_\d{6}_000019$")

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
    """The training images every trainer test uses (tests/conftest.py: 16 at 128×64, seed 0)."""
    return [render(128, 64, seed=0, split="train", index=i) for i in range(16)]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_names_and_modes_are_those_of_cityscapes(dataset):
    cities = {}
    for split in ("train", "val"):
        images = sorted((dataset / "leftImg8bit" / split).glob("*/*"))
        assert len(images) == PARAMS[split]
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
    assert cities["train"].isdisjoint(cities["val"])
    assert sorted(p.name for p in dataset.iterdir()) == ["gtFine", "leftImg8bit", MARKER]  # no temp files left
    assert json.loads((dataset / MARKER).read_text())["complete"] is True
    # torchvision's own reader finds every image and its label.
    ds = Cityscapes(str(dataset), split="train", mode="fine", target_type="semantic")
    assert len(ds) == PARAMS["train"]
    image, target = ds[0]
    assert image.size == target.size == (128, 64)


def test_label_files_hold_table_ids_and_train_ids_are_the_official_mapping(dataset):
    label_files = sorted(dataset.glob("gtFine/*/*/*_gtFine_labelIds.png"))
    assert len(label_files) == PARAMS["train"] + PARAMS["val"]
    for ids_path in label_files:
        ids = np.asarray(Image.open(ids_path))
        assert set(np.unique(ids).tolist()) <= TABLE_IDS
        train = np.asarray(Image.open(str(ids_path).replace("_labelIds", "_labelTrainIds")))
        np.testing.assert_array_equal(train, TRAIN_LUT[ids])


def test_every_pixel_is_a_training_class_and_a_few_images_hold_all_19(scenes):
    seen = set()
    for rgb, label in scenes:
        assert rgb.shape == (64, 128, 3) and rgb.dtype == np.uint8
        assert label.shape == (64, 128) and label.dtype == np.uint8
        train = TRAIN_LUT[label]
        assert (train < 19).all()  # nothing unlabeled or ignored
        classes = set(np.unique(train).tolist())
        assert len(classes) >= 8, classes  # a street: road, sidewalk, buildings, sky, cars, poles, people...
        seen |= classes
    assert seen == set(range(19)), sorted(set(range(19)) - seen)


@pytest.mark.parametrize("size", [(16, 16), (100, 300), (333, 77)])
def test_any_size(size):
    rgb, label = render(*size, seed=3, split="val", index=5)
    assert rgb.shape == (size[1], size[0], 3) and label.shape == (size[1], size[0])


def test_same_seed_same_bytes_and_each_image_its_own(dataset, tmp_path):
    assert files(generate(tmp_path / "again", **PARAMS)) == files(dataset)
    other = files(generate(tmp_path / "other", **{**PARAMS, "seed": 1}))
    images = {name: data for name, data in files(dataset).items() if name.endswith("_leftImg8bit.png")}
    assert len(set(images.values())) == len(images)  # no two images alike, across splits too
    for name, data in images.items():
        assert other[name] != data, name


def test_a_complete_dataset_is_reused_and_another_one_refused(dataset, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in dataset.rglob("*")}
    assert generate(dataset, **PARAMS) == dataset
    assert {p: p.stat().st_mtime_ns for p in dataset.rglob("*")} == before
    with pytest.raises(UserError, match="other parameters"):
        generate(dataset, **{**PARAMS, "train": 5})
    older = tmp_path / "older"  # drawn by a previous version of the generator
    shutil.copytree(dataset, older)
    marker = json.loads((older / MARKER).read_text())
    (older / MARKER).write_text(json.dumps({**marker, "version": marker["version"] - 1}))
    with pytest.raises(UserError, match="another version") as err:
        generate(older, **PARAMS)
    assert str(older) in str(err.value) and "delete it" in str(err.value)


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
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]  # untouched
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        generate(tmp_path / "file", train=1, val=1, width=32, height=16)


@pytest.mark.parametrize("kwargs, flag", [
    (dict(width=0), "--width"), (dict(height=9000), "--height"), (dict(train=-1), "--train"),
    (dict(train=0, val=0), "--train/--val"), (dict(seed=-2), "--seed"), (dict(width=64.5), "--width"),
    (dict(val=True), "--val"),
])
def test_bad_parameters_name_the_flag(tmp_path, kwargs, flag):
    with pytest.raises(UserError) as err:
        generate(tmp_path / "out", **{"train": 1, "val": 1, "width": 32, "height": 16, **kwargs})
    assert str(err.value).startswith(flag + ":")
    assert not (tmp_path / "out").exists()


def test_cli_from_any_directory_and_each_mistake_is_one_line_with_status_2(tmp_path):
    script = str(ROOT / "tools" / "synthetic.py")
    mistakes = {"--width": ["--width", "0"], "argument --height": ["--height", "tall"],
                "--train/--val": ["--train", "0", "--val", "0"]}
    # All at once: each pays for importing torch, and there are two cores. Run from elsewhere, as users may.
    good = subprocess.Popen([sys.executable, script, "good", "--train", "2", "--val", "1", "--width", "64",
                             "--height", "32", "--train-ids"], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    bad = {flag: subprocess.Popen([sys.executable, script, f"bad{i}", *args], cwd=tmp_path, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for i, (flag, args) in enumerate(mistakes.items())}
    out, err = good.communicate(timeout=120)
    assert good.returncode == 0, err
    assert "synthetic Cityscapes (2 train, 1 val, 64x32)" in out
    assert len(list((tmp_path / "good").glob("gtFine/*/*/*_gtFine_labelTrainIds.png"))) == 3
    for flag, proc in bad.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (flag, err)
        assert err.strip().splitlines() == [err.strip()] and err.startswith(f"error: {flag}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good"]  # mistakes create nothing


def test_colour_alone_does_not_decide_the_class_but_context_helps(scenes):
    """Best per-colour guess (a lookup table fitted on half the scenes) against the same with the image row:
    colour tells classes apart better than the majority class does, but place matters too."""
    rgb = np.stack([s[0] for s in scenes])
    label = TRAIN_LUT[np.stack([s[1] for s in scenes])]
    n, h, w, _ = rgb.shape
    q = (rgb >> 5).astype(np.int64)  # 8 levels per channel
    colour = (q[..., 0] << 6) | (q[..., 1] << 3) | q[..., 2]
    row = np.broadcast_to(np.arange(h)[None, :, None] // 8, (n, h, w))

    def lookup_accuracy(key: np.ndarray, bins: int) -> float:
        fit, held = slice(0, n // 2), slice(n // 2, n)
        counts = np.zeros((bins, 256), dtype=np.int64)
        np.add.at(counts, (key[fit].ravel(), label[fit].ravel()), 1)
        return float((counts.argmax(1)[key[held].ravel()] == label[held].ravel()).mean())

    by_colour = lookup_accuracy(colour, 512)
    by_colour_and_row = lookup_accuracy(colour * 8 + row, 512 * 8)
    majority = float((label == np.bincount(label.ravel()).argmax()).mean())
    assert majority + 0.1 < by_colour < 0.75, (majority, by_colour)
    assert by_colour_and_row > by_colour + 0.05, (by_colour, by_colour_and_row)
