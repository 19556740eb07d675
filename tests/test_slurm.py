"""The Slurm scripts on a real one-node Slurm (tests/slurm_cluster.py): a stage and a student, requeue after
SIGUSR1, scancel, the chained curriculum, several tasks through srun; and, without Slurm, the wrappers'
argument order, .env and choice of interpreter, and submit_curriculum.sh --dry-run.

The jobs run the real job scripts, main.sh and train.py from the repository on tiny synthetic data, with
the scripts' own #SBATCH headers except --cpus-per-task (this machine has few cores) and --output.
Without root (nothing can install or start Slurm) the cluster tests skip; with CI=true they must run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import slurm_cluster as harness
import torch
from conftest import ROOT, TINY_ARGS, edited_project
from slurm_cluster import SlurmCluster, SlurmError, SlurmUnavailable, slurm_cluster

from fastseg.checkpoint import load_checkpoint

# The headers ask for 18 CPUs per task; the node has what this machine has.
SBATCH_ARGS = ["--cpus-per-task=1"]
# Two images per batch on four training images: two steps per epoch, a few seconds per stage.
PYTHON_ARGS = [*TINY_ARGS, "--batch-size", "2"]
JOB_TIMEOUT = 300
# Epochs of the stages stopped by a signal: long enough for the signal to land after epoch 1 is saved
# and before the last one ends.
STOP_TEST_EPOCHS = 12


@pytest.fixture(scope="module")
def cluster():
    try:
        with slurm_cluster() as running:
            yield running
    except SlurmUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the Slurm tests, but Slurm is unavailable: {exc}")
        pytest.skip(f"no Slurm test cluster: {exc}")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from tools.synthetic import generate

    root = tmp_path_factory.mktemp("slurm-data") / "cityscapes"
    generate(root, train=4, val=2, width=128, height=64, seed=0)
    return root


def records(stage: Path) -> list[dict]:
    return [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]


def submit_stage(
    cluster: SlurmCluster,
    logs: Path,
    data: Path,
    out: Path,
    *python_args: str,
    sbatch_args: tuple[str, ...] = (),
    script: str = "jobscript_slurm.sh",
    env: dict[str, str] | None = None,
) -> str:
    """sbatch a job script from the project directory, as users do; ``env`` reaches the job."""
    return cluster.sbatch(
        [
            *SBATCH_ARGS,
            f"--output={logs}/%x-%j.out",
            *sbatch_args,
            script,
            *PYTHON_ARGS,
            "--data-dir",
            str(data),
            "--output-dir",
            str(out),
            *python_args,
        ],
        cwd=ROOT,
        env=env,
    )


def finished_ok(cluster: SlurmCluster, job_id: str) -> dict[str, str]:
    info = cluster.wait_finished(job_id, JOB_TIMEOUT)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", cluster.describe(job_id)
    return info


def wait_for_training(cluster: SlurmCluster, job_id: str, log: Path, epochs: int = STOP_TEST_EPOCHS) -> None:
    """Until epoch 1 is saved (its line is logged): a requeued run then has a last.pth to resume from.

    Polled often: on an idle machine a tiny epoch lasts a fraction of a second, and the signal sent next
    must arrive before the stage ends (STOP_TEST_EPOCHS leaves room for that, yet stays short).
    """
    pattern = f"epoch 1/{epochs}: train loss"

    def found() -> bool:
        if log.is_file() and pattern in log.read_text(errors="replace"):
            return True
        if cluster.state(job_id) not in ("PENDING", "RUNNING", "CONFIGURING"):
            raise SlurmError(f"job {job_id} ended before printing {pattern!r}\n{cluster.describe(job_id)}")
        return False

    cluster.wait_until(
        found, JOB_TIMEOUT, f"{pattern!r} in {log}", lambda: cluster.describe(job_id), poll=0.05
    )


def test_stage_completes_is_not_retrained_and_teaches_a_student(cluster, data, tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "out"
    logs.mkdir()
    job = submit_stage(cluster, logs, data, out, "--experiment-id", "one", "--epochs", "2")
    info = finished_ok(cluster, job)

    stage = out / "one" / "profile-1"
    assert (stage / "best.pth").is_file() and (stage / "last.pth").is_file()
    # --epochs 2 given to sbatch reached train.py after main.sh's own settings, and won.
    assert [r["epoch"] for r in records(stage)] == [1, 2]
    assert json.loads((stage / "config.json").read_text())["epochs"] == 2
    log = Path(info["StdOut"]).read_text()
    assert re.search(r"runtime: host \S+python", log), log
    assert "done: best val mIoU" in log

    # The same job once more (a requeue after the last epoch, a resubmission) finds the stage complete.
    metrics_before = (stage / "metrics.jsonl").read_bytes()
    best_mtime = (stage / "best.pth").stat().st_mtime_ns
    again = submit_stage(cluster, logs, data, out, "--experiment-id", "one", "--epochs", "2")
    again_log = Path(finished_ok(cluster, again)["StdOut"]).read_text()
    assert "stage already complete" in again_log, again_log
    assert (stage / "metrics.jsonl").read_bytes() == metrics_before
    assert (stage / "best.pth").stat().st_mtime_ns == best_mtime

    # The distillation job script, with this stage as the teacher.
    student = submit_stage(
        cluster, logs, data, out, "--experiment-id", "student", "--epochs", "1",
        "--trained-teacher-model-path", str(stage / "best.pth"), script="jobscript_slurm_distillation.sh",
    )  # fmt: skip
    student_log = Path(finished_ok(cluster, student)["StdOut"]).read_text()
    assert "bash main_distillation.sh" in student_log
    config = json.loads((out / "student" / "profile-1" / "config.json").read_text())
    assert config["trained_teacher_model_path"] == str(stage / "best.pth")
    assert [r["epoch"] for r in records(out / "student" / "profile-1")] == [1]
    assert "train_kd_loss" in records(out / "student" / "profile-1")[0]


def test_usr1_saves_last_requeues_and_resumes(cluster, data, tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "out"
    logs.mkdir()
    job = submit_stage(cluster, logs, data, out, "--experiment-id", "sig", "--epochs", str(STOP_TEST_EPOCHS))
    log_path = logs / f"fastseg-train-{job}.out"
    # Signal once training is under way (the trainer's handler is installed before the first step), as
    # Slurm does with --signal=B:USR1@300 near the time limit: only the batch shell receives it.
    wait_for_training(cluster, job, log_path)
    cluster.run(["scancel", "--signal=USR1", "--batch", job])

    info = finished_ok(cluster, job)
    assert info["Restarts"] == "1", cluster.describe(job)
    log = log_path.read_text()
    # --open-mode=append keeps both runs in one log, in this order.
    expected = [
        "got SIGUSR1",
        "stopped by SIGUSR1; last.pth holds the last finished epoch",
        f"requeueing job {job}",
        "(restart 1)",
        "resumed from",
        "done: best val mIoU",
    ]
    positions = [log.find(text) for text in expected]
    assert -1 not in positions and positions == sorted(positions), log

    stage = out / "sig" / "profile-1"
    assert [r["epoch"] for r in records(stage)] == list(range(1, STOP_TEST_EPOCHS + 1)), log
    assert load_checkpoint(stage / "last.pth", "last.pth")["epoch"] == STOP_TEST_EPOCHS


def test_scancel_stops_and_the_job_stays_cancelled(cluster, data, tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "out"
    logs.mkdir()
    job = submit_stage(
        cluster, logs, data, out, "--experiment-id", "cancel", "--epochs", str(STOP_TEST_EPOCHS)
    )
    log_path = logs / f"fastseg-train-{job}.out"
    wait_for_training(cluster, job, log_path)
    cluster.run(["scancel", job])  # SIGTERM to the batch shell and the trainer alike

    cluster.wait_until(
        lambda: not cluster.in_queue(job), JOB_TIMEOUT, "the job to end", lambda: cluster.describe(job)
    )
    info = cluster.job(job)
    # The trainer stopped cleanly (last.pth of the last epoch stays), but a job the user cancelled is not
    # brought back by a requeue.
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", cluster.describe(job)
    assert "not requeueing after SIGTERM" in log_path.read_text()
    assert (out / "cancel" / "profile-1" / "last.pth").is_file()


def test_curriculum_chain_runs_in_order(cluster, data, tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "out"
    command = [
        "bash", str(ROOT / "submit_curriculum.sh"), "--profiles", "1-2", "--experiment-id", "chain",
        "--output-dir", str(out), "--data-dir", str(data), "--log-dir", str(logs),
        "--sbatch-args", " ".join(SBATCH_ARGS),
        "--eval-args", "--device cpu --batch-size 2 --num-workers 0 --runs 3 --warmup 1 --throughput-batch 2",
        "--", *PYTHON_ARGS, "--epochs", "1",
    ]  # fmt: skip
    done = cluster.run(command, cwd=tmp_path)
    jobs = dict(re.findall(r"^chain-(\S+): job (\d+)$", done.stdout, flags=re.M))
    assert list(jobs) == ["teacher-p1", "teacher-p2", "eval"], done.stdout
    assert f"scancel {' '.join(jobs.values())}" in done.stdout

    for job in jobs.values():
        finished_ok(cluster, job)

    # Each job started after the one it depends on had ended (the completion log, what `sacct -c` reads).
    times = {c["JobId"]: (c["StartTime"], c["EndTime"]) for c in cluster.completions()}
    p1, p2, ev = (times[jobs[name]] for name in ("teacher-p1", "teacher-p2", "eval"))
    assert p1[1] <= p2[0] and p2[1] <= ev[0], times  # ISO timestamps compare as text

    stage1, stage2 = out / "chain" / "profile-1", out / "chain" / "profile-2"
    assert json.loads((stage1 / "config.json").read_text())["previous_model_loaded"] is None
    assert json.loads((stage2 / "config.json").read_text())["previous_model_loaded"] == str(
        stage1 / "best.pth"
    )

    report = json.loads((out / "chain" / "efficiency.json").read_text())
    assert [r["path"] for r in report["results"]] == [str(stage1 / "best.pth"), str(stage2 / "best.pth")]
    assert list((out / "chain" / "efficiency").glob("*.png")), "no plots"


def test_several_tasks_run_one_process_each_through_srun(cluster, data, tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "out"
    logs.mkdir()
    job = submit_stage(
        cluster,
        logs,
        data,
        out,
        "--experiment-id",
        "ddp",
        "--epochs",
        "1",
        sbatch_args=("--gpus-per-node=2", "--ntasks-per-node=2"),
    )
    log = Path(finished_ok(cluster, job)["StdOut"]).read_text()
    assert f"srun --cpus-per-task=1 bash {ROOT}/tools/srun_task.sh bash main.sh" in log
    # Two processes split the four training images: one step of 2 + 2 per epoch instead of two.
    assert "epoch 1/1 step 1/1 " in log and "step 1/2 " not in log, log
    assert [r["epoch"] for r in records(out / "ddp" / "profile-1")] == [1]


# --------------------------------------------------------------------------------- without Slurm
# A stand-in interpreter that prints what it was asked to run, so the wrappers can be checked on their own.
RECORDER = """#!/usr/bin/env bash
printf '%s\\n' "interpreter=$0" "WANDB_API_KEY=${WANDB_API_KEY:-}" "PYTHON=${PYTHON:-}" "$@"
"""


def project_copy(tmp_path: Path) -> Path:
    """The wrappers and job scripts copied into an empty project directory."""
    project = tmp_path / "project"
    (project / "tools").mkdir(parents=True)
    for name in (
        "main.sh",
        "main_distillation.sh",
        "jobscript_slurm.sh",
        "evaluate_efficiency.sh",
        "tools/launch.sh",
    ):
        (project / name).write_text((ROOT / name).read_text())
    return project


def executable(path: Path, text: str = RECORDER) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def run_lines(argv: list[str], cwd: Path, **env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_API_KEY", "PYTHON"))}
    done = subprocess.run(argv, cwd=cwd, env={**base, **env}, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_wrappers_pass_on_exactly_the_arguments_given(tmp_path):
    project = project_copy(tmp_path)
    python = executable(project / ".venv" / "bin" / "python")

    lines = run_lines(["bash", "main.sh", "--epochs", "1", "--profile", "3"], project)
    assert lines[0] == f"interpreter={python}"  # the project's .venv when $PYTHON is not set
    # No setting of its own: nothing that could shadow a constant edited in train.py.
    assert lines[3:] == [str(project / "train.py"), "--epochs", "1", "--profile", "3"]
    assert run_lines(["bash", "main.sh"], project)[3:] == [str(project / "train.py")]

    # $PYTHON (set by the job scripts) wins over .venv; the environment reaches the trainer.
    other = executable(tmp_path / "bin" / "python")
    lines = run_lines(
        ["bash", str(project / "main_distillation.sh"), "--alpha", "1"],
        tmp_path,
        WANDB_API_KEY="from-env",
        PYTHON=str(other),
    )
    assert lines[0] == f"interpreter={other}" and "WANDB_API_KEY=from-env" in lines
    assert lines[3:] == [str(project / "train_distillation.py"), "--alpha", "1"]


@pytest.mark.parametrize("runtime", ["container", "venv", "path"])
def test_job_script_picks_container_then_venv_then_python3(tmp_path, runtime):
    project = project_copy(tmp_path)
    bin_dir = tmp_path / "bin"
    executable(bin_dir / "apptainer")
    executable(bin_dir / "python3")
    if runtime == "container":
        (project / "container.sif").write_text("")
    if runtime in ("container", "venv"):
        executable(project / ".venv" / "bin" / "python")

    path = f"{bin_dir}:{os.environ['PATH']}"
    lines = run_lines(
        ["bash", "jobscript_slurm.sh", "--epochs", "3"], project, SLURM_SUBMIT_DIR=str(project), PATH=path
    )
    # What the payload printed: between the launcher's "job ..." line and its "payload exited" line.
    start = next(i for i, line in enumerate(lines) if line.startswith("job local"))
    assert lines[-1].endswith("payload exited with status 0")
    runs = lines[start + 1 : -1]
    if runtime == "container":
        assert runs[0] == f"interpreter={bin_dir}/apptainer" and "PYTHON=python3" in runs
        assert runs[3:] == [
            "exec",
            "--nv",
            str(project / "container.sif"),
            "bash",
            "main.sh",
            "--epochs",
            "3",
        ]
    else:
        interpreter = project / ".venv" / "bin" / "python" if runtime == "venv" else bin_dir / "python3"
        assert runs[0] == f"interpreter={interpreter}"
        assert runs[3] == str(project / "train.py") and runs[-2:] == ["--epochs", "3"]


def dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "submit_curriculum.sh"), "--dry-run", *args],
        capture_output=True,
        text=True,
        timeout=120,  # --baseline imports PyTorch to size its stage
    )


def test_dry_run_prints_the_chain():
    done = dry_run(
        "--profiles",
        "1-3",
        "--experiment-id",
        "run",
        "--with-student",
        "--sbatch-args",
        "--time=2:00:00 --qos=long",
        "--",
        "--epochs",
        "7",
    )
    assert done.returncode == 0, done.stderr
    jobs = [line for line in done.stdout.splitlines() if line.startswith("job")]
    assert len(jobs) == 7  # three teacher stages, three student stages, the evaluation
    teacher, student, evaluation = jobs[:3], jobs[3:6], jobs[6]
    for i, line in enumerate(teacher, start=1):
        assert f"jobscript_slurm.sh --experiment-id run --profile {i}" in line
        assert f"--previous-model-path {'none' if i == 1 else 'auto'}" in line
    for i, line in enumerate(student, start=1):
        assert f"jobscript_slurm_distillation.sh --experiment-id run_student --profile {i}" in line
        assert f"--previous-student-model-path {'none' if i == 1 else 'auto'}" in line
        assert "--trained-teacher-model-path checkpoints/run/profile-3/best.pth" in line
    for n, line in enumerate(jobs, start=1):
        assert line.startswith(f"job{n}=$(sbatch --parsable ")
        assert "--time=2:00:00 --qos=long" in line
        assert ("--epochs 7" in line) == (n < 7)  # pass-through reaches the trainers only
        if 1 < n < 7:
            assert f'"--dependency=afterok:$job{n - 1}" --kill-on-invalid-dep=yes' in line
    assert jobs[0].count("--dependency") == 0
    assert '"--dependency=afterok:$job1:$job2:$job3:$job4:$job5:$job6"' in evaluation
    assert "evaluate_efficiency.sh --current-model-path checkpoints/run/profile-1/best.pth" in evaluation
    assert "checkpoints/run_student/profile-3/best.pth" in evaluation
    assert "scancel $job1 $job2 $job3 $job4 $job5 $job6 $job7" in done.stdout
    # The printed commands are a shell script as they stand.
    assert subprocess.run(["bash", "-n"], input=done.stdout, text=True).returncode == 0


def test_dry_run_sizes_the_baseline_from_the_curriculums_compute():
    done = dry_run("--experiment-id", "ab", "--baseline", "--", "--curriculum-epochs", "40,30,20,10,10", "--lr", "0.01")
    assert done.returncode == 0, done.stderr
    jobs = [line for line in done.stdout.splitlines() if line.startswith("job")]
    assert len(jobs) == 7  # five stages, the baseline, the evaluation
    baseline = jobs[5]
    epochs = int(re.search(r"--epochs (\d+)", baseline).group(1))
    # Fast-SCNN's compute grows with the pixels of the crop: the budget in profile-5 epochs, by pixel counts.
    pixels = [448 * 224, 576 * 288, 768 * 384, 1152 * 576, 1536 * 768]
    by_pixels = sum(e * p for e, p in zip((40, 30, 20, 10, 10), pixels)) / pixels[-1]
    assert abs(epochs - by_pixels) <= 0.05 * by_pixels, (epochs, by_pixels)
    assert "--experiment-id ab_baseline --profile 5 --previous-model-path none" in baseline
    assert "--lr-decay stage" in baseline and "--lr 0.01" in baseline and "--curriculum-epochs" not in baseline
    assert "--dependency" not in baseline  # beside the curriculum, not after it
    assert "checkpoints/ab_baseline/profile-5/best.pth" in jobs[6] and ":$job6" in jobs[6]


def test_dry_run_continues_a_run_and_rejects_bad_options():
    done = dry_run("--profiles", "3,4", "--experiment-id", "run", "--no-eval")
    assert done.returncode == 0, done.stderr
    jobs = [line for line in done.stdout.splitlines() if line.startswith("job")]
    assert len(jobs) == 2 and "--profile 3 --previous-model-path auto" in jobs[0]

    for args, message in [
        (("--profiles", "3-1"), "ranges go up"),
        (("--profiles", "2,1"), "ascending"),
        (("--profiles", "6"), "profiles 1..5"),
        (("--profiles", "2-3"), "give its --experiment-id"),
        (("--student-only",), "needs --teacher-model-path"),
        (("--", "--profile", "2"), "set per stage"),
        (("--", "--output-dir=x"), "option of submit_curriculum.sh"),
        (("--frobnicate",), "unknown option"),
    ]:
        done = dry_run(*args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)


def test_dry_run_refuses_a_gap_in_the_profiles_at_once():
    for spec, skipped in (("1,3,5", "profile 2"), ("2,5", "profiles 3-4")):
        done = dry_run("--profiles", spec, "--experiment-id", "run", "--with-student", "--baseline")
        assert done.returncode == 2 and done.stdout == "", done.stdout  # nothing planned, nothing sized
        assert done.stderr.splitlines() == [
            f"error: submit_curriculum.sh: --profiles '{spec}' skips {skipped}: each stage starts from the best.pth "
            "of the profile before it and the one lr decay counts every profile's epochs; list consecutive "
            "profiles (1-5, or 3-5 to continue a run)"]


# A python3 that cannot import PyTorch, as on a login node where it lives only in the container.
NO_TORCH_PYTHON = """#!/usr/bin/env bash
PYTHONPATH={blocker} exec {python} "$@"
"""
# apptainer exec [--nv] IMAGE CMD...: CMD as the image runs it, whose python3 has PyTorch (the project's .venv).
APPTAINER = """#!/usr/bin/env bash
shift; [[ $1 == --nv ]] && shift; shift
if [[ $1 == python3 ]]; then shift; exec {venv_python} "$@"; fi
exec "$@"
"""


@pytest.mark.parametrize("runtime", ["container", "venv", "none"])
def test_dry_run_sizes_the_baseline_with_the_jobs_python_not_the_hosts(tmp_path, runtime):
    import shutil

    project = edited_project(tmp_path, "train.py", {})
    bin_dir, blocker = tmp_path / "bin", tmp_path / "blocker" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\")\n")
    executable(bin_dir / "python3", NO_TORCH_PYTHON.format(blocker=blocker.parent, python=shutil.which("python3")))
    if runtime != "venv":
        (project / ".venv").unlink()
    if runtime == "container":
        (project / "container.sif").write_text("")
        executable(bin_dir / "apptainer", APPTAINER.format(venv_python=ROOT / ".venv" / "bin" / "python"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "CONTAINER", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    host = subprocess.run(["python3", "-c", "import torch"], env=env, capture_output=True, text=True)
    assert host.returncode != 0 and "No module named 'torch'" in host.stderr  # the host's python3: no PyTorch

    done = subprocess.run(["bash", "submit_curriculum.sh", "--dry-run", "--experiment-id", "ab", "--baseline",
                           "--no-eval", "--", "--curriculum-epochs", "40,30,20,10,10"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)
    if runtime == "none":  # the jobs would run that python3 too: one line, before anything is planned
        assert done.returncode == 2 and done.stdout == ""
        [line] = done.stderr.splitlines()
        assert line.startswith("error: submit_curriculum.sh: --baseline: could not size the baseline stage with the "
                               "jobs' runtime: host python3") and "No module named 'torch'" in line, line
        return
    assert done.returncode == 0, done.stderr
    sized = {"container": f"runtime: apptainer exec --nv {project}/container.sif python3",
             "venv": f"runtime: host {project}/.venv/bin/python"}[runtime]
    assert f"# baseline: 28 epochs at profile 5 cost what profiles 1 2 3 4 5 cost (sized by the jobs' {sized}" \
        in done.stdout, done.stdout
    assert "--epochs 28 --lr-decay stage" in done.stdout  # as the test above sizes it


def test_without_root_slurm_is_unavailable_rather_than_broken(monkeypatch):
    monkeypatch.setattr(harness.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(harness, "missing_programs", lambda: ["slurmctld"])
    with pytest.raises(SlurmUnavailable, match="needs root"), slurm_cluster():
        pass
    monkeypatch.setattr(harness, "missing_programs", lambda: [])
    with pytest.raises(SlurmUnavailable, match="as root"), slurm_cluster():
        pass


# --------------------------------------------------------------------------- edited constants
# The users' workflow: edit the constants at the top of the script, then run the wrapper or sbatch the job
# script. The run must use the edited values; no wrapper may hold a copy that shadows them.


def plain_teacher(tmp_path: Path) -> Path:
    """A users' plain Fast-SCNN state_dict: the cheapest teacher to distil from."""
    from fastseg.models import build_model

    torch.manual_seed(0)
    path = tmp_path / "teacher.pth"
    torch.save(build_model("fast_scnn").state_dict(), path)
    return path


