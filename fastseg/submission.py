"""Packages that a user uploads or deploys, written from a checkpoint: they run with nothing of this repo.

For a checkpoint, :func:`export_submission` writes under ``<dir>/``::

    codalab/            the grader's format: model.py (``Model()``, no arguments), model.pth (its state_dict,
                        loaded with strict=True), process_data.py (``preprocess(img)``, ``postprocess(prediction,
                        shape)``)
    codalab.zip         the same three files at the root of a zip, ready to upload
    docker/             Dockerfile, predict.py (every *.png of $IMAGE_DIR -> a train-id PNG of the same name in
                        $OUTPUT_DIR, model from $MODEL_PATH), model.py, model.pt, requirements.txt, and
                        model.onnx when onnxscript and onnxruntime are installed: the container then runs it with
                        onnxruntime, the fastest CPU path measured (docs/deploy.md)

Both need torch, torchvision, numpy and pillow only (and onnxruntime for model.onnx). Their pre- and post-processing are the evaluation's own
(``fastseg.cityscapes.read_image``/``resize_image``, ``fastseg.augment.prepare_batch`` without jitter,
``fastseg.engine.upsample_logits`` then the argmax), so a package scores what ``evaluate_efficiency.py`` reported;
``tests/test_submission.py`` runs each one from an empty folder and checks that.
"""

from __future__ import annotations

import inspect
import zipfile
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

import fast_scnn
from fastseg import deploy
from fastseg.checkpoint import atomic_path, atomic_save, atomic_write_text
from fastseg.cityscapes import MEAN, STD, Profile
from fastseg.errors import UserError

# What the packages need; torch and torchvision at the versions this repo pins (its checkpoints load there).
PACKAGE_REQUIREMENTS = (f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}",
                        "numpy", "pillow")

# The files of the grader's zip, as it expects them.
CODALAB_FILES = ("model.py", "model.pth", "process_data.py")

# --------------------------------------------------------------------------------------------------
# model.py
# --------------------------------------------------------------------------------------------------

_FAST_SCNN_MODEL = '''

class Model(FastSCNN):
    """The exported checkpoint's Fast-SCNN: {num_classes} classes, width_mult {width_mult!r}, without the
    training-only auxiliary heads. Built with no arguments, as the grader does."""

    def __init__(self):
        super().__init__(num_classes={num_classes}, width_mult={width_mult!r}, aux=False)


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """BatchNorm folded into the convolutions and channels_last: the form evaluate_efficiency.py timed."""
    return fold_batchnorm(model).to(memory_format=torch.channels_last)
'''

_TORCHVISION_MODEL = '''"""The exported checkpoint's {arch} (torchvision), returning the logits at the input's size."""

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import segmentation


class Model(nn.Module):
    """{arch} with {num_classes} classes, without the training-only auxiliary classifier; built with no
    arguments, as the grader does. The state_dict keys are torchvision's (backbone.*, classifier.*)."""

    def __init__(self):
        super().__init__()
        net = segmentation.{arch}(weights=None, weights_backbone=None, num_classes={num_classes})
        self.backbone = net.backbone
        self.classifier = net.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        out = self.classifier({head_input})
        # Bilinear with align_corners=False, as torchvision's models were designed and trained.
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


def prepare_for_inference(model: nn.Module) -> nn.Module:
    return model.eval()
'''


def model_source(config: dict[str, Any]) -> str:
    """model.py for a checkpoint's ``config`` (arch, num_classes, width_mult): a ``Model`` class built with no
    arguments and a ``prepare_for_inference(model)`` for the Docker entry point.

    Fast-SCNN's is this repo's fast_scnn.py (torch only, written to be copied) up to its command-line summary,
    with ``Model`` bound to the checkpoint's width; torchvision's builds torchvision's own model.
    """
    from fastseg.models import ARCHS

    arch = config.get("arch", "fast_scnn")
    num_classes = int(config.get("num_classes", 19))
    if arch == "fast_scnn":
        source = inspect.getsource(fast_scnn)
        cut = source.find("\ndef _summary(")
        alias = "\nModel = FastSCNN\n"
        if cut < 0 or alias not in source:
            raise RuntimeError("fast_scnn.py changed: model_source() no longer finds `Model = FastSCNN` and _summary")
        source = source[:cut].rstrip() + "\n"
        width_mult = float(config.get("width_mult", 1.0))
        return source.replace(alias, _FAST_SCNN_MODEL.format(num_classes=num_classes, width_mult=width_mult) + "\n")
    if arch in ARCHS:
        head_input = "features" if arch.startswith("lraspp") else 'features["out"]'
        return _TORCHVISION_MODEL.format(arch=arch, num_classes=num_classes, head_input=head_input)
    raise UserError(f"--export-submission: {arch!r} is not an architecture this repo builds; "
                    "export a checkpoint trained with train.py")


# --------------------------------------------------------------------------------------------------
# process_data.py and predict.py: the evaluation's pre- and post-processing, written once
# --------------------------------------------------------------------------------------------------

