"""`make demo`'s script, the same steps at a tiny size, so the demo cannot break silently."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_demo_runs_every_step_and_reports_four_stages(tmp_path):
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "DATA_DIR": str(tmp_path / "data"),
        "OUTPUT_DIR": str(tmp_path / "checkpoints"),
        "RESULTS_DIR": str(tmp_path / "results"),
        "TRAIN_IMAGES": "8", "VAL_IMAGES": "2", "IMAGE_SIZE": "128x64",
        "EPOCHS": "1", "BATCH_SIZE": "4", "NUM_WORKERS": "0", "TIMED_RUNS": "3",
        "DEPLOYED_SPEED": "no-deployed-speed",  # (each ONNX export takes seconds; tests/test_efficiency.py times one)
        "STAGE_ARGS": "--resize 128x64 --patch 96x48 --device cpu",
        "WANDB": "disabled",
    }
    result = subprocess.run(["bash", str(ROOT / "demo.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for n in range(1, 7):
        assert f"==> {n}/6" in result.stdout
    assert "Done." in result.stdout
    report = json.loads((tmp_path / "results" / "efficiency.json").read_text())["results"]
    stages = sorted((r["experiment_id"], r["profile"]) for r in report)
    assert stages == [("demo_student", 1), ("demo_student", 2), ("demo_teacher", 1), ("demo_teacher", 2)]
    assert all(0 <= r["miou"] <= 1 and r["macs"] > 0 for r in report)
    assert list((tmp_path / "results").glob("*.png"))
    student = json.loads((tmp_path / "checkpoints" / "demo_student" / "profile-2" / "config.json").read_text())
    assert student["teacher"]["path"].endswith("demo_teacher/profile-2/best.pth")
    assert student["previous_model_loaded"].endswith("demo_student/profile-1/best.pth")

    # A second run reuses the data and skips every finished stage.
    again = subprocess.run(["bash", str(ROOT / "demo.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("stage already complete") == 4
