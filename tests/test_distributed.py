"""Real multi-process DDP on CPU (gloo): identical weights on every rank, exact all-reduced validation."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT, TINY_ARGS

from fastseg.cityscapes import Profile
from fastseg.data import SegmentationDataset, build_loader, set_epoch
from fastseg.distributed import env_dist_info
from fastseg.engine import StepContext, evaluate, supervised_objective, train_one_epoch
from fastseg.losses import SegmentationLoss
from fastseg.models import build_model

TINY = Profile(1, (128, 64), (96, 48))


@pytest.fixture
def one_thread():
    """Score with the kernels the single-threaded ranks used, then give the other tests their threads back."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)  # the same kernels as the single-process check below, bit for bit
    torch.manual_seed(0)
    model = build_model("fast_scnn")
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_loader = build_loader(SegmentationDataset(data, "train", TINY, train=True), 2, 0, shuffle=True, seed=0,
                                distributed=True)
    set_epoch(train_loader, 0)
    ctx = StepContext(ddp, supervised_objective(SegmentationLoss()), optimizer,
                      torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), None, torch.device("cpu"),
                      None, False, seed=0, rank=rank, world_size=world)
    train_one_epoch(ctx, train_loader, epoch=0)
    # Parameters, not BatchNorm statistics: DDP re-broadcasts rank 0's buffers before every forward, so after
    # the last step each rank holds the statistics of its own last batch and rank 0's are the ones saved.
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    val_loader = build_loader(SegmentationDataset(data, "val", TINY, train=False), 1, 0, shuffle=False, seed=0,
                              distributed=True)
    metrics = evaluate(model, val_loader, torch.device("cpu"))
    if rank == 0:
        torch.save({"max_rank_difference": max(float((g - gathered[0]).abs().max()) for g in gathered),
                    "state_dict": model.state_dict(), "metrics": metrics}, out)
    dist.destroy_process_group()


def test_ddp_ranks_keep_identical_weights_and_validation_matches_one_process(synthetic_root, tmp_path, one_thread):
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, free_port(), str(synthetic_root), str(out)), nprocs=2, join=True)
    result = torch.load(out, weights_only=False)
    assert result["max_rank_difference"] == 0.0
    # The same weights scored by one process over the whole split give the same confusion matrix as the two
    # ranks' halves all-reduced (batch 1, so each image is computed the same way in both).
    model = build_model("fast_scnn")
    model.load_state_dict(result["state_dict"])
    single = evaluate(model, build_loader(SegmentationDataset(synthetic_root, "val", TINY, train=False), 1, 0,
                                          shuffle=False, seed=0), torch.device("cpu"))
    assert abs(single["miou"] - result["metrics"]["miou"]) < 1e-12
    assert abs(single["pixel_accuracy"] - result["metrics"]["pixel_accuracy"]) < 1e-9
    assert abs(single["loss"] - result["metrics"]["loss"]) < 1e-5


def test_train_py_under_torchrun_with_two_processes(synthetic_root, tmp_path, one_thread):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(ROOT / "train.py"), *TINY_ARGS, "--batch-size", "2", "--data-dir", str(synthetic_root),
           "--output-dir", str(tmp_path), "--experiment-id", "ddp", "--epochs", "1", "--previous-model-path", "none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    stage = tmp_path / "ddp" / "profile-1"
    lines = (stage / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # rank 0 alone writes
    assert result.stdout.count("epoch 1/1: train loss") == 1  # and prints
    record = json.loads(lines[0])
    model = build_model("fast_scnn")
    model.load_state_dict(torch.load(stage / "last.pth", weights_only=True)["model"])
    single = evaluate(model, build_loader(SegmentationDataset(synthetic_root, "val", TINY, train=False), 2, 0,
                                          shuffle=False, seed=0), torch.device("cpu"))
    # Rank 0 saved the weights; both ranks scored them (rank 0's BatchNorm statistics) and summed the counts.
    assert abs(single["miou"] - record["val_miou"]) < 1e-6


def test_slurm_environment_is_read_for_srun_tasks():
    env = {"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0"}
    info = env_dist_info(env)
    assert (info.rank, info.world_size, info.local_rank) == (3, 4, 1)
    # The batch script itself (no job step) is one process even in a 4-task allocation.
    assert env_dist_info({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}).world_size == 1
    assert env_dist_info({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}).rank == 1