_PROCESSING = '''
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

INPUT_SIZE = {input_hw!r}  # (height, width) the model was evaluated at: the profile's resize
MEAN = {mean!r}  # the training normalisation, on the 0-1 scale
STD = {std!r}
# One scale and one offset per channel, computed in float32 as the evaluation computes them, so that the
# model's input is the evaluation's bit for bit.
_INV_STD = 1 / torch.tensor(STD)
SCALE = (_INV_STD / 255).tolist()
OFFSET = (-torch.tensor(MEAN) * _INV_STD).tolist()


def preprocess(img: Image.Image) -> torch.Tensor:
    """A PIL image (any size, RGB or convertible) -> the model's 1x3xHxW float32 input at INPUT_SIZE."""
    rgb = np.array(img if img.mode == "RGB" else img.convert("RGB"))
    x = torch.from_numpy(rgb).permute(2, 0, 1)
    if tuple(x.shape[-2:]) != INPUT_SIZE:
        # Bilinear with antialiasing on uint8, as the evaluation resized the images.
        x = F.interpolate(x[None], size=INPUT_SIZE, mode="bilinear", antialias=True, align_corners=False)[0]
    batch = torch.empty((1, 3, *INPUT_SIZE), dtype=torch.float32)
    for c in range(3):
        torch.mul(x[c], SCALE[c], out=batch[0, c])
        batch[0, c].add_(OFFSET[c])
    return batch


def postprocess(prediction, shape) -> np.ndarray:
    """The model's output and the original image's (height, width) -> an HxW uint8 array of train ids 0-18.

    The logits are upsampled (bilinear) to the original size before the argmax: what the evaluation
    scored. Taking the argmax at the model's size and resizing the ids costs accuracy at class borders.
    """
    if isinstance(prediction, dict):  # a torchvision model called directly
        prediction = prediction["out"]
    if isinstance(prediction, (tuple, list)):  # a model with auxiliary outputs: the first is the main one
        prediction = prediction[0]
    logits = torch.as_tensor(prediction).float()
    if logits.dim() == 3:
        logits = logits[None]
    size = (int(shape[0]), int(shape[1]))
    if tuple(logits.shape[-2:]) != size:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits[0].argmax(0).to(torch.uint8).numpy()
'''

_PROCESS_DATA_HEADER = '''"""Pre- and post-processing of the exported model, exactly as evaluate_efficiency.py scored it.

The grader runs, per image:  batch = preprocess(img); prediction = Model()(batch);
train_ids = postprocess(prediction, (img.height, img.width)).
"""
'''

_PREDICT_HEADER = '''"""Segment every *.png of IMAGE_DIR into a train-id PNG (0-18) of the same name in OUTPUT_DIR.

    IMAGE_DIR=/data OUTPUT_DIR=/output MODEL_PATH=/app/{model_file} python predict.py

The three environment variables default to the container's paths. MODEL_PATH may name model.onnx (run by
onnxruntime, the faster CPU path) or model.pt (run by PyTorch); both give the same predictions. Pre- and post-processing are
the evaluation's, so the predictions score what evaluate_efficiency.py reported.
"""

import os
import sys
from pathlib import Path
'''

