"""The deployed path: the BN-folded fp32 ONNX export and its onnxruntime latency, beside PyTorch's.

On a CPU, onnxruntime ran this export at 0.36-0.39x the time PyTorch took for the same BN-folded channels_last
model at 2048x1024 (2 threads, idle machine, two runs), at the same mIoU (``benchmarks/bench_deploy.py``;
docs/deploy.md). So ``evaluate_efficiency.py`` times it by default and reports it beside PyTorch's latency, and
the Docker package of ``--export-submission`` runs it. int8 quantization and torch.compile were measured there
too and were slower; that page has the figures."""

from __future__ import annotations

import inspect
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastseg.checkpoint import atomic_path
from fastseg.engine import main_logits
from fastseg.errors import UserError
from fastseg.measure import _percentile, _timed_runs, prepare_for_speed

# The lowest opset the torch.export-based ONNX exporter writes without converting its graph afterwards.
ONNX_OPSET = 18


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def onnx_export_available() -> bool:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def export_onnx(model: nn.Module, input_hw: tuple[int, int], path: str | os.PathLike) -> Path:
    """Export a BN-folded fp32 copy of ``model`` for a 1×3×H×W input; the file is replaced atomically.

    The torch.export-based exporter (``dynamo=True``) is used: it exports Fast-SCNN's pyramid pooling at
    every input size, whereas the older TorchScript exporter refuses adaptive pooling to bins that do not
    divide the feature map (6 bins on the 9×18 map of profile 1). It needs ``onnxscript``.
    """
    missing = onnx_exporter_missing(torch.onnx.export)
    if missing:
        raise UserError(f"--export-onnx: needs PyTorch 2.5 or newer (this is torch {torch.__version__}, whose "
                        f"torch.onnx.export has no {missing}); install torch>=2.5 or drop --export-onnx")
    try:
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise UserError(
            "--export-onnx: the ONNX exporter needs onnxscript, which is not installed; "
            "`pip install onnxscript` (it is in requirements-dev.txt) or drop --export-onnx"
        ) from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prepared, _ = prepare_for_speed(model, fold_bn=True, channels_last=False)
    prepared = prepared.float().cpu()
    example = torch.randn(1, 3, *input_hw)
    try:
        with atomic_path(path, suffix=".onnx") as tmp:
            torch.onnx.export(
                _LogitsOnly(prepared).eval(),
                (example,),
                tmp,
                input_names=["image"],
                output_names=["logits"],
                opset_version=ONNX_OPSET,
                dynamo=True,
                external_data=False,  # one self-contained file: Fast-SCNN's weights are a few MB
                verbose=False,
            )
    except Exception as exc:  # the exporter's coverage depends on the PyTorch version (2.5 fails on LR-ASPP)
        raise UserError(f"--export-onnx: torch {torch.__version__}'s ONNX exporter failed on this model "
                        f"({export_error(exc)}); a newer PyTorch may export it, or drop --export-onnx") from exc
    return path


def export_error(exc: BaseException) -> str:
    """``Type: first line`` of an exporter error (the one :func:`export_onnx`'s line wraps), without colours."""
    cause = exc.__cause__ if isinstance(exc, UserError) and exc.__cause__ else exc
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0][:200] if lines else ''}"


def onnx_exporter_missing(export: Callable) -> str | None:
    """The keyword arguments of :func:`export_onnx` that ``export`` (``torch.onnx.export``) lacks, or None.

    ``dynamo`` and ``external_data`` came with PyTorch 2.5; 2.4's exporter fails on them with a TypeError.
    """
    parameters = inspect.signature(export).parameters  # by name: 2.5's export also takes (and drops) **kwargs
    missing = [name for name in ("dynamo", "external_data") if name not in parameters]
    return " or ".join(f"'{name}' argument" for name in missing) or None


