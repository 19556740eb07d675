"""The efficiency tool: its mIoU is the official Cityscapes evaluation's on its own saved predictions, its cost
figures are flops.py's, its report holds every key, row and plot, and bad input ends in one clear line; its
constants are its settings (the wrapper adds none); test-time augmentation, the last epoch, training compute,
a checkpoint at every profile, and a student beside its twin and teacher."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY_ARGS, edited_project
from PIL import Image
from torch import nn

import evaluate_efficiency
import train
from fastseg import deploy, measure, selection
from fastseg.cityscapes import CLASS_NAMES, TRAIN_ID_TO_ID
from fastseg.errors import UserError, run_cli
from fastseg.flops import count_macs, count_params
from fastseg.models import build_model
from fastseg.report import (
    RESULT_KEYS,
    markdown_table,
    plot_accuracy_vs_train_compute,
    train_compute_runs,
    write_json,
)
from fastseg.selection import checkpoint_labels, expand_checkpoint_paths, training_record

# The synthetic images are 128×64; evaluating at that size keeps every forward pass tiny.
TINY_RESIZE = [128, 64]
# (The deployed path's export takes seconds: one test times it, the others leave it out.)
QUICK_SPEED = ["--runs", "3", "--warmup", "1", "--throughput-batch", "2", "--no-deployed-speed"]


def _fast_scnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("fast_scnn", init="kaiming")
    # An untrained head gives nearly flat logits; sharper ones make the predictions vary over classes and
    # pixels, so that the comparison with the official evaluation covers many confusion-matrix cells. (He
    # init's classifier std 0.01, times 200: the scale these tests were set up with.)
    with torch.no_grad():
        model.classifier.conv[-1].weight.mul_(200)
    return model.eval()


def _save(path: Path, model: nn.Module, epoch: int = 1, metrics: dict | None = None, **config) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    base = {"arch": "fast_scnn", "num_classes": 19, "width_mult": 1.0, "aux": False, "profile": 1}
    checkpoint = {"model": model.state_dict(), "config": {**base, **config}, "epoch": epoch, "metrics": metrics or {}}
    torch.save(checkpoint, path)
    return path


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    # The constants write results/ relative to the working directory: never into the repository.
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """A curriculum-like tree: a teacher and a distilled student at profile 1, plus an older plain state_dict."""
    root = tmp_path_factory.mktemp("checkpoints")
    _save(
        root / "baseline" / "profile-1" / "best.pth",
        _fast_scnn(0),
        experiment_id="baseline",
        resize=TINY_RESIZE,
    )
    _save(
        root / "kd" / "profile-1" / "best.pth",
        _fast_scnn(1),
        experiment_id="kd",
        resize=TINY_RESIZE,
        teacher={"path": str(root / "baseline" / "profile-1" / "best.pth"), "arch": "fast_scnn", "profile": 1},
    )
    torch.save(_fast_scnn(2).state_dict(), root / "plain.pth")
    return root


def _run(capsys, *argv: str) -> tuple[dict, str]:
    """Run the tool in-process; return the JSON report and stdout."""
    assert evaluate_efficiency.main([*argv, "--device", "cpu", "--num-workers", "0"]) == 0
    out = capsys.readouterr().out
    output = Path(argv[list(argv).index("--output") + 1])
    return json.loads(output.read_text()), out


def _official_evaluation(predictions: list[str], ground_truth: list[str], tmp_path: Path) -> dict:
    import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as cs
    args = cs.args
    args.evalInstLevelScore = False  # instance scores need *_instanceIds.png, which are not scored here
    args.evalPixelAccuracy = False
    args.JSONOutput = False
    args.exportFile = str(tmp_path / "official.json")
    args.quiet = True
    args.colorized = False
    return cs.evaluateImgLists(predictions, ground_truth, args)


def test_miou_equals_official_cityscapes_evaluation(synthetic_root, checkpoints, tmp_path, capsys):
    pred_dir, overlay_dir = tmp_path / "pred", tmp_path / "overlays"
    report, _ = _run(
        capsys,
        *(
            "--data-dir",
            str(synthetic_root),
            "--current-model-path",
            str(checkpoints / "baseline/profile-1/best.pth"),
        ),
        *("--skip-speed", "--output", str(tmp_path / "r.json"), "--batch-size", "3"),
        *("--save-predictions", str(pred_dir), "--save-overlays", str(overlay_dir)),
    )
    (row,) = report["results"]
    ground_truth = sorted((synthetic_root / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    assert len(ground_truth) == 4
    predictions = []
    for gt in ground_truth:
        name = gt.name.replace("_gtFine_labelIds.png", "")
        pred = pred_dir / f"{name}_pred_labelIds.png"
        assert Image.open(pred).size == Image.open(gt).size
        assert (overlay_dir / f"{name}_overlay.png").is_file()
        predictions.append(str(pred))
    saved = np.stack([np.array(Image.open(p)) for p in predictions])
    # Label ids, not train ids, and several classes: a comparison that could fail.
    assert set(np.unique(saved)) <= set(TRAIN_ID_TO_ID[:19].tolist())
    assert len(np.unique(saved)) >= 3

    official = _official_evaluation(predictions, [str(p) for p in ground_truth], tmp_path)
    assert row["miou"] == pytest.approx(official["averageScoreClasses"], abs=1e-4)
    for name, iou in zip(CLASS_NAMES, row["per_class_iou"]):
        theirs = official["classScores"][name]
        if iou is None:
            assert math.isnan(theirs), name
        else:
            assert iou == pytest.approx(theirs, abs=1e-4), name
    assert 0 < row["miou"] < 1 and 0 < row["dice"] < 1 and 0 < row["pixel_accuracy"] < 1


def test_resized_labels_score_at_profile_size_but_predictions_stay_full_size(
    synthetic_root, checkpoints, tmp_path, capsys
):
    pred_dir = tmp_path / "pred"
    args = ("--data-dir", str(synthetic_root), "--skip-speed", "--save-predictions", str(pred_dir))
    report, _ = _run(
        capsys,
        *args,
        *("--current-model-path", str(checkpoints / "plain.pth"), "--profile", "1"),
        *("--label-resolution", "resized", "--output", str(tmp_path / "r.json")),
    )
    (row,) = report["results"]
    assert row["label_resolution"] == "resized" and row["input_size"] == [288, 576]
    assert row["miou"] is not None
    for pred in pred_dir.glob("*_pred_labelIds.png"):
        name = pred.name.replace("_pred_labelIds.png", "")
        (gt,) = (synthetic_root / "gtFine" / "val").glob(f"*/{name}_gtFine_labelIds.png")
        assert Image.open(pred).size == Image.open(gt).size
    assert len(list(pred_dir.glob("*_pred_labelIds.png"))) == 4


def test_report_for_a_curriculum_glob(synthetic_root, checkpoints, tmp_path, capsys):
    plots = tmp_path / "plots"
    report, out = _run(
        capsys,
        *(
            "--data-dir",
            str(synthetic_root),
            "--current-model-path",
            str(checkpoints / "*" / "profile-*" / "best.pth"),
        ),
        *("--output", str(tmp_path / "r.json"), "--plots", str(plots), *QUICK_SPEED),
    )
    rows = report["results"]
    assert [r["checkpoint"] for r in rows] == ["baseline/profile-1/best.pth", "kd/profile-1/best.pth"]
    assert [r["stage"] for r in rows] == ["teacher p1", "student p1"]
    reference = build_model("fast_scnn").eval()
    for row in rows:
        assert set(RESULT_KEYS) <= set(row)
        assert row["input_size"] == [64, 128] and row["device"] == "cpu" and row["dtype"] == "fp32"
        assert row["macs"] == count_macs(reference, (64, 128)) and row["flops"] == 2 * row["macs"]
        assert row["params"] == count_params(reference)
        assert row["latency_p90_ms"] >= row["latency_ms"] > 0 and row["fps"] > 0
        assert row["fps_batch1"] == pytest.approx(1e3 / row["latency_ms"]) and row["throughput_batch"] == 2
        assert row["dice_per_gflop"] == pytest.approx(row["dice"] / (row["flops"] / 1e9))
        assert row["miou_per_gflop"] == pytest.approx(row["miou"] / (row["flops"] / 1e9))
        assert len(row["per_class_iou"]) == 19 and row["bn_folded"] is True
    settings = report["settings"]
    assert settings["runs"] == 3 and settings["throughput_batch"] == 2
    assert settings["torch"] == torch.__version__ and settings["dtypes"] == ["fp32"]
    assert settings["torch_cuda"] == torch.version.cuda and settings["driver"] is None  # CPU: no driver asked

    table = [line for line in out.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows)
    assert "baseline/profile-1/best.pth" in table[2] and "kd/profile-1/best.pth" in table[3]

    names = {p.name for p in plots.glob("*.png")}
    assert {"accuracy_vs_gflops.png", "accuracy_vs_latency.png"} <= names
    assert {"per_class_iou_baseline_profile-1_best.png", "per_class_iou_kd_profile-1_best.png"} <= names


def test_macs_match_the_published_thop_figure_and_plain_state_dicts_need_a_profile(
    checkpoints, tmp_path, capsys
):
    plain = str(checkpoints / "plain.pth")
    with pytest.raises(UserError, match="--profile"):
        evaluate_efficiency.main(["--current-model-path", plain, "--skip-accuracy", "--skip-speed"])
    report, out = _run(
        capsys,
        *("--current-model-path", plain, "--profile", "1", "--skip-accuracy", "--skip-speed"),
        *("--output", str(tmp_path / "r.json")),
    )
    (row,) = report["results"]
    assert abs(row["macs"] / 1e9 - 0.565) < 0.0005  # users' thop figure at 576×288, to its last digit
    assert row["miou"] is None and row["latency_ms"] is None and row["miou_per_gflop"] is None
    assert "| plain.pth | 1 | 288×576 |" in out


def test_onnx_export_matches_pytorch_and_its_latency_stands_beside_pytorchs(checkpoints, tmp_path, capsys):
    # At 64×128 the pyramid pooling's 6×6 bins do not divide its 2×4 map: the hardest case for an exporter.
    import onnx
    import onnxruntime as ort
    import onnxscript  # noqa: F401  (the exporter needs it; requirements-dev.txt installs it)

    path = tmp_path / "model.onnx"
    report, out = _run(
        capsys,
        *("--current-model-path", str(checkpoints / "baseline/profile-1/best.pth"), "--skip-accuracy"),
        *("--export-onnx", str(path), "--runs", "2", "--warmup", "1", "--throughput-batch", "2"),
        *("--output", str(tmp_path / "r.json")),
    )
    (row,) = report["results"]
    assert row["onnx_path"] == str(path) and row["onnx_latency_ms"] > 0 and row["latency_ms"] > 0
    header = out.splitlines()[0].split(" | ")
    assert header[header.index("latency ms") + 1] == "ORT ms"  # the deployed path beside PyTorch
    assert f"| {row['latency_ms']:.2f} | {row['onnx_latency_ms']:.2f} |" in out
    onnx.checker.check_model(str(path), full_check=True)  # a valid ONNX file, not only one onnxruntime reads
    x = torch.randn(1, 3, 64, 128)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (ours,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        expected = _fast_scnn(0)(x).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-3 * np.abs(expected).max())


def test_onnx_export_without_onnxscript_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # makes `import onnxscript` fail
    with pytest.raises(UserError, match="--export-onnx: .*pip install onnxscript"):
        deploy.export_onnx(_fast_scnn(0), (64, 128), tmp_path / "model.onnx")
    assert not list(tmp_path.iterdir())


def test_an_onnx_export_that_fails_is_one_line_or_a_note(checkpoints, monkeypatch, tmp_path, capsys):
    # PyTorch 2.5's exporter fails on LR-ASPP, for one: the default timing of the deployed path says so and the
    # report goes on; an explicit --export-onnx stops with one line that names it.
    def failing_export(model, args, f=None, *, dynamo=True, external_data=True, **kwargs):  # 2.5's arguments
        raise RuntimeError("Failed to convert the exported program to an ONNX model.\nNext steps: ...")

    monkeypatch.setattr(torch.onnx, "export", failing_export)
    checkpoint = str(checkpoints / "baseline" / "profile-1" / "best.pth")
    common = ["--current-model-path", checkpoint, "--skip-accuracy", "--runs", "2", "--warmup", "0",
              "--throughput-batch", "1", "--output", str(tmp_path / "r.json"), "--plots", "none", "--device", "cpu"]
    report_, _ = _run(capsys, *common)
    assert report_["results"][0]["latency_ms"] > 0 and report_["results"][0].get("onnx_latency_ms") is None
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: evaluate_efficiency.main([*common, "--export-onnx", str(tmp_path / "m.onnx")]))
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert err == [f"error: --export-onnx: torch {torch.__version__}'s ONNX exporter failed on this model "
                   "(RuntimeError: Failed to convert the exported program to an ONNX model.); a newer PyTorch may "
                   "export it, or drop --export-onnx"]
    assert not (tmp_path / "m.onnx").exists()


def test_bad_checkpoints_end_in_one_line(checkpoints, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    good = str(checkpoints / "baseline" / "profile-1" / "best.pth")
    for argv, match in (
        ([str(tmp_path / "missing.pth")], "--current-model-path"),
        ([str(corrupt)], "--current-model-path: .*corrupt.pth"),
        ([str(tmp_path / "*" / "best.pth")], "no file matches"),
        ([good, str(checkpoints / "plain.pth")], "--profile: .*plain.pth"),
    ):
        with pytest.raises(UserError, match=match):
            evaluate_efficiency.main(["--current-model-path", *argv, "--skip-accuracy", "--skip-speed"])
    # Every checkpoint is checked before the first is evaluated: the bad second file is reported, not the
    # missing data directory the first would have run into.
    bad_second = [
        "--current-model-path",
        good,
        str(corrupt),
        "--data-dir",
        str(tmp_path / "none"),
        "--skip-speed",
    ]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: evaluate_efficiency.main(bad_second))
    assert exit_info.value.code == 2
    # The settings that differ from the constants, then the one line of the error.
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("setting: ")]
    assert len(err) == 1 and err[0].startswith("error: --current-model-path")


def test_empty_val_split_is_a_user_error(checkpoints, tmp_path):
    (tmp_path / "leftImg8bit" / "val" / "aachen").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        evaluate_efficiency.main(
            [
                "--data-dir",
                str(tmp_path),
                "--current-model-path",
                str(checkpoints / "plain.pth"),
                "--profile",
                "1",
            ]
            + ["--skip-speed", "--device", "cpu", "--num-workers", "0"]
        )


class _HalvesModel(nn.Module):
    """Predicts train id 0 on the left half of the image and 1 on the right, whatever the pixels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        logits = torch.zeros(n, 19, h, w)
        logits[:, 0, :, : w // 2] = 1
        logits[:, 1, :, w // 2 :] = 1
        return logits


def test_accuracy_on_a_hand_checked_case(tmp_path):
    # Ground truth (train ids) and the model's prediction on a 2×4 image:
    #   [[0, 0, 1, 1],        [[0, 0, 1, 1],
    #    [0, 0, 0, 255]]       [0, 0, 1, 1]]
    # road: TP 4, FN 1, FP 0 → IoU 4/5, Dice 8/9; sidewalk: TP 2, FP 1 → IoU 2/3, Dice 4/5; 6 of 7 pixels right.
    label = np.array([[0, 0, 1, 1], [0, 0, 0, 255]], dtype=np.uint8)
    label_file = tmp_path / "gt.png"
    Image.fromarray(label).save(label_file)
    image_file = tmp_path / "image.png"
    Image.fromarray(np.zeros((2, 4, 3), np.uint8)).save(image_file)
    sample = SimpleNamespace(name="aachen_000000_000019", label=label_file, image=image_file)
    batch = (torch.zeros(1, 3, 2, 4, dtype=torch.uint8), torch.from_numpy(label)[None], torch.tensor([0]))

    scores = measure.evaluate_accuracy(
        _HalvesModel(), [batch], torch.device("cpu"), samples=[sample], prediction_dir=tmp_path / "pred"
    )
    assert scores["miou"] == pytest.approx((4 / 5 + 2 / 3) / 2)
    assert scores["dice"] == pytest.approx((8 / 9 + 4 / 5) / 2)
    assert scores["pixel_accuracy"] == pytest.approx(6 / 7)
    assert scores["per_class_iou"][:2] == pytest.approx([4 / 5, 2 / 3])
    assert scores["per_class_iou"][2:] == [None] * 17  # absent classes are left out, not zero
    matrix = np.array(scores["confusion_matrix"])
    assert matrix.sum() == 7 and matrix[0, 0] == 4 and matrix[0, 1] == 1 and matrix[1, 1] == 2
    saved = np.array(Image.open(tmp_path / "pred" / "aachen_000000_000019_pred_labelIds.png"))
    np.testing.assert_array_equal(saved, [[7, 7, 8, 8], [7, 7, 8, 8]])  # road and sidewalk label ids


def test_checkpoint_paths_expand_globs_in_order_without_repeats(tmp_path):
    for name in ("b/profile-2/best.pth", "b/profile-1/best.pth", "a/profile-1/best.pth"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    paths = expand_checkpoint_paths(
        [str(tmp_path / "b/profile-2/best.pth"), str(tmp_path / "**/best.pth")]
    )
    labels = checkpoint_labels(paths)
    assert labels == ["b/profile-2/best.pth", "a/profile-1/best.pth", "b/profile-1/best.pth"]
    # Labels are the paths relative to the folder that holds them all, so two never read the same.
    assert checkpoint_labels(["/m/x/fast.pth", "/m/y/fast.pth", "/m/y/other.pth"]) == [
        "x/fast.pth",
        "y/fast.pth",
        "y/other.pth",
    ]
    assert checkpoint_labels(["/m/x/../y/fast.pth"]) == ["fast.pth"]


def test_report_files_survive_missing_values(tmp_path):
    row = dict.fromkeys(RESULT_KEYS)
    row.update(checkpoint="x/profile-3/last.pth", profile=3, input_size=[512, 1024], miou=float("nan"))
    row.update(measure.cost_fields(1_000_000, 2_000_000_000))
    row.update(measure.efficiency_scores({**row, "miou": 0.5}))
    assert row["miou_per_gflop"] == pytest.approx(0.5 / 4.0) and row["dice_per_gflop"] is None
    table = markdown_table([row])
    assert "| x/profile-3/last.pth | 3 | 512×1024 | – | – | 1.000 | 2.000 |" in table
    path = write_json(tmp_path / "out" / "r.json", [row], {"runs": 50})
    loaded = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    assert loaded["results"][0]["miou"] is None and loaded["settings"] == {"runs": 50}
    assert not [p for p in path.parent.iterdir() if p != path]  # no temp file left behind


def test_measure_speed_reports_every_figure():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    cpu = torch.device("cpu")
    speed = measure.benchmark_speed(model, (16, 32), cpu, runs=4, warmup=1, throughput_batch=3)
    fp32 = speed["by_dtype"]["fp32"]
    assert speed["bn_folded"] is False  # only Fast-SCNN is folded
    assert fp32["runs"] == 4 and fp32["throughput_batch"] == 3
    assert fp32["latency_p90_ms"] >= fp32["latency_ms"] >= fp32["latency_min_ms"] > 0
    assert fp32["peak_memory_mb"] is None  # measured on CUDA only
    assert model[1].training is False and isinstance(model[1], nn.BatchNorm2d)  # the original is untouched


class _Recorder(nn.Module):
    """A conv that notes, on every call, its weights' dtype, the input's, autocast and the TF32 settings."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.calls: list[tuple] = []

    def forward(self, x):
        self.calls.append((self.conv.weight.dtype, x.dtype, torch.is_autocast_enabled("cpu"),
                           torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return self.conv(x)


@pytest.fixture
def tf32_allowed():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # cuDNN's default is True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_each_dtype_is_timed_on_a_converted_model_and_fp32_without_tf32(monkeypatch, tf32_allowed):
    model = _Recorder()
    seen = []
    real = measure.measure_speed

    def keep(prepared, *args, **kwargs):  # the deployable copy that was timed, as benchmark_speed made it
        seen.append(prepared)
        return real(prepared, *args, **kwargs)

    monkeypatch.setattr(measure, "measure_speed", keep)
    speed = measure.benchmark_speed(model, (8, 8), torch.device("cpu"), dtypes=("fp32", "bf16"), runs=2,
                                    warmup=1, throughput_batch=2)
    fp32_calls = seen[0].calls
    bf16_calls = seen[1].calls[len(fp32_calls):]  # the bf16 copy was made after the fp32 timing, with its notes
    assert fp32_calls and set(fp32_calls) == {(torch.float32, torch.float32, False, False, False)}
    # bf16: weights and input in bf16, no autocast casting fp32 weights on every call.
    assert bf16_calls and {c[:3] for c in bf16_calls} == {(torch.bfloat16, torch.bfloat16, False)}
    assert speed["by_dtype"]["fp32"]["tf32"] is False and speed["by_dtype"]["bf16"]["weights_dtype"] == "bf16"
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32  # put back afterwards
    assert model.conv.weight.dtype == torch.float32 and not model.calls  # the original is untouched


def test_onnx_export_on_a_pytorch_without_the_new_exporter_says_so():
    def export_of_torch_2_4(model, args, f, export_params=True, verbose=False, opset_version=None, dynamo=False):
        """torch.onnx.export's arguments in PyTorch 2.4: a dynamo flag, no external_data."""

    def export_with_both(model, args, f, *, dynamo=True, external_data=True):
        """As 2.5 and later."""

    assert deploy.onnx_exporter_missing(export_of_torch_2_4) == "'external_data' argument"
    assert deploy.onnx_exporter_missing(export_with_both) is None
    assert deploy.onnx_exporter_missing(torch.onnx.export) is None  # this PyTorch (the supported range)


# --------------------------------------------------------------------------------------------------
# One home for each setting
# --------------------------------------------------------------------------------------------------


def test_every_constant_is_a_flag_and_changed_settings_are_printed(capsys):
    constants = evaluate_efficiency.constants()
    assert {"current_model_path", "data_dir", "output", "plots", "batch_size", "num_workers"} <= set(constants)
    assert vars(evaluate_efficiency.parse_args([])) == constants  # no flag given: exactly the constants
    out, err = capsys.readouterr()
    assert out == "" and "setting: every value as the constants in evaluate_efficiency.py" in err
    args = evaluate_efficiency.parse_args(["--output", "none", "--batch-size", "2"])
    assert evaluate_efficiency.optional_path(args.output) is None
    out, err = capsys.readouterr()
    assert out == ""  # stdout is the table's alone
    assert "setting: output = 'none' (from the command line; the constant OUTPUT is 'results/efficiency.json')" in err
    assert "setting: batch_size = 2 " in err and "setting: data_dir" not in err


def test_edited_constants_reach_evaluate_efficiency_sh(checkpoints, tmp_path):
    # As users work: edit the constants in evaluate_efficiency.py, run the wrapper with a few flags of their own.
    checkpoint = checkpoints / "baseline" / "profile-1" / "best.pth"
    output = tmp_path / "edited" / "report.json"
    edits = {"CURRENT_MODEL_PATH": repr((str(checkpoint),)), "OUTPUT": repr(str(output))}
    project = edited_project(tmp_path, "evaluate_efficiency.py", edits)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run(
        ["bash", "evaluate_efficiency.sh", "--device", "cpu", "--runs", "2", "--warmup", "0", "--skip-accuracy",
         "--no-deployed-speed"],
        cwd=project, env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(output.read_text())["results"]  # the edited OUTPUT, for the edited checkpoint
    assert row["path"] == str(checkpoint) and row["latency_ms"] > 0 and row["device"] == "cpu"
    assert "| best.pth | 1 | 64×128 |" in done.stdout
    assert "setting: device = 'cpu' (from the command line" in done.stderr
    assert "setting: runs = 2 " in done.stderr
    for key in ("current_model_path", "output", "plots", "data_dir", "batch_size"):  # the wrapper added none
        assert f"setting: {key} =" not in done.stderr, done.stderr
    assert not (project / "results").exists()  # the edited OUTPUT was used, not the original one


def test_profiles_are_single_lists_or_ranges():
    parse = selection.requested_profiles
    assert parse(None) is None
    assert parse(["1-5"]) == [1, 2, 3, 4, 5] == parse("1-5") == parse((1, 2, 3, 4, 5))
    assert parse(["3", "1", "3"]) == [3, 1] and parse(2) == [2] and parse(["1,2", "4-5"]) == [1, 2, 4, 5]
    for bad, match in (("6", "--profile 6: no such profile"), ("0-2", "--profile 0"), ("4-2", "goes down"),
                       ("x", "--profile x: expected")):
        with pytest.raises(UserError, match=match):
            parse([bad])


# --------------------------------------------------------------------------------------------------
# Test-time augmentation and the last epoch
# --------------------------------------------------------------------------------------------------


class _LopsidedModel(nn.Module):
    """Road (logit 2) on the left half, sidewalk (logit 1) on the right, whatever the pixels: not mirror
    symmetric, so a flipped pass disagrees with the plain one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        logits = torch.zeros(n, 19, h, w)
        logits[:, 0, :, : w // 2] = 2
        logits[:, 1, :, w // 2 :] = 1
        return logits


def test_tta_on_a_hand_checked_case():
    # Labels (train ids) [[0, 0, 1, 1], [0, 0, 0, 255]]. Plain pass: [[0, 0, 1, 1], [0, 0, 1, 1]].
    # With the mirrored pass each half averages softmax(road 2) with softmax(sidewalk 1):
    # road (e²/(e²+18) + 1/(e+18))/2 = 0.170 beats sidewalk (1/(e²+18) + e/(e+18))/2 = 0.085 everywhere, so
    # every pixel is road: road IoU 5/7 (2 false positives), sidewalk IoU 0 → mIoU 5/14.
    label = torch.tensor([[[0, 0, 1, 1], [0, 0, 0, 255]]], dtype=torch.uint8)
    batch = (torch.zeros(1, 3, 2, 4, dtype=torch.uint8), label, torch.tensor([0]))
    cpu = torch.device("cpu")
    plain = measure.evaluate_accuracy(_LopsidedModel(), [batch], cpu)
    assert plain["miou"] == pytest.approx((4 / 5 + 2 / 3) / 2)
    flipped = measure.evaluate_tta(_LopsidedModel(), [batch], cpu, scales=(1.0,), flip=True)
    assert flipped["miou_tta"] == pytest.approx(5 / 14)
    assert flipped["per_class_iou_tta"][:2] == pytest.approx([5 / 7, 0.0])
    # One scale without the mirror is the plain pass.
    assert measure.evaluate_tta(_LopsidedModel(), [batch], cpu, scales=(1.0,), flip=False)["miou_tta"] == (
        pytest.approx(plain["miou"])
    )


def test_tta_passes_every_scale_and_mirrors_back():
    seen = []

    class Pixelwise(nn.Module):
        """A 1×1 convolution: mirroring its input mirrors its output, so flip and flip back change nothing."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 19, 1)

        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return self.conv(x)

    model = Pixelwise().eval()
    x = torch.randn(2, 3, 8, 16)
    with torch.no_grad():
        probabilities = measure.tta_probabilities(model, x, (16, 32))
        assert seen == [(round(8 * s), round(16 * s)) for s in measure.TTA_SCALES for _ in range(2)]
        assert probabilities.shape == (2, 19, 16, 32)
        torch.testing.assert_close(probabilities.sum(1), torch.ones(2, 16, 32))
        alone = measure.tta_probabilities(model, x, (8, 16), scales=(1.0,), flip=True)
        torch.testing.assert_close(alone, model(x).softmax(1))


def test_tta_and_the_last_epoch_beside_the_best(synthetic_root, tmp_path, capsys):
    stage = tmp_path / "run" / "profile-1"
    best = _save(stage / "best.pth", _fast_scnn(0), epoch=2, experiment_id="run", resize=TINY_RESIZE)
    last = _save(stage / "last.pth", _fast_scnn(5), epoch=3, experiment_id="run", resize=TINY_RESIZE)
    common = ("--data-dir", str(synthetic_root), "--skip-speed", "--plots", "none")
    report_, out = _run(capsys, *common, "--current-model-path", str(best), "--tta", "--output", "r.json")
    (row,) = report_["results"]
    assert 0 <= row["miou_tta"] <= 1 and row["miou_tta"] != row["miou"] and len(row["per_class_iou_tta"]) == 19
    assert report_["settings"]["tta_scales"] == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    # The last epoch is scored as if it had been given on its own.
    alone, _ = _run(capsys, *common, "--current-model-path", str(last), "--output", "last.json")
    (last_row,) = alone["results"]
    assert last_row["miou_last"] is None and last_row["epoch"] == 3
    assert row["miou_last"] == pytest.approx(last_row["miou"]) and row["miou_last"] != row["miou"]
    assert row["epoch"] == 2 and row["epoch_last"] == 3
    header, _, cells = (line for line in out.splitlines() if line.startswith("|"))
    assert "| mIoU % | mIoU TTA % | mIoU last % | epoch best/last |" in header and "| 2/3 |" in cells
    off, out = _run(capsys, *common, "--current-model-path", str(best), "--no-last-epoch", "--output", "off.json")
    assert off["results"][0]["miou_last"] is None and "mIoU last" not in out and "TTA" not in out


# --------------------------------------------------------------------------------------------------
# Accuracy against training compute
# --------------------------------------------------------------------------------------------------


def test_accuracy_against_training_compute_of_real_stages(synthetic_root, tmp_path, capsys):
    out = tmp_path / "runs"
    for profile, previous in ((1, "none"), (2, "auto")):  # two stages of one curriculum, one epoch each
        argv = [*TINY_ARGS, "--data-dir", str(synthetic_root), "--output-dir", str(out), "--experiment-id", "a",
                "--profile", str(profile), "--epochs", "1", "--previous-model-path", previous]
        assert train.main(argv) == 0
    capsys.readouterr()
    plots = tmp_path / "plots"
    report_, _ = _run(
        capsys, "--data-dir", str(synthetic_root), "--current-model-path", str(out / "a" / "profile-*" / "best.pth"),
        "--skip-speed", "--output", "r.json", "--plots", str(plots),
    )
    rows = {row["checkpoint"]: row for row in report_["results"]}
    assert set(rows) == {"profile-1/best.pth", "profile-2/best.pth"}
    for name, row in rows.items():
        log = (out / "a" / name).with_name("metrics.jsonl")
        (line,) = [json.loads(line) for line in log.read_text().splitlines()]
        assert row["epoch"] == row["epoch_last"] == line["epoch"] == 1
        assert row["cum_train_tflop"] == line["cum_train_tflop"] > 0
        assert row["miou_last"] == row["miou"]  # best.pth is the last epoch's: scored once
    # Stage 2 counts stage 1's training too.
    assert rows["profile-2/best.pth"]["cum_train_tflop"] > rows["profile-1/best.pth"]["cum_train_tflop"]
    runs = train_compute_runs(report_["results"])
    assert {run: [row["profile"] for row in run_rows] for run, run_rows in runs.items()} == {"a": [1, 2]}
    assert (plots / "accuracy_vs_train_compute.png").stat().st_size > 0
    assert (plots / "accuracy_vs_gflops.png").is_file()


def test_training_compute_is_read_from_the_metrics_log_when_the_checkpoint_lacks_it(tmp_path):
    stage = tmp_path / "run" / "profile-2"
    stage.mkdir(parents=True)
    (stage / "metrics.jsonl").write_text(
        "".join(json.dumps({"epoch": e, "cum_train_tflop": 10.0 + e}) + "\n" for e in (1, 2, 3))
    )
    assert training_record({"epoch": 2, "metrics": {}}, stage / "best.pth") == {"epoch": 2, "cum_train_tflop": 12.0}
    stored = {"epoch": 2, "metrics": {"cum_train_tflop": 5.0}}
    assert training_record(stored, stage / "best.pth")["cum_train_tflop"] == 5.0
    assert training_record({"epoch": None}, tmp_path / "plain.pth") == {"epoch": None, "cum_train_tflop": None}


def test_labels_of_stages_with_the_same_figures_are_stacked_not_overprinted():
    from fastseg.report import _stacked

    # The demo's teacher and student at profile 2 had the same GFLOPs and mIoU to 0.02 points.
    points = [(1.13, 18.68), (1.13, 19.21), (2.01, 26.00), (2.01, 25.98), (2.01, 26.0)]
    assert _stacked(points) == [0, 0, 0, 1, 2]
    assert _stacked([(1.0, 5.0)]) == [0] and _stacked([]) == []
    # A chain: the first and the third are each near the second only; the third may share the first's line.
    assert _stacked([(0.0, 0.0), (0.0, 0.2), (0.0, 0.4), (0.0, 10.0)]) == [0, 1, 0, 0]


def test_training_compute_plot_draws_one_line_per_run(tmp_path):
    def row(name, run, profile, tflop, trained=None):
        return {"checkpoint": name, "experiment_id": run, "profile": profile, "trained_profile": trained or profile,
                "miou": 0.1 * profile, "cum_train_tflop": tflop}

    rows = [row("b2", "b", 2, 30.0), row("a2", "a", 2, 20.0), row("a1", "a", 1, 5.0), row("b1", "b", 1, 5.0),
            row("a5@1", "a", 1, 90.0, trained=5), row("plain", None, 1, None)]
    runs = train_compute_runs(rows)
    # Grouped by experiment id, in order of compute; a checkpoint scored away from its own profile is left out.
    assert {run: [r["checkpoint"] for r in rs] for run, rs in runs.items()} == {"b": ["b1", "b2"], "a": ["a1", "a2"]}
    path = plot_accuracy_vs_train_compute(rows, tmp_path / "compute.png")
    assert path.stat().st_size > 0
    assert plot_accuracy_vs_train_compute([rows[-1]], tmp_path / "none.png") is None


# --------------------------------------------------------------------------------------------------
# A checkpoint at every profile; a student beside its twin and teacher
# --------------------------------------------------------------------------------------------------


def test_one_checkpoint_at_several_profiles(synthetic_root, checkpoints, tmp_path, capsys):
    plots = tmp_path / "plots"
    checkpoint = str(checkpoints / "baseline" / "profile-1" / "best.pth")
    report_, out = _run(
        capsys, "--data-dir", str(synthetic_root), "--current-model-path", checkpoint, "--profile", "1-2",
        "--skip-speed", "--output", "r.json", "--plots", str(plots),
    )
    rows = report_["results"]
    # Each profile's own size, not the size stored in the checkpoint (its stage was trained at 128×64).
    assert [(row["profile"], row["input_size"], row["stage"]) for row in rows] == [
        (1, [288, 576], "teacher p1"), (2, [384, 768], "teacher p2")
    ]
    assert all(0 <= row["miou"] <= 1 for row in rows) and rows[0]["miou"] != rows[1]["miou"]
    assert "| best.pth | 1 | 288×576 |" in out and "| best.pth | 2 | 384×768 |" in out
    assert {"per_class_iou_best_p1.png", "per_class_iou_best_p2.png"} <= {p.name for p in plots.iterdir()}


def test_student_beside_its_undistilled_twin_and_teacher(synthetic_root, tmp_path, capsys):
    teacher = _save(tmp_path / "teacher" / "profile-1" / "best.pth", _fast_scnn(0), experiment_id="teacher",
                    resize=[256, 128])
    distilled = {"teacher": {"path": str(teacher), "arch": "fast_scnn", "profile": 1}}
    for run, seed, extra in (("student", 1, distilled), ("twin", 3, {})):
        stage = tmp_path / run / "profile-1"
        _save(stage / "best.pth", _fast_scnn(seed), epoch=1, experiment_id=run, resize=TINY_RESIZE, **extra)
        _save(stage / "last.pth", _fast_scnn(seed + 10), epoch=2, experiment_id=run, resize=TINY_RESIZE, **extra)
    student, twin = str(tmp_path / "student/profile-*/best.pth"), str(tmp_path / "twin/profile-*/best.pth")
    report_, out = _run(
        capsys, "--data-dir", str(synthetic_root), "--compare", student, twin, "--skip-speed", "--output", "r.json",
        "--plots", "none",
    )
    rows = {row["checkpoint"]: row for row in report_["results"]}
    assert set(rows) == {"student/profile-1/best.pth", "twin/profile-1/best.pth", "teacher/profile-1/best.pth"}
    s, t = rows["student/profile-1/best.pth"], rows["twin/profile-1/best.pth"]
    teacher_row = rows["teacher/profile-1/best.pth"]
    # The teacher at the student's input size (its own stage was trained at another), its last epoch not scored.
    assert teacher_row["input_size"] == s["input_size"] == [64, 128] and teacher_row["miou_last"] is None
    (compared,) = report_["comparison"]
    assert compared["profile"] == 1 and compared["teacher"] == "teacher/profile-1/best.pth"
    assert compared["student_miou"] == s["miou"] and compared["twin_miou"] == t["miou"]
    assert compared["gain"] == pytest.approx(s["miou"] - t["miou"]) and compared["gain"] != 0
    assert compared["gain_last"] == pytest.approx(s["miou_last"] - t["miou_last"])
    assert compared["teacher_miou"] == teacher_row["miou"]
    table = out[out.index("| profile | student mIoU %"):].splitlines()
    assert table[2] == (f"| 1 | {100 * s['miou']:.2f} | {100 * t['miou']:.2f} | {100 * compared['gain']:+.2f} | "
                        f"{100 * compared['gain_last']:+.2f} | {100 * teacher_row['miou']:.2f} |")

    for argv, match in (
        (["--compare", twin, student], "--compare: .*twin.*trained without a teacher"),
        (["--compare", student, student], "--compare: .*student.*distilled from"),
        (["--compare", student, twin, "--profile", "2"], "drop --profile"),
        (["--compare", student, twin, "--current-model-path", str(teacher)], "drop --current-model-path"),
    ):
        with pytest.raises(UserError, match=match):
            evaluate_efficiency.main([*argv, "--skip-speed", "--data-dir", str(synthetic_root)])
