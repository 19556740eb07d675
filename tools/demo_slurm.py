"""`make demo-slurm`: `make demo`'s workflow, submitted with submit_curriculum.sh to a Slurm on this machine.

The same synthetic data and the same training settings as demo.sh (it sources demo.sh for them, so the
environment variables that size `make demo` size this one too: EPOCHS=1, TRAIN_IMAGES=8, ...). The cluster
is the one the tests use (tests/slurm_cluster.py): one node on localhost, started as root in a temporary
directory and stopped at the end, whatever happens. The jobs are the real job scripts, as on a cluster:

    teacher profile 1 -> teacher profile 2 -> student profile 1 -> student profile 2 -> evaluation

This script prints each job's state as it changes and the new lines of its log, then the evaluation's table.

Exit status: 0 when every job completed, 1 when one did not (its log's tail is shown), 2 when there is no
Slurm to start (not root), 130 after Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from slurm_cluster import (  # noqa: E402 - the harness lives beside the tests, not in a package
    FINISHED_STATES,
    PARTITION,
    SlurmCluster,
    SlurmError,
    SlurmUnavailable,
    ensure_installed,
    missing_programs,
    parse_key_values,
    slurm_cluster,
)

EXPERIMENT_ID = "demo_slurm"
PROFILES = "1-2"
POLL_S = 2.0
TAIL_LINES = 25
# demo.sh's settings this script needs; demo.sh is where their defaults live.
SETTINGS = ("DATA_DIR", "OUTPUT_DIR", "TRAIN_IMAGES", "VAL_IMAGES", "IMAGE_SIZE", "NUM_WORKERS", "TIMED_RUNS")


class DemoFailed(Exception):
    """A step failed (a job, the submission, the data); the message is the one-line error."""


def say(text: str = "") -> None:
    print(text, flush=True)


def step(text: str) -> None:
    say(f"\n==> {text}")


def error_line(text: str) -> str:
    # Errors from the harness carry daemon logs after the first line; the user gets the one line.
    first = text.strip().splitlines()[0] if text.strip() else "unknown error"
    return f"error: demo_slurm: {first}"


def demo_settings() -> tuple[dict[str, str], list[str]]:
    """demo.sh's variables after the environment has had its say, and the flags every stage trains with."""
    names = " ".join(f'"{name}=${name}"' for name in SETTINGS)
    script = f'source ./demo.sh && printf "%s\\0" {names} && printf "stage_flags=%s\\0" "${{stage_flags[@]}}"'
    done = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(error_line(f"reading demo.sh's settings failed: {done.stderr}"))
    settings: dict[str, str] = {}
    flags: list[str] = []
    for item in done.stdout.split("\0")[:-1]:
        key, _, value = item.partition("=")
        if key == "stage_flags":
            flags.append(value)
        else:
            settings[key] = value
    return settings, flags


def elapsed(start: float) -> str:
    seconds = int(time.monotonic() - start)
    return f"{seconds // 60}:{seconds % 60:02d}"


