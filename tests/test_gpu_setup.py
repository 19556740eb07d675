"""What a GPU job needs from the setup, checked on a CPU: a job given GPUs that PyTorch cannot use stops with one
line; ``--amp auto`` picks bf16 only on GPUs that compute it natively; ``--sync-bn``; the PyTorch build in the
log and the config; the last collectives' tensors outlive the process group."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from conftest import ROOT
from test_train import argv

import train
from fastseg import distributed, measure
from fastseg.distributed import requested_gpus, sync_batchnorm
from fastseg.engine import resolve_amp
from fastseg.errors import UserError
from fastseg.models import build_model

# The header of `nvidia-smi` on a node whose driver is older than the pinned wheel's CUDA.
NVIDIA_SMI = """#!/bin/sh
cat <<'EOF'
+-----------------------------------------------------------------------------+
| NVIDIA-SMI 470.57.02    Driver Version: 470.57.02    CUDA Version: 11.4     |
+-----------------------------------------------------------------------------+
EOF
"""


def gpu_job_env(tmp_path, with_nvidia_smi: bool, **gpu_vars: str) -> dict[str, str]:
    """This environment without any GPU or Slurm variables, plus ``gpu_vars``; nvidia-smi first on PATH or none."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if with_nvidia_smi:
        (bin_dir / "nvidia-smi").write_text(NVIDIA_SMI)
        (bin_dir / "nvidia-smi").chmod(0o755)
    # No nvidia-smi from elsewhere: only the interpreter's folder and the basic system folders stay on PATH.
    path = os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), "/usr/bin", "/bin"])
    if not with_nvidia_smi and any(os.path.exists(os.path.join(d, "nvidia-smi")) for d in path.split(os.pathsep)):
        pytest.skip("nvidia-smi is installed system-wide here")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "CUDA_VISIBLE", "RANK", "WORLD"))}
    return {**base, "PATH": path, **gpu_vars}


GPU_JOBS = [
    # Slurm gave the job a GPU, but the process sees none (a container started without --nv looks like this).
    pytest.param({"SLURM_JOB_GPUS": "0", "SLURM_GPUS_ON_NODE": "1", "CUDA_VISIBLE_DEVICES": ""}, True,
                 id="slurm-gpus-with-nvidia-smi"),
    pytest.param({"SLURM_STEP_GPUS": "2,3", "CUDA_VISIBLE_DEVICES": ""}, False, id="slurm-step-gpus-no-nvidia-smi"),
    # CUDA_VISIBLE_DEVICES names a GPU that PyTorch cannot use (here: no GPU at all).
    pytest.param({"CUDA_VISIBLE_DEVICES": "0"}, True, id="cuda-visible-devices",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is usable here")),
]


@pytest.mark.parametrize(("gpu_vars", "with_nvidia_smi"), GPU_JOBS)
def test_a_gpu_job_without_a_usable_gpu_stops_with_one_line(tmp_path, gpu_vars, with_nvidia_smi):
    env = gpu_job_env(tmp_path, with_nvidia_smi, **gpu_vars)
    # The data directory does not exist: the device is checked first, before anything is read or built.
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--data-dir", str(tmp_path / "missing"), "--wandb", "disabled",
         "--previous-model-path", "none", "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: --device: this job was given GPUs (") and "missing" not in line
    assert f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}" in line
    if with_nvidia_smi:
        assert "nvidia-smi reports driver 470.57.02 (CUDA 11.4 at most)" in line
    else:
        assert "nvidia-smi is not found" in line
    assert "--nv" in line and "wheel built for the cluster's CUDA" in line and "--device cpu" in line
    assert not (tmp_path / "out").exists()


