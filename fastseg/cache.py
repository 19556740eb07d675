"""The pre-resized, memory-mapped cache of a split: where it lives, building it once, and opening it.

Why a cache: decoding one 2048×1024 PNG costs ~35 ms of CPU, which made every epoch of every stage
decode-bound. Each split is decoded once per profile into uint8 arrays already resized to the profile
(images 3×H×W, labels as train ids), stored as ``.npy`` files that the loader workers memory-map; a train
sample is then a slice, a flip and a copy.

Cache location: ``cache_dir`` argument, else ``$FASTSEG_CACHE_DIR``, else ``<data_dir>/.cache/fastseg`` when
writable, else ``~/.cache/fastseg``. Inside it, ``<data name>-<hash of its path>/<split>-<hash of the
source files' paths, sizes and mtimes>/`` holds one file per array, so an edited, added or removed
source file gives a new key and a rebuild (older entries of the split are removed then).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fastseg.cityscapes import Sample, load_sample, read_label, read_sizes
from fastseg.errors import UserError

# Bumped whenever what is stored changes (decoder, resize method, layout): old entries then no longer match.
CACHE_VERSION = 1
CACHE_ENV = "FASTSEG_CACHE_DIR"


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            return True
    except OSError:
        return False


def cache_root(data_dir: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where the cache of ``data_dir`` lives (before the per-dataset subdirectory)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    beside = Path(data_dir).expanduser() / ".cache" / "fastseg"
    if _writable_dir(beside):
        return beside
    home_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return home_cache / "fastseg"


def _array_names(resize_hw: tuple[int, int] | None) -> tuple[str, ...]:
    if resize_hw is None:
        return ("labels-full.npy", "labels-full-index.npy")
    h, w = resize_hw
    return (f"images-{w}x{h}.npy", f"labels-{w}x{h}.npy")


@dataclass(frozen=True)
class _BuildJob:
    samples: tuple[Sample, ...]
    resize_hw: tuple[int, int] | None  # None: full-resolution labels only
    paths: tuple[Path, ...]  # temporary files the arrays are written to
    index: np.ndarray | None  # full labels: (offset, h, w) per sample


_JOB: _BuildJob | None = None
_OUT: tuple[np.ndarray, ...] = ()


def _init_builder(job: _BuildJob, parent: int | None = None) -> None:
    global _JOB, _OUT
    if parent is not None:  # a builder process
        _detach_from_signals(parent)
    torch.set_num_threads(1)  # one decode per process; processes are the parallelism
    _JOB = job
    _OUT = tuple(np.load(p, mmap_mode="r+") for p in job.paths[: 1 if job.resize_hw is None else 2])


def _detach_from_signals(parent: int) -> None:
    """Builders leave signals to the process that started them and die with it.

    They inherit the trainer's SIGUSR1/SIGTERM handler (which only sets a flag) and would otherwise ignore
    the signal that ends them. Slurm and Ctrl-C signal the whole process group; the trainer decides: it
    lets the build finish (the cache is kept for the next run) and then stops, or, after a second Ctrl-C,
    drops the build. A builder left without its parent (killed with SIGKILL) is killed too.
    """
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):  # Linux only; elsewhere builders exit with the pool
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _build_one(i: int) -> int:
    job = _JOB
    sample = job.samples[i]
    if job.resize_hw is None:
        label = read_label(sample.label)
        offset, h, w = job.index[i]
        if label.shape != (h, w):  # the file changed between the header scan and now
            raise UserError(f"{sample.label}: changed while the cache was being built; run again")
        _OUT[0][offset : offset + h * w] = label.reshape(-1)
    else:
        image, label = load_sample(sample, job.resize_hw)
        _OUT[0][i] = image.numpy()
        _OUT[1][i] = label.numpy()
    return i


def _build_workers(n: int, pixels: int, workers: int | None) -> int:
    if workers is None:
        # Small sets decode faster than a pool starts; below ~8 full-size frames stay in this process.
        workers = 1 if pixels < 16_000_000 else min(len(os.sched_getaffinity(0)), 32)
    if mp.current_process().daemon:  # a daemonic process (e.g. a loader worker) may not have children
        workers = 1
    return max(1, min(workers, n))


def _build(entry: Path, samples: Sequence[Sample], resize_hw, split: str, workers: int | None) -> None:
    """Decode ``samples`` into the arrays of ``entry`` (temp files, then renamed)."""
    sizes = read_sizes(samples)
    n = len(samples)
    names = _array_names(resize_hw)
    tmp = [entry / f".{name}.tmp-{socket.gethostname()}-{os.getpid()}" for name in names]
    index = None
    if resize_hw is None:
        counts = np.array([h * w for h, w in sizes], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        index = np.stack([offsets, [h for h, _ in sizes], [w for _, w in sizes]], axis=1).astype(np.int64)
        need = int(counts.sum())
        shapes = [(need,)]
    else:
        h, w = resize_hw
        shapes = [(n, 3, h, w), (n, h, w)]
        need = 4 * n * h * w
    free = shutil.disk_usage(entry).free
    if need > free:
        raise UserError(
            f"{entry}: the data cache needs {need / 1e9:.1f} GB but the disk has {free / 1e9:.1f} GB free; "
            f"set {CACHE_ENV} (or --cache-dir) to a larger disk"
        )
    for path, shape in zip(tmp, shapes):
        np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape).flush()
    if index is not None:
        with open(tmp[1], "wb") as f:  # a file object: np.save would append ".npy" to a path
            np.save(f, index)

    job = _BuildJob(tuple(samples), resize_hw, tuple(tmp), index)
    what = "full-size labels" if resize_hw is None else f"{resize_hw[1]}x{resize_hw[0]}"
    pixels = sum(h * w for h, w in sizes)
    procs = _build_workers(n, pixels, workers)
    print(
        f"building the {split} data cache ({n} images, {what}, {need / 1e9:.2f} GB) in {entry}",
        file=sys.stderr,
        flush=True,
    )
    global _OUT
    try:
        with tqdm(total=n, desc=f"cache {split} {what}", unit="img", file=sys.stderr) as bar:
            if procs == 1:
                threads = torch.get_num_threads()
                _init_builder(job)
                torch.set_num_threads(threads)
                for i in range(n):
                    _build_one(i)
                    bar.update()
            else:
                # fork: children only run libpng and tensor resizes on fresh single-thread pools; spawn
                # would re-import torch in each of them for no benefit.
                pool = ProcessPoolExecutor(procs, mp_context=mp.get_context("fork"), initializer=_init_builder,
                                           initargs=(job, os.getpid()))
                try:
                    for _ in pool.map(_build_one, range(n), chunksize=4):
                        bar.update()
                except BrokenProcessPool:
                    raise UserError(
                        f"{entry}: a process building the data cache was killed (out of memory, or SIGKILL); run again, "
                        f"or set {CACHE_ENV} / --cache-dir to build it elsewhere"
                    ) from None
                finally:  # on an error, the chunks not started are dropped rather than decoded for nothing
                    pool.shutdown(wait=True, cancel_futures=True)
        _OUT = ()
        for path in tmp:
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
    except BaseException:
        _OUT = ()
        for path in tmp:
            path.unlink(missing_ok=True)
        raise
    # The index goes in place before the data, so the data file's presence means both are complete.
    for path, name in sorted(zip(tmp, names), key=lambda pn: "index" not in pn[1]):
        os.replace(path, entry / name)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[bool]:
    """Hold an exclusive flock on ``path``; yields False where the file system has no flock (some
    Lustre mounts): building stays correct then (unique temp names, atomic renames), only not shared."""
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"waiting for another process building the data cache ({path})", file=sys.stderr, flush=True
            )
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as exc:
            print(f"note: no file locking on {path.parent} ({exc}); building without it", file=sys.stderr)
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _source_key(data_dir: Path, split: str, samples: Sequence[Sample]) -> str:
    files = []
    for s in samples:
        for path in (s.image, s.label):
            st = path.stat()
            files.append([str(path), st.st_size, st.st_mtime_ns])
    return _sha({"version": CACHE_VERSION, "data_dir": str(data_dir), "split": split, "files": files})


def open_cache(
    data_dir: str | Path,
    split: str,
    samples: Sequence[Sample],
    resize_hw: tuple[int, int] | None,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    build: bool = True,
) -> tuple[Path, ...] | None:
    """Paths of the cached arrays of ``samples``, built first if missing or stale (``None`` then, when
    not ``build``).

    ``resize_hw`` given: ``images-WxH.npy`` (N×3×H×W) and ``labels-WxH.npy`` (N×H×W train ids).
    ``None``: full-resolution labels, ``labels-full.npy`` (all labels flattened one after another) and
    ``labels-full-index.npy`` (offset, h, w per sample).

    Readers of a complete entry take no lock: every file appears by an atomic rename once complete.
    Builders hold an exclusive ``flock`` per entry, so concurrent processes (DDP ranks, two jobs) build
    it once and the others wait, then read.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    key = _source_key(data_dir, split, samples)
    group = f"{data_dir.name or 'data'}-{_sha(str(data_dir))[:8]}"
    entry_name = f"{split}-{key[:16]}"
    names = _array_names(resize_hw)

    roots = [cache_root(data_dir, cache_dir)]
    if cache_dir is None and not os.environ.get(CACHE_ENV):
        # A cache already built beside a read-only data copy (e.g. by whoever shares it) is used as is.
        roots.insert(0, data_dir / ".cache" / "fastseg")
    for root in roots:
        entry = root / group / entry_name
        if all((entry / name).is_file() for name in names):
            return tuple(entry / name for name in names)
    if not build:
        return None

    root = roots[-1]
    entry = root / group / entry_name
    try:
        entry.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"{root}: cannot create the data cache there ({exc}); set {CACHE_ENV} or --cache-dir"
        ) from None
    with _locked(root / group / f"{entry_name}.lock") as exclusive:
        if not all((entry / name).is_file() for name in names):
            if exclusive:  # temp files left by a builder that was killed
                for leftover in entry.glob(".*.tmp-*"):
                    leftover.unlink(missing_ok=True)
            t0 = time.perf_counter()
            _build(entry, samples, resize_hw, split, workers)
            print(f"data cache ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            _remove_stale(root / group, split, entry_name)
    return tuple(entry / name for name in names)


def _remove_stale(group_dir: Path, split: str, keep: str) -> None:
    """Entries of this split for other source sets are out of date: free their space.

    A process still reading one keeps its open memory maps valid (POSIX unlink semantics).
    """
    pattern = re.compile(rf"^{re.escape(split)}-[0-9a-f]{{16}}$")
    for old in group_dir.iterdir():
        if old.name != keep and old.is_dir() and pattern.match(old.name):
            shutil.rmtree(old, ignore_errors=True)
            (group_dir / f"{old.name}.lock").unlink(missing_ok=True)

