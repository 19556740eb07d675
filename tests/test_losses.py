"""Losses against references computed by hand with numpy loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastseg.errors import UserError
from fastseg.losses import DistillationLoss, SegmentationLoss, cross_entropy, cwd_loss, dist_loss, kd_loss


def _logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _kd_reference(student, teacher, target, temperature, ignore_index=255):
    s, t = student.double().numpy(), teacher.double().numpy()
    n, _, h, w = s.shape
    total, count = 0.0, 0
    for b in range(n):
        for y in range(h):
            for x in range(w):
                if target is not None and int(target[b, y, x]) == ignore_index:
                    continue
                p = _softmax(t[b, :, y, x] / temperature)
                q = _softmax(s[b, :, y, x] / temperature)
                total += float(np.sum(p * np.log(p / q)))
                count += 1
    return total / count * temperature**2


def test_kd_matches_hand_computed_reference():
    student, teacher = _logits(2, 4, 3, 5, seed=1), _logits(2, 4, 3, 5, seed=2)
    target = torch.randint(0, 4, (2, 3, 5), generator=torch.Generator().manual_seed(3))
    target[0, 1, :3] = 255
    for temperature in (1.0, 4.0):
        got = kd_loss(student, teacher, target, temperature=temperature)
        assert got.item() == pytest.approx(_kd_reference(student, teacher, target, temperature), rel=1e-5)
    # without labels every pixel counts
    got = kd_loss(student, teacher, temperature=2.0)
    assert got.item() == pytest.approx(_kd_reference(student, teacher, None, 2.0), rel=1e-5)


def test_kd_is_a_mean_so_it_does_not_grow_with_resolution():
    student, teacher = _logits(2, 5, 4, 6, seed=4), _logits(2, 5, 4, 6, seed=5)
    target = torch.randint(0, 5, (2, 4, 6), generator=torch.Generator().manual_seed(6))
    target[1, 0, 0] = 255
    low = kd_loss(student, teacher, target)

    def up(x):
        return x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)

    high = kd_loss(up(student), up(teacher), up(target))
    assert high.item() == pytest.approx(low.item(), rel=1e-5)
    assert low.item() > 0.01


def test_kd_resizes_teacher_to_student_size():
    student = _logits(1, 3, 4, 4, seed=7)
    teacher = _logits(1, 3, 8, 8, seed=8)
    resized = F.interpolate(teacher, size=(4, 4), mode="bilinear", align_corners=False)
    assert kd_loss(student, teacher).item() == pytest.approx(kd_loss(student, resized).item(), rel=1e-6)
    # Labels at the teacher's size are brought to the student's size too, with nearest. Each label below
    # becomes a 2×2 block at the teacher's size whose main diagonal holds the label and whose other diagonal
    # holds another value (255 beside a class, class 3 beside 255): nearest reads the label from either corner
    # of the diagonal, while an interpolation that blends a block turns the ignored blocks into a class.
    # The pattern has no symmetry, so a transposed or flipped mask, or one of another size, counts other pixels.
    at_student = torch.tensor([[[255, 255, 0, 0], [255, 1, 1, 0], [2, 2, 255, 0], [2, 2, 255, 255]]])
    target = at_student.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    off_diagonal = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 == 1
    target[:, off_diagonal] = torch.where(target[:, off_diagonal] == 255, 3, 255)
    assert target[0, :2, :2].tolist() == [[255, 3], [3, 255]] and target[0, 2:4, 2:4].tolist() == [[1, 255], [255, 1]]
    expected = kd_loss(student, resized, at_student).item()
    assert kd_loss(student, teacher, target).item() == pytest.approx(expected, rel=1e-6)
    # the mask matters: without it, or transposed or flipped, the loss differs
    for other in (None, at_student.transpose(-2, -1), at_student.flip(-1), at_student.flip(-2)):
        assert kd_loss(student, resized, other).item() != pytest.approx(expected, rel=1e-3)


def test_kd_zero_when_student_equals_teacher():
    logits = _logits(2, 6, 5, 5, seed=9)
    assert kd_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_ignores_pixels_labelled_255():
    student, teacher = _logits(1, 4, 4, 4, seed=10), _logits(1, 4, 4, 4, seed=11)
    target = torch.randint(0, 4, (1, 4, 4), generator=torch.Generator().manual_seed(12))
    target[0, :2] = 255
    before = kd_loss(student, teacher, target)
    student2, teacher2 = student.clone(), teacher.clone()
    student2[..., :2, :] = 100 * torch.randn(1, 4, 2, 4)
    teacher2[..., :2, :] = -50.0
    after = kd_loss(student2, teacher2, target)
    assert after.item() == pytest.approx(before.item(), rel=1e-6)
    # and the valid pixels are averaged, not summed
    only_valid = kd_loss(student[..., 2:, :], teacher[..., 2:, :])
    assert before.item() == pytest.approx(only_valid.item(), rel=1e-6)


def test_kd_gradient_reaches_student_not_teacher_and_is_stable():
    student = _logits(1, 3, 2, 2, seed=13).requires_grad_()
    teacher = (_logits(1, 3, 2, 2, seed=14) * 1000).requires_grad_()  # extreme logits: no overflow
    loss = kd_loss(student, teacher)
    loss.backward()
    assert math.isfinite(loss.item())
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert teacher.grad is None


def test_kd_all_ignored_is_zero_with_gradient():
    student = _logits(1, 3, 2, 2).requires_grad_()
    loss = kd_loss(student, _logits(1, 3, 2, 2, seed=1), torch.full((1, 2, 2), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_cross_entropy_ignores_255_and_averages_valid_pixels():
    logits = _logits(1, 3, 2, 2, seed=15)
    target = torch.tensor([[[0, 2], [255, 1]]])
    logp = F.log_softmax(logits.double(), dim=1)[0]
    expected = -(logp[0, 0, 0] + logp[2, 0, 1] + logp[1, 1, 1]) / 3
    assert cross_entropy(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    # whatever the logits at the ignored pixel, the loss stays the same
    logits2 = logits.clone()
    logits2[0, :, 1, 0] = torch.tensor([50.0, -50.0, 3.0])
    assert cross_entropy(logits2, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_segmentation_loss_all_ignored_batch_is_finite_zero_with_grad():
    logits = _logits(2, 4, 3, 3).requires_grad_()
    loss, parts = SegmentationLoss()(logits, torch.full((2, 3, 3), 255))
    assert loss.item() == 0.0 and parts["ce"].item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_segmentation_loss_adds_weighted_aux():
    main, aux = _logits(2, 4, 3, 3, seed=16), _logits(2, 4, 3, 3, seed=17)
    target = torch.randint(0, 4, (2, 3, 3), generator=torch.Generator().manual_seed(18))
    target[0, 0, 0] = 255
    ce_main = F.cross_entropy(main, target, ignore_index=255)
    ce_aux = F.cross_entropy(aux, target, ignore_index=255)
    loss, parts = SegmentationLoss(aux_weight=0.4)((main, aux), target)
    assert loss.item() == pytest.approx((ce_main + 0.4 * ce_aux).item(), rel=1e-6)
    assert parts["ce"].item() == pytest.approx(ce_main.item(), rel=1e-6)
    assert parts["aux"].item() == pytest.approx(ce_aux.item(), rel=1e-6)
    plain, plain_parts = SegmentationLoss(aux_weight=0.4)(main, target)
    assert plain.item() == pytest.approx(ce_main.item(), rel=1e-6)
    assert "aux" not in plain_parts


def test_segmentation_loss_adds_every_aux_output_at_full_weight():
    # Fast-SCNN with aux returns (main, 1/8 head, 1/32 head); the recipe weighs each head 0.4.
    main, aux1, aux2 = (_logits(2, 4, 3, 3, seed=s) for s in (25, 26, 27))
    target = torch.randint(0, 4, (2, 3, 3), generator=torch.Generator().manual_seed(28))
    target[1, 0, 2] = 255
    ce_main, ce_aux1, ce_aux2 = (F.cross_entropy(x, target, ignore_index=255) for x in (main, aux1, aux2))
    for output in ((main, aux1, aux2), [main, aux1, aux2]):
        loss, parts = SegmentationLoss(aux_weight=0.4)(output, target)
        assert loss.item() == pytest.approx((ce_main + 0.4 * (ce_aux1 + ce_aux2)).item(), rel=1e-6)
        assert set(parts) == {"ce", "aux"}
        assert parts["ce"].item() == pytest.approx(ce_main.item(), rel=1e-6)
        assert parts["aux"].item() == pytest.approx((ce_aux1 + ce_aux2).item(), rel=1e-6)  # the sum
    # The order of the auxiliary outputs does not matter; the main one is always first.
    swapped, _ = SegmentationLoss(aux_weight=0.4)((main, aux2, aux1), target)
    assert swapped.item() == pytest.approx(loss.item(), rel=1e-6)
    no_weight, _ = SegmentationLoss(aux_weight=0.0)((main, aux1, aux2), target)
    assert no_weight.item() == pytest.approx(ce_main.item(), rel=1e-6)


def test_segmentation_loss_backpropagates_into_every_head():
    outputs = [_logits(2, 4, 3, 3, seed=s).requires_grad_() for s in (29, 30, 31)]
    target = torch.randint(0, 4, (2, 3, 3), generator=torch.Generator().manual_seed(32))
    loss, _ = SegmentationLoss(aux_weight=0.4)(tuple(outputs), target)
    loss.backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in outputs)
    # d loss / d aux = 0.4 × d CE / d aux: the aux gradients are 0.4 × those of the same logits as main.
    main_only = outputs[1].detach().clone().requires_grad_()
    cross_entropy(main_only, target).backward()
    torch.testing.assert_close(outputs[1].grad, 0.4 * main_only.grad)


def _cwd_reference(student, teacher, temperature):
    s, t = student.double().numpy(), teacher.double().numpy()
    n, c = s.shape[:2]
    total = 0.0
    for b in range(n):
        for ch in range(c):
            p = _softmax(t[b, ch].ravel() / temperature)
            q = _softmax(s[b, ch].ravel() / temperature)
            total += float(np.sum(p * np.log(p / q)))
    return total / (n * c) * temperature**2


def test_cwd_matches_hand_computation_zero_for_equal_positive_otherwise():
    student, teacher = _logits(2, 3, 4, 5, seed=19), _logits(2, 3, 4, 5, seed=20)
    got = cwd_loss(student, teacher, temperature=4.0)
    assert got.item() == pytest.approx(_cwd_reference(student, teacher, 4.0), rel=1e-5)
    assert got.item() > 0
    assert cwd_loss(student, student.clone()).item() == pytest.approx(0.0, abs=1e-6)


def _dist_reference(student, teacher, target, temperature, beta=1.0, gamma=1.0, ignore_index=255):
    """DIST written out: pixel by pixel, class by class, with numpy's corrcoef."""
    s, t = student.double().numpy(), teacher.double().numpy()
    n, c, h, w = s.shape
    ps, pt = [], []  # the class-probability vectors of the labelled pixels of the whole batch
    for b in range(n):
        for y in range(h):
            for x in range(w):
                if target is not None and int(target[b, y, x]) == ignore_index:
                    continue
                ps.append(_softmax(s[b, :, y, x] / temperature))
                pt.append(_softmax(t[b, :, y, x] / temperature))
    inter = np.mean([1 - np.corrcoef(a, b)[0, 1] for a, b in zip(ps, pt)])
    ps, pt = np.array(ps), np.array(pt)
    intra = np.mean([1 - np.corrcoef(ps[:, k], pt[:, k])[0, 1] for k in range(c)])
    return temperature**2 * (beta * inter + gamma * intra)


