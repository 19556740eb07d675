"""The GPU paths: AMP training with its scaler, a stop and resume, distillation and the efficiency tool on CUDA.

Each test also runs on the CPU (where AMP falls back to fp32), so the test itself is checked everywhere; the
CUDA cases skip where no GPU is visible and run on any GPU machine with plain ``make test``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_ARGS
from test_distributed import free_port
from test_train import argv, records, with_hook

import evaluate_efficiency
import train
import train_distillation
from fastseg.checkpoint import load_checkpoint
from fastseg.engine import native_bf16
from fastseg.models import build_model
from fastseg.stopping import REQUEUE_EXIT_CODE

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


def _native_bf16() -> bool:
    return torch.cuda.is_available() and native_bf16(torch.device("cuda", 0))


CASES = [
    pytest.param("cuda", "bf16", marks=needs_cuda),
    pytest.param("cuda", "fp16", marks=needs_cuda),
    pytest.param("cpu", "fp16"),  # AMP asked for on the CPU: a note, then fp32
]


def _finite(recs: list[dict], *keys: str) -> bool:
    return all(math.isfinite(r[k]) for r in recs for k in keys)


def _expected_dtype(device: str, amp: str) -> torch.dtype:
    """What a convolution computes in inside a training step: autocast's dtype on CUDA, fp32 on the CPU."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp] if device == "cuda" else torch.float32


def _probing_dtypes(build, seen: list):
    """``build`` (a make_objective), with a forward hook on the model's first convolution that records the
    dtype of its output in every training step (not in validation or the FLOP count, which run without grad)."""

    def probed(args, device, model):
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype)
                                   if torch.is_grad_enabled() else None)
        return build(args, device, model)

    return probed


@pytest.mark.parametrize("device, amp", CASES)
def test_stage_with_amp_stops_resumes_and_finishes(synthetic_root, tmp_path, device, amp, capsys):
    if amp == "bf16" and not _native_bf16():
        pytest.skip("this GPU has no native bf16 (compute capability below 8.0)")
    args = argv(synthetic_root, tmp_path, "--epochs", "3", "--previous-model-path", "none", "--amp", amp,
                "--device", device, "--check-every", "1")
    steps_per_epoch = 4

    def stop_in_epoch_two(n, loss):
        if n == steps_per_epoch + 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return loss

    seen = []
    assert train.main(args, make_objective=_probing_dtypes(with_hook(stop_in_epoch_two), seen)) == REQUEUE_EXIT_CODE
    assert seen and set(seen) == {_expected_dtype(device, amp)}  # autocast was on in every step
    last = load_checkpoint(tmp_path / "t" / "profile-1" / "last.pth")
    assert last["epoch"] == 1
    # fp16 needs a GradScaler, and its state travels with last.pth; bf16 and fp32 have none.
    assert (last["scaler"] is not None) == (device == "cuda" and amp == "fp16")
    if device == "cpu":
        assert f"--amp {amp} needs a GPU" in capsys.readouterr().out

    assert train.main(args) == 0  # resumes from last.pth
    straight = tmp_path / "straight"
    assert train.main(argv(synthetic_root, straight, *args[len(argv(synthetic_root, tmp_path)):])) == 0
    recs, whole = records(tmp_path / "t" / "profile-1"), records(straight / "t" / "profile-1")
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    assert _finite(recs, "train_loss", "val_loss", "val_miou")
    # The schedule went on where it stopped: the same rates as the uninterrupted run, epoch by epoch.
    assert [r["lr"] for r in recs] == [r["lr"] for r in whole]
    assert json.loads((tmp_path / "t" / "profile-1" / "config.json").read_text())["amp"] == amp
    a = load_checkpoint(tmp_path / "t" / "profile-1" / "last.pth")
    b = load_checkpoint(straight / "t" / "profile-1" / "last.pth")
    if device == "cpu":  # bit for bit; cuDNN's autotuned kernels and atomics make GPU runs differ slightly
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    else:
        assert all(torch.allclose(a["model"][k].float(), b["model"][k].float(), rtol=0.05, atol=0.05)
                   for k in a["model"])
    if amp == "fp16" and device == "cuda":  # the scaler's state was restored, not restarted at 65536
        assert a["scaler"]["_growth_tracker"] == b["scaler"]["_growth_tracker"]


