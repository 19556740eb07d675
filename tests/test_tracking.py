"""Progress lines, the wandb tracker (real wandb, offline, no network) and .env loading."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch

from fastseg import tracking
from fastseg.errors import UserError
from fastseg.tracking import Progress, Tracker, prediction_panel, read_dotenv, resolve_mode


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """wandb confined to tmp_path: no API key, no stored credentials, no mode from the caller's shell."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    return tmp_path


# ---------------------------------------------------------------- Progress


LINE = re.compile(r"^epoch 3/10 step (\d+)/5 loss (\d+\.\d{4}) lr (\d\.\de[-+]\d\d) (\d+\.\d) img/s$")


def test_progress_in_a_log_file_prints_plain_periodic_lines_and_a_final_one():
    out = io.StringIO()
    with Progress(total=5, desc="epoch 3/10", enabled=True, log_every=2, interval_s=1e9, stream=out) as bar:
        for step in range(5):
            bar.update(loss=torch.tensor(0.5 - 0.01 * step), lr=8.1e-4, images_per_s=42.06)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [LINE.match(line).group(1) for line in lines[:2]] == ["2", "4"]
    assert LINE.match(lines[0]).groups()[1:] == ("0.4900", "8.1e-04", "42.1")
    assert lines[2].startswith("epoch 3/10 finished 5/5 steps in ")
    assert lines[2].endswith("loss 0.4600 lr 8.1e-04 42.1 img/s")
    assert len(lines) == 3


def test_progress_prints_by_time_when_steps_are_slow_and_keeps_last_loss():
    out = io.StringIO()
    bar = Progress(total=3, desc="epoch 1/1", enabled=True, log_every=None, interval_s=0.0, stream=out)
    bar.update(loss=1.25, lr=0.01, images=8)
    bar.update(loss=None, lr=0.01, images=8)  # the loop read no loss this step: the last one stays
    bar.close()
    bar.close()  # twice is harmless
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("epoch 1/1 step 1/3 loss 1.2500 lr 1.0e-02 ") and lines[0].endswith(" img/s")
    assert lines[1].startswith("epoch 1/1 step 2/3 loss 1.2500")
    assert lines[2].startswith("epoch 1/1 finished 2/3 steps")


def test_progress_resumed_mid_epoch_counts_from_initial():
    out = io.StringIO()
    bar = Progress(total=10, desc="e", enabled=True, log_every=5, interval_s=1e9, initial=4, stream=out)
    bar.update(loss=0.1)
    bar.close()
    assert out.getvalue().splitlines()[0].startswith("e step 5/10 loss 0.1000")


def test_progress_on_a_terminal_draws_a_bar_with_postfix():
    out = io.StringIO()
    bar = Progress(total=3, desc="epoch 1/2", enabled=True, log_every=1, stream=out, tty=True)
    for _ in range(3):
        bar.update(loss=0.25, lr=1e-3, images_per_s=10.0)
    bar.close()
    text = out.getvalue()
    assert "\r" in text and "epoch 1/2" in text and "3/3" in text
    assert "loss 0.2500" in text and "10.0 img/s" in text
    assert "step 1/3" not in text  # no plain lines next to the bar


def test_progress_is_silent_when_disabled_and_on_other_ranks(monkeypatch):
    out = io.StringIO()
    bar = Progress(total=2, desc="x", enabled=False, log_every=1, interval_s=0.0, stream=out)
    bar.update(loss=1.0)
    bar.write("hello")
    bar.close()
    monkeypatch.setenv("RANK", "1")
    other = Progress(total=2, desc="x", log_every=1, interval_s=0.0, stream=out)
    other.update(loss=1.0)
    other.close()
    assert out.getvalue() == ""
    monkeypatch.setenv("RANK", "0")
    main = Progress(total=2, desc="x", log_every=1, interval_s=1e9, stream=out)
    main.write("hello")
    assert out.getvalue() == "hello\n"


# ---------------------------------------------------------------- Tracker


def test_resolve_mode():
    assert resolve_mode("auto", {}) == "offline"
    assert resolve_mode("auto", {"WANDB_API_KEY": "k"}) == "online"
    assert resolve_mode("auto", {"WANDB_API_KEY": "k", "WANDB_MODE": "disabled"}) == "disabled"
    assert resolve_mode("offline", {"WANDB_API_KEY": "k"}) == "offline"
    with pytest.raises(UserError, match="--wandb"):
        resolve_mode("cloud", {})


def _run_dirs(root):
    return sorted((root / "wandb").glob("offline-run-*"))


