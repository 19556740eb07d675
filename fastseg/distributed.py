"""Process-group set-up for torchrun and srun, and rank-0-only printing.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Under ``srun`` (one task per GPU) the rank
comes from SLURM_PROCID, the master is the first host of the job's node list and the port is derived from the
job id so that two jobs sharing a node do not collide. The job scripts export MASTER_ADDR/MASTER_PORT on the
host before they start the tasks (tools/launch.sh), since ``scontrol`` is usually missing inside a container;
the same rules apply here when a task was started some other way.

A GPU job in which PyTorch sees no GPU (a container started without ``--nv``, a wheel built for a newer CUDA
than the node's driver) stops here with one line instead of training on the CPU (:func:`resolve_device`).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastseg.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_hostlist(nodelist: str) -> list[str]:
    """Slurm's compact host list as host names, in order: what ``scontrol show hostnames`` prints.

    ``gpu[001-004]`` keeps the zero padding (the width of the range's first number), ``a[1-2],b[3,5-6]``
    joins groups, ``node[1-2]-ib`` keeps text after the brackets, and several bracket groups in one name
    (``rack[1-2]-node[01-02]``) give every combination, the first group varying slowest. ValueError when
    the list is malformed.
    """
    hosts: list[str] = []
    for name in _split_names(nodelist):
        # Alternating text and bracket bodies: "rack[1-2]-n[3]" -> ["rack", "1-2", "-n", "3", ""].
        pieces = re.split(r"\[([^\[\]]*)\]", name)
        if any("[" in text or "]" in text for text in pieces[::2]):
            raise ValueError(f"unbalanced or nested brackets in host list {nodelist!r}")
        choices = [[text] if i % 2 == 0 else _expand_range(text, nodelist) for i, text in enumerate(pieces)]
        hosts.extend("".join(parts) for parts in itertools.product(*choices))
    return hosts


def _split_names(nodelist: str) -> list[str]:
    """Split at commas and spaces outside brackets: "a[1,3],b" -> ["a[1,3]", "b"]."""
    names, current, depth = [], "", 0
    for char in nodelist:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth == 0 and (char == "," or char.isspace()):
            names.append(current)
            current = ""
        else:
            current += char
    names.append(current)
    return [name for name in names if name]


def _expand_range(body: str, nodelist: str) -> list[str]:
    """The inside of one bracket pair: "001-003,7" -> ["001", "002", "003", "7"]."""
    values = []
    for item in body.split(","):
        low, _, high = item.strip().partition("-")
        if not re.fullmatch(r"[0-9]+", low) or (high and not re.fullmatch(r"[0-9]+", high)):
            raise ValueError(f"bad range [{body}] in host list {nodelist!r}")
        if not high:
            values.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"range {item} goes down in host list {nodelist!r}")
        values.extend(f"{n:0{len(low)}d}" for n in range(int(low), int(high) + 1))
    return values


def first_slurm_host(nodelist: str) -> str:
    """The first host of a job's node list: scontrol's answer when it is on PATH, else expand_hostlist's."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 check=True, timeout=30).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass  # e.g. no slurm.conf where this runs: the node list itself is enough
    try:
        hosts = expand_hostlist(nodelist)
    except ValueError as exc:
        raise UserError(f"SLURM_JOB_NODELIST: {exc}; set MASTER_ADDR to the first node's name") from exc
    if not hosts:
        raise UserError("SLURM_JOB_NODELIST is empty; set MASTER_ADDR to the first node's name")
    return hosts[0]


def master_port(job_id: str | int | None) -> int:
    """The rendezvous port of a Slurm job; ``fastseg_master_port`` in tools/launch.sh computes the same.

    From the job id, so two jobs sharing a node (and their tasks) pick different ports; 10000-29999 stays
    below Linux's ephemeral ports (32768 and up), which outgoing connections may hold at any moment.
    """
    return 10000 + int(job_id or 0) % 20000


def env_dist_info(env: dict[str, str] | None = None) -> DistInfo:
    """Read rank and world size from torchrun's or Slurm's environment (world size 1 when neither)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        # Only a job step started by srun has SLURM_STEP_ID; the batch script itself is a single process.
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistInfo()


def torch_build() -> str:
    """``torch 2.5.1, CUDA build 12.4``: what a run prints once and a report stores."""
    return f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none (a CPU-only wheel)'}"


# Variables that say a job was given GPUs: Slurm's (--gpus, --gres=gpu, --gpus-per-node...) and the CUDA one
# that Slurm, a launcher or the user sets.
GPU_ENV_PREFIXES = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS")


def requested_gpus(env: dict[str, str] | None = None) -> str | None:
    """``NAME=value`` of the first variable that gives this job GPUs, or None when none does.

    ``CUDA_VISIBLE_DEVICES`` counts when it names devices: empty, ``-1`` (hide all) and Slurm's ``NoDevFiles``
    do not. Slurm's GPU counts count when they are not 0.
    """
    env = os.environ if env is None else env
    for name in sorted(env):
        value = env[name].strip()
        if not name.startswith(GPU_ENV_PREFIXES) or value in ("", "(null)", "N/A"):
            continue
        # SLURM_JOB_GPUS / SLURM_STEP_GPUS list GPU indices ("0" is the first GPU); SLURM_GPUS* are counts.
        if name in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS") or value != "0":
            return f"{name}={value}"
    value = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if value and value not in ("-1", "NoDevFiles") and not value.startswith("-"):
        return f"CUDA_VISIBLE_DEVICES={value}"
    return None


def nvidia_driver() -> str | None:
    """``driver 535.104.05 (CUDA 12.2)`` from ``nvidia-smi``'s header, or None without a working nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    driver = re.search(r"Driver Version:\s*([0-9.]+)", out)
    cuda = re.search(r"CUDA Version:\s*([0-9.]+)", out)
    if not driver:
        return None
    return f"driver {driver.group(1)}" + (f" (CUDA {cuda.group(1)} at most)" if cuda else "")


def no_gpu_message(requested: str) -> str:
    """The one line a GPU job ends with when PyTorch cannot use the GPU it was given."""
    driver = nvidia_driver()
    seen = (f"nvidia-smi reports {driver}" if driver else
            "nvidia-smi is not found or fails here (no GPU driver visible to this process)")
    return (f"--device: this job was given GPUs ({requested}) but PyTorch cannot use one: "
            f"{torch_build()}; {seen}. Fix: run inside the container with --nv (apptainer/singularity exec --nv), "
            "or install the PyTorch wheel built for the cluster's CUDA (docs/gpu.md); "
            "--device cpu trains on the CPU on purpose")


def resolve_device(name: str, local_rank: int = 0, env: dict[str, str] | None = None) -> torch.device:
    """``auto`` picks the local GPU when there is one, else the CPU.

    When the job was given GPUs (:func:`requested_gpus`) but PyTorch cannot use one, ``auto`` and ``cuda`` stop
    with :func:`no_gpu_message` rather than burn a GPU allocation at CPU speed; ``cpu`` is always honoured.
    """
    if name != "cpu" and (name == "auto" or name.startswith("cuda")) and not torch.cuda.is_available():
        requested = requested_gpus(env)
        if requested:
            raise UserError(no_gpu_message(requested))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device: CUDA was asked for but no GPU is visible (use --device cpu or auto)")
        if name == "cuda":
            name = f"cuda:{local_rank % torch.cuda.device_count()}"
        torch.cuda.set_device(torch.device(name))
    elif name != "cpu":
        raise UserError(f"--device: unknown device '{name}' (use auto, cpu or cuda)")
    return torch.device(name)


def sync_batchnorm(model: torch.nn.Module, device: torch.device, world_size: int) -> tuple[torch.nn.Module, int]:
    """``model`` with every BatchNorm layer made a SyncBatchNorm (statistics over all ranks' batches), and their
    number. Under DDP this needs GPUs: PyTorch's SyncBatchNorm refuses CPU tensors in a process group (gloo).
    """
    if world_size > 1 and device.type != "cuda":
        raise UserError(f"--sync-bn: PyTorch's SyncBatchNorm needs GPUs (NCCL) under DDP; this run has "
                        f"{world_size} processes on the CPU (gloo); drop --sync-bn or run on GPUs")
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())


