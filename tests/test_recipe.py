"""The default recipe is the published one, the learning rate makes one decay over the curriculum, and each
epoch records the training compute spent on the curriculum so far."""

from __future__ import annotations

import argparse
import json
import math
from itertools import accumulate

import pytest
import torch
from test_train import argv, records

import train
from fastseg.flops import count_flops
from fastseg.models import load_model
from fastseg.optim import apply_recipe


def config(out, experiment="t", profile=1) -> dict:
    return json.loads((out / experiment / f"profile-{profile}" / "config.json").read_text())


def test_the_default_recipe_is_the_papers_and_adamw_is_the_earlier_one(synthetic_root, tmp_path):
    assert train.main(argv(synthetic_root, tmp_path / "paper", "--epochs", "1", "--previous-model-path", "none")) == 0
    paper = config(tmp_path / "paper")
    assert (paper["recipe"], paper["optimizer"], paper["weight_decay"], paper["lr_schedule"]) == ("paper", "sgd", 4e-5, "poly")
    assert paper["lr"] == pytest.approx(0.00375 * 4)  # per image of the global batch: --batch-size 4, one process
    assert paper["min_lr"] == 1e-4 and paper["aux"] is True and paper["scale_aug"] is True
    model, cfg = load_model(tmp_path / "paper" / "t" / "profile-1" / "best.pth")  # trained with its two heads
    assert cfg["aux"] is True and not model.training

    assert train.main(argv(synthetic_root, tmp_path / "adamw", "--epochs", "1", "--previous-model-path", "none",
                           "--recipe", "adamw", "--lr", "2e-3")) == 0
    adamw = config(tmp_path / "adamw")
    assert (adamw["optimizer"], adamw["lr_schedule"], adamw["lr_decay"], adamw["min_lr"], adamw["aux"],
            adamw["scale_aug"], adamw["init"]) == ("adamw", "poly", "stage", 0.0, False, False, "pytorch")
    assert adamw["lr"] == 2e-3  # a setting given on its own wins over the recipe
    assert records(tmp_path / "adamw" / "t" / "profile-1")[0]["lr"] == 0.0  # a whole poly decay in the stage


def test_the_papers_rate_scales_with_the_global_batch():
    base = argparse.Namespace(recipe="paper", **dict.fromkeys(
        ("batch_size", "optimizer", "lr", "weight_decay", "lr_schedule", "min_lr", "lr_decay", "aux", "scale_aug",
         "init")))
    one, filled = apply_recipe(base, world_size=1)
    eight, _ = apply_recipe(base, world_size=8)
    assert one.batch_size == 16 and one.lr == pytest.approx(0.06)  # the paper: 0.045 at a batch of 12
    assert eight.lr == pytest.approx(0.48) and "lr" in filled
    adamw, _ = apply_recipe(argparse.Namespace(**{**vars(base), "recipe": "adamw"}), world_size=8)
    assert (adamw.batch_size, adamw.lr) == (16, 1e-3)


def test_two_stages_make_one_decay_and_add_up_their_compute(synthetic_root, tmp_path):
    # 16 images, batch 4: 4 steps an epoch; the plan is 2 + 2 epochs, so one decay of 16 steps.
    common = ["--curriculum-epochs", "2,2,0,0,0", "--lr", "0.02"]
    assert train.main(argv(synthetic_root, tmp_path, *common, "--previous-model-path", "none")) == 0
    assert train.main(argv(synthetic_root, tmp_path, *common, "--profile", "2", "--resize", "128x64",
                           "--patch", "112x56", "--previous-model-path", "auto")) == 0
    first, second = records(tmp_path / "t" / "profile-1"), records(tmp_path / "t" / "profile-2")
    rates = [r["lr"] for r in first + second]  # each is the rate after the epoch's last step
    expected = [1e-4 + (0.02 - 1e-4) * (1 - 4 * k / 16) ** 0.9 for k in (1, 2, 3, 4)]
    assert rates == pytest.approx(expected)  # stage 2 went on where stage 1 ended, down to MIN_LR at the end
    assert rates[-1] == pytest.approx(1e-4)

    for r in first + second:
        for key in ("train_tflop", "cum_train_tflop", "epoch_s", "cum_device_hours"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    cums = [r["cum_train_tflop"] for r in first + second]
    assert cums == pytest.approx(list(accumulate([r["train_tflop"] for r in first + second])))
    hours = [r["cum_device_hours"] for r in first + second]
    assert hours == sorted(hours) and hours[-1] == pytest.approx(sum(r["epoch_s"] for r in first + second) / 3600)
    # A training step costs about three forward passes (forward, then backward for inputs and weights), a
    # little more with the auxiliary heads: checked against an independent count of the eval-mode forward
    # pass (no heads) at each stage's crop size.
    model, _ = load_model(tmp_path / "t" / "profile-1" / "best.pth")
    for recs, crop_hw in ((first, (48, 96)), (second, (56, 112))):
        forward = count_flops(model, crop_hw) * 4 * 4 / 1e12  # batch 4, 4 steps
        assert 3.0 < recs[0]["train_tflop"] / forward < 3.6, (recs[0]["train_tflop"], forward)
    assert second[0]["train_tflop"] > first[0]["train_tflop"]  # larger crops cost more


def test_a_stage_on_its_own_gets_a_whole_decay(synthetic_root, tmp_path):
    assert train.main(argv(synthetic_root, tmp_path, "--epochs", "2", "--lr-decay", "stage", "--lr", "0.02",
                           "--previous-model-path", "none")) == 0
    rates = [r["lr"] for r in records(tmp_path / "t" / "profile-1")]
    assert rates == pytest.approx([1e-4 + (0.02 - 1e-4) * 0.5 ** 0.9, 1e-4])



def test_a_last_pth_without_compute_totals_resumes(synthetic_root, tmp_path):
    # A last.pth written before the compute was recorded: the resumed stage counts from there, no traceback.
    args = argv(synthetic_root, tmp_path, "--epochs", "1", "--previous-model-path", "none")
    assert train.main(args) == 0
    last = tmp_path / "t" / "profile-1" / "last.pth"
    old = torch.load(last, weights_only=True)
    for key in ("cum_train_tflop", "cum_device_hours"):
        del old["metrics"][key]
    torch.save(old, last)
    assert train.main(argv(synthetic_root, tmp_path, "--epochs", "2", "--previous-model-path", "none")) == 0
    second = records(tmp_path / "t" / "profile-1")[1]
    assert second["cum_train_tflop"] == pytest.approx(second["train_tflop"])
