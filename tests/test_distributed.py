"""Real multi-process DDP on CPU (gloo): identical weights on every rank, exact all-reduced validation; and the
rendezvous under Slurm: the host-list parser, and the port the job scripts and the trainer derive alike."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT, TINY_ARGS

import train
from fastseg.cityscapes import Profile
from fastseg.data import SegmentationDataset, build_loader
from fastseg.distributed import cleanup, env_dist_info, expand_hostlist, first_slurm_host, master_port
from fastseg.engine import evaluate
from fastseg.errors import UserError
from fastseg.models import build_model, load_model
from fastseg.stopping import REQUEUE_EXIT_CODE, StopFlag
from fastseg.tracking import Progress

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
    objective, _ = train.build_objective(None, torch.device("cpu"), model)
    train.train_one_epoch(ddp, objective, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                          train_loader, torch.device("cpu"), 0, types.SimpleNamespace(check_every=2), StopFlag(),
                          Progress(total=len(train_loader), enabled=False), world_size=world)
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
    # As the trainer tears down: the DDP wrapper (its reducer holds the process group) goes first, with its
    # stage, then the process group, the last collectives' tensors outliving it. Destroyed the other way
    # round, PyTorch 2.5's gloo could deadlock in the group's destructor at the end of this function.
    del ddp
    cleanup()


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
    assert torch.equal(single["matrix"], result["metrics"]["matrix"])  # each image counted once
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
    model, _ = load_model(stage / "last.pth")  # trained with the recipe's auxiliary heads, scored without
    single = evaluate(model, build_loader(SegmentationDataset(synthetic_root, "val", TINY, train=False), 2, 0,
                                          shuffle=False, seed=0), torch.device("cpu"))
    # Rank 0 saved the weights; both ranks scored them (rank 0's BatchNorm statistics) and summed the counts.
    assert abs(single["miou"] - record["val_miou"]) < 1e-6


def _signalled_rank(rank: int, world: int, port: int, argv: list[str], where: str, out: str) -> None:
    """A rank of train.py in which only rank 1 gets SIGUSR1: at its 5th step, or during its validation."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    steps = []

    def make_objective(args, device, model):
        objective, extra = train.build_objective(args, device, model)

        def counted(m, images, labels):
            if not torch.is_grad_enabled():  # the one-off count of a step's FLOPs
                return objective(m, images, labels)
            steps.append(len(steps) + 1)
            if rank == 1 and where == "step" and len(steps) == 5:
                os.kill(os.getpid(), signal.SIGUSR1)
            return objective(m, images, labels)

        return counted, extra

    real = train.evaluate
    matrices = []  # the confusion matrix of each validation, as this rank holds it after the all-reduce

    def evaluate(*args, **kwargs):
        if rank == 1 and where == "validation":
            os.kill(os.getpid(), signal.SIGUSR1)
        metrics = real(*args, **kwargs)
        matrices.append(metrics["matrix"].tolist())
        return metrics

    train.evaluate = evaluate
    code = train.main(argv, make_objective=make_objective)
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"code": code, "steps": len(steps), "matrices": matrices}, f)


@pytest.mark.parametrize("where", ["step", "validation"])
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(synthetic_root, tmp_path, one_thread, where):
    # Slurm may signal one task only, or the tasks at different moments: a rank that stopped alone would
    # leave the other waiting in the next collective until the time limit, and no requeue would happen.
    argv = [*TINY_ARGS, "--batch-size", "2", "--data-dir", str(synthetic_root), "--output-dir", str(tmp_path),
            "--experiment-id", "ddp", "--epochs", "3", "--previous-model-path", "none", "--check-every", "2"]
    out = str(tmp_path / "result")
    mp.spawn(_signalled_rank, args=(2, free_port(), argv, where, out), nprocs=2, join=True)
    results = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(2)]
    assert [r["code"] for r in results] == [REQUEUE_EXIT_CODE] * 2
    assert results[0]["steps"] == results[1]["steps"]
    # 16 images, 2 ranks x batch 2: 4 steps an epoch. Signalled at step 5, both stop at the check of step 6;
    # signalled during epoch 1's validation, both stop before epoch 2.
    assert results[0]["steps"] == {"step": 6, "validation": 4}[where]
    last = torch.load(tmp_path / "ddp" / "profile-1" / "last.pth", weights_only=True)
    assert last["epoch"] == 1
    # Epoch 1's validation: each rank scored its half of the split and the counts were summed, so both hold
    # the matrix of one process scoring the whole split with the saved weights (rank 0's BatchNorm statistics).
    model, _ = load_model(tmp_path / "ddp" / "profile-1" / "last.pth")
    single = evaluate(model, build_loader(SegmentationDataset(synthetic_root, "val", TINY, train=False), 2, 0,
                                          shuffle=False, seed=0), torch.device("cpu"))
    assert [r["matrices"] for r in results] == [[single["matrix"].tolist()]] * 2