_PREDICT_MAIN = '''
from model import Model, prepare_for_inference

IMAGE_DIR = Path(os.environ.get("IMAGE_DIR", "/data"))
OUTPUT_DIR = Path(os.environ.get("OUTPUT_DIR", "/output"))
MODEL_PATH = Path(os.environ.get("MODEL_PATH", "/app/{model_file}"))


def load(path: Path):
    """The forward pass: onnxruntime on a .onnx file (BatchNorm folded at export), else PyTorch on model.pt."""
    if path.suffix == ".onnx":
        import numpy as np
        try:
            import onnxruntime
        except ImportError:
            print(f"error: MODEL_PATH {{path}} needs onnxruntime, which is not installed: "
                  "pip install -r requirements.txt, or set MODEL_PATH to model.pt (PyTorch)", file=sys.stderr)
            sys.exit(2)

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda batch: torch.from_numpy(session.run(None, {{"image": np.ascontiguousarray(batch.numpy())}})[0])
    model = Model()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    model = prepare_for_inference(model.eval())
    return lambda batch: model(batch.contiguous(memory_format=torch.channels_last))


def main() -> int:
    if not MODEL_PATH.is_file():
        print(f"error: MODEL_PATH {{MODEL_PATH}}: no such file; set MODEL_PATH to the exported model.onnx or model.pt",
              file=sys.stderr)
        return 2
    images = sorted(IMAGE_DIR.glob("*.png")) if IMAGE_DIR.is_dir() else []
    if not images:
        print(f"error: IMAGE_DIR {{IMAGE_DIR}}: no *.png images there; set IMAGE_DIR to the folder of images",
              file=sys.stderr)
        return 2
    forward = load(MODEL_PATH)
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        for path in images:
            with Image.open(path) as img:
                img.load()
                shape = (img.height, img.width)
                batch = preprocess(img)
            train_ids = postprocess(forward(batch), shape)
            tmp = OUTPUT_DIR / f".{{path.name}}.tmp"
            Image.fromarray(train_ids).save(tmp, format="PNG")
            os.replace(tmp, OUTPUT_DIR / path.name)  # never a half-written prediction
    print(f"wrote {{len(images)}} prediction(s) to {{OUTPUT_DIR}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''

_DOCKERFILE = '''# Build:  docker build -t fastseg-predict .
# Run:    docker run --rm -v "$PWD/images:/data:ro" -v "$PWD/out:/output" fastseg-predict
FROM python:3.12-slim
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt
COPY {files} ./
ENV IMAGE_DIR=/data OUTPUT_DIR=/output MODEL_PATH=/app/{model_file}
CMD ["python", "/app/predict.py"]
'''


def processing_source(input_hw: tuple[int, int]) -> str:
    """The body of process_data.py (and of predict.py): preprocess and postprocess at ``input_hw``."""
    return _PROCESSING.format(input_hw=tuple(int(v) for v in input_hw), mean=tuple(MEAN), std=tuple(STD))


# --------------------------------------------------------------------------------------------------
# Writing the packages
# --------------------------------------------------------------------------------------------------


def export_submission(model: nn.Module, config: dict[str, Any], profile: Profile,
                      out_dir: str | Path) -> tuple[Path, str | None]:
    """Write both packages of ``model`` (built by ``load_model``: eval mode, no auxiliary heads) for the
    checkpoint's ``config`` at ``profile``'s input size into ``out_dir``.

    Returns ``out_dir`` and, when the Docker package runs PyTorch rather than onnxruntime, why (None when it
    has its ``model.onnx``). The weights are the model's own state_dict (BatchNorm not folded), so
    ``Model().load_state_dict(..., strict=True)`` takes them as they are.
    """
    out_dir = Path(out_dir)
    model_py = model_source(config)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if set(state) != set(_fresh_model_keys(model_py)):
        raise RuntimeError("the exported Model() does not have the checkpoint's state_dict keys")
    processing = processing_source(profile.resize_hw)

    codalab = out_dir / "codalab"
    atomic_write_text(codalab / "model.py", model_py)
    atomic_save(state, codalab / "model.pth")
    atomic_write_text(codalab / "process_data.py", _PROCESS_DATA_HEADER + processing)
    with (atomic_path(out_dir / "codalab.zip", suffix=".zip") as tmp,
          zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive):
        for name in CODALAB_FILES:
            archive.write(codalab / name, arcname=name)

    docker = out_dir / "docker"
    atomic_write_text(docker / "model.py", model_py)
    atomic_save(state, docker / "model.pt")
    files, requirements = ["model.py", "predict.py", "model.pt"], list(PACKAGE_REQUIREMENTS)
    # The container runs onnxruntime where it can: 2.6-2.8x PyTorch's speed at 2048x1024 (docs/deploy.md).
    no_onnx = onnx_unavailable()
    if no_onnx is None:
        try:
            deploy.export_onnx(model, tuple(profile.resize_hw), docker / "model.onnx")
        except Exception as exc:  # the exporter's coverage depends on the PyTorch version and the architecture
            no_onnx = f"the ONNX export failed ({deploy.export_error(exc)})"
    if no_onnx is None:
        import onnxruntime

        files.append("model.onnx")
        requirements.append(f"onnxruntime=={onnxruntime.__version__.split('+')[0]}")
    else:
        (docker / "model.onnx").unlink(missing_ok=True)  # a package exported before must not keep a stale one
    model_file = files[-1]
    atomic_write_text(docker / "predict.py", _PREDICT_HEADER.format(model_file=model_file) + processing
                      + _PREDICT_MAIN.format(model_file=model_file))
    atomic_write_text(docker / "requirements.txt", "\n".join(requirements) + "\n")
    atomic_write_text(docker / "Dockerfile", _DOCKERFILE.format(files=" ".join(files), model_file=model_file))
    return out_dir, no_onnx


def onnx_unavailable() -> str | None:
    """Why this environment cannot give the Docker package its model.onnx, or None when it can."""
    missing = deploy.onnx_exporter_missing(torch.onnx.export)
    if missing:
        return f"torch {torch.__version__}'s ONNX exporter has no {missing} (PyTorch 2.5 or newer has)"
    if not deploy.onnx_export_available():
        return "onnxscript (the ONNX exporter's dependency) is not installed"
    if not deploy.onnxruntime_available():
        return "onnxruntime is not installed"
    return None


def _fresh_model_keys(model_py: str) -> list[str]:
    """The state_dict keys of ``Model()`` from ``model_py``, run in a namespace of its own."""
    namespace: dict[str, Any] = {"__name__": "exported_model"}
    exec(compile(model_py, "model.py", "exec"), namespace)  # the package's own file, as the grader imports it
    return list(namespace["Model"]().state_dict())