def test_dist_matches_per_pixel_and_per_class_correlations():
    student, teacher = _logits(2, 5, 3, 4, seed=30), _logits(2, 5, 3, 4, seed=31)
    target = torch.randint(0, 5, (2, 3, 4), generator=torch.Generator().manual_seed(32))
    target[1, 0, :] = 255
    for temperature, beta, gamma in ((1.0, 1.0, 1.0), (2.0, 0.5, 2.0)):
        got = dist_loss(student, teacher, target, temperature, beta, gamma)
        want = _dist_reference(student, teacher, target, temperature, beta, gamma)
        assert got.item() == pytest.approx(want, rel=1e-5)
    assert dist_loss(student, teacher).item() == pytest.approx(_dist_reference(student, teacher, None, 1.0), rel=1e-5)
    assert dist_loss(student, student.clone(), target).item() == pytest.approx(0.0, abs=1e-6)


def test_dist_ignores_255_and_resizes_the_teacher():
    student, teacher = _logits(1, 4, 4, 4, seed=33), _logits(1, 4, 8, 8, seed=34)
    target = torch.randint(0, 4, (1, 8, 8), generator=torch.Generator().manual_seed(35))
    target[0, :4] = 255  # the top half, at the labels' size: rows 0-1 of the 4x4 grid
    resized = F.interpolate(teacher, size=(4, 4), mode="bilinear", align_corners=False)
    before = dist_loss(student, teacher, target)
    assert before.item() == pytest.approx(dist_loss(student[..., 2:, :], resized[..., 2:, :]).item(), rel=1e-5)
    student2 = student.clone()
    student2[..., :2, :] = 100.0 * torch.randn(1, 4, 2, 4)
    assert dist_loss(student2, teacher, target).item() == pytest.approx(before.item(), rel=1e-5)


