"""The packages of --export-submission, run as their consumers run them: each unpacked into an empty folder and
run in a subprocess from there, with nothing of this repo importable (the grader's zip through a stand-in of the
grader's loop, the Docker entry point through `python predict.py` and its three environment variables). Their
train ids, scored with the project's confusion matrix, give the mIoU evaluate_efficiency.py reported."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate_efficiency
from fastseg import deploy
from fastseg.augment import prepare_batch
from fastseg.cityscapes import list_samples, load_sample, read_label
from fastseg.errors import UserError
from fastseg.metrics import ConfusionMatrix
from fastseg.models import build_model

# Not the images' 128×64: the package must resize down to the profile's size and upsample the logits back.
RESIZE = [96, 48]

# The grader's loop, as the course's grader runs a zip: import model.py and process_data.py from the working
# directory, build Model() with no arguments, load model.pth strictly, then per image preprocess, forward,
# postprocess. It first checks that nothing of this repo can be imported.
GRADER = '''
import importlib.util, os, sys
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.getcwd())
for name in ("fastseg", "fast_scnn", "evaluate_efficiency", "train"):
    assert importlib.util.find_spec(name) is None, f"{name} is importable: the package is not on its own"
from model import Model
from process_data import postprocess, preprocess

images, out = sys.argv[1], sys.argv[2]
model = Model()
model.load_state_dict(torch.load("model.pth", map_location="cpu", weights_only=True), strict=True)
model.eval()
with torch.no_grad():
    for name in sorted(os.listdir(images)):
        img = Image.open(os.path.join(images, name))
        prediction = model(preprocess(img))
        np.save(os.path.join(out, name + ".npy"), postprocess(prediction, (img.height, img.width)))
'''


def _sharp(model: torch.nn.Module, scale: float, *classifiers: torch.nn.Conv2d) -> torch.nn.Module:
    # An untrained head gives nearly flat logits (std ~1e-3): scaled up, they spread over many classes, and the
    # argmax no longer hangs on rounding, so the mIoU of two runs of the same model compares to 1e-3.
    with torch.no_grad():
        for conv in classifiers:
            conv.weight.mul_(scale)
            conv.bias.zero_()
    return model.eval()


def _save(path: Path, model: torch.nn.Module, **config) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "epoch": 1, "metrics": {},
                "config": {"num_classes": 19, "aux": False, "profile": 1, "resize": RESIZE, **config}}, path)
    return path


@pytest.fixture(scope="module")
def exported(synthetic_root, tmp_path_factory):
    """A Fast-SCNN of width 0.5 trained with its auxiliary heads and a torchvision LR-ASPP, scored and exported
    by evaluate_efficiency.py: ``(report rows by checkpoint, export folder)``."""
    root = tmp_path_factory.mktemp("submission")
    torch.manual_seed(0)
    fast = build_model("fast_scnn", aux=True, width_mult=0.5, init="kaiming")  # the scale _sharp was set for
    _save(root / "ckpt" / "fast" / "best.pth", _sharp(fast, 1e5, fast.classifier.conv[1]),
          arch="fast_scnn", width_mult=0.5, aux=True)
    lraspp = build_model("lraspp_mobilenet_v3_large")
    _save(root / "ckpt" / "lraspp" / "best.pth", _sharp(lraspp, 300, lraspp.classifier.high_classifier, lraspp.classifier.low_classifier),
          arch="lraspp_mobilenet_v3_large", width_mult=1.0)
    out = root / "submit"
    assert evaluate_efficiency.main([
        "--current-model-path", str(root / "ckpt" / "*" / "best.pth"), "--data-dir", str(synthetic_root),
        "--skip-speed", "--export-submission", str(out), "--output", str(root / "r.json"), "--plots", "none",
        "--device", "cpu", "--num-workers", "0"]) == 0
    rows = json.loads((root / "r.json").read_text())["results"]
    return {row["checkpoint"]: row for row in rows}, out


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell outside this repo: no PYTHONPATH, the test's thread count."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="2", **extra)
    return env


def _val_images(synthetic_root: Path, folder: Path) -> list:
    """The full-size val images, copied into one folder as a user would hand them over; their samples."""
    folder.mkdir()
    samples = list_samples(synthetic_root, "val")
    for sample in samples:
        shutil.copy(sample.image, folder / sample.image.name)
    return samples


def _score(samples, predictions: dict[str, np.ndarray]) -> float:
    cm = ConfusionMatrix(19)
    for sample in samples:
        pred = predictions[sample.image.name]
        label = read_label(sample.label)
        assert pred.shape == label.shape, sample.name  # the original size, not the model's
        assert pred.dtype == np.uint8 and pred.max() <= 18, sample.name
        cm.update(torch.from_numpy(label), torch.from_numpy(pred.astype(np.int64)))
    return cm.compute()["miou"]


@pytest.mark.parametrize("checkpoint", ["fast/best.pth", "lraspp/best.pth"])
def test_zip_run_by_a_grader_loop_from_an_empty_folder_scores_the_reported_miou(
    exported, synthetic_root, tmp_path, checkpoint
):
    rows, out = exported
    row = rows[checkpoint]
    package = out / Path(row["submission_dir"]).name
    assert package == Path(row["submission_dir"])
    with zipfile.ZipFile(package / "codalab.zip") as archive:
        assert sorted(archive.namelist()) == ["model.pth", "model.py", "process_data.py"]
        unpacked = tmp_path / "unpacked"
        unpacked.mkdir()
        archive.extractall(unpacked)
    # The unpacked folder beside the zip holds the same files.
    for name in ("model.py", "model.pth", "process_data.py"):
        assert (package / "codalab" / name).read_bytes() == (unpacked / name).read_bytes()
    samples = _val_images(synthetic_root, tmp_path / "images")
    (tmp_path / "pred").mkdir()
    grader = tmp_path / "grader.py"
    grader.write_text(GRADER)
    subprocess.run([sys.executable, str(grader), str(tmp_path / "images"), str(tmp_path / "pred")],
                   cwd=unpacked, env=_clean_env(), check=True)
    predictions = {p.name[: -len(".npy")]: np.load(p) for p in (tmp_path / "pred").glob("*.npy")}
    miou = _score(samples, predictions)
    assert 0 < row["miou"] < 1
    assert miou == pytest.approx(row["miou"], abs=1e-3)
    assert len({int(v) for p in predictions.values() for v in np.unique(p)}) >= 3  # a comparison that can fail


def test_docker_entry_point_from_an_empty_folder_scores_the_reported_miou(exported, synthetic_root, tmp_path):
    # (LR-ASPP's entry point differs from Fast-SCNN's in model.py only, which its zip test runs.)
    rows, _ = exported
    row = rows["fast/best.pth"]
    source = Path(row["submission_dir"]) / "docker"
    assert sorted(p.name for p in source.iterdir()) == sorted(
        ["Dockerfile", "predict.py", "model.py", "model.pt", "model.onnx", "requirements.txt"])
    app = tmp_path / "app"
    shutil.copytree(source, app)
    samples = _val_images(synthetic_root, tmp_path / "data")
    # The container runs model.onnx with onnxruntime; model.pt with PyTorch is the same model.
    dockerfile = (app / "Dockerfile").read_text()
    assert "COPY model.py predict.py model.pt model.onnx ./" in dockerfile and "MODEL_PATH=/app/model.onnx" in dockerfile
    requirements = (app / "requirements.txt").read_text().split()
    assert [r.split("==")[0] for r in requirements] == ["torch", "torchvision", "numpy", "pillow", "onnxruntime"]
    for model_file in ("model.onnx", "model.pt"):
        output = tmp_path / f"output-{model_file}"
        env = _clean_env(IMAGE_DIR=str(tmp_path / "data"), OUTPUT_DIR=str(output), MODEL_PATH=str(app / model_file))
        # As the container runs `python /app/predict.py`: predict.py's own folder first on the import path.
        subprocess.run([sys.executable, "predict.py"], cwd=app, env=env, check=True)
        written = sorted(p.name for p in output.iterdir())
        assert written == sorted(s.image.name for s in samples)  # same names, nothing else
        predictions = {name: np.array(Image.open(output / name)) for name in written}
        assert _score(samples, predictions) == pytest.approx(row["miou"], abs=1e-3), model_file


def _export_fails(*args, **kwargs):
    raise RuntimeError("Failed to convert the exported program\nsee the stack trace")


@pytest.mark.parametrize("cause, reason", [
    ("no onnxruntime", "onnxruntime is not installed"),
    ("export fails", "the ONNX export failed (RuntimeError: Failed to convert the exported program)"),
])
def test_without_onnxruntime_the_docker_package_runs_pytorch(exported, tmp_path, monkeypatch, capsys, cause, reason):
    # PyTorch 2.5's exporter, for one, fails on LR-ASPP: the zip and the PyTorch container must still be written.
    rows, _ = exported
    row = rows["fast/best.pth"]
    out = Path(row["submission_dir"]).parent
    stale = tmp_path / "submit" / "best" / "docker" / "model.onnx"  # a package exported before, with onnxruntime
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    if cause == "no onnxruntime":
        monkeypatch.setattr(deploy, "onnxruntime_available", lambda: False)
    else:
        monkeypatch.setattr(deploy, "export_onnx", _export_fails)
    checkpoint = out.parent / "ckpt" / "fast" / "best.pth"
    assert evaluate_efficiency.main([
        "--current-model-path", str(checkpoint), "--skip-accuracy", "--skip-speed", "--export-submission",
        str(tmp_path / "submit"), "--output", "none", "--plots", "none", "--device", "cpu"]) == 0
    docker = tmp_path / "submit" / "best" / "docker"
    assert sorted(p.name for p in docker.iterdir()) == sorted(
        ["Dockerfile", "predict.py", "model.py", "model.pt", "requirements.txt"])
    assert "MODEL_PATH=/app/model.pt" in (docker / "Dockerfile").read_text()
    assert "onnxruntime" not in (docker / "requirements.txt").read_text()
    err = capsys.readouterr().err
    assert f"note: {docker} runs PyTorch, not onnxruntime (2.6-2.8x faster" in err
    assert err.rstrip().endswith(reason)
    assert (tmp_path / "submit" / "best" / "codalab.zip").is_file()


def test_docker_entry_point_without_images_says_which_variable(exported, tmp_path):
    rows, _ = exported
    app = Path(rows["fast/best.pth"]["submission_dir"]) / "docker"
    (tmp_path / "empty").mkdir()
    env = _clean_env(IMAGE_DIR=str(tmp_path / "empty"), OUTPUT_DIR=str(tmp_path / "o"), MODEL_PATH=str(app / "model.pt"))
    result = subprocess.run([sys.executable, str(app / "predict.py")], cwd=tmp_path, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: IMAGE_DIR {tmp_path / 'empty'}: no *.png images there; set IMAGE_DIR to the folder of images"]


def test_docker_entry_point_without_onnxruntime_says_so_in_one_line(exported, synthetic_root, tmp_path):
    # Run outside the container, where onnxruntime may be missing: a stand-in package that fails to import.
    rows, _ = exported
    app = Path(rows["fast/best.pth"]["submission_dir"]) / "docker"
    blocked = tmp_path / "blocked" / "onnxruntime"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('No module named onnxruntime')\n")
    _val_images(synthetic_root, tmp_path / "data")
    env = _clean_env(IMAGE_DIR=str(tmp_path / "data"), OUTPUT_DIR=str(tmp_path / "o"),
                     MODEL_PATH=str(app / "model.onnx"), PYTHONPATH=str(tmp_path / "blocked"))
    result = subprocess.run([sys.executable, str(app / "predict.py")], cwd=tmp_path, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: MODEL_PATH {app / 'model.onnx'} needs onnxruntime, which is not installed: "
        "pip install -r requirements.txt, or set MODEL_PATH to model.pt (PyTorch)"]
    assert not (tmp_path / "o").exists()


def test_preprocess_gives_the_evaluations_input_bit_for_bit(exported, synthetic_root):
    rows, _ = exported
    path = Path(rows["fast/best.pth"]["submission_dir"]) / "codalab" / "process_data.py"
    spec = importlib.util.spec_from_file_location("exported_process_data", path)
    process_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(process_data)
    sample = list_samples(synthetic_root, "val")[0]
    image, label = load_sample(sample, (RESIZE[1], RESIZE[0]))  # what the val cache stores
    expected, _ = prepare_batch(image[None], label[None], "cpu", train=False)
    with Image.open(sample.image) as img:
        assert torch.equal(process_data.preprocess(img), expected)


def test_export_into_a_file_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="--export-submission: .* is a file"):
        evaluate_efficiency.parse_args(["--export-submission", str(tmp_path / "file")])
