"""A stage resumed as users resume it: stopped by a signal and run again with other flags, or finished and given
more epochs. The rates used, config.json, last.pth and the messages tell what ran (docs/resume.md)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from conftest import TRAIN_IMAGES
from test_train import argv, records

import train
import train_distillation
from fastseg.checkpoint import carry_on_resume, load_checkpoint
from fastseg.models import build_model
from fastseg.stopping import REQUEUE_EXIT_CODE


def poly(base: float, done: float, total: float, floor: float = 1e-4) -> float:
    return floor + (base - floor) * (1 - min(done / total, 1.0)) ** 0.9


class RateSpy:
    """The rate the optimiser applies at each training step (read as the step's loss is computed), and a
    SIGUSR1 sent at one step, as Slurm sends it before the time limit. ``build_objective`` is the objective
    to pass to train.main; train_distillation's is replaced in its module."""

    def __init__(self, monkeypatch, stop_at_step: int | None = None, module=train):
        self.rates: list[float] = []
        self.stop_at_step = stop_at_step
        real_build_optimizer, real_objective = train.build_optimizer, module.build_objective

        def build_optimizer(*args, **kwargs):
            self.optimizer = real_build_optimizer(*args, **kwargs)
            return self.optimizer

        def build_objective(args, device, model):
            objective, extra = real_objective(args, device, model)

            def spied(m, images, labels):
                if torch.is_grad_enabled():  # a training step, not the one-off count of its FLOPs
                    self.rates.append(self.optimizer.param_groups[0]["lr"])
                    if len(self.rates) == self.stop_at_step:
                        os.kill(os.getpid(), signal.SIGUSR1)
                return objective(m, images, labels)

            return spied, extra

        self.build_objective = build_objective
        monkeypatch.setattr(train, "build_optimizer", build_optimizer)
        if module is not train:
            monkeypatch.setattr(module, "build_objective", build_objective)


def config_of(stage) -> dict:
    return json.loads((stage / "config.json").read_text())


def test_a_stage_resumed_with_another_batch_goes_on_in_epochs_at_the_new_batchs_rate(synthetic_root, tmp_path,
                                                                                    monkeypatch, capsys):
    # Stage 2 of a run starts from stage 1's best.pth, is stopped by a signal in its second epoch and runs again
    # with half the batch: the paper recipe's rate is 0.00375 per image, 0.015 at 4 and 0.0075 at 2.
    stage1_best = tmp_path / "t" / "profile-1" / "best.pth"
    stage1_best.parent.mkdir(parents=True)
    torch.save(build_model("fast_scnn").state_dict(), stage1_best)  # as good as trained, for this test
    stage2 = ["--profile", "2", "--resize", "128x64", "--patch", "112x56", "--epochs", "3", "--lr-decay", "stage"]
    steps = TRAIN_IMAGES // 4
    with monkeypatch.context() as m:
        spy = RateSpy(m, stop_at_step=steps + 1)
        assert train.main(argv(synthetic_root, tmp_path, *stage2, "--check-every", "1"),
                          make_objective=spy.build_objective) == REQUEUE_EXIT_CODE
    assert spy.rates[:steps] == pytest.approx([poly(0.015, k, 3 * steps) for k in range(steps)])
    capsys.readouterr()

    with monkeypatch.context() as m:
        spy = RateSpy(m)
        assert train.main(argv(synthetic_root, tmp_path, *stage2, "--batch-size", "2"),
                          make_objective=spy.build_objective) == 0
    out = capsys.readouterr().out
    assert "up to epoch 1 the stage ran with a global batch of 4 (4 x 1 processes), this run has 2" in out
    assert "base rate 0.0075 (was 0.015)" in out
    # Epochs 2 and 3 at 8 steps each: the decay goes on from epoch 1 of 3, at the new base rate, to the floor.
    assert spy.rates == pytest.approx([poly(0.0075, 8 + k, 24) for k in range(16)])
    stage = tmp_path / "t" / "profile-2"
    assert [r["lr"] for r in records(stage)] == pytest.approx(
        [poly(0.015, 1, 3), poly(0.0075, 2, 3), 1e-4])  # the rate at the end of each epoch

    change = {"epoch": 1, "batch_size": [4, 2], "global_batch": [4, 2]}
    for config in (config_of(stage), load_checkpoint(stage / "last.pth")["config"]):
        assert (config["batch_size"], config["global_batch"], config["lr"]) == (2, 2, pytest.approx(0.0075))
        [changes] = config["resumed_changes"]
        assert {k: v for k, v in changes.items() if k != "lr"} == change
        assert changes["lr"] == pytest.approx([0.015, 0.0075])
        assert config["previous_model_loaded"] == str(stage1_best)  # where the stage started, after a resume
    assert load_checkpoint(stage / "best.pth")["config"]["previous_model_loaded"] == str(stage1_best)


@pytest.mark.parametrize("decay", ["stage", "curriculum"])
def test_more_epochs_for_a_finished_stage_go_on_from_where_its_rate_ended(synthetic_root, tmp_path, monkeypatch,
                                                                         capsys, decay):
    common = ["--lr", "0.02", "--lr-decay", decay, "--curriculum-epochs", "2,2,0,0,0", "--previous-model-path",
              "none"]
    assert train.main(argv(synthetic_root, tmp_path, *common, "--epochs", "2")) == 0
    assert train.main(argv(synthetic_root, tmp_path, *common, "--epochs", "2")) == 0
    assert "raise --epochs to train further: the added epochs go on from the rate where the stage ended, never " \
           "back up" in capsys.readouterr().out

    with monkeypatch.context() as m:
        spy = RateSpy(m)
        assert train.main(argv(synthetic_root, tmp_path, *common, "--epochs", "3"),
                          make_objective=spy.build_objective) == 0
    assert "keeps the plan this stage started with" in capsys.readouterr().out
    rates = [r["lr"] for r in records(tmp_path / "t" / "profile-1")]
    steps = TRAIN_IMAGES // 4
    if decay == "stage":  # the stage's own decay ended at the floor after epoch 2: the added epoch stays there
        assert rates == pytest.approx([poly(0.02, 1, 2), 1e-4, 1e-4])
        assert spy.rates == pytest.approx([1e-4] * steps)
    else:  # one decay over the 2 + 2 planned epochs of profiles 1 and 2: epoch 3 goes on down it
        assert rates == pytest.approx([poly(0.02, e, 4) for e in (1, 2, 3)])
        assert spy.rates == pytest.approx([poly(0.02, 2 * steps + k, 4 * steps) for k in range(steps)])
    assert config_of(tmp_path / "t" / "profile-1")["decay_epochs"] == ([0, 2] if decay == "stage" else [0, 4])


def test_a_resumed_stage_keeps_the_init_its_weights_started_from(synthetic_root, tmp_path):
    # A stage begun with He init (the paper recipe's before), then resumed where the recipe's init is PyTorch's:
    # the files still say how its weights started.
    common = ["--previous-model-path", "none", "--curriculum-epochs", "2,2,0,0,0"]
    assert train.main(argv(synthetic_root, tmp_path, *common, "--init", "kaiming", "--epochs", "1")) == 0
    assert train.main(argv(synthetic_root, tmp_path, *common, "--epochs", "2")) == 0
    stage = tmp_path / "t" / "profile-1"
    assert [r["epoch"] for r in records(stage)] == [1, 2]
    for config in (config_of(stage), load_checkpoint(stage / "last.pth")["config"]):
        assert config["init"] == "kaiming"


def test_a_student_resumed_keeps_its_origin_and_teacher(synthetic_root, tmp_path, monkeypatch):
    torch.manual_seed(0)
    teacher, start = tmp_path / "teacher.pth", tmp_path / "start.pth"
    torch.save(build_model("fast_scnn").state_dict(), teacher)  # users' plain state_dicts
    torch.save(build_model("fast_scnn").state_dict(), start)
    args = argv(synthetic_root, tmp_path, "--epochs", "2", "--trained-teacher-model-path", str(teacher),
                "--previous-student-model-path", str(start), "--check-every", "1")
    with monkeypatch.context() as m:
        RateSpy(m, stop_at_step=TRAIN_IMAGES // 4 + 1, module=train_distillation)
        assert train_distillation.main(args) == REQUEUE_EXIT_CODE
    assert train_distillation.main(args) == 0
    stage = tmp_path / "t" / "profile-1"
    for config in (config_of(stage), load_checkpoint(stage / "last.pth")["config"]):
        assert config["previous_model_loaded"] == str(start)
        assert config["teacher"]["path"] == str(teacher) and "teacher_at_start" not in config
        assert config["resumed_changes"] == []


def test_a_resume_with_another_teacher_records_the_first():
    saved = {"previous_model_loaded": "s1.pth", "teacher": {"path": "a.pth"}, "batch_size": 8, "world_size": 2,
             "lr": 0.06}
    now = {"previous_model_loaded": None, "teacher": {"path": "b.pth"}, "batch_size": 8, "world_size": 2,
           "global_batch": 16, "lr": 0.06}
    config, notes = carry_on_resume(saved, now, 5)
    assert config["previous_model_loaded"] == "s1.pth" and config["teacher_at_start"] == {"path": "a.pth"}
    assert notes == ["note: this stage started with the teacher a.pth; it goes on with b.pth"]
    assert config["resumed_changes"] == []  # the global batch of a file from before it was recorded: 8 x 2
    again, _ = carry_on_resume(config, {**now, "teacher": {"path": "c.pth"}, "world_size": 1, "global_batch": 8,
                                        "lr": 0.03}, 7)
    assert again["teacher_at_start"] == {"path": "a.pth"}
    assert again["resumed_changes"] == [{"epoch": 7, "world_size": [2, 1], "global_batch": [16, 8],
                                         "lr": [0.06, 0.03]}]
