"""Which checkpoints a report scores, at which profiles, and what training recorded in each.

:func:`plan` turns evaluate_efficiency.py's paths and globs, ``--profile`` and ``--compare`` into
:class:`Job` rows. It reads every checkpoint before the first is scored, so that a bad file or a missing
``--profile`` stops the run at once rather than after the checkpoints before it have been scored.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fastseg.checkpoint import load_checkpoint, model_config
from fastseg.cityscapes import Profile, get_profile
from fastseg.errors import UserError

_GLOB_CHARS = frozenset("*?[")


def expand_checkpoint_paths(patterns: Iterable[str], flag: str = "--current-model-path") -> list[Path]:
    """Expand paths and globs (``**`` allowed) into checkpoint files, in the order given, without repeats.

    Globs are expanded here as well as by the shell, because a quoted glob reaches the script as is.
    """
    paths: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if _GLOB_CHARS.intersection(pattern):
            matches = sorted(Path(m) for m in glob.glob(pattern, recursive=True) if Path(m).is_file())
            if not matches:
                raise UserError(f"{flag}: no file matches {pattern!r}; check the directory and the pattern")
            paths.extend(matches)
        else:
            path = Path(pattern)
            if not path.is_file():
                raise UserError(f"{flag}: {path} does not exist; give the path of a .pth checkpoint")
            paths.append(path)
    if not paths:
        raise UserError(f"{flag}: no checkpoint given; pass one or more .pth paths or a glob")
    unique: dict[Path, Path] = {}
    for path in paths:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def checkpoint_labels(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Each path relative to the deepest folder that holds them all: distinct, as short as that allows.

    ``checkpoints/*/profile-*/best.pth`` reads ``<experiment>/profile-<k>/best.pth``; one checkpoint reads
    as its file name.
    """
    absolute = [Path(os.path.abspath(p)) for p in paths]
    common = os.path.commonpath([p.parent for p in absolute])
    return [p.relative_to(common).as_posix() for p in absolute]


def teacher_path(config: dict[str, Any]) -> str | None:
    """The teacher a student was distilled from (``config["teacher"]["path"]``, as train_distillation.py
    stores it; older students stored the path itself), or None for a model trained without one."""
    teacher = config.get("teacher")
    if isinstance(teacher, dict):
        teacher = teacher.get("path")
    return str(teacher or config.get("trained_teacher_model_path") or "") or None


def is_distilled(config: dict[str, Any]) -> bool:
    """A student trained by distillation carries its teacher in the config."""
    return teacher_path(config) is not None