class Job:
    """One submitted job: the state last printed, and how far its log has been shown."""

    def __init__(self, name: str, job_id: str) -> None:
        self.name = name
        self.id = job_id
        self.short = name.removeprefix(f"{EXPERIMENT_ID}-")
        self.state = ""
        self.record: dict[str, str] = {}
        self.offset = 0
        self.partial = ""
        # While a block of the log that is not progress is passed over: the start of the line that ends it,
        # and whether that line is shown.
        self.skip_until: tuple[str, bool] | None = None

    @property
    def log(self) -> Path | None:
        out = self.record.get("StdOut")
        return Path(out) if out else None

    def set_record(self, record: dict[str, str]) -> None:
        # The completion log lacks StdOut: keep the path the controller gave while it knew the job.
        self.record = {**self.record, **record}

    def text(self) -> str:
        if self.log is None or not self.log.is_file():
            return ""
        return self.log.read_text(errors="replace")

    def new_lines(self) -> list[str]:
        """Complete lines written to the log since the last call (Slurm appends; requeues keep the file)."""
        if self.log is None or not self.log.is_file():
            return []
        with open(self.log, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        text = self.partial + data.decode(errors="replace")
        *lines, self.partial = text.split("\n")
        return lines

    def progress(self) -> list[str]:
        """The new log lines worth showing while waiting: training and evaluation progress, errors."""
        shown = []
        for raw in self.new_lines():
            # A progress bar redraws itself with carriage returns; its last state is the news.
            line = raw.rstrip().rsplit("\r", 1)[-1]
            if self.skip_until is not None:
                end, keep = self.skip_until
                if not line.startswith(end):
                    continue
                self.skip_until = None
                if not keep:
                    continue
            if line == "{":
                # The stage's full configuration: it is in config.json beside the checkpoints.
                self.skip_until = ("}", False)
            elif line.startswith("|"):
                # The evaluation's table and the paragraph under it: printed once, at the end. The
                # "wrote ..." lines after them say where the report went.
                self.skip_until = ("wrote ", True)
            elif line.strip() and not line.startswith("wandb:"):
                shown.append(line)
        return shown

    def tail(self, lines: int = TAIL_LINES) -> str:
        if self.log is None or not self.log.is_file():
            return f"(no log file {self.log})"
        return "\n".join(self.text().splitlines()[-lines:])


def submit(cluster: SlurmCluster, settings: dict[str, str], flags: list[str], log_dir: str) -> list[Job]:
    # The node has this machine's CPUs; the job scripts ask for 18. The stages run one after the other,
    # so each may have them all.
    command = [
        "bash", "submit_curriculum.sh", "--profiles", PROFILES, "--with-student",
        "--experiment-id", EXPERIMENT_ID,
        "--data-dir", settings["DATA_DIR"], "--output-dir", settings["OUTPUT_DIR"], "--log-dir", log_dir,
        "--sbatch-args", f"--cpus-per-task={cluster.cpus}",
        "--eval-args", f"--num-workers {settings['NUM_WORKERS']} --runs {settings['TIMED_RUNS']}",
        "--", *flags,
    ]  # fmt: skip
    say(f"$ {shlex.join(command)}")
    done = cluster.run(command, check=False, cwd=REPO)
    sys.stdout.write(done.stdout)
    if done.returncode != 0:
        raise DemoFailed(
            f"submit_curriculum.sh exited {done.returncode}: {done.stderr.strip() or done.stdout}"
        )
    jobs = []
    for line in done.stdout.splitlines():
        name, sep, job_id = line.partition(": job ")
        if sep and job_id.strip().isdigit():
            jobs.append(Job(name, job_id.strip()))
    if not jobs:
        raise DemoFailed(f"submit_curriculum.sh printed no job ids:\n{done.stdout}")
    return jobs


def records(cluster: SlurmCluster) -> dict[str, dict[str, str]]:
    """Every job the controller knows, by id; jobs it has forgotten come from the completion log."""
    found = {c.get("JobId", ""): c for c in cluster.completions()}
    done = cluster.run(["scontrol", "show", "job", "-o"], check=False)
    if done.returncode != 0 and "No jobs" not in done.stderr + done.stdout:
        raise SlurmError(f"scontrol show job: {done.stderr.strip()}")
    for line in done.stdout.splitlines():
        record = parse_key_values(line)
        if "JobId" in record:
            found[record["JobId"]] = record
    return found


def describe_state(record: dict[str, str]) -> str:
    state = record.get("JobState", "?")
    reason = record.get("Reason", "None")
    if state == "PENDING" and reason not in ("None", ""):
        return f"{state} ({reason})"
    if state == "CANCELLED" and reason not in ("None", ""):
        return f"{state} ({reason})"
    if state in FINISHED_STATES and state != "COMPLETED":
        return f"{state} (exit {record.get('ExitCode', '?')})"
    return state


def wait(cluster: SlurmCluster, jobs: list[Job], start: float) -> None:
    """Print state changes and new log lines until every job has completed; DemoFailed on the first that fails."""
    while True:
        known = records(cluster)
        for job in jobs:
            if job.id in known:
                job.set_record(known[job.id])
            state = describe_state(job.record)
            lines = [f"    {job.short} | {line}" for line in job.progress()]
            change = [f"[{elapsed(start)}] {job.short} (job {job.id}): {state}"] if state != job.state else []
            job.state = state
            # A job's last lines come before the news that it has ended, its first ones after it started.
            ended = job.record.get("JobState") in FINISHED_STATES
            for line in lines + change if ended else change + lines:
                say(line)
        for job in jobs:
            state = job.record.get("JobState", "")
            if state in FINISHED_STATES and state != "COMPLETED":
                say(f"\n--- last lines of {job.log}")
                say(job.tail())
                raise DemoFailed(
                    f"job {job.id} ({job.name}) ended {describe_state(job.record)}; log: {job.log}"
                )
        if all(job.record.get("JobState") == "COMPLETED" for job in jobs):
            return
        time.sleep(POLL_S)


def evaluation_table(job: Job) -> str:
    """The Markdown table evaluate_efficiency.py printed, from the job's log."""
    lines = job.text().splitlines()
    table = [i for i, line in enumerate(lines) if line.startswith("|")]
    if not table:
        return f"(no table in {job.log})"
    first, last = table[0], table[0]
    while last + 1 < len(lines) and lines[last + 1].startswith("|"):
        last += 1
    return "\n".join(lines[first : last + 1])


def check_slurm() -> None:
    """SlurmUnavailable unless a local Slurm can be started here; installs it when root and it is missing."""
    if missing_programs() and os.geteuid() == 0:
        say("installing Slurm and munge with tools/install_slurm.sh (once; a few minutes)")
    ensure_installed()
    if os.geteuid() != 0:
        raise SlurmUnavailable(
            "not root: the local Slurm runs slurmd as root; run this as root, or run `make demo` here and "
            "submit_curriculum.sh on a real cluster"
        )
    say(f"slurmctld, slurmd and munged found ({shutil.which('sbatch')})")


def run_on_cluster(settings: dict[str, str], flags: list[str], log_dir: str, start: float) -> str:
    """Cluster up, jobs submitted and waited for, cluster down (always); returns the evaluation's table."""
    up = time.monotonic()
    with contextlib.ExitStack() as stack:
        try:
            cluster = stack.enter_context(slurm_cluster())
        except SlurmError as exc:
            # Not started is the same as not there; a failure once it runs is the demo's.
            raise SlurmUnavailable(f"Slurm did not start: {exc}") from exc
        try:
            say(f"one node ({cluster.node}, {cluster.cpus} CPUs, partition {PARTITION}), up in {elapsed(up)}")
            step(f"4/5 submit_curriculum.sh: teacher and student, profiles {PROFILES}, then the evaluation")
            jobs = submit(cluster, settings, flags, log_dir)
            step("5/5 the jobs (Ctrl-C cancels them and stops the cluster)")
            wait(cluster, jobs, start)
            return evaluation_table(jobs[-1])
        except KeyboardInterrupt:
            say("\ninterrupted: a stage that is training stops; `make demo-slurm` again resumes it from its last epoch")
            raise
        finally:
            # A second Ctrl-C while the cluster stops would leave its daemons and jobs behind.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            say("\nstopping the Slurm cluster")


def main() -> int:
    # `kill` (or a closed terminal) must stop the cluster too: the same clean-up path as Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.default_int_handler)
    start = time.monotonic()
    settings, flags = demo_settings()
    out = settings["OUTPUT_DIR"]
    # Each run's cluster numbers its jobs from 1 again, so the logs of two runs would share names (and the
    # training jobs append to theirs): every run gets its own folder.
    log_dir = f"logs/{EXPERIMENT_ID}-{time.strftime('%Y%m%d-%H%M%S')}"
    started = False
    try:
        # Before the data: without Slurm there is nothing to make it for.
        step("1/5 a local Slurm (tests/slurm_cluster.py)")
        check_slurm()

        step(
            f"2/5 synthetic Cityscapes: {settings['TRAIN_IMAGES']} train + {settings['VAL_IMAGES']} val "
            f"street scenes at {settings['IMAGE_SIZE']} in {settings['DATA_DIR']}"
        )
        made = subprocess.run(["bash", "-c", "source ./demo.sh && make_data"], cwd=REPO)
        if made.returncode != 0:
            raise DemoFailed(f"making the synthetic data failed (exit {made.returncode})")

        step("3/5 a one-node Slurm cluster on this machine")
        started = True
        table = run_on_cluster(settings, flags, log_dir, start)
    except SlurmUnavailable as exc:
        print(error_line(f"no Slurm to run the demo on: {exc}"), file=sys.stderr)
        return 2
    except SlurmError as exc:
        print(error_line(f"Slurm: {exc}"), file=sys.stderr)
        return 1
    except DemoFailed as exc:
        print(error_line(str(exc)), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "error: demo_slurm: interrupted" + ("; the cluster is stopped" if started else ""),
            file=sys.stderr,
        )
        return 130

    step("the four stages: accuracy, cost and speed")
    say(table)
    experiment = f"{out}/{EXPERIMENT_ID}"
    say(
        f"\nDone in {elapsed(start)} (m:ss).\n"
        f"  report:      {experiment}/efficiency.json\n"
        f"  plots:       {experiment}/efficiency/*.png\n"
        f"  checkpoints: {experiment} and {experiment}_student\n"
        f"  job logs:    {log_dir}/\n"
        f"  W&B runs:    {out}/{EXPERIMENT_ID}*/profile-*/wandb (offline; `wandb sync` uploads them)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