def test_dist_all_ignored_is_zero_with_gradient():
    student = _logits(1, 3, 2, 2).requires_grad_()
    loss = dist_loss(student, _logits(1, 3, 2, 2, seed=1), torch.full((1, 2, 2), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_dist_gradient_reaches_student_only():
    student = _logits(2, 4, 3, 3, seed=37).requires_grad_()
    teacher = _logits(2, 4, 3, 3, seed=38).requires_grad_()
    dist_loss(student, teacher).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_distillation_loss_forms():
    student, aux = _logits(2, 4, 3, 3, seed=21), _logits(2, 4, 3, 3, seed=22)
    teacher = _logits(2, 4, 3, 3, seed=23)
    target = torch.randint(0, 4, (2, 3, 3), generator=torch.Generator().manual_seed(24))
    target[1, 2, 2] = 255
    ce = F.cross_entropy(student, target, ignore_index=255)
    ce_aux = F.cross_entropy(aux, target, ignore_index=255)
    kl = kd_loss(student, teacher, temperature=2.0)  # every pixel, the default
    dist = dist_loss(student, teacher, temperature=2.0)
    cwd = cwd_loss(student, teacher, temperature=4.0)

    # the published form: the cross-entropy at full weight, the distillation added
    total, parts = DistillationLoss(kd="dist", kd_weight=0.5, temperature=2.0)((student, aux), teacher, target)
    assert total.item() == pytest.approx((ce + 0.4 * ce_aux + 0.5 * dist).item(), rel=1e-6)
    assert set(parts) == {"ce", "aux", "kd"}
    assert parts["kd"].item() == pytest.approx(dist.item(), rel=1e-6)
    total, parts = DistillationLoss(kd="kl", kd_weight=1.0, temperature=2.0, cwd_weight=3.0, cwd_temperature=4.0)(
        student, teacher, target)
    assert total.item() == pytest.approx((ce + kl + 3.0 * cwd).item(), rel=1e-6)
    assert parts["cwd"].item() == pytest.approx(cwd.item(), rel=1e-6)

    # the earlier form: alpha blends the two, kd_weight is not used
    total, _ = DistillationLoss(kd="kl", kd_weight=7.0, alpha=0.3, temperature=2.0)((student, aux), teacher, target)
    assert total.item() == pytest.approx((0.7 * (ce + 0.4 * ce_aux) + 0.3 * kl).item(), rel=1e-6)
    only_ce, _ = DistillationLoss(kd="kl", alpha=0.0)(student, teacher, target)
    assert only_ce.item() == pytest.approx(ce.item(), rel=1e-6)

    # A student with two auxiliary outputs (Fast-SCNN with aux); the teacher returned a tuple too.
    aux2 = _logits(2, 4, 3, 3, seed=33)
    ce_aux2 = F.cross_entropy(aux2, target, ignore_index=255)
    total, parts = DistillationLoss(kd="kl", alpha=0.3, temperature=2.0)((student, aux, aux2), (teacher, aux2), target)
    expected = 0.7 * (ce + 0.4 * (ce_aux + ce_aux2)) + 0.3 * kl
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(parts) == {"ce", "aux", "kd"}
    assert parts["aux"].item() == pytest.approx((ce_aux + ce_aux2).item(), rel=1e-6)


def test_distillation_loss_distils_the_given_logits_and_takes_ce_on_the_output():
    low = _logits(2, 4, 3, 5, seed=40)  # a classifier's logits at 1/8
    output = F.interpolate(low, size=(24, 40), mode="bilinear", align_corners=True)  # the model's output
    teacher = _logits(2, 4, 6, 10, seed=41)
    target = torch.randint(0, 4, (2, 24, 40), generator=torch.Generator().manual_seed(42))
    target[:, :8] = 255
    for kd, fn in (("dist", dist_loss), ("kl", kd_loss)):
        total, parts = DistillationLoss(kd=kd)((output, output), teacher, target, student_logits=low)
        assert parts["kd"].item() == pytest.approx(fn(low, teacher).item(), rel=1e-6)
        assert parts["ce"].item() == pytest.approx(cross_entropy(output, target).item(), rel=1e-6)
        assert total.item() == pytest.approx((1.4 * parts["ce"] + parts["kd"]).item(), rel=1e-6)


def _pearson_reference(a, b, eps=1e-8):
    """The authors' correlation: cosine similarity of the centred vectors, eps added to the norms' product."""
    a, b = a - a.mean(), b - b.mean()
    return float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b) + eps))