def test_slurm_environment_is_read_for_srun_tasks():
    env = {"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0"}
    info = env_dist_info(env)
    assert (info.rank, info.world_size, info.local_rank) == (3, 4, 1)
    # The batch script itself (no job step) is one process even in a 4-task allocation.
    assert env_dist_info({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}).world_size == 1
    assert env_dist_info({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}).rank == 1


# Expected expansions written out by hand from Slurm's host-list rules (scontrol show hostnames).
HOSTLISTS = [
    ("node07", ["node07"]),
    ("gpu[001-004]", ["gpu001", "gpu002", "gpu003", "gpu004"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),  # no padding: the width of the first number, 1
    ("x[09-11]", ["x09", "x10", "x11"]),
    ("n[01-2]", ["n01", "n02"]),
    ("a[1-2],b[3,5-6]", ["a1", "a2", "b3", "b5", "b6"]),
    ("n[1-3,07]", ["n1", "n2", "n3", "n07"]),
    ("n[7]", ["n7"]),
    ("node[1-2]-ib", ["node1-ib", "node2-ib"]),
    ("n1-[1-2]", ["n1-1", "n1-2"]),
    ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
    ("c[1-2]x,login", ["c1x", "c2x", "login"]),
    ("a,b c", ["a", "b", "c"]),
    ("fastseg-node[1-2]", ["fastseg-node1", "fastseg-node2"]),
    ("", []),
]


@pytest.mark.parametrize(("nodelist", "hosts"), HOSTLISTS)
def test_slurm_host_lists_expand_like_scontrol(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["n[1-2", "n1-2]", "n[[1]]", "n[3-1]", "n[a-b]", "n[]", "n[1,]"])
def test_malformed_host_lists_are_refused(nodelist):
    with pytest.raises(ValueError, match="host list"):
        expand_hostlist(nodelist)


def test_first_host_without_scontrol_comes_from_the_parser(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol, as inside a container
    assert first_slurm_host("gpu[007-009],cpu1") == "gpu007"
    with pytest.raises(UserError, match="SLURM_JOB_NODELIST.*MASTER_ADDR"):
        first_slurm_host("gpu[007-")


def run_launch_sh(script: str, path: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "MASTER_"))}
    done = subprocess.run(["bash", "-c", f"source {ROOT / 'tools' / 'launch.sh'}; {script}"], capture_output=True,
                          text=True, env={**base, "PATH": path, **env}, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_job_scripts_derive_the_same_port_and_take_the_first_host_from_scontrol(tmp_path):
    ids = [0, 1, 9999, 10000, 19999, 20000, 20001, 123456, 67043327, 4294967295]
    out = run_launch_sh(" ".join(f"fastseg_master_port {i};" for i in ids), os.environ["PATH"])
    assert [int(p) for p in out.split()] == [master_port(i) for i in ids]
    assert len({master_port(i) for i in range(1000, 1100)}) == 100  # neighbouring jobs never share a port
    assert all(10000 <= master_port(i) < 32768 for i in ids)  # below Linux's ephemeral ports

    # A stand-in scontrol that prints one host per line, as the real one does.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[007-008]" ] && '
                                      'printf "gpu007\\ngpu008\\n"\n')
    (bin_dir / "scontrol").chmod(0o755)
    path = f"{bin_dir}:{os.environ['PATH']}"
    job = {"SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "123456"}
    show = 'fastseg_rendezvous; echo "[$MASTER_ADDR] [$MASTER_PORT]"'
    assert run_launch_sh(show, path, **job).splitlines()[-1] == f"[gpu007] [{master_port(123456)}]"
    # Values given at submission are kept; a single task needs no rendezvous.
    assert run_launch_sh(show, path, **job, MASTER_ADDR="m", MASTER_PORT="1").splitlines()[-1] == "[m] [1]"
    assert run_launch_sh(show, path, **{**job, "SLURM_NTASKS": "1"}).splitlines()[-1] == "[] []"