def test_device_cpu_in_a_gpu_job_trains_on_the_cpu_and_records_the_build(synthetic_root, tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.setenv("SLURM_JOB_GPUS", "0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert train.main(argv(synthetic_root, tmp_path, "--epochs", "1", "--previous-model-path", "none")) == 0
    out = capsys.readouterr().out
    build = f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none (a CPU-only wheel)'}"
    assert out.count(build) == 1
    assert "training on the CPU" in out
    config = json.loads((tmp_path / "t" / "profile-1" / "config.json").read_text())
    assert config["device"] == "cpu" and config["torch_version"] == torch.__version__
    assert config["torch_cuda"] == torch.version.cuda and config["amp_dtype"] is None
    assert config["sync_bn"] is False  # the constant's default reaches the config as every setting does


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"SLURM_JOB_GPUS": "0"}, "SLURM_JOB_GPUS=0"),  # an index: GPU 0
    ({"SLURM_GPUS_ON_NODE": "0"}, None),  # a count: none
    ({"SLURM_GPUS_PER_NODE": "a100:4"}, "SLURM_GPUS_PER_NODE=a100:4"),
    ({"CUDA_VISIBLE_DEVICES": ""}, None),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, None),
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, None),
    ({"CUDA_VISIBLE_DEVICES": "GPU-5f1c0a3e"}, "CUDA_VISIBLE_DEVICES=GPU-5f1c0a3e"),
    ({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}, None),  # a CPU job
])
def test_which_environments_ask_for_gpus(env, expected):
    assert requested_gpus(env) == expected


@pytest.mark.parametrize(("capability", "expected"), [
    ((6, 1), torch.float16),  # P100
    ((7, 0), torch.float16),  # V100
    ((7, 5), torch.float16),  # T4
    ((8, 0), torch.bfloat16),  # A100
    ((8, 6), torch.bfloat16),
    ((9, 0), torch.bfloat16),  # H100
])
def test_amp_auto_is_bf16_only_from_compute_capability_8(monkeypatch, capability, expected):
    # Faked device: the rule must follow the compute capability, not is_bf16_supported(), which says True on
    # V100/T4 because PyTorch emulates bf16 there.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cuda = torch.device("cuda", 0)
    assert resolve_amp("auto", cuda) == expected
    # The efficiency report times the same dtypes the trainer would pick: bf16 only where it is native.
    assert measure.speed_dtypes(cuda) == (["fp32", "fp16", "bf16"] if expected == torch.bfloat16
                                          else ["fp32", "fp16"])
    assert resolve_amp("fp16", cuda) == torch.float16 and resolve_amp("off", cuda) is None
    assert resolve_amp("auto", torch.device("cpu")) is None


def test_sync_bn_converts_every_batchnorm_and_reaches_the_config(synthetic_root, tmp_path, capsys):
    seen = {}

    def make_objective(args, device, model):
        seen["sync"] = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
        seen["plain"] = sum(type(m) is torch.nn.BatchNorm2d for m in model.modules())
        return train.build_objective(args, device, model)

    code = train.main(argv(synthetic_root, tmp_path, "--epochs", "1", "--previous-model-path", "none",
                           "--sync-bn"), make_objective=make_objective)
    assert code == 0
    expected = sum(isinstance(m, torch.nn.BatchNorm2d) for m in build_model("fast_scnn", aux=True).modules())
    assert seen == {"sync": expected, "plain": 0} and expected > 30
    assert f"--sync-bn: {expected} BatchNorm layers are SyncBatchNorm (one process" in capsys.readouterr().out
    config = json.loads((tmp_path / "t" / "profile-1" / "config.json").read_text())
    assert config["sync_bn"] is True


def test_sync_bn_under_ddp_on_the_cpu_is_one_clear_error():
    with pytest.raises(UserError, match=r"^--sync-bn: .*GPUs \(NCCL\).*2 processes on the CPU \(gloo\); drop "):
        sync_batchnorm(build_model("fast_scnn"), torch.device("cpu"), world_size=2)


def test_the_last_collectives_tensors_outlive_the_process_group(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        t = distributed.all_reduce(torch.ones(3), kind="test")
        assert distributed._LAST_COLLECTIVES["test"][0] is t
        assert distributed.all_reduce_mean(2.0, torch.device("cpu")) == 2.0
    finally:
        distributed.cleanup()
    assert not dist.is_initialized() and distributed._LAST_COLLECTIVES == {}