class _LogitsOnly(nn.Module):
    """Export wrapper so that the graph has a single ``logits`` output whatever the model returns."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return main_logits(self.model(x))


def onnx_latency(
    path: str | os.PathLike,
    input_hw: tuple[int, int],
    *,
    runs: int = 50,
    warmup: int = 10,
    use_cuda: bool = False,
) -> dict[str, Any]:
    """onnxruntime latency at batch 1 (median, p90) with the CUDA provider when asked and present."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise UserError(
            "--export-onnx: onnxruntime is not installed, so the exported model cannot be timed; "
            "`pip install onnxruntime` (or onnxruntime-gpu) to time it"
        ) from exc
    providers = ["CPUExecutionProvider"]
    if use_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # PyTorch's count: the latencies compare
    session = ort.InferenceSession(str(path), options, providers=providers)
    feed = {
        session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((1, 3, *input_hw), np.float32)
    }
    times = _timed_runs(lambda: session.run(None, feed), runs, warmup, torch.device("cpu"))
    return {
        "onnx_path": str(path),
        "onnx_provider": session.get_providers()[0],
        "onnx_latency_ms": _percentile(times, 50),
        "onnx_latency_p90_ms": _percentile(times, 90),
    }


def deployed_speed(
    model: nn.Module,
    input_hw: tuple[int, int],
    *,
    export_path: str | os.PathLike | None = None,
    runs: int = 50,
    warmup: int = 10,
    use_cuda: bool = False,
) -> dict[str, Any]:
    """Export ``model`` (to ``export_path``, or to a temporary file) and time it with onnxruntime at batch 1,
    with as many threads as PyTorch uses, so that the two latencies compare; ``onnx_path`` is set only when
    the file is kept."""
    if export_path is not None:
        path = export_onnx(model, input_hw, export_path)
        return onnx_latency(path, input_hw, runs=runs, warmup=warmup, use_cuda=use_cuda)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, input_hw, Path(tmp) / "model.onnx")
        fields = onnx_latency(path, input_hw, runs=runs, warmup=warmup, use_cuda=use_cuda)
    fields.pop("onnx_path")  # gone with the temporary folder
    return fields


def deployed_fields(
    model: nn.Module,
    input_hw: tuple[int, int],
    label: str,
    *,
    export_path: str | os.PathLike | None = None,
    runs: int = 50,
    warmup: int = 10,
    use_cuda: bool = False,
) -> dict[str, Any]:
    """The report's deployed-path fields of one checkpoint (``onnx_latency_ms``, ...; ``onnx_path`` when
    ``export_path`` keeps the file). Without onnxscript or onnxruntime only an explicit ``export_path`` is an
    error (--export-onnx); otherwise a note says what to install and the fields stay empty."""
    missing = [name for name, ok in (("onnxscript", onnx_export_available()), ("onnxruntime", onnxruntime_available()))
               if not ok]
    if export_path is not None and missing == ["onnxruntime"]:
        path = export_onnx(model, input_hw, export_path)
        print(f"{label}: exported {path}; onnxruntime is not installed, so it is not timed (pip install onnxruntime)",
              file=sys.stderr, flush=True)
        return {"onnx_path": str(path)}
    if missing:
        if export_path is not None:
            export_onnx(model, input_hw, export_path)  # the one-line error that names --export-onnx
        print(f"{label}: the deployed path (onnxruntime) is not timed: pip install {' '.join(missing)} "
              "(or --no-deployed-speed)", file=sys.stderr, flush=True)
        return {}
    print(f"{label}: timing the deployed path, onnxruntime on the BN-folded ONNX export", file=sys.stderr, flush=True)
    try:
        return deployed_speed(model, input_hw, export_path=export_path, runs=runs, warmup=warmup, use_cuda=use_cuda)
    except UserError as exc:
        if export_path is not None:  # asked for by --export-onnx: the run stops with the one line
            raise
        print(f"{label}: the deployed path (onnxruntime) is not timed: torch {torch.__version__}'s ONNX exporter "
              f"failed on this model ({export_error(exc)}; --no-deployed-speed skips it)", file=sys.stderr, flush=True)
        return {}