def _dist_authors_reference(student, teacher):
    """DIST as the authors' segmentation code computes it (β = γ = 1, no temperature), loop by loop: every
    pixel of the batch is a row of class probabilities; 1 − correlation per row, averaged, plus 1 −
    correlation per class column, averaged. No label is read: ignored pixels count like the others."""
    s, t = student.double().numpy(), teacher.double().numpy()
    n, c, h, w = s.shape
    rows_s = [_softmax(s[b, :, y, x]) for b in range(n) for y in range(h) for x in range(w)]
    rows_t = [_softmax(t[b, :, y, x]) for b in range(n) for y in range(h) for x in range(w)]
    inter = sum(1 - _pearson_reference(a, b) for a, b in zip(rows_s, rows_t)) / len(rows_s)
    columns = [([r[k] for r in rows_s], [r[k] for r in rows_t]) for k in range(c)]
    intra = sum(1 - _pearson_reference(np.array(a), np.array(b)) for a, b in columns) / c
    return inter + intra


def _cirkd_kd_reference(student, teacher):
    """CIRKD's CriterionKD at T = 1: F.kl_div(log p_s, p_t, reduction="batchmean") over the (N·H·W)×C rows,
    i.e. the KL summed over classes and divided by the number of pixels, labelled or not; loop by loop."""
    s, t = student.double().numpy(), teacher.double().numpy()
    n, _, h, w = s.shape
    total = 0.0
    for b in range(n):
        for y in range(h):
            for x in range(w):
                p, q = _softmax(t[b, :, y, x]), _softmax(s[b, :, y, x])
                total += float(np.sum(p * (np.log(p) - np.log(q))))
    return total / (n * h * w)


def _random_batch(seed):
    student, teacher = _logits(2, 5, 3, 4, seed=seed), _logits(2, 5, 3, 4, seed=seed + 1)
    target = torch.randint(0, 5, (2, 3, 4), generator=torch.Generator().manual_seed(seed + 2))
    target[0, 0, :] = 255
    target[1, 1:, 2] = 255
    teacher[0, :, 0, :] *= 4  # a confident teacher where the labels are ignored: there the terms tell them apart
    return student, teacher, target


def test_the_kd_defaults_average_over_every_pixel_as_the_authors_do():
    student, teacher, target = _random_batch(60)
    for kd, authors in (("dist", _dist_authors_reference), ("kl", _cirkd_kd_reference)):
        _, parts = DistillationLoss(kd=kd)(student, teacher, target)
        assert parts["kd"].item() == pytest.approx(authors(student, teacher), rel=1e-5), kd
        # --kd-pixels labelled: the pixels labelled 255 are left out, which changes the value here
        _, labelled = DistillationLoss(kd=kd, kd_pixels="labelled")(student, teacher, target)
        reference = _dist_reference if kd == "dist" else _kd_reference
        assert labelled["kd"].item() == pytest.approx(reference(student, teacher, target, 1.0), rel=1e-5), kd
        assert labelled["kd"].item() != pytest.approx(parts["kd"].item(), rel=1e-3)