def init_distributed(device: torch.device, info: DistInfo | None = None) -> DistInfo:
    """Start the process group when more than one process takes part (NCCL on GPUs, gloo on CPU)."""
    info = info or env_dist_info()
    if not info.distributed or dist.is_initialized():
        return info
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = first_slurm_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(master_port(os.environ.get("SLURM_JOB_ID")))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=info.rank, world_size=info.world_size)
    if info.is_main:
        # The rendezvous in the log: a run that hangs here has a rank that cannot reach it.
        print(f"process group: world size {info.world_size}, backend {backend}, master "
              f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", flush=True)
    return info


# The tensors of the latest collective of each kind, referenced here until the process group is destroyed.
# Older PyTorch (2.5 among them) can deadlock in the gloo process group's destructor: a finished work object
# still holds its tensor, and freeing that tensor's Python object there needs the GIL that the thread calling
# destroy_process_group() holds. With a reference kept here, the destructor only drops a count; the tensors
# are freed after the teardown, by Python.
_LAST_COLLECTIVES: dict[str, list[torch.Tensor]] = {}


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM, kind: str = "all_reduce") -> torch.Tensor:
    """``dist.all_reduce`` in place, waited for; ``tensor`` stays referenced until :func:`cleanup`."""
    _LAST_COLLECTIVES[kind] = [tensor]
    dist.all_reduce(tensor, op=op)
    return tensor


def cleanup() -> None:
    """Destroy the process group (no-op without one), then let go of the last collectives' tensors."""
    if dist.is_initialized():
        dist.destroy_process_group()
    _LAST_COLLECTIVES.clear()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank when any rank raised ``flag`` (a signal arrives at one process, all must stop)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    all_reduce(t, op=dist.ReduceOp.MAX, kind="broadcast_flag")
    return bool(t.item() > 0)


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics).

    DDP broadcasts them before each training forward, so after the last step each rank holds the statistics
    of its own last batch; validation must score the one model that rank 0 saves.
    """
    if not dist.is_initialized():
        return
    buffers = [buffer.data for buffer in model.buffers()]
    _LAST_COLLECTIVES["broadcast_buffers"] = buffers
    for buffer in buffers:
        dist.broadcast(buffer, src=0)


def all_reduce_mean(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    all_reduce(t, kind="all_reduce_mean")
    return float(t.item()) / dist.get_world_size()
