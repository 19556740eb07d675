"""One stage across two Slurm nodes: DDP (gloo, CPU) through the job script, USR1 requeue, the container path.

The cluster is two slurmd daemons on this machine (``slurm_cluster(nodes=2)``, tests/slurm_cluster.py), so the
two ranks talk over loopback; what is real is Slurm's side: two nodes in the allocation, one task on each
through srun, the master resolved from the node list on the host, the signal forwarded to every task, the
requeue. Each job runs jobscript_slurm.sh, main.sh and train.py from the repository on tiny synthetic data,
one thread per process. As root these tests run (installing Slurm when needed); without root they skip.

    python -m pytest tests/test_multinode.py
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from slurm_cluster import slurm_cluster
from test_slurm import JOB_TIMEOUT, finished_ok, records, submit_stage, wait_for_training

from fastseg.checkpoint import load_checkpoint
from fastseg.distributed import master_port

TWO_NODES = ("--nodes=2", "--ntasks-per-node=1")
# One thread per process: the two "nodes" share this machine's cores.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
# Four steps per epoch (16 images, 2 per process, 2 processes); the signal comes after epoch 1 is saved,
# with epochs left for it to land during training.
USR1_EPOCHS = 6


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("not root: the two-node test cluster runs slurmd as root (and installs Slurm if missing)")
    with slurm_cluster(nodes=2) as running:  # as root Slurm must come up: no skip when it does not
        yield running


def check_two_ranks(log: str, job: str) -> None:
    """Both nodes in the rendezvous the job script resolved on the host, and the trainer's group of two."""
    port = master_port(job)
    resolved = f"rendezvous resolved on the host fastseg-node1: MASTER_ADDR=fastseg-node1 MASTER_PORT={port}"
    assert resolved in log, log
    assert f"process group: world size 2, backend gloo, master fastseg-node1:{port}" in log, log
    # Two processes split the 16 training images: 4 steps of 2 + 2 per epoch instead of 8.
    steps = set(re.findall(r"step \d+/(\d+) ", log))
    assert steps == {"4"}, log


def tasks_on_both_nodes(cluster, job: str) -> None:
    """Each node's slurmd launched a task of the job's step (srun --ntasks-per-node=1 over 2 nodes)."""
    for node in cluster.nodes:
        slurmd_log = (cluster.log_dir / f"slurmd-{node}.log").read_text()
        assert f"launch task StepId={job}.0 " in slurmd_log, f"{node} ran no task:\n{slurmd_log[-2000:]}"


