"""A real Slurm on localhost for tests: ``with slurm_cluster() as cluster: cluster.sbatch(...)``.

Debian's Slurm 22.05 (``slurmctld``, ``slurmd``, ``slurm-client``, ``munge``; ``tools/install_slurm.sh``) is
started as root with its configuration, state, spool, logs and munge key in a fresh temporary directory,
on free TCP ports and a private munge socket, so it cannot clash with a Slurm or munge already on the
machine. Commands reach it through ``SLURM_CONF`` (``cluster.env``). Everything it started is stopped on
exit, running jobs included. The one lasting change: the host's name is added to /etc/hosts when it does
not resolve, as slurmd needs (and the names of the nodes below where mount namespaces are refused).

``slurm_cluster(nodes=2)`` gives two nodes, ``fastseg-node1`` and ``fastseg-node2``: two slurmd daemons on
this machine (``slurmd -N <node>``), both at 127.0.0.1, each with its own port, spool directory, pid file and
log.
Jobs reach the first node by name (MASTER_ADDR), so the slurmd daemons run in a private mount namespace where
a copy of /etc/hosts also names the nodes; their jobs inherit it and the machine's /etc/hosts is untouched.
Where namespaces are refused (``unshare`` fails), the names are added to /etc/hosts instead.

Each node pretends to have GPUs so job scripts asking for ``--gpus=1`` are accepted: a GRES whose ``File=``
entries are symlinks to /dev/null (a count-only GRES makes the node INVALID and plain files are refused).
The partition is ``gpu_a100`` like on the users' cluster; tests lower ``--cpus-per-task`` to fit the machine.

Standalone check: ``python tests/slurm_cluster.py`` starts a two-node cluster, runs a job and stops it.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INSTALL_SCRIPT = REPO / "tools" / "install_slurm.sh"
DAEMONS = ("slurmctld", "slurmd", "munged", "mungekey")
CLIENTS = ("sbatch", "squeue", "sacct", "scontrol", "scancel", "sinfo")
PARTITION = "gpu_a100"
# `unshare` arguments that run a command in a private mount namespace with its own /etc/hosts; followed by the
# hosts file, then the command.
PRIVATE_HOSTS = [
    "--mount", "--propagation", "private", "--", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"'
]  # fmt: skip
POLL_S = 0.5

# States after which a job will not run again unless it is requeued.
FINISHED_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed and cannot be installed here (not root, no apt, install failed)."""


class SlurmError(RuntimeError):
    """The test cluster misbehaved: a daemon did not start, a command failed, a wait timed out."""


def _which(name: str) -> str | None:
    # Daemons live in /usr/sbin, which is not on every root PATH (e.g. under `su` without `-`).
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


def missing_programs() -> list[str]:
    return [name for name in DAEMONS + CLIENTS if _which(name) is None]


def ensure_installed() -> None:
    """Install Slurm and munge with tools/install_slurm.sh when missing; SlurmUnavailable if impossible."""
    missing = missing_programs()
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(
            f"Slurm is not installed ({', '.join(missing)} missing) and installing it needs root: "
            f"run `sudo bash {INSTALL_SCRIPT.relative_to(REPO)}`"
        )
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(
            f"Slurm is not installed ({', '.join(missing)} missing) and there is no apt-get"
        )
    done = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True)
    if done.returncode != 0 or missing_programs():
        raise SlurmUnavailable(
            f"{INSTALL_SCRIPT.relative_to(REPO)} failed (exit {done.returncode}):\n{done.stdout[-2000:]}"
            f"{done.stderr[-2000:]}"
        )


def _resolves(name: str) -> bool:
    try:
        socket.gethostbyname(name)
    except OSError:
        return False
    return True


def _add_to_etc_hosts(names: Sequence[str]) -> None:
    with open("/etc/hosts", "a") as hosts:
        hosts.write(f"\n127.0.0.1 {' '.join(names)}\n")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} not readable)"
    return "\n".join(text[-lines:])


def parse_key_values(text: str) -> dict[str, str]:
    """`scontrol show ... -o` prints one line of Key=Value pairs."""
    return dict(re.findall(r"(\w[\w:/.]*)=(\S*)", text))