@pytest.mark.parametrize("device, amp", CASES)
def test_distillation_with_amp(synthetic_root, tmp_path, device, amp, monkeypatch):
    if amp == "bf16" and not _native_bf16():
        pytest.skip("this GPU has no native bf16 (compute capability below 8.0)")
    seen = []
    monkeypatch.setattr(train_distillation, "build_objective",
                        _probing_dtypes(train_distillation.build_objective, seen))
    teacher = tmp_path / "teacher.pth"
    torch.manual_seed(0)
    torch.save(build_model("fast_scnn", width_mult=1.0).state_dict(), teacher)  # a users' plain state_dict
    args = argv(synthetic_root, tmp_path, "--epochs", "1", "--previous-student-model-path", "none",
                "--trained-teacher-model-path", str(teacher), "--amp", amp, "--device", device)
    assert train_distillation.main(args) == 0
    assert seen and set(seen) == {_expected_dtype(device, amp)}  # the student's steps ran under autocast
    recs = records(tmp_path / "t" / "profile-1")
    assert _finite(recs, "train_loss", "train_ce_loss", "train_kd_loss", "val_miou")


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda), "cpu"])
def test_efficiency_report_on_the_device(synthetic_root, tmp_path, device):
    ckpt = tmp_path / "run" / "profile-1" / "best.pth"
    ckpt.parent.mkdir(parents=True)
    config = {"arch": "fast_scnn", "num_classes": 19, "width_mult": 1.0, "aux": False, "profile": 1,
              "resize": [128, 64], "experiment_id": "run"}
    torch.save({"model": build_model("fast_scnn").state_dict(), "config": config, "epoch": 1, "metrics": {}}, ckpt)
    out = tmp_path / "report.json"
    assert evaluate_efficiency.main([
        "--current-model-path", str(ckpt), "--data-dir", str(synthetic_root), "--device", device,
        "--num-workers", "0", "--runs", "5", "--warmup", "2", "--throughput-batch", "2", "--output", str(out),
        "--plots", str(tmp_path / "plots"),
    ]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["device"].startswith(device)
    assert 0.0 <= row["miou"] <= 1.0
    assert row["latency_p90_ms"] >= row["latency_ms"] > 0 and row["fps"] > 0
    expected = {"fp32", "fp16"} | ({"bf16"} if device == "cuda" and _native_bf16() else set())
    assert set(row["speed"]) == (expected if device == "cuda" else {"fp32"})
    if device == "cuda":
        assert row["peak_memory_mb"] > 0  # torch.cuda.max_memory_allocated during batch-1 inference


@needs_cuda
@pytest.mark.parametrize("gpus", [1, pytest.param(2, marks=needs_two_gpus)])
def test_sync_bn_trains_on_gpus(synthetic_root, tmp_path, gpus):
    # Under torchrun as on a node: with two GPUs the statistics are all-reduced over NCCL; with one, plain BN.
    args = [a if a != "cpu" else "cuda" for a in TINY_ARGS]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(gpus), "--master-port",
           str(free_port()), str(ROOT / "train.py"), *args, "--batch-size", "2", "--data-dir", str(synthetic_root),
           "--output-dir", str(tmp_path), "--experiment-id", "sbn", "--epochs", "2", "--previous-model-path", "none",
           "--sync-bn"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "BatchNorm layers are SyncBatchNorm" in result.stdout
    stage = tmp_path / "sbn" / "profile-1"
    config = json.loads((stage / "config.json").read_text())
    assert config["sync_bn"] is True and config["world_size"] == gpus and config["device"] == "cuda"
    assert _finite(records(stage), "train_loss", "val_loss", "val_miou")
