"""Progress output, the wandb tracker (real wandb, offline: no network, no prompt) and .env loading."""

from __future__ import annotations

import io
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastseg import tracking
from fastseg.cityscapes import CLASS_NAMES, MEAN, STD, colorize
from fastseg.errors import UserError
from fastseg.tracking import Progress, Tracker, prediction_panel, read_dotenv


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """wandb confined to tmp_path: no API key, no stored login, no mode from the caller's shell."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    for name in ("DIR", "CONFIG_DIR", "CACHE_DIR", "DATA_DIR"):
        monkeypatch.setenv(f"WANDB_{name}", str(tmp_path / name.lower()))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    return tmp_path


def _run_dirs(root):
    return sorted((root / "wandb").glob("offline-run-*"))


def _records(run_dir, last: bytes) -> bytes:
    """The run's log as written to disk (protobuf records, where the keys are plain text), once it holds
    ``last``: wandb's service process may still be writing it when ``finish()`` has returned.
    """
    deadline = time.monotonic() + 30
    while True:
        records = next(run_dir.glob("run-*.wandb")).read_bytes()
        if last in records or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


# ---------------------------------------------------------------- Progress


class _CountingLoss:
    """A loss that counts its reads: each read of a GPU tensor is a host sync."""

    def __init__(self, value):
        self.value, self.reads = value, 0

    def __float__(self):
        self.reads += 1
        return self.value


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_in_a_log_file_prints_a_plain_line_every_n_steps_and_reads_the_loss_only_then():
    out = io.StringIO()
    loss = _CountingLoss(0.4321)
    bar = Progress(total=7, desc="epoch 3/10", enabled=True, log_every=3, stream=out)
    for _ in range(7):
        bar.update(loss=loss, lr=8.1e-4, images_per_s=42.06)
    bar.close()
    assert out.getvalue().splitlines() == [
        "epoch 3/10 step 3/7 loss 0.4321 lr 8.1e-04 42.1 img/s",
        "epoch 3/10 step 6/7 loss 0.4321 lr 8.1e-04 42.1 img/s",
        "epoch 3/10 step 7/7 loss 0.4321 lr 8.1e-04 42.1 img/s",  # the epoch's last step always shows
    ]
    assert loss.reads == 3


def test_progress_resumed_mid_epoch_counts_from_initial_and_takes_a_tensor_loss():
    out = io.StringIO()
    bar = Progress(total=10, desc="e", enabled=True, log_every=5, initial=4, stream=out)
    bar.update(loss=torch.tensor(0.1), lr=1e-3, images_per_s=1.0)
    assert out.getvalue().splitlines() == ["e step 5/10 loss 0.1000 lr 1.0e-03 1.0 img/s"]


def test_progress_on_a_terminal_draws_a_bar_with_the_values():
    out = _Terminal()
    bar = Progress(total=3, desc="epoch 1/2", enabled=True, log_every=1, stream=out)
    for _ in range(3):
        bar.update(loss=0.25, lr=1e-3, images_per_s=10.0)
    bar.close()
    bar.close()
    text = out.getvalue()
    assert "\r" in text and "epoch 1/2" in text and "3/3" in text
    assert "loss 0.2500" in text and "10.0 img/s" in text
    assert "step 1/3" not in text  # no plain lines next to the bar


def test_progress_is_silent_when_disabled():
    out = _Terminal()
    bar = Progress(total=2, desc="x", enabled=False, log_every=1, stream=out)
    bar.update(loss=1.0, lr=1e-3, images_per_s=1.0)
    bar.close()
    assert out.getvalue() == ""


# ---------------------------------------------------------------- Tracker


def test_auto_without_api_key_logs_offline_into_dir_and_resumes_the_same_run(wandb_env, capsys):
    runs = wandb_env / "runs"
    tracker = Tracker(mode="auto", project="test", name="stage-1", config={"lr": 1e-3, "out": runs}, dir=runs)
    assert tracker.mode == "offline" and tracker.run_id
    tracker.log({"train_loss": 0.5, "val_dice": None}, step=1)
    tracker.log_per_class([0.5] * (len(CLASS_NAMES) - 1) + [None], step=1)
    tracker.summary({"best_val_miou": 0.4})
    tracker.finish()
    tracker.finish()
    assert "warning" not in capsys.readouterr().err
    [run_dir] = _run_dirs(runs)
    assert run_dir.name.endswith(tracker.run_id)
    records = _records(run_dir, last=b"best_val_miou")
    assert b"train_loss" in records and b"best_val_miou" in records
    assert f"val_iou/{CLASS_NAMES[0]}".encode() in records
    assert b"val_dice" not in records  # None is left out
    assert f"val_iou/{CLASS_NAMES[-1]}".encode() not in records  # a class absent from the split

    again = Tracker(mode="offline", project="test", dir=runs, run_id=tracker.run_id)
    assert again.run_id == tracker.run_id
    again.finish()
    # a second folder for the same run id (wandb appends -1 when both runs start in the same second)
    names = [d.name for d in _run_dirs(runs)]
    assert len(names) == 2 and all(f"-{tracker.run_id}" in name for name in names), names


def test_online_without_credentials_logs_offline_with_one_warning_and_no_prompt(wandb_env, capsys):
    tracker = Tracker(mode="online", project="test", dir=wandb_env / "runs")
    assert tracker.mode == "offline" and tracker.run_id
    tracker.finish()
    err = capsys.readouterr().err
    assert err.count("warning: ") == 1 and "WANDB_API_KEY" in err


def test_disabled_and_other_ranks_leave_no_trace(wandb_env, capsys):
    for tracker in (Tracker(mode="disabled", dir=wandb_env / "a"), Tracker(mode="offline", dir=wandb_env / "b",
                                                                          enabled=False, run_id="keep")):
        assert tracker.mode == "disabled"
        assert tracker.val_batch_hook(0) is None
        tracker.log({"loss": 1.0}, step=1)
        tracker.log_per_class([0.5] * len(CLASS_NAMES), step=1)
        tracker.summary({"x": 1})
        tracker.finish()
    assert tracker.run_id == "keep"
    assert not (wandb_env / "a").exists() and not (wandb_env / "b").exists()
    assert capsys.readouterr().err == ""


def test_missing_wandb_is_one_warning_and_keeps_the_run_id(wandb_env, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails, as without the package
    tracker = Tracker(mode="offline", dir=wandb_env, run_id="abc123")
    tracker.log({"loss": 1.0}, step=1)
    tracker.summary({"x": 1})
    tracker.finish()
    err = capsys.readouterr().err
    assert err.count("warning: ") == 1 and "training goes on" in err
    assert tracker.mode == "disabled" and tracker.run_id == "abc123"  # a later run can still resume it


def test_a_wandb_failure_mid_run_is_one_warning_then_nothing(wandb_env, capsys):
    tracker = Tracker(mode="offline", dir=wandb_env / "runs")
    tracker._run.finish()  # wandb refuses to log into a finished run
    capsys.readouterr()
    for step in range(3):
        tracker.log({"loss": 1.0}, step=step)
    tracker.summary({"x": 1})
    tracker.finish()
    err = capsys.readouterr().err
    assert err.count("warning: ") == 1 and err.count("\n") == 1 and "wandb log failed" in err
    assert tracker.mode == "disabled"


def test_module_imports_no_wandb():
    # importing the package must stay fast and work without wandb installed
    assert "wandb" not in vars(tracking)


# ---------------------------------------------------------------- validation images


def test_prediction_panel_puts_image_label_and_prediction_side_by_side():
    rgb = np.random.default_rng(0).integers(0, 256, size=(8, 12, 3), dtype=np.uint8)
    label = np.zeros((8, 12), dtype=np.uint8)
    label[:, 6:] = 13
    label[0, 0] = 255
    pred = np.full((8, 12), 2, dtype=np.uint8)
    normalised = torch.from_numpy(((rgb / 255.0 - MEAN) / STD).astype(np.float32)).permute(2, 0, 1)

    panel = prediction_panel(normalised, torch.from_numpy(label), torch.from_numpy(pred), height=8)
    assert panel.shape == (8, 36, 3) and panel.dtype == np.uint8
    assert np.abs(panel[:, :12].astype(int) - rgb).max() <= 1
    assert np.array_equal(panel[:, 12:24], colorize(label))
    assert np.array_equal(panel[:, 24:], colorize(pred))
    # a full-resolution label beside a smaller network input: all three at the label's shape, scaled
    small = prediction_panel(normalised[:, ::2, ::2], torch.from_numpy(label), torch.from_numpy(pred), height=4)
    assert small.shape == (4, 18, 3)


def test_val_batch_hook_puts_the_first_images_into_the_next_log(wandb_env):
    runs = wandb_env / "runs"
    tracker = Tracker(mode="offline", dir=runs)
    hook = tracker.val_batch_hook(epoch=2, max_images=3)
    for start in (0, 2, 4):  # three batches of two; only the first three images are kept
        labels = torch.randint(0, 19, (2, 8, 12))
        hook(torch.tensor([start, start + 1]), torch.randn(2, 19, 8, 12), torch.randn(2, 3, 8, 12), labels)
    assert [image._caption for image in tracker._images] == [f"epoch 3, val image {i}" for i in range(3)]
    tracker.log({"val_miou": 0.5}, step=3)
    tracker.log({"val_miou": 0.6}, step=4)  # no images left for this one
    tracker.finish()
    [run_dir] = _run_dirs(runs)
    assert len(list(run_dir.glob("files/media/images/val/predictions_*.png"))) == 3


# ---------------------------------------------------------------- .env


@pytest.fixture
def clean_env(monkeypatch):
    names = ("FASTSEG_T_KEY", "FASTSEG_T_QUOTED", "FASTSEG_T_DOUBLE", "FASTSEG_T_SHELL", "FASTSEG_T_EMPTY",
             "FASTSEG_T_UNSET_IN_SHELL")
    for name in names:
        monkeypatch.setenv(name, "")  # so that monkeypatch removes what read_dotenv sets
        monkeypatch.delenv(name)
    return monkeypatch


def test_read_dotenv_rules(tmp_path, clean_env):
    env = tmp_path / ".env"
    env.write_text(
        "# W&B\n"
        "FASTSEG_T_KEY=abc123  # from the settings page\n"
        "\n"
        "export FASTSEG_T_QUOTED='a # b'\n"
        '   FASTSEG_T_DOUBLE = "x=y"\n'
        "FASTSEG_T_SHELL=from-file\n"
        "FASTSEG_T_EMPTY=\n"
        "FASTSEG_T_UNSET_IN_SHELL=from-file\n"
    )
    clean_env.setenv("FASTSEG_T_SHELL", "from-shell")
    clean_env.setenv("FASTSEG_T_UNSET_IN_SHELL", "")  # empty in the environment: .env fills it
    read_dotenv(env)
    assert os.environ["FASTSEG_T_KEY"] == "abc123"
    assert os.environ["FASTSEG_T_QUOTED"] == "a # b"
    assert os.environ["FASTSEG_T_DOUBLE"] == "x=y"
    assert os.environ["FASTSEG_T_SHELL"] == "from-shell"  # the environment wins
    assert "FASTSEG_T_EMPTY" not in os.environ  # an empty value means unset
    assert os.environ["FASTSEG_T_UNSET_IN_SHELL"] == "from-file"
    read_dotenv(tmp_path / "missing.env")  # no .env is fine


@pytest.mark.parametrize("bad", ["this is not an assignment", "=value", "MY-KEY=1", "export"])
def test_read_dotenv_names_the_file_and_line_of_a_bad_line(tmp_path, clean_env, bad):
    env = tmp_path / ".env"
    env.write_text(f"FASTSEG_T_KEY=1\n{bad}\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(env))}, line 2: expected KEY=VALUE"):
        read_dotenv(env)


def test_the_project_dotenv_sits_beside_train_py():
    project = Path(__file__).resolve().parents[1]
    assert project / ".env" == tracking.DOTENV
