"""Shared fixtures: a tiny synthetic Cityscapes made once per test session, and quiet tracking; a copy of the
project with a script's constants edited, as users do."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Tiny sizes for trainer tests: the same code path as a real stage, a hundredth of the pixels.
TINY_SIZE = (128, 64)  # images the generator writes (W, H)
TRAIN_IMAGES, VAL_IMAGES = 16, 4
TINY_ARGS = ["--resize", "128x64", "--patch", "96x48", "--batch-size", "4", "--num-workers", "0",
             "--device", "cpu", "--wandb", "disabled", "--log-every", "1"]


@pytest.fixture(autouse=True, scope="session")
def _quiet_environment(tmp_path_factory):
    # Never reach the network or a login prompt from a test, whatever the developer's environment holds.
    os.environ.pop("WANDB_API_KEY", None)
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ["WANDB_DIR"] = str(tmp_path_factory.mktemp("wandb"))
    os.environ["FASTSEG_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """16 train and 4 val synthetic street scenes at 128×64 in the Cityscapes layout."""
    from tools.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic") / "cityscapes"
    generate(root, train=TRAIN_IMAGES, val=VAL_IMAGES, width=TINY_SIZE[0], height=TINY_SIZE[1], seed=0)
    return root


def edited_project(tmp_path: Path, script: str, edits: dict[str, str]) -> Path:
    """A copy of the project whose ``script`` has the constants in ``edits`` set as a user would, in place."""
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=shutil.ignore_patterns(
        ".git", ".venv", "data", "checkpoints", "results", "logs", "__pycache__", ".pytest_cache", "wandb"))
    (project / ".venv").symlink_to(ROOT / ".venv")  # the job script's runtime: the project's .venv
    text = (project / script).read_text()
    for name, value in edits.items():
        text, count = re.subn(rf"^{name} = .*$", f"{name} = {value}", text, count=1, flags=re.M)
        assert count == 1, f"no constant {name} in {script}"
    (project / script).write_text(text)
    return project
