"""ConfusionMatrix against matrices and scores worked out by hand, and against the official evaluation."""

from __future__ import annotations

import copy
import math
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from fastseg.engine import upsample_logits
from fastseg.metrics import ConfusionMatrix


def _cm(target, pred, num_classes=4):
    cm = ConfusionMatrix(num_classes=num_classes)
    cm.update(torch.tensor(target), torch.tensor(pred))
    return cm


def test_matrix_counts_and_drops_ignore_pixels():
    target = [[0, 0, 1, 255], [2, 2, 255, 1]]
    pred = [[0, 1, 1, 3], [2, 0, 2, 1]]
    cm = _cm(target, pred)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    for t, p in [(0, 0), (0, 1), (1, 1), (2, 2), (2, 0), (1, 1)]:
        expected[t, p] += 1
    assert torch.equal(cm.mat, expected)
    assert cm.mat.dtype == torch.int64
    assert cm.compute()["valid_pixels"] == 6


def test_scores_by_hand_with_absent_and_prediction_only_classes():
    # 5 classes. Class 3 is predicted but never in the ground truth (IoU 0, counted);
    # class 4 is in neither (left out of the mean, None per class).
    target = [0, 0, 0, 0, 1, 1, 1, 2, 2, 255, 255]
    pred = [0, 0, 0, 1, 1, 1, 3, 2, 0, 4, 3]
    m = _cm(target, pred, num_classes=5).compute()
    # class 0: TP 3, FP 1 (a 2 predicted as 0), FN 1 -> IoU 3/5, Dice 6/8
    # class 1: TP 2, FP 1, FN 1 -> IoU 2/4, Dice 4/6
    # class 2: TP 1, FP 0, FN 1 -> IoU 1/2, Dice 2/3
    # class 3: TP 0, FP 1, FN 0 -> IoU 0, Dice 0
    iou = [3 / 5, 2 / 4, 1 / 2, 0.0]
    dice = [6 / 8, 4 / 6, 2 / 3, 0.0]
    assert m["per_class_iou"][:4] == pytest.approx(iou)
    assert m["per_class_iou"][4] is None
    assert m["per_class_dice"][:4] == pytest.approx(dice)
    assert m["per_class_dice"][4] is None
    assert m["miou"] == pytest.approx(sum(iou) / 4)
    assert m["dice"] == pytest.approx(sum(dice) / 4)
    # the ignore pixels (predicted 4 and 3) are not counted anywhere
    assert m["pixel_accuracy"] == pytest.approx(6 / 9)


def test_dice_is_dataset_level_not_mean_over_batches():
    cm = ConfusionMatrix(num_classes=2)
    cm.update(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1]))
    cm.update(torch.tensor([1]), torch.tensor([1]))
    m = cm.compute()
    # class 0: TP 3 FP 0 FN 1 -> 6/7; class 1: TP 1 FP 1 FN 0 -> 2/3 (per-batch averaging would differ)
    assert m["per_class_dice"] == pytest.approx([6 / 7, 2 / 3])
    assert m["dice"] == pytest.approx((6 / 7 + 2 / 3) / 2)


def test_out_of_range_prediction_is_a_miss_not_another_cell():
    cm = _cm([0, 1, 2], [0, 255, 2], num_classes=3)
    assert cm.mat.sum() == 2  # the 255 prediction never lands in a class column
    m = cm.compute()
    assert m["per_class_iou"] == pytest.approx([1.0, 0.0, 1.0])
    assert m["pixel_accuracy"] == pytest.approx(2 / 3)


def test_accumulates_reset_and_shape_check():
    cm = ConfusionMatrix(num_classes=3)
    cm.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    cm.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    assert cm.mat.diag().tolist() == [2, 2, 0]
    cm.reset()
    assert cm.mat.sum() == 0
    assert math.isnan(cm.compute()["miou"])
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))


def test_logits_upsampled_bilinearly_to_label_size_decide_each_pixel():
    # 2×2 logits for 3 classes, labels at 4×4: the argmax of the bilinear upsample decides each pixel.
    logits = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 3, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    target[0, 0, 0] = 255
    cm = ConfusionMatrix(num_classes=3)
    cm.update(target, upsample_logits(logits, target.shape[-2:]).argmax(1))
    up = torch.nn.functional.interpolate(logits, size=(4, 4), mode="bilinear", align_corners=False)
    ref = ConfusionMatrix(num_classes=3)
    ref.update(target, up.argmax(1))
    assert torch.equal(cm.mat, ref.mat)
    assert cm.mat.sum() == 2 * 16 - 1
    # nearest upsampling would give a different matrix here, so the mode is really checked
    near = ConfusionMatrix(num_classes=3)
    near.update(target, torch.nn.functional.interpolate(logits, size=(4, 4), mode="nearest").argmax(1))
    assert not torch.equal(near.mat, cm.mat)