def test_auto_without_api_key_runs_offline_under_dir_and_resumes_the_same_id(wandb_env, capsys):
    runs = wandb_env / "runs"
    tracker = Tracker(
        mode="auto", project="test", name="stage-1", config={"lr": 1e-3, "path": runs}, dir=runs
    )
    assert tracker.mode == "offline" and tracker.active
    assert tracker.run_id
    tracker.log({"train_loss": 0.5, "val_miou": float("nan"), "skipped": None}, step=1)
    tracker.log_per_class([0.5, None, 0.25], step=1, names=["road", "wall", "car"])
    tracker.summary({"best_val_miou": 0.4})
    tracker.finish()
    tracker.finish()
    dirs = _run_dirs(runs)
    assert len(dirs) == 1 and dirs[0].name.endswith(tracker.run_id)
    assert list(dirs[0].glob("run-*.wandb"))
    assert "warning" not in capsys.readouterr().err

    again = Tracker(mode="offline", project="test", dir=runs, run_id=tracker.run_id)
    assert again.run_id == tracker.run_id
    again.finish()
    # a second offline directory for the same run id (wandb adds -1 when both start in the same second)
    names = [d.name for d in _run_dirs(runs)]
    assert len(names) == 2 and all(f"-{tracker.run_id}" in name for name in names), names


def test_online_without_credentials_falls_back_to_offline_without_prompt(wandb_env, capsys):
    tracker = Tracker(mode="online", project="test", dir=wandb_env / "runs")
    assert tracker.mode == "offline" and tracker.active
    tracker.finish()
    assert "no API key" in capsys.readouterr().err


def test_disabled_tracker_never_touches_wandb(wandb_env, monkeypatch, capsys):
    import wandb

    def boom(*args, **kwargs):
        raise AssertionError("wandb.init must not be called")

    monkeypatch.setattr(wandb, "init", boom)
    for tracker in (
        Tracker(mode="disabled", dir=wandb_env),
        Tracker(mode="offline", dir=wandb_env, enabled=False),
    ):
        assert tracker.mode == "disabled" and not tracker.active
        tracker.log({"loss": 1.0}, step=1)
        tracker.log_images(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), step=1)
        tracker.summary({"x": 1})
        assert tracker.val_batch_hook(0) is None
        tracker.finish()
    assert not (wandb_env / "wandb").exists()
    assert capsys.readouterr().err == ""


def test_wandb_init_failure_leaves_a_no_op_tracker_and_one_warning(wandb_env, monkeypatch, capsys):
    import wandb

    def boom(*args, **kwargs):
        raise RuntimeError("service unreachable")

    monkeypatch.setattr(wandb, "init", boom)
    tracker = Tracker(mode="offline", dir=wandb_env, run_id="abc123")
    tracker.log({"loss": 1.0}, step=1)
    tracker.summary({"x": 1})
    tracker.finish()
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "service unreachable" in err
    assert tracker.mode == "disabled" and not tracker.active
    assert tracker.run_id == "abc123"  # kept for the checkpoint, so a later run can still resume it


def test_wandb_import_failure_is_a_warning(wandb_env, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    tracker = Tracker(mode="offline", dir=wandb_env)
    tracker.log({"loss": 1.0})
    assert not tracker.active
    assert capsys.readouterr().err.count("warning") == 1


class _FailingRun:
    id = "r1"
    dir = None

    def __init__(self):
        self.calls = 0
        self.summary = {}

    def log(self, data, step=None):
        self.calls += 1
        raise OSError("disk full")

    def finish(self):
        raise AssertionError("a failed run is not finished again")


def test_wandb_log_failure_mid_run_disables_tracking_once(wandb_env, monkeypatch, capsys):
    import wandb

    run = _FailingRun()
    monkeypatch.setattr(wandb, "init", lambda **kwargs: run)
    tracker = Tracker(mode="offline", dir=wandb_env)
    assert tracker.run_id == "r1"
    for step in range(3):
        tracker.log({"loss": 1.0}, step=step)
    tracker.finish()
    assert run.calls == 1
    assert capsys.readouterr().err.count("warning") == 1


# ---------------------------------------------------------------- images


def test_prediction_panel_puts_image_label_and_prediction_side_by_side():
    from fastseg import cityscapes
    rgb = np.random.default_rng(0).integers(0, 256, size=(8, 12, 3), dtype=np.uint8)
    label = np.zeros((8, 12), dtype=np.uint8)
    label[:, 6:] = 13
    label[0, 0] = 255
    pred = np.full((8, 12), 2, dtype=np.uint8)
    mean = np.asarray(cityscapes.MEAN, dtype=np.float32)
    std = np.asarray(cityscapes.STD, dtype=np.float32)
    normalised = torch.from_numpy(((rgb / 255.0 - mean) / std).astype(np.float32)).permute(2, 0, 1)

    panel = prediction_panel(normalised, torch.from_numpy(label), torch.from_numpy(pred))
    assert panel.shape == (8, 36, 3) and panel.dtype == np.uint8
    assert np.abs(panel[:, :12].astype(int) - rgb).max() <= 1
    assert np.array_equal(panel[:, 12:24], cityscapes.colorize(label))
    assert np.array_equal(panel[:, 24:], cityscapes.colorize(pred))
    # a uint8 image is used as it is, and a tall label is scaled down
    tall = prediction_panel(torch.from_numpy(rgb).permute(2, 0, 1), label, pred, max_height=4)
    assert tall.shape == (4, 18, 3)


def test_val_batch_hook_logs_fixed_images_with_the_next_log(wandb_env, monkeypatch):
    logged = []

    class _Run:
        id = "r2"
        dir = None
        summary = {}

        def log(self, data, step=None):
            logged.append((step, data))

        def finish(self):
            pass

    import wandb

    monkeypatch.setattr(wandb, "init", lambda **kwargs: _Run())
    tracker = Tracker(mode="offline", dir=wandb_env)
    hook = tracker.val_batch_hook(epoch=2, max_images=3)
    for start in (0, 2, 4):  # three batches of two; only the first three images are kept
        hook(
            torch.tensor([start, start + 1]),
            torch.zeros(2, 19, 4, 6),  # logits
            torch.zeros(2, 3, 4, 6),
            torch.zeros(2, 4, 6),
        )
    tracker.log({"val_miou": 0.5}, step=3)
    assert len(logged) == 1
    step, data = logged[0]
    assert step == 3 and data["val_miou"] == 0.5
    images = data["val/predictions"]
    assert len(images) == 3 and all(isinstance(im, wandb.Image) for im in images)
    assert "epoch 3 val image 2" in images[2]._caption
    tracker.log({"val_miou": 0.6}, step=4)
    assert "val/predictions" not in logged[1][1]


def test_images_reach_an_offline_run(wandb_env):
    runs = wandb_env / "runs"
    tracker = Tracker(mode="offline", dir=runs)
    labels = torch.randint(0, 19, (2, 4, 6))
    tracker.log_images(torch.randn(2, 3, 4, 6), labels, labels, step=1)
    tracker.finish()
    media = list(_run_dirs(runs)[0].glob("files/media/images/val/predictions*.png"))
    assert len(media) == 2


# ---------------------------------------------------------------- .env


def test_read_dotenv_loads_without_overriding(tmp_path, monkeypatch):
    env = tmp_path / ".env"
    env.write_text(
        "# W&B\n"
        "WANDB_API_KEY=abc123  # from the settings page\n"
        "\n"
        "export FASTSEG_TEST_QUOTED='a # b'\n"
        'FASTSEG_TEST_DOUBLE="x=y"\n'
        "FASTSEG_TEST_EXISTING=from-file\n"
        "FASTSEG_TEST_EMPTY=\n"
    )
    for name in ("WANDB_API_KEY", "FASTSEG_TEST_QUOTED", "FASTSEG_TEST_DOUBLE", "FASTSEG_TEST_EMPTY"):
        # set, then delete: monkeypatch then removes what read_dotenv sets when the test ends
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("FASTSEG_TEST_EXISTING", "from-shell")
    loaded = read_dotenv(env)
    assert loaded == {
        "WANDB_API_KEY": "abc123",
        "FASTSEG_TEST_QUOTED": "a # b",
        "FASTSEG_TEST_DOUBLE": "x=y",
        "FASTSEG_TEST_EMPTY": "",
    }
    import os

    assert os.environ["FASTSEG_TEST_EXISTING"] == "from-shell"
    assert os.environ["WANDB_API_KEY"] == "abc123"
    assert read_dotenv(tmp_path / "missing.env") == {}


def test_read_dotenv_names_the_bad_line(tmp_path):
    env = tmp_path / ".env"
    env.write_text("GOOD=1\nthis is not an assignment\n")
    with pytest.raises(UserError, match=r"\.env:2: expected KEY=VALUE"):
        read_dotenv(env)


def test_module_has_no_wandb_import_at_top_level():
    # importing the package must stay fast and work without wandb installed
    assert "wandb" not in vars(tracking)


def test_image_failure_keeps_the_scalars(wandb_env, monkeypatch, capsys):
    logged = []

    class _Run:
        id = "r3"
        dir = None
        summary = {}

        def log(self, data, step=None):
            logged.append(data)

        def finish(self):
            pass

    import wandb

    monkeypatch.setattr(wandb, "init", lambda **kwargs: _Run())

    def broken_panel(*args, **kwargs):
        raise ValueError("bad image")

    monkeypatch.setattr(tracking, "prediction_panel", broken_panel)
    tracker = Tracker(mode="offline", dir=wandb_env)
    tracker.log_images(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))
    tracker.log({"val_miou": 0.5}, step=1)
    tracker.log({"val_miou": 0.6}, step=2)
    assert logged == [{"val_miou": 0.5}, {"val_miou": 0.6}]
    assert tracker.active
    assert capsys.readouterr().err.count("bad image") == 1