class SlurmCluster:
    """One slurmctld, one slurmd per node and one munged, all run from ``root``; see the module docstring."""

    def __init__(self, root: Path, gpus: int = 2, nodes: int = 1) -> None:
        self.root = root
        self.gpus = gpus  # per node
        # The controller's host, and the node of a one-node cluster.
        self.node = socket.gethostname().split(".")[0]
        self.nodes = [self.node] if nodes == 1 else [f"fastseg-node{i}" for i in range(1, nodes + 1)]
        self.hosts_file: Path | None = None  # /etc/hosts of the slurmd daemons' namespace, when they have one
        self.cpus = os.cpu_count() or 1
        self.conf = root / "slurm" / "slurm.conf"
        self.log_dir = root / "log"
        self.jobcomp = self.log_dir / "jobcomp.txt"
        self.munge_dir = root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        # The scripts under test must not see a Slurm job this process may itself be running in.
        for key in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if key != "SLURM_CONF":
                del self.env[key]
        self._procs: dict[str, subprocess.Popen] = {}

    # ----------------------------------------------------------------------------------- set-up
    def _write_munge(self) -> None:
        import pwd

        try:
            munge_user = pwd.getpwnam("munge")
        except KeyError as exc:
            raise SlurmUnavailable("user `munge` does not exist; reinstall the munge package") from exc
        # munged wants its socket's directory searchable by everyone (clients of any user connect).
        self.munge_dir.mkdir()
        self.munge_dir.chmod(0o755)
        key = self.munge_dir / "munge.key"
        self._check(["mungekey", "--create", "--keyfile", str(key)])
        for path in (self.munge_dir, key):
            os.chown(path, munge_user.pw_uid, munge_user.pw_gid)
        # munged refuses to run as root; it runs as `munge` and only needs its own directory.
        self._procs["munged"] = subprocess.Popen(
            [
                _which("munged") or "munged",
                "--foreground",
                "--socket",
                str(self.munge_socket),
                "--key-file",
                str(key),
                "--pid-file",
                str(self.munge_dir / "munged.pid"),
                "--log-file",
                str(self.munge_dir / "munged.log"),
                "--seed-file",
                str(self.munge_dir / "munged.seed"),
            ],
            user=munge_user.pw_uid,
            group=munge_user.pw_gid,
            extra_groups=[],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log_dir / "munged.stderr", "wb"),  # noqa: SIM115 - closed with the process
            start_new_session=True,
        )

    def _write_slurm_conf(self) -> None:
        slurm = self.conf.parent
        for sub in ("slurm", "state", "spool", "run", "dev"):
            (self.root / sub).mkdir(exist_ok=True)
        for i in range(self.gpus):
            (self.root / "dev" / f"gpu{i}").symlink_to("/dev/null")
        gpu_files = f"{self.root}/dev/gpu[0-{self.gpus - 1}]" if self.gpus > 1 else f"{self.root}/dev/gpu0"
        (slurm / "gres.conf").write_text(f"NodeName={','.join(self.nodes)} Name=gpu File={gpu_files}\n")
        for node in self.nodes:
            (self.root / "spool" / node).mkdir()
        ctld_port, slurmd_ports = _free_port(), [_free_port() for _ in self.nodes]
        node_lines = "\n".join(
            f"NodeName={node} NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus} Gres=gpu:{self.gpus} "
            "State=UNKNOWN"
            for node, port in zip(self.nodes, slurmd_ports)
        )
        r = self.root
        self.conf.write_text(
            f"""\
ClusterName=fastsegtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_ports[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s; minimum 5).
AuthInfo=socket={self.munge_socket},cred_expire=5
CredType=cred/munge
StateSaveLocation={r}/state
# %n is the node's name: each slurmd of a several-node cluster keeps its own files.
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={self.log_dir}/slurmctld.log
SlurmdLogFile={self.log_dir}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SlurmdParameters=config_overrides
# A busy scheduler keeps requeues and dependencies quick in tests. KillWait (SIGTERM to SIGKILL) stays
# Slurm's default: a trainer stopped by scancel needs it to finish its step and save last.pth.
KillWait=30
SchedulerParameters=sched_interval=1,bf_interval=1
MinJobAge=600
# Job ids, and so the jobs' rendezvous ports (fastseg.distributed.master_port), differ between test clusters
# running at the same time on one machine.
FirstJobId={random.randint(1000, 19000)}
GresTypes=gpu
{node_lines}
PartitionName={PARTITION} Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _ensure_host_resolves(self) -> None:
        # slurmd and the clients look the host up by name; a container may not list its own name.
        if not _resolves(self.node):
            _add_to_etc_hosts([self.node])

    def _name_the_nodes(self) -> None:
        """Make the invented node names resolve to 127.0.0.1 for the jobs (see the module docstring)."""
        names = [node for node in self.nodes if node != self.node]
        if not names:
            return
        hosts = self.conf.parent / "hosts"
        hosts.write_text(Path("/etc/hosts").read_text() + f"\n127.0.0.1 {' '.join(names)}\n")
        unshare = _which("unshare")
        probe = [unshare, *PRIVATE_HOSTS, str(hosts), "true"] if unshare else None
        if probe and subprocess.run(probe, capture_output=True).returncode == 0:
            self.hosts_file = hosts
        elif unresolved := [name for name in names if not _resolves(name)]:
            _add_to_etc_hosts(unresolved)

    def _slurmd_argv(self, node: str) -> list[str]:
        argv = [_which("slurmd") or "slurmd", "-D", "-f", str(self.conf), "-N", node]
        if self.hosts_file is None:
            return argv
        # Jobs are started by slurmd and inherit its namespace, with the node names in its /etc/hosts.
        return [_which("unshare") or "unshare", *PRIVATE_HOSTS, str(self.hosts_file), *argv]

    def start(self, timeout: float = 60.0) -> None:
        self.root.chmod(0o755)  # the munge user must reach its directory inside
        self.log_dir.mkdir()
        self._ensure_host_resolves()
        self._write_munge()
        self.wait_until(self._munge_ready, 15, "munged to open its socket", self._diagnostics)
        self._write_slurm_conf()
        self._name_the_nodes()
        daemons = [("slurmctld", [_which("slurmctld") or "slurmctld", "-D", "-c", "-f", str(self.conf)])]
        daemons += [(f"slurmd-{node}", self._slurmd_argv(node)) for node in self.nodes]
        for name, argv in daemons:
            self._procs[name] = subprocess.Popen(
                argv,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=open(self.log_dir / f"{name}.stderr", "wb"),  # noqa: SIM115
                start_new_session=True,
            )
        self.wait_until(
            self._nodes_idle, timeout, f"nodes {','.join(self.nodes)} to become idle", self._diagnostics
        )

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise SlurmError(f"{name} exited with status {proc.returncode}\n{self._diagnostics()}")

    def _munge_ready(self) -> bool:
        self._check_alive()
        return self.munge_socket.exists()

    def _nodes_idle(self) -> bool:
        self._check_alive()
        done = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
        states = [state.rstrip("*") for state in done.stdout.split()]
        return done.returncode == 0 and states == ["idle"] * len(self.nodes)

    def _diagnostics(self) -> str:
        parts = []
        slurmd = [f"slurmd-{node}.{ext}" for node in self.nodes for ext in ("log", "stderr")]
        for name in ("munged.log", "munged.stderr", "slurmctld.log", "slurmctld.stderr", *slurmd):
            path = self.munge_dir / name if name.startswith("munged.log") else self.log_dir / name
            if path.exists():
                parts.append(f"--- {path}\n{_tail(path)}")
        return "\n".join(parts)

    # ---------------------------------------------------------------------------------- teardown
    def stop(self) -> None:
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--user", "root"], check=False)
            with contextlib.suppress(SlurmError):
                self.wait_until(
                    lambda: not self.run(["squeue", "-h"], check=False).stdout.strip(), 45, "jobs to end"
                )
        self._kill_job_processes()
        for name in [*(f"slurmd-{node}" for node in self.nodes), "slurmctld", "munged"]:
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def _kill_job_processes(self) -> None:
        """Jobs' processes outlive slurmd; end those whose environment names this cluster's config."""
        marker = f"SLURM_CONF={self.conf}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in environ:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(entry.name), signal.SIGKILL)

    # ---------------------------------------------------------------------------------- commands
    def run(
        self,
        argv: Sequence[str],
        check: bool = True,
        cwd: Path | str | None = None,
        timeout: float = 60,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """Run a command against this cluster (SLURM_CONF set, ``env`` added); SlurmError if it fails.

        sbatch hands its environment to the job, so ``env`` also reaches the job script.
        """
        env = {**self.env, **(env or {})}
        done = subprocess.run(list(argv), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise SlurmError(
                f"{' '.join(argv)} exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
            )
        return done

    _check = run

    def sbatch(
        self, args: Sequence[str], cwd: Path | str | None = None, env: dict[str, str] | None = None
    ) -> str:
        """Submit with ``sbatch --parsable``; returns the job id."""
        done = self.run(["sbatch", "--parsable", *args], cwd=cwd, env=env)
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """The controller's view of a job (``scontrol show job``): JobState, Restarts, ExitCode, StdOut, ..."""
        done = self.run(["scontrol", "show", "job", "-o", job_id], check=False)
        if done.returncode != 0:
            raise SlurmError(f"scontrol show job {job_id}: {done.stderr.strip()}")
        return parse_key_values(done.stdout)

    def state(self, job_id: str) -> str:
        return self.job(job_id)["JobState"]

    def wait_for_state(
        self, job_id: str, states: Sequence[str] | frozenset[str], timeout: float
    ) -> dict[str, str]:
        """Poll until the job is in one of ``states``; returns its record. SlurmError (with its log) on timeout."""
        wanted = set(states)
        seen: dict[str, str] = {}

        def reached() -> bool:
            seen.update(self.job(job_id))
            return seen["JobState"] in wanted

        self.wait_until(
            reached, timeout, f"job {job_id} to reach {sorted(wanted)}", lambda: self.describe(job_id)
        )
        return seen

    def wait_finished(self, job_id: str, timeout: float) -> dict[str, str]:
        return self.wait_for_state(job_id, FINISHED_STATES, timeout)

    def in_queue(self, job_id: str) -> bool:
        """Pending, running or completing: some process of the job may still run."""
        return bool(self.run(["squeue", "-h", "-j", job_id, "-o", "%T"], check=False).stdout.strip())

    def describe(self, job_id: str) -> str:
        """Job record and its output file, for assertion messages."""
        try:
            info = self.job(job_id)
        except SlurmError as exc:
            return str(exc)
        out = Path(info.get("StdOut", ""))
        text = _tail(out, 60) if out.is_file() else f"(no output file {out})"
        return f"job {job_id}: {' '.join(f'{k}={v}' for k, v in info.items())}\n--- {out}\n{text}"

    def completions(self) -> list[dict[str, str]]:
        """Finished jobs from the job completion log (what ``sacct -c`` reads), one dict per line."""
        if not self.jobcomp.exists():
            return []
        return [parse_key_values(line) for line in self.jobcomp.read_text().splitlines() if line.strip()]

    @staticmethod
    def wait_until(
        predicate: Callable[[], bool],
        timeout: float,
        what: str,
        diagnostics: Callable[[], str] | None = None,
        poll: float = POLL_S,
    ) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                detail = f"\n{diagnostics()}" if diagnostics else ""
                raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}{detail}")
            time.sleep(poll)


