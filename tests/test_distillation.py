"""train_distillation.py: a frozen teacher, the KD term, the shared trainer, and its bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARGS

import train
import train_distillation
from fastseg.augment import prepare_batch
from fastseg.cityscapes import Profile
from fastseg.data import SegmentationDataset, build_loader
from fastseg.errors import UserError
from fastseg.losses import cross_entropy, cwd_loss, dist_loss, kd_loss
from fastseg.models import ClassifierLogits, build_model, load_model

TINY = Profile(1, (128, 64), (96, 48))


def argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [*TINY_ARGS, "--data-dir", str(data), "--output-dir", str(out), *extra]


@pytest.fixture(scope="module")
def teacher(synthetic_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    # AdamW: in six epochs on 16 images SGD leaves the teacher close to uniform, a teacher with nothing to teach
    assert train.main(argv(synthetic_root, out, "--experiment-id", "teacher", "--epochs", "6", "--recipe", "adamw",
                           "--lr", "5e-3", "--previous-model-path", "none")) == 0
    return out / "teacher" / "profile-1" / "best.pth"


def agreement(student: torch.nn.Module, teacher: torch.nn.Module, data: Path) -> float:
    """Fraction of validation pixels where student and teacher predict the same class."""
    loader = build_loader(SegmentationDataset(data, "val", TINY, train=False, label_resolution="resized"), 4, 0,
                          shuffle=False, seed=0)
    same = total = 0
    student.eval()
    with torch.no_grad():
        for images, labels, _ in loader:
            x, _ = prepare_batch(images, labels, "cpu", train=False)
            same += int((student(x).argmax(1) == teacher(x).argmax(1)).sum())
            total += x.shape[0] * x.shape[2] * x.shape[3]
    return same / total


def test_student_learns_to_agree_with_the_teacher(teacher, synthetic_root, tmp_path):
    teacher_model, _ = load_model(teacher)
    torch.manual_seed(0)
    before = agreement(build_model("fast_scnn"), teacher_model, synthetic_root)
    code = train_distillation.main(argv(synthetic_root, tmp_path, "--experiment-id", "student", "--epochs", "5",
                                        "--lr", "5e-3", "--alpha", "1.0", "--trained-teacher-model-path",
                                        str(teacher), "--previous-student-model-path", "none"))
    assert code == 0
    stage = tmp_path / "student" / "profile-1"
    student, cfg = load_model(stage / "last.pth")
    after = agreement(student, teacher_model, synthetic_root)
    assert after > before + 0.2, (before, after)
    records = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert {"train_ce_loss", "train_kd_loss", "val_miou"} <= records[0].keys()
    assert records[-1]["train_kd_loss"] < records[0]["train_kd_loss"]
    assert cfg["teacher"]["path"] == str(teacher) and cfg["alpha"] == 1.0


def test_teacher_is_frozen_and_gets_no_gradient(teacher, synthetic_root, tmp_path):
    args = train.parse_args(argv(synthetic_root, tmp_path, "--trained-teacher-model-path", str(teacher)),
                            train_distillation.constants(), extend=train_distillation.add_distillation_flags)
    student = build_model("fast_scnn")
    objective, extra = train_distillation.build_objective(args, torch.device("cpu"), student)
    assert extra["teacher"]["path"] == str(teacher)
    teacher_model = next(c.cell_contents for c in objective.__closure__
                         if isinstance(c.cell_contents, torch.nn.Module))
    before = {k: v.clone() for k, v in teacher_model.state_dict().items()}
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    loader = build_loader(SegmentationDataset(synthetic_root, "train", TINY, train=True), 4, 0, shuffle=True, seed=0)
    student.train()
    for images, labels, _ in loader:
        x, y = prepare_batch(images, labels, "cpu", train=True)
        loss, parts = objective(student, x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert parts["kd"] > 0
    assert not teacher_model.training
    assert all(p.grad is None and not p.requires_grad for p in teacher_model.parameters())
    for key, value in teacher_model.state_dict().items():
        assert torch.equal(value, before[key]), key  # BatchNorm statistics included: eval mode throughout
    assert any(p.grad is not None for p in student.parameters())


def test_a_teacher_of_another_architecture_works_end_to_end(synthetic_root, tmp_path):
    assert train.main(argv(synthetic_root, tmp_path, "--experiment-id", "lraspp", "--epochs", "1",
                           "--arch", "lraspp_mobilenet_v3_large", "--previous-model-path", "none")) == 0
    big = tmp_path / "lraspp" / "profile-1" / "best.pth"
    assert train_distillation.main(argv(synthetic_root, tmp_path, "--experiment-id", "s", "--epochs", "1",
                                        "--trained-teacher-model-path", str(big),
                                        "--previous-student-model-path", "none")) == 0
    cfg = json.loads((tmp_path / "s" / "profile-1" / "config.json").read_text())
    assert cfg["teacher"]["arch"] == "lraspp_mobilenet_v3_large" and cfg["arch"] == "fast_scnn"


def test_a_wider_fast_scnn_teacher_from_train_py_works_end_to_end(synthetic_root, tmp_path):
    assert train.main(argv(synthetic_root, tmp_path, "--experiment-id", "wide", "--epochs", "1",
                           "--width-mult", "2", "--previous-model-path", "none")) == 0
    wide = tmp_path / "wide" / "profile-1" / "best.pth"
    teacher_model, teacher_cfg = load_model(wide)
    assert teacher_cfg["width_mult"] == 2.0
    assert teacher_model.learning_to_downsample.conv.conv[0].out_channels == 64  # twice the standard 32
    assert train_distillation.main(argv(synthetic_root, tmp_path, "--experiment-id", "s", "--epochs", "1",
                                        "--trained-teacher-model-path", str(wide),
                                        "--previous-student-model-path", "none")) == 0
    stage = tmp_path / "s" / "profile-1"
    cfg = json.loads((stage / "config.json").read_text())
    assert cfg["teacher"]["width_mult"] == 2.0 and cfg["teacher"]["path"] == str(wide)
    assert cfg["width_mult"] == 1.0 and cfg["arch"] == "fast_scnn"
    record = json.loads((stage / "metrics.jsonl").read_text().splitlines()[0])
    assert record["train_kd_loss"] > 0
    student, _ = load_model(stage / "best.pth")
    assert student.learning_to_downsample.conv.conv[0].out_channels == 32


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--alpha", "1.5"], "--alpha"),
        (["--temperature", "0"], "--temperature"),
        (["--kd-weight", "-1"], "--kd-weight"),
        (["--cwd-weight", "1", "--cwd-temperature", "0"], "--cwd-temperature"),
        (["--trained-teacher-model-path", "missing.pth"], "--trained-teacher-model-path: missing.pth: no such file"),
    ],
)
def test_bad_distillation_input(teacher, synthetic_root, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        train_distillation.main(argv(synthetic_root, tmp_path, "--trained-teacher-model-path", str(teacher),
                                     "--previous-student-model-path", "none", *extra))


def test_teacher_with_another_class_count_or_corrupt_file(synthetic_root, tmp_path):
    from fast_scnn import FastSCNN

    eight = tmp_path / "eight.pth"
    torch.save(FastSCNN(num_classes=8).state_dict(), eight)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00" * 100)
    for path, message in ((eight, "8 classes"), (corrupt, "not a readable PyTorch checkpoint")):
        with pytest.raises(UserError, match=message):
            train_distillation.main(argv(synthetic_root, tmp_path, "--trained-teacher-model-path", str(path),
                                         "--previous-student-model-path", "none"))


def records_of(stage: Path) -> list[dict]:
    return [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kd", ["dist", "kl"])
def test_each_kd_loss_trains_with_ce_and_kd_of_comparable_size(teacher, synthetic_root, tmp_path, kd):
    # The defaults: CE at full weight plus 1.0 x KD at T = 1, on the classifiers' 1/8 logits.
    assert train_distillation.main(argv(synthetic_root, tmp_path, "--experiment-id", kd, "--epochs", "2",
                                        "--kd-loss", kd, "--trained-teacher-model-path", str(teacher),
                                        "--previous-student-model-path", "none")) == 0
    stage = tmp_path / kd / "profile-1"
    for record in records_of(stage):
        ce, kd_value = record["train_ce_loss"], record["train_kd_loss"]
        assert math.isfinite(ce) and math.isfinite(kd_value) and kd_value > 0, record
        # Same scale: a KD summed over pixels (as this project's earliest form) was 10^4-10^5 times the CE;
        # an average over pixels stays within about an order of magnitude of it, here as the teacher allows.
        assert 1 / 30 < kd_value / ce < 30, record
    cfg = json.loads((stage / "config.json").read_text())
    assert (cfg["kd_loss"], cfg["kd_weight"], cfg["temperature"], cfg["alpha"]) == (kd, 1.0, 1.0, None)


def objective_and_batch(teacher, synthetic_root, tmp_path, *flags):
    """train_distillation's objective for ``flags``, a fresh training-mode student with its two heads, the
    teacher as loaded, and one normalised batch of the tiny training set."""
    args = train.parse_args(argv(synthetic_root, tmp_path, "--trained-teacher-model-path", str(teacher), *flags),
                            train_distillation.constants(), extend=train_distillation.add_distillation_flags)
    torch.manual_seed(0)
    student = build_model("fast_scnn", aux=True).train()
    objective, _ = train_distillation.build_objective(args, torch.device("cpu"), student)
    teacher_model, _ = load_model(teacher)
    images, labels, _ = next(iter(build_loader(SegmentationDataset(synthetic_root, "train", TINY, train=True), 4, 0,
                                               shuffle=False, seed=0)))
    x, y = prepare_batch(images, labels, "cpu", train=False)
    return student, objective, teacher_model, x, y


def test_the_kd_term_compares_the_classifiers_eighth_grid_logits(teacher, synthetic_root, tmp_path):
    student, objective, teacher_model, x, y = objective_and_batch(teacher, synthetic_root, tmp_path)
    y[:, :8] = 255
    # What the two classifiers give for this batch, read by hooks of our own (dropout off for a fair replay).
    student.eval()
    ours_s, ours_t = ClassifierLogits(student), ClassifierLogits(teacher_model)
    student(x)
    with torch.no_grad():
        teacher_model(x)
    low_s, low_t = ours_s.take(), ours_t.take()
    assert low_s.shape[-2:] == low_t.shape[-2:] == (6, 12)  # 48x96 crops: Fast-SCNN's 1/8 grid
    _, parts = objective(student, x, y)
    assert parts["kd"].item() == pytest.approx(dist_loss(low_s, low_t).item(), rel=1e-5)
    # and not the distillation of the upsampled outputs, which differs (by about 1e-4 of its value here: over
    # every pixel, bilinear upsampling keeps the correlations nearly as they are; the match above is to 1e-5)
    assert parts["kd"].item() != pytest.approx(dist_loss(student(x), teacher_model(x)).item(), rel=2e-5)
    # the cross-entropy stays on the full-resolution output: a training-mode student returns (main, aux...)
    student.train()
    torch.manual_seed(1)
    _, parts = objective(student, x, y)
    torch.manual_seed(1)
    main = student(x)[0]
    assert parts["ce"].item() == pytest.approx(cross_entropy(main, y).item(), rel=1e-5)


def test_the_objective_is_ce_and_aux_plus_each_distillation_term_at_its_weight(teacher, synthetic_root, tmp_path):
    # KL and CWD, each at a weight and temperature of its own: CE + 0.4 x aux CE + w x KD + w x CWD, every
    # term recomputed here from the classifiers' 1/8 logits of a training-mode student with its two heads.
    student, objective, teacher_model, x, y = objective_and_batch(
        teacher, synthetic_root, tmp_path, "--kd-loss", "kl", "--kd-weight", "0.7", "--temperature", "2",
        "--cwd-weight", "3", "--cwd-temperature", "4")
    torch.manual_seed(1)  # the same dropout in the objective's forward and in the replay
    loss, parts = objective(student, x, y)

    ours_s, ours_t = ClassifierLogits(student), ClassifierLogits(teacher_model)
    torch.manual_seed(1)
    main, *aux = student(x)
    with torch.no_grad():
        teacher_model(x)
    low_s, low_t = ours_s.take(), ours_t.take()
    ce = cross_entropy(main, y)
    aux_ce = sum(cross_entropy(logits, y) for logits in aux)
    kd = kd_loss(low_s, low_t, temperature=2.0)  # every pixel of the batch, the default (--kd-pixels all)
    cwd = cwd_loss(low_s, low_t, temperature=4.0)
    assert len(aux) == 2
    assert set(parts) == {"ce", "aux", "kd", "cwd"}
    for name, value in (("ce", ce), ("aux", aux_ce), ("kd", kd), ("cwd", cwd)):
        assert parts[name].item() == pytest.approx(value.item(), rel=1e-5), name
    assert loss.item() == pytest.approx((ce + 0.4 * aux_ce + 0.7 * kd + 3.0 * cwd).item(), rel=1e-5)


def test_teacher_input_teacher_scales_the_batch_to_the_teachers_resolution(teacher, synthetic_root, tmp_path):
    # The teacher was trained on 128x64 images; this student trains on 64x32 ones: the teacher sees 2x.
    args = train.parse_args(argv(synthetic_root, tmp_path, "--trained-teacher-model-path", str(teacher),
                                 "--resize", "64x32", "--patch", "48x24", "--teacher-input", "teacher", "--kd-loss",
                                 "kl"), train_distillation.constants(), extend=train_distillation.add_distillation_flags)
    student = build_model("fast_scnn").eval()  # eval: the replay below gives the same logits
    objective, extra = train_distillation.build_objective(args, torch.device("cpu"), student)
    assert extra["teacher"]["input_scale"] == [2.0, 2.0] and extra["teacher"]["resize"] == [128, 64]
    teacher_model = next(c.cell_contents for c in objective.__closure__
                         if isinstance(c.cell_contents, torch.nn.Module))
    seen = []
    teacher_model.register_forward_pre_hook(lambda module, inputs: seen.append(tuple(inputs[0].shape[-2:])))
    x = torch.randn(2, 3, 24, 48)
    y = torch.randint(0, 19, (2, 24, 48))
    loss, parts = objective(student, x, y)
    assert seen == [(48, 96)]
    # its logits come back to the student's 1/8 grid: the KD equals the KL against them resized there
    probe = ClassifierLogits(teacher_model)
    with torch.no_grad():
        teacher_model(torch.nn.functional.interpolate(x, size=(48, 96), mode="bilinear", align_corners=False))
    head = ClassifierLogits(student)
    student(x)
    assert parts["kd"].item() == pytest.approx(kd_loss(head.take(), probe.take()).item(), rel=1e-4)
    loss.backward()


def test_teacher_input_teacher_needs_a_checkpoint_that_knows_its_resolution(synthetic_root, tmp_path):
    plain = tmp_path / "plain.pth"
    torch.save(build_model("fast_scnn").state_dict(), plain)
    with pytest.raises(UserError, match="--teacher-input teacher: .*plain.pth does not say at which resolution"):
        train_distillation.main(argv(synthetic_root, tmp_path, "--trained-teacher-model-path", str(plain),
                                     "--teacher-input", "teacher", "--previous-student-model-path", "none"))


def test_kd_aux_distils_each_head_from_the_teachers_of_the_same_rank_with_the_teacher_frozen(synthetic_root,
                                                                                             tmp_path):
    torch.manual_seed(0)
    with_heads, without = tmp_path / "with_heads.pth", tmp_path / "without.pth"
    torch.save(build_model("fast_scnn", aux=True).state_dict(), with_heads)  # a plain state_dict with its heads
    torch.save(build_model("fast_scnn").state_dict(), without)

    def objective_for(teacher_path, *extra):
        args = train.parse_args(argv(synthetic_root, tmp_path, "--trained-teacher-model-path", str(teacher_path),
                                     "--kd-aux", *extra),
                                train_distillation.constants(), extend=train_distillation.add_distillation_flags)
        student = build_model("fast_scnn", aux=True)
        return student, *train_distillation.build_objective(args, torch.device("cpu"), student)

    student, objective, extra = objective_for(with_heads)
    heads = [["auxlayer", "auxlayer"], ["auxlayer_gfe", "auxlayer_gfe"]]
    assert [list(p) for p in extra["teacher"]["kd_aux_pairs"]] == heads
    teacher_model = next(c.cell_contents for c in objective.__closure__
                         if isinstance(c.cell_contents, torch.nn.Module))
    before = {k: v.clone() for k, v in teacher_model.state_dict().items()}
    images, labels, _ = next(iter(build_loader(SegmentationDataset(synthetic_root, "train", TINY, train=True), 4, 0,
                                               shuffle=True, seed=0)))
    x, y = prepare_batch(images, labels, "cpu", train=True)
    student.train()
    loss, parts = objective(student, x, y)
    loss.backward()
    assert parts["kd_aux"] > 0 and parts["kd"] > 0
    assert all(not m.training for m in teacher_model.modules() if m is not teacher_model)  # BatchNorm, dropout
    for key, value in teacher_model.state_dict().items():
        assert torch.equal(value, before[key]), key  # running statistics untouched
    assert student.auxlayer_gfe[0].weight.grad.abs().sum() > 0

    with pytest.raises(UserError, match="--trained-teacher-model-path: .*without.pth holds no weights of the "
                                        "auxiliary head"):
        objective_for(without)
    with pytest.raises(UserError, match="--kd-aux: the student has no auxiliary heads"):
        args = train.parse_args(argv(synthetic_root, tmp_path, "--trained-teacher-model-path", str(with_heads),
                                     "--kd-aux"),
                                train_distillation.constants(), extend=train_distillation.add_distillation_flags)
        train_distillation.build_objective(args, torch.device("cpu"), build_model("fast_scnn"))