def training_record(checkpoint: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """The epoch a checkpoint holds and the curriculum's training compute up to it (``cum_train_tflop``).

    Both come from the epoch's line stored in the checkpoint; a checkpoint without it is looked up in the
    stage's ``metrics.jsonl`` beside it. Unknown values are None (a plain state_dict).
    """
    epoch = checkpoint.get("epoch")
    metrics = checkpoint.get("metrics") or {}
    if metrics.get("cum_train_tflop") is None and epoch is not None:
        log = Path(path).parent / "metrics.jsonl"
        if log.is_file():
            for line in log.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("epoch") == epoch:
                    metrics = record
    return {"epoch": epoch, "cum_train_tflop": metrics.get("cum_train_tflop")}


def stage_label(config: dict[str, Any], profile: int) -> str:
    """``teacher p1`` / ``student p2``: the role in the curriculum and the profile.

    Models trained without a teacher are the curriculum's teachers; distilled ones are its students.
    """
    role = "student" if is_distilled(config) else "teacher"
    return f"{role} p{profile}"


def requested_profiles(value: Any) -> list[int] | None:
    """``--profile``'s values as profile indices, in order without repeats: None (each checkpoint's own),
    ``3``, ``["1", "3"]``, ``"1-5"``, ``(1, 2, 3)``."""
    if value is None:
        return None
    profiles: list[int] = []
    for item in [value] if isinstance(value, (int, str)) else value:
        for part in str(item).replace(",", " ").split():
            first, _, last = part.partition("-")
            try:
                low, high = int(first), int(last or first)
            except ValueError:
                raise UserError(f"--profile {part}: expected a profile (1-5) or a range such as 1-5") from None
            if low > high:
                raise UserError(f"--profile {part}: the range goes down; write it as {high}-{low}")
            for k in range(low, high + 1):
                get_profile(k)  # an unknown profile ends here, naming the flag
                if k not in profiles:
                    profiles.append(k)
    return profiles or None


def resolve_profile(index: int | None, config: dict[str, Any], path: Path) -> Profile:
    """The profile to evaluate at: ``index`` (from --profile), else the checkpoint's own (with its stored
    resize, which a stage trained with --resize changed)."""
    if index is not None:
        return get_profile(index)
    if config.get("profile") is None:
        raise UserError(
            f"--profile: {path} is a plain state_dict with no stored profile; "
            "pass --profile K (1-5) with the profile it was trained at"
        )
    profile = get_profile(int(config["profile"]))
    if config.get("resize"):
        profile = dataclasses.replace(profile, resize=tuple(int(v) for v in config["resize"]))
    return profile


@dataclasses.dataclass
class Job:
    """One row of the report: a checkpoint scored at one profile, with what training recorded in it."""

    path: Path
    profile: Profile
    config: dict[str, Any]
    flag: str  # the flag the path came from, for error messages
    epoch: int | None = None
    cum_train_tflop: float | None = None
    last: Path | None = None  # the stage's last.pth, scored beside a best.pth
    epoch_last: int | None = None


def read_job(path: Path, flag: str, index: int | None = None, profile: Profile | None = None,
             with_last: bool = True) -> Job:
    """Read a checkpoint (and, with ``with_last``, the last.pth beside a best.pth) and settle its profile."""
    checkpoint = load_checkpoint(path, flag=flag)
    config = model_config(checkpoint)
    job = Job(path, profile or resolve_profile(index, config, path), config, flag,
              **training_record(checkpoint, path))
    last = path.with_name("last.pth")
    if with_last and path.name == "best.pth" and last.is_file():
        job.last, job.epoch_last = last, load_checkpoint(last, flag=flag).get("epoch")
    return job


def plan(paths: Sequence[str], profile: Any = None, compare: Sequence[str] | None = None,
         with_last: bool = True) -> tuple[list[Job], dict[str, list] | None]:
    """Every (checkpoint, profile) to score: ``paths`` (``--current-model-path``) at ``profile``
    (``--profile``), or with ``compare`` (``--compare STUDENT TWIN``) a student's stages, its twin's and its
    teacher's. ``with_last`` also reads the last.pth beside each best.pth.

    With ``compare``, also the roles: the indices of the students, of their twins, and of each student's
    teacher scored at the student's profile (None where the teacher's file is not there).
    """
    if compare is None:
        profiles = requested_profiles(profile) or [None]
        jobs = []
        for path in expand_checkpoint_paths(paths):
            job = read_job(path, "--current-model-path", profiles[0], with_last=with_last)  # each file read once
            jobs += [job] + [dataclasses.replace(job, profile=get_profile(k)) for k in profiles[1:]]
        return jobs, None

    student_glob, twin_glob = compare
    students = [read_job(p, "--compare", with_last=with_last)
                for p in expand_checkpoint_paths([student_glob], "--compare")]
    twins = [read_job(p, "--compare", with_last=with_last) for p in expand_checkpoint_paths([twin_glob], "--compare")]
    for job in students:
        if not is_distilled(job.config):
            raise UserError(f"--compare: {job.path} was trained without a teacher; the first path is the "
                            "distilled student's (train_distillation.py), the second its undistilled twin's")
    for job in twins:
        if is_distilled(job.config):
            raise UserError(f"--compare: {job.path} was distilled from {teacher_path(job.config)}; the "
                            "second path is the twin's, trained with the same recipe and no teacher")
    for role, jobs in (("student", students), ("twin", twins)):
        seen: dict[int, Path] = {}
        for job in jobs:
            if job.profile.index in seen:
                raise UserError(f"--compare: two {role} checkpoints of profile {job.profile.index} "
                                f"({seen[job.profile.index]}, {job.path}); give the stages of one run")
            seen[job.profile.index] = job.path

    jobs = students + twins
    teachers: list[int | None] = []
    for student in students:
        teacher = Path(teacher_path(student.config))
        if not teacher.is_file():
            print(f"note: {student.path} was distilled from {teacher}, which is not there (a relative path is read "
                  "from the current directory); its teacher column stays empty", file=sys.stderr, flush=True)
            teachers.append(None)
            continue
        # The teacher at the student's input size: what it offered the student at that stage.
        same = [i for i, job in enumerate(jobs)
                if job.path.resolve() == teacher.resolve() and job.profile == student.profile]
        if not same:
            jobs.append(read_job(teacher, "--compare", profile=student.profile, with_last=False))
            same = [len(jobs) - 1]
        teachers.append(same[0])
    roles = {"students": list(range(len(students))),
             "twins": list(range(len(students), len(students) + len(twins))),
             "teachers": teachers}
    return jobs, roles