def test_multinode_stage_trains_with_ddp_across_two_nodes(cluster, synthetic_root, tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "out"
    logs.mkdir()
    job = submit_stage(cluster, logs, synthetic_root, out, "--experiment-id", "two", "--epochs", "2",
                       sbatch_args=TWO_NODES, env=ONE_THREAD)
    info = finished_ok(cluster, job)
    assert info["NodeList"] == "fastseg-node[1-2]" and info["NumNodes"] == "2", cluster.describe(job)
    log = Path(info["StdOut"]).read_text()
    check_two_ranks(log, job)
    tasks_on_both_nodes(cluster, job)
    assert log.count("epoch 2/2: train loss") == 1, log  # rank 0 alone prints
    assert [r["epoch"] for r in records(out / "two" / "profile-1")] == [1, 2]


def test_multinode_usr1_stops_every_rank_saves_once_and_requeues(cluster, synthetic_root, tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "out"
    logs.mkdir()
    job = submit_stage(cluster, logs, synthetic_root, out, "--experiment-id", "sig",
                       "--epochs", str(USR1_EPOCHS), sbatch_args=TWO_NODES, env=ONE_THREAD)
    log_path = logs / f"fastseg-train-{job}.out"
    wait_for_training(cluster, job, log_path, epochs=USR1_EPOCHS)
    # As --signal=B:USR1@300 does near the time limit: to the batch shell only.
    cluster.run(["scancel", "--signal=USR1", "--batch", job])

    info = finished_ok(cluster, job)
    assert info["Restarts"] == "1", cluster.describe(job)
    log = log_path.read_text()
    first_run, _, second_run = log.partition("(restart 1)")
    assert second_run, log
    # srun passed the signal to both tasks, on both nodes; both stopped at the step they agreed on and
    # exited 75 (none was killed); rank 0 alone reports the stop.
    assert first_run.count("received SIGUSR1") == 2, log
    for rank, node in enumerate(cluster.nodes):
        assert f"{node}: task {rank}: Exited with exit code 75" in first_run, log
    assert first_run.count("stopped by SIGUSR1; last.pth holds the last finished epoch") == 1, log
    assert f"requeueing job {job}" in first_run and "done: best val mIoU" in second_run, log
    # The resumed run starts after the last epoch the first run finished and saved.
    saved = len(re.findall(rf"epoch \d+/{USR1_EPOCHS}: train loss", first_run))
    assert 1 <= saved < USR1_EPOCHS, log
    assert re.search(rf"resumed from \S+last\.pth: epoch {saved + 1}\b", second_run), log
    check_two_ranks(second_run, job)

    stage = out / "sig" / "profile-1"
    assert [r["epoch"] for r in records(stage)] == list(range(1, USR1_EPOCHS + 1)), log
    assert load_checkpoint(stage / "last.pth", "last.pth")["epoch"] == USR1_EPOCHS
    assert sorted(p.name for p in stage.iterdir()) == ["best.pth", "config.json", "last.pth", "metrics.jsonl"]


# Stands in for `apptainer exec [--nv] IMAGE CMD...`: runs CMD where no Slurm command is on PATH, as inside an
# image, with the test's interpreter as the image's python3. The PATH is a directory of links to the host's
# programs, less Slurm's.
APPTAINER = """#!/usr/bin/env bash
set -euo pipefail
[[ $1 == exec ]] && shift
while [[ $1 == --* ]]; do shift; done
[[ -f $1 ]] || { echo "apptainer stand-in: no image $1" >&2; exit 255; }
shift
image_bin="$(mktemp -d "@TMP@/bin.XXXXXX")"
shopt -s nullglob
IFS=: read -ra dirs <<<"$PATH"
for dir in "${dirs[@]}"; do
    programs=("$dir"/*)
    if [[ ${#programs[@]} -gt 0 ]]; then
        ln -s "${programs[@]}" "$image_bin"/ 2>/dev/null || true  # the first of a name on PATH wins
    fi
done
rm -f "$image_bin"/{scontrol,srun,sbatch,squeue,scancel,sinfo,sacct,salloc,python3}
printf '#!/bin/sh\\nexec %s "$@"\\n' "@PYTHON@" >"$image_bin/python3"
chmod +x "$image_bin/python3"
export PATH="$image_bin"
echo "apptainer stand-in on ${SLURMD_NODENAME:-?}: scontrol $(command -v scontrol || echo absent)" >&2
exec "$@"
"""


def test_multinode_stage_in_a_container_without_scontrol(cluster, synthetic_root, tmp_path):
    logs, out, bin_dir = tmp_path / "logs", tmp_path / "out", tmp_path / "host-bin"
    logs.mkdir()
    bin_dir.mkdir()
    apptainer = bin_dir / "apptainer"
    apptainer.write_text(APPTAINER.replace("@TMP@", str(tmp_path)).replace("@PYTHON@", sys.executable))
    apptainer.chmod(0o755)
    image = tmp_path / "container.sif"
    image.write_text("")
    env = {**ONE_THREAD, "PATH": f"{bin_dir}:{cluster.env['PATH']}", "CONTAINER": str(image)}
    job = submit_stage(cluster, logs, synthetic_root, out, "--experiment-id", "sif", "--epochs", "1",
                       sbatch_args=TWO_NODES, env=env)
    info = finished_ok(cluster, job)
    log = Path(info["StdOut"]).read_text()
    assert f"runtime: apptainer exec --nv {image} python3" in log, log
    # Inside the "image" on each node there is no scontrol; the master came from the host.
    for node in cluster.nodes:
        assert f"apptainer stand-in on {node}: scontrol absent" in log, log
    check_two_ranks(log, job)
    assert [r["epoch"] for r in records(out / "sif" / "profile-1")] == [1]


def test_multinode_failed_task_ends_the_step_at_once(cluster, tmp_path):
    """A rank that fails ends the others, as srun --kill-on-bad-exit would (tools/srun_task.sh)."""
    out, script = tmp_path / "job.out", tmp_path / "job.sh"
    # Rank 0 would wait for its lost peer for ever: here an hour, far beyond every limit below.
    script.write_text(f"""#!/usr/bin/env bash
source {ROOT}/tools/launch.sh
FASTSEG_LAUNCH=()
fastseg_run_job bash -c '[[ $SLURM_PROCID == 1 ]] && exit 3; sleep 3600'
""")
    job = cluster.sbatch([*TWO_NODES, "--cpus-per-task=1", f"--output={out}", str(script)], cwd=tmp_path)
    try:
        info = cluster.wait_finished(job, JOB_TIMEOUT)
    finally:  # a step that was never ended must not hold the test cluster's nodes for the hour
        cluster.run(["scancel", job], check=False)
    log = out.read_text()
    assert info["JobState"] == "FAILED", cluster.describe(job)
    assert f"task 1 on fastseg-node2 failed (exit 3): ending job step {job}.0" in log, log
    # Ended by that kill, not by rank 0's sleep: the controller's run time of the job is seconds.
    assert run_seconds(info["RunTime"]) < 120, cluster.describe(job)


def run_seconds(run_time: str) -> int:
    """Seconds in a Slurm run time, ``[days-]hours:minutes:seconds``."""
    days, _, clock = run_time.rpartition("-")
    hours, minutes, seconds = (int(x) for x in clock.split(":"))
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds
