"""train.py end to end on tiny synthetic data: learning, chaining, exact resume, signals, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_ARGS, TRAIN_IMAGES

import train
from fastseg.checkpoint import atomic_path, atomic_save, load_checkpoint
from fastseg.cityscapes import PROFILES
from fastseg.data import SegmentationDataset
from fastseg.engine import NonFiniteLoss
from fastseg.errors import UserError
from fastseg.metrics import ConfusionMatrix
from fastseg.models import load_model
from fastseg.stopping import REQUEUE_EXIT_CODE


def argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [*TINY_ARGS, "--data-dir", str(data), "--output-dir", str(out), "--experiment-id", "t", *extra]


def records(stage: Path) -> list[dict]:
    return [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]


def with_hook(hook):
    """train.py's objective, with ``hook(call_index, loss)`` seeing every training step."""
    calls = {"n": 0}

    def build(args, device, model):
        objective, extra = train.build_objective(args, device, model)

        def wrapped(m, images, labels):
            loss, parts = objective(m, images, labels)
            if not torch.is_grad_enabled():  # the one-off count of a step's FLOPs, not a training step
                return loss, parts
            calls["n"] += 1
            return hook(calls["n"], loss), parts

        return wrapped, extra

    return build


@pytest.fixture(scope="module")
def stage1(synthetic_root, tmp_path_factory) -> Path:
    """Profile 1 trained for a few epochs; shared by the tests that need a trained stage."""
    out = tmp_path_factory.mktemp("runs")
    code = train.main(argv(synthetic_root, out, "--epochs", "15", "--lr", "5e-2", "--previous-model-path", "none"))
    assert code == 0
    return out


def majority_class_miou(data: Path) -> float:
    """mIoU of always predicting the commonest class: the floor a model must clearly beat."""
    cm = ConfusionMatrix()
    labels = [label for _, label, _ in SegmentationDataset(data, "val", PROFILES[1], train=False)]
    commonest = int(torch.bincount(torch.cat([x.flatten() for x in labels]).long(), minlength=256)[:19].argmax())
    for label in labels:
        cm.update(label, torch.full_like(label, commonest))
    return cm.compute()["miou"]


def test_stage_learns_and_writes_its_files(stage1, synthetic_root):
    stage = stage1 / "t" / "profile-1"
    assert {p.name for p in stage.iterdir()} >= {"best.pth", "last.pth", "metrics.jsonl", "config.json"}
    recs = records(stage)
    assert [r["epoch"] for r in recs] == list(range(1, 16))
    for key in ("train_loss", "val_loss", "val_miou", "val_dice", "lr", "images_per_s", "val_per_class_iou"):
        assert key in recs[0], key
    assert all(0.0 <= r["val_miou"] <= 1.0 for r in recs)
    # Always predicting the commonest class (road) scores about 0.02 mIoU here; learning the scenes' layout
    # and colours lifts it several times higher within these few steps.
    assert max(r["val_miou"] for r in recs) > 4 * majority_class_miou(synthetic_root)
    assert recs[-1]["train_loss"] < recs[0]["train_loss"]
    cfg = json.loads((stage / "config.json").read_text())
    assert cfg["profile"] == 1 and cfg["epochs"] == 15 and cfg["lr"] == 5e-2
    best = load_checkpoint(stage / "best.pth")
    assert best["config"]["experiment_id"] == "t"
    assert best["metrics"]["val_miou"] == max(r["val_miou"] for r in recs)
    model, mcfg = load_model(stage / "best.pth")
    assert mcfg["arch"] == "fast_scnn" and not model.training


def test_finished_stage_is_not_retrained(stage1, synthetic_root, capsys):
    stage = stage1 / "t" / "profile-1"
    before = (stage / "last.pth").stat().st_mtime_ns
    assert train.main(argv(synthetic_root, stage1, "--epochs", "15", "--previous-model-path", "none")) == 0
    assert "already complete" in capsys.readouterr().out
    assert (stage / "last.pth").stat().st_mtime_ns == before


def test_stage_two_starts_from_stage_one_with_auto(stage1, synthetic_root):
    initial = {}  # stage 2's weights as its objective is built, before its first step

    def build(args, device, model):
        initial.update({k: v.clone() for k, v in model.state_dict().items()})
        return train.build_objective(args, device, model)

    code = train.main(argv(synthetic_root, stage1, "--profile", "2", "--resize", "128x64", "--patch", "112x56",
                           "--epochs", "1", "--previous-model-path", "auto"), make_objective=build)
    assert code == 0
    best = load_checkpoint(stage1 / "t" / "profile-1" / "best.pth")["model"]
    assert initial.keys() == best.keys()
    for key, value in best.items():  # every tensor, BatchNorm statistics included
        assert torch.equal(initial[key], value), key
    cfg = json.loads((stage1 / "t" / "profile-2" / "config.json").read_text())
    assert cfg["previous_model_loaded"] == str(stage1 / "t" / "profile-1" / "best.pth")
    first = records(stage1 / "t" / "profile-1")[0]
    # Started from trained weights, its first epoch already beats stage 1's first epoch.
    assert records(stage1 / "t" / "profile-2")[0]["val_miou"] > first["val_miou"]


def test_resume_after_a_hard_kill_repairs_the_metrics_log(stage1, synthetic_root, tmp_path, capsys):
    # A SIGKILL can land between last.pth and the log line: here epoch 15's line is missing, and a line for
    # an epoch 16 whose checkpoint never got written is present. The resumed run's log is whole and true.
    stage = tmp_path / "t" / "profile-1"
    shutil.copytree(stage1 / "t" / "profile-1", stage, ignore=shutil.ignore_patterns("wandb"))
    original = records(stage)
    fake = {**original[-1], "epoch": 16, "val_miou": 2.0}
    (stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*original[:-1], fake]))
    assert train.main(argv(synthetic_root, tmp_path, "--epochs", "16", "--lr", "5e-2")) == 0
    assert "did not match the checkpoint" in capsys.readouterr().out
    repaired = records(stage)
    assert [r["epoch"] for r in repaired] == list(range(1, 17))
    assert repaired[:15] == original
    assert repaired[15]["val_miou"] <= 1.0


def test_previous_model_from_a_higher_profile_warns(stage1, synthetic_root, tmp_path, capsys):
    # Stage 1's best as the start of another run's profile 1 is fine; a profile-3 checkpoint is not.
    best = load_checkpoint(stage1 / "t" / "profile-1" / "best.pth")
    higher = tmp_path / "profile3.pth"
    torch.save({**best, "config": {**best["config"], "profile": 3}}, higher)
    assert train.main(argv(synthetic_root, tmp_path, "--epochs", "1", "--previous-model-path", str(higher))) == 0
    assert "trained at profile 3, above this stage's 1" in capsys.readouterr().out


def test_interrupted_and_resumed_run_ends_with_the_same_weights(synthetic_root, tmp_path):
    common = ["--epochs", "3", "--previous-model-path", "none", "--seed", "3", "--check-every", "2"]
    straight = tmp_path / "straight"
    assert train.main(argv(synthetic_root, straight, *common)) == 0

    steps_per_epoch = TRAIN_IMAGES // 4
    seen = []

    def stop_in_epoch_two(n, loss):
        seen.append(n)
        if n == steps_per_epoch + 1:  # a real signal, as Slurm sends it before the time limit
            os.kill(os.getpid(), signal.SIGUSR1)
        return loss

    broken = tmp_path / "broken"
    assert train.main(argv(synthetic_root, broken, *common), make_objective=with_hook(stop_in_epoch_two)) == 75
    assert len(seen) - (steps_per_epoch + 1) < 2  # stopped at the next check, --check-every 2 steps
    assert load_checkpoint(broken / "t" / "profile-1" / "last.pth")["epoch"] == 1
    assert [r["epoch"] for r in records(broken / "t" / "profile-1")] == [1]

    assert train.main(argv(synthetic_root, broken, *common)) == 0  # --resume auto is the default
    a = load_checkpoint(straight / "t" / "profile-1" / "last.pth")["model"]
    b = load_checkpoint(broken / "t" / "profile-1" / "last.pth")["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    resumed, whole = records(broken / "t" / "profile-1"), records(straight / "t" / "profile-1")
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    for key in ("train_loss", "val_loss", "val_miou", "lr"):
        assert [r[key] for r in resumed] == [r[key] for r in whole], key


def test_nan_loss_stops_with_an_error_and_keeps_the_last_good_checkpoint(synthetic_root, tmp_path):
    args = argv(synthetic_root, tmp_path, "--epochs", "3", "--previous-model-path", "none")
    steps_per_epoch = TRAIN_IMAGES // 4

    def poison_second_epoch(n, loss):
        return loss * float("nan") if n > steps_per_epoch else loss

    with pytest.raises(NonFiniteLoss, match="--lr"):
        train.main(args, make_objective=with_hook(poison_second_epoch))
    last = load_checkpoint(tmp_path / "t" / "profile-1" / "last.pth")
    assert last["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_weights_that_are_not_finite_are_never_saved(synthetic_root, tmp_path):
    # The loss may stay finite while the model is not: an inf in a BatchNorm running statistic, which training
    # mode never reads, would still ruin every later evaluation. No file may get it.
    args = argv(synthetic_root, tmp_path, "--epochs", "2", "--previous-model-path", "none", "--check-every", "1")
    steps_per_epoch = TRAIN_IMAGES // 4
    poisoned = {}

    def build(a, device, model):
        objective, extra = train.build_objective(a, device, model)

        def wrapped(m, images, labels):
            poisoned["n"] = poisoned.get("n", 0) + torch.is_grad_enabled()  # not the FLOP count's call
            if poisoned["n"] == steps_per_epoch + 1:
                bn = next(x for x in model.modules() if isinstance(x, torch.nn.BatchNorm2d))
                bn.running_var.fill_(float("inf"))
            return objective(m, images, labels)

        return wrapped, extra

    with pytest.raises(NonFiniteLoss, match="weights became non-finite"):
        train.main(args, make_objective=build)
    last = load_checkpoint(tmp_path / "t" / "profile-1" / "last.pth")
    assert last["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--previous-model-path", "nowhere.pth"], "--previous-model-path: nowhere.pth: no such file"),
        (["--patch", "160x48"], "--patch"),
        (["--profile", "3", "--previous-model-path", "auto"], "train profile 2"),
        (["--device", "cuda"], "--device"),
        (["--batch-size", "1"], "--batch-size 1: training needs at least 2"),
    ],
)
def test_bad_input_names_the_flag(synthetic_root, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):  # later flags win, as on the command line
        train.main(argv(synthetic_root, tmp_path, "--epochs", "1", "--previous-model-path", "none", *extra))


def test_checkpoint_of_another_class_count_or_corrupt_file_is_refused(synthetic_root, tmp_path):
    from fast_scnn import FastSCNN

    wrong = tmp_path / "eight_classes.pth"
    torch.save(FastSCNN(num_classes=8).state_dict(), wrong)
    with pytest.raises(UserError, match=r"classifier\.conv\.1\.weight"):
        train.main(argv(synthetic_root, tmp_path, "--epochs", "1", "--previous-model-path", str(wrong)))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        train.main(argv(synthetic_root, tmp_path, "--epochs", "1", "--previous-model-path", str(corrupt)))


def test_command_line_error_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--data-dir", str(tmp_path / "missing"), "--device", "cpu",
         "--wandb", "disabled", "--previous-model-path", "none", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing" in lines[0], result.stderr
    assert not list(tmp_path.glob("**/*.pth"))


def test_ctrl_c_stops_and_twice_quits_at_once(synthetic_root, tmp_path):
    common = ["--epochs", "3", "--previous-model-path", "none", "--check-every", "1"]
    steps_per_epoch = TRAIN_IMAGES // 4
    before = signal.getsignal(signal.SIGINT)

    def interrupt(times):
        def hook(n, loss):
            if n == steps_per_epoch + 2:
                for _ in range(times):  # a real SIGINT, as the terminal sends on Ctrl-C
                    os.kill(os.getpid(), signal.SIGINT)
            return loss

        return hook

    once = tmp_path / "once"
    assert train.main(argv(synthetic_root, once, *common), make_objective=with_hook(interrupt(1))) == 75
    assert load_checkpoint(once / "t" / "profile-1" / "last.pth")["epoch"] == 1
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is back

    twice = tmp_path / "twice"
    with pytest.raises(KeyboardInterrupt):
        train.main(argv(synthetic_root, twice, *common), make_objective=with_hook(interrupt(2)))
    assert load_checkpoint(twice / "t" / "profile-1" / "last.pth")["epoch"] == 1
    assert signal.getsignal(signal.SIGINT) is before


def test_a_signal_during_validation_stops_after_the_epoch_unless_it_was_the_last(synthetic_root, tmp_path,
                                                                                 monkeypatch):
    real_evaluate = train.evaluate

    def signalled_evaluate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate", signalled_evaluate)
    args = argv(synthetic_root, tmp_path, "--epochs", "2", "--previous-model-path", "none")
    assert train.main(args) == REQUEUE_EXIT_CODE  # epoch 1 is saved whole; the requeued job does epoch 2
    assert load_checkpoint(tmp_path / "t" / "profile-1" / "last.pth")["epoch"] == 1
    assert train.main(args) == 0  # the stage is complete: nothing to requeue for
    assert [r["epoch"] for r in records(tmp_path / "t" / "profile-1")] == [1, 2]


def test_a_kill_during_save_leaves_the_previous_file_loadable(tmp_path):
    target = tmp_path / "last.pth"
    atomic_save({"model": {"w": torch.zeros(3)}, "epoch": 1}, target)
    # The child starts writing a new checkpoint, says so from inside the write and waits there: the kill
    # lands while the temporary file is half written, every time.
    code = (
        "import sys; from fastseg.checkpoint import atomic_write\n"
        "def write(f):\n"
        "    f.write(b'PK' + bytes(1_000_000))\n"
        "    f.flush(); print('writing', flush=True); sys.stdin.readline()\n"
        "atomic_write(sys.argv[1], write)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(target)], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    assert [p.stat().st_size for p in tmp_path.glob(".last.pth.*")] == [1_000_002]  # the half-written file
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert load_checkpoint(target)["epoch"] == 1


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_saved_files_take_the_umask_like_any_new_file(tmp_path, umask, mode):
    # A run shared with a group on a cluster: its checkpoints must not stay private like temp files.
    old = os.umask(umask)
    try:
        atomic_save({"epoch": 1}, tmp_path / "best.pth")
        with atomic_path(tmp_path / "plot.png", suffix=".png") as tmp:
            tmp.write_bytes(b"png")
    finally:
        os.umask(old)
    assert (tmp_path / "best.pth").stat().st_mode & 0o777 == mode
    assert (tmp_path / "plot.png").stat().st_mode & 0o777 == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "plot.png"]


def _signal_self_and_report(stop, queue) -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    queue.put(stop.signal_name)


def _trainer_with_a_forked_worker(queue) -> None:
    import multiprocessing as mp

    from fastseg.stopping import StopFlag

    stop = StopFlag().install()
    worker = mp.get_context("fork").Process(target=_signal_self_and_report, args=(stop, queue))
    worker.start()
    worker.join(timeout=30)
    queue.put(("worker exit", worker.exitcode))
    _signal_self_and_report(stop, queue)


def test_stop_signal_is_taken_by_the_trainer_not_by_its_forked_workers():
    # Loader workers inherit the handler: there it must neither raise the flag nor end the worker
    # (it keeps serving batches until the trainer has finished its step and saved).
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    trainer = ctx.Process(target=_trainer_with_a_forked_worker, args=(queue,))
    trainer.start()
    seen = [queue.get(timeout=30) for _ in range(3)]
    trainer.join(timeout=30)
    assert seen == [None, ("worker exit", 0), "SIGTERM"]
    assert trainer.exitcode == 0


@pytest.mark.parametrize("arch", ["fast_scnn", "deeplabv3_mobilenet_v3_large"])
def test_a_stage_loads_the_previous_one_with_or_without_auxiliary_heads(tmp_path, arch, capsys):
    from fastseg.checkpoint import load_previous_stage
    from fastseg.models import build_model

    plain, with_aux = build_model(arch, aux=False), build_model(arch, aux=True)
    for source, target in ((plain, build_model(arch, aux=True)), (with_aux, build_model(arch, aux=False))):
        path = tmp_path / "previous.pth"
        torch.save({"model": source.state_dict(), "config": {"arch": arch, "profile": 1}}, path)
        fresh = {k: v.clone() for k, v in target.state_dict().items()}
        load_previous_stage(target, path, arch, 2, "--previous-model-path")
        loaded = target.state_dict()
        for key, value in loaded.items():  # the shared layers come from the file, an added head stays fresh
            expected = source.state_dict()[key] if key in source.state_dict() else fresh[key]
            assert torch.equal(value, expected), key


def test_an_output_dir_that_cannot_be_created_is_one_line_naming_the_flag(synthetic_root, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--output-dir", "/proc/fastseg-runs", "--device", "cpu",
         "--wandb", "disabled", "--previous-model-path", "none"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --output-dir /proc/fastseg-runs: cannot create"), lines
    (tmp_path / "a-file").write_text("in the way")
    with pytest.raises(UserError, match="--output-dir .*a-file: cannot create"):
        train.main(argv(synthetic_root, tmp_path / "a-file", "--epochs", "1"))