@contextlib.contextmanager
def slurm_cluster(gpus: int = 2, keep: bool = False, nodes: int = 1) -> Iterator[SlurmCluster]:
    """Install if needed (root), start, yield, stop. ``keep`` leaves the temp dir for a post-mortem."""
    ensure_installed()
    if os.geteuid() != 0:
        raise SlurmUnavailable("the test cluster runs slurmd as root (jobs of any user, munge as `munge`)")
    # Not under pytest's tmp dirs: those are private to root and munged, running as `munge`, must enter.
    root = Path(tempfile.mkdtemp(prefix="fastseg-slurm-"))
    cluster = SlurmCluster(root, gpus=gpus, nodes=nodes)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    with slurm_cluster(nodes=2) as c:
        print(c.run(["sinfo"]).stdout)
        out = c.root / "hello.out"
        jid = c.sbatch(
            ["--nodes=2", "--gpus-per-node=1", "--cpus-per-task=1", f"--output={out}", "--wrap",
             "srun bash -c 'echo $SLURMD_NODENAME GPU $CUDA_VISIBLE_DEVICES $(getent hosts fastseg-node1)'"]
        )
        print(c.wait_finished(jid, 60)["JobState"], out.read_text())
        print(c.run(["sacct", "-c", "-j", jid]).stdout)