def test_kd_aux_adds_each_auxiliary_pair_at_0_4_as_the_dist_authors():
    student, teacher, target = _random_batch(70)
    aux_s, aux_t = _logits(2, 5, 3, 4, seed=73), _logits(2, 5, 6, 8, seed=74)  # the teacher's head on its own grid
    main, aux1, aux2 = (_logits(2, 5, 3, 4, seed=s) for s in (75, 76, 77))
    ce = sum(w * F.cross_entropy(x, target, ignore_index=255) for w, x in ((1, main), (0.4, aux1), (0.4, aux2)))
    aux_t_on_grid = F.interpolate(aux_t, size=(3, 4), mode="bilinear", align_corners=False)
    kd_main, kd_aux = _dist_authors_reference(student, teacher), _dist_authors_reference(aux_s, aux_t_on_grid)
    loss = DistillationLoss(kd="dist", kd_weight=2.0)
    total, parts = loss((main, aux1, aux2), teacher, target, student_logits=student, aux_pairs=[(aux_s, aux_t)])
    assert parts["kd"].item() == pytest.approx(kd_main, rel=1e-5)
    assert parts["kd_aux"].item() == pytest.approx(kd_aux, rel=1e-5)
    assert total.item() == pytest.approx(ce.item() + 2.0 * (kd_main + 0.4 * kd_aux), rel=1e-5)
    total, _ = DistillationLoss(kd="dist", alpha=0.25)((main, aux1, aux2), teacher, target, student_logits=student,
                                                       aux_pairs=[(aux_s, aux_t)])
    assert total.item() == pytest.approx(0.75 * ce.item() + 0.25 * (kd_main + 0.4 * kd_aux), rel=1e-5)


def _peak_bytes(fn) -> int:
    """Peak memory allocated while ``fn`` runs, above what was allocated before: CUDA's counter on a GPU,
    the profiler's record of every allocation and free on the CPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    level = top = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        level += event.self_cpu_memory_usage
        top = max(top, level)
    return top


@pytest.mark.parametrize("loss", [dist_loss, kd_loss])
def test_distilling_on_the_eighth_grid_needs_a_fraction_of_the_memory(loss):
    # Profile 1's crops (448x224): Fast-SCNN's classifier gives 56x28 logits, the model's output 448x224.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    low_student = _logits(2, 19, 28, 56, seed=43).to(device)
    low_teacher = _logits(2, 19, 28, 56, seed=44).to(device)
    target = torch.randint(0, 19, (2, 224, 448), generator=torch.Generator().manual_seed(45)).to(device)

    def up(x):
        return F.interpolate(x, size=(224, 448), mode="bilinear", align_corners=True)

    full_student, full_teacher = up(low_student), up(low_teacher)

    def run(student, teacher):
        student = student.clone().requires_grad_()
        return lambda: loss(student, teacher, target).backward()

    low = _peak_bytes(run(low_student, low_teacher))
    full = _peak_bytes(run(full_student, full_teacher))
    print(f"{loss.__name__}: peak {low / 2**20:.2f} MiB on the 1/8 grid, {full / 2**20:.2f} MiB at full resolution")
    assert 0 < low < full / 16, (low, full)  # 64x fewer pixels; the labels at full size are read by both


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"kd": "mse"}, "--kd-loss"),
        ({"kd_weight": -1.0}, "--kd-weight"),
        ({"kd_weight": float("nan")}, "--kd-weight"),
        ({"cwd_temperature": 0.0}, "--cwd-temperature"),
        ({"alpha": -0.1}, "--alpha"),
        ({"alpha": 1.5}, "--alpha"),
        ({"alpha": float("nan")}, "--alpha"),
        ({"temperature": 0.0}, "--temperature"),
        ({"temperature": -1.0}, "--temperature"),
        ({"cwd_weight": -1.0}, "--cwd-weight"),
        ({"kd_pixels": "valid"}, "--kd-pixels"),
    ],
)
def test_bad_hyperparameters_raise_user_error_naming_the_flag(kwargs, flag):
    with pytest.raises(UserError, match=flag):
        DistillationLoss(**kwargs)


def test_kd_rejects_bad_temperature():
    with pytest.raises(UserError, match="--temperature"):
        kd_loss(_logits(1, 2, 2, 2), _logits(1, 2, 2, 2), temperature=0)