def check_edited_run(out: Path, experiment: str, log: str, expected: dict) -> None:
    """The stage ran at the edited profile for the edited values, and the log said where each setting came from."""
    stage = out / experiment / f"profile-{expected['profile']}"
    config = json.loads((stage / "config.json").read_text())
    for key, value in expected.items():
        assert config[key] == value, (key, config[key], log)
    assert len(records(stage)) == config["epochs"]
    assert not (out / experiment / "profile-1").exists()  # the wrapper's old default profile never ran
    for key in expected:  # no flag changed them, and the log would have said so
        assert f"setting: {key} =" not in log, log
    assert "setting: data_dir = " in log and "(from the command line" in log


TRAIN_EDITS = {"PROFILE": "2", "EPOCHS": "2"}
STUDENT_EDITS = {"PROFILE": "2", "ALPHA": "0.25"}


def test_edited_constants_of_train_py_reach_main_sh(tmp_path, data):
    project = edited_project(tmp_path, "train.py", TRAIN_EDITS)
    out = tmp_path / "out"
    done = subprocess.run(["bash", "main.sh", *PYTHON_ARGS, "--data-dir", str(data), "--output-dir", str(out),
                           "--experiment-id", "edited", "--previous-model-path", "none"],
                          cwd=project, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    check_edited_run(out, "edited", done.stdout, {"profile": 2, "epochs": 2})


def test_edited_constants_of_train_distillation_py_reach_main_distillation_sh(tmp_path, data):
    project = edited_project(tmp_path, "train_distillation.py", STUDENT_EDITS)
    out = tmp_path / "out"
    done = subprocess.run(["bash", "main_distillation.sh", *PYTHON_ARGS, "--data-dir", str(data), "--output-dir",
                           str(out), "--epochs", "1", "--previous-student-model-path", "none",
                           "--trained-teacher-model-path", str(plain_teacher(tmp_path))],
                          cwd=project, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    check_edited_run(out, "fast_scnn_student", done.stdout,
                     {"profile": 2, "alpha": 0.25})


def test_edited_constants_reach_the_slurm_jobs(cluster, data, tmp_path):
    # sbatch as users do: from the edited project, with no --profile; the job reads the edited files.
    out = tmp_path / "out"
    teacher = plain_teacher(tmp_path)
    jobs = []
    for script, edits, job_script, extra in (
        ("train.py", TRAIN_EDITS, "jobscript_slurm.sh", ["--experiment-id", "edited"]),
        ("train_distillation.py", STUDENT_EDITS, "jobscript_slurm_distillation.sh",
         ["--epochs", "1", "--trained-teacher-model-path", str(teacher)]),
    ):
        project = edited_project(tmp_path / script, script, edits)
        (project / "logs").mkdir()
        jobs.append(cluster.sbatch([*SBATCH_ARGS, job_script, *PYTHON_ARGS, "--data-dir", str(data),
                                    "--output-dir", str(out), "--previous-model-path", "none", *extra],
                                   cwd=project))
    train_log = Path(finished_ok(cluster, jobs[0])["StdOut"]).read_text()
    check_edited_run(out, "edited", train_log, {"profile": 2, "epochs": 2})
    student_log = Path(finished_ok(cluster, jobs[1])["StdOut"]).read_text()
    check_edited_run(out, "fast_scnn_student", student_log,
                     {"profile": 2, "alpha": 0.25})