def test_logits_at_label_size_are_scored_by_plain_argmax():
    logits = torch.zeros(1, 2, 1, 3)
    logits[0, 1, 0, 2] = 5.0
    assert upsample_logits(logits, (1, 3)) is logits
    cm = ConfusionMatrix(num_classes=2)
    cm.update(torch.tensor([[[0, 1, 1]]]), upsample_logits(logits, (1, 3)).argmax(1))
    assert cm.mat.tolist() == [[1, 0], [1, 1]]


def _official_class_ious(tmp_path, gt_label_ids, pred_label_ids):
    import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as ev
    args = copy.copy(ev.args)
    args.evalInstLevelScore = False
    args.JSONOutput = False
    args.quiet = True
    gt_files, pred_files = [], []
    for i, (gt, pred) in enumerate(zip(gt_label_ids, pred_label_ids)):
        gt_files.append(str(tmp_path / f"gt{i}_gtFine_labelIds.png"))
        pred_files.append(str(tmp_path / f"gt{i}_pred_labelIds.png"))
        Image.fromarray(gt).save(gt_files[-1])
        Image.fromarray(pred).save(pred_files[-1])
    return ev.evaluateImgLists(pred_files, gt_files, args)


def test_miou_equals_official_cityscapes_evaluation(tmp_path):
    import cityscapesscripts.helpers.labels as labels
    train_to_id = np.zeros(256, dtype=np.uint8)
    id_to_train = np.full(256, 255, dtype=np.uint8)
    for label in labels.labels:
        if label.id >= 0:
            id_to_train[label.id] = label.trainId if 0 <= label.trainId < 19 else 255
        if 0 <= label.trainId < 19:
            train_to_id[label.trainId] = label.id
    rng = np.random.default_rng(0)
    # Ground truth covers classes 0..11 plus ignored ids (0 = unlabeled, 4 = static); predictions use 0..13,
    # so classes 12 and 13 are prediction-only and 14..18 absent everywhere.
    gts, preds = [], []
    cm = ConfusionMatrix(num_classes=19)
    for _ in range(3):
        gt_train = rng.integers(0, 12, size=(24, 32)).astype(np.uint8)
        gt_ids = train_to_id[gt_train]
        gt_ids[rng.random((24, 32)) < 0.1] = 0
        gt_ids[:2, :] = 4
        pred_train = np.where(
            rng.random((24, 32)) < 0.6, gt_train, rng.integers(0, 14, size=(24, 32))
        ).astype(np.uint8)
        gts.append(gt_ids)
        preds.append(train_to_id[pred_train])
        cm.update(torch.from_numpy(id_to_train[gt_ids]), torch.from_numpy(pred_train))
    official = _official_class_ious(tmp_path, gts, preds)
    ours = cm.compute()
    assert ours["miou"] == pytest.approx(official["averageScoreClasses"], abs=1e-9)
    for train_id in range(19):
        name = labels.trainId2label[train_id].name
        theirs = official["classScores"][name]
        if math.isnan(theirs):
            assert ours["per_class_iou"][train_id] is None
        else:
            assert ours["per_class_iou"][train_id] == pytest.approx(theirs, abs=1e-12)
    assert ours["per_class_iou"][12] == 0.0 and ours["per_class_iou"][14] is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reduce_worker(rank: int, world_size: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        cm = ConfusionMatrix(num_classes=3)
        # each rank sees different pixels
        cm.update(torch.tensor([0, 1, 2, rank]), torch.tensor([0, 0, 2, 2 - rank]))
        cm.all_reduce()
        out[rank] = cm.mat.tolist()
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_over_two_gloo_processes():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_reduce_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        results = dict(out)
    expected = ConfusionMatrix(num_classes=3)
    for rank in range(2):
        expected.update(torch.tensor([0, 1, 2, rank]), torch.tensor([0, 0, 2, 2 - rank]))
    assert results[0] == expected.mat.tolist()
    assert results[1] == expected.mat.tolist()


def test_all_reduce_without_process_group_is_a_no_op():
    cm = _cm([0, 1], [0, 1], num_classes=2)
    cm.all_reduce()
    assert cm.mat.tolist() == [[1, 0], [0, 1]]
