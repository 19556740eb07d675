"""--pretrained-backbone: ImageNet weights for a torchvision teacher's backbone, from a file or torch's cache,
and one clear line when neither is there and the network is not."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
from conftest import TINY_ARGS

import train
import train_distillation
from fastseg.errors import UserError
from fastseg.models import build_model


def _imagenet_file(path: Path, name: str, seed: int) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet classifier ``name`` with random weights, saved as its downloaded file would be."""
    torch.manual_seed(seed)
    state = getattr(torchvision.models, name)().state_dict()
    torch.save(state, path)
    return state


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torch cache and no network: every download fails as on an offline compute node."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.mark.parametrize(("arch", "classifier", "prefix"), [
    ("lraspp_mobilenet_v3_large", "mobilenet_v3_large", "features."),
    ("deeplabv3_resnet50", "resnet50", ""),
])
def test_backbone_weights_come_from_a_file(tmp_path, arch, classifier, prefix):
    state = _imagenet_file(tmp_path / f"{classifier}.pth", classifier, seed=1)
    model = build_model(arch, pretrained_backbone=str(tmp_path / f"{classifier}.pth"))
    backbone = model.backbone.state_dict()
    assert backbone, arch
    for key, value in backbone.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, state[prefix + key]), key
    # the heads stay as built: a fresh model of the same seed has other backbone weights
    fresh = build_model(arch).backbone.state_dict()
    assert not all(torch.equal(fresh[k], backbone[k]) for k in backbone if k.endswith("weight"))


def test_a_weight_name_loads_from_torchs_cache_offline(offline):
    offline.mkdir(parents=True)
    file = Path(torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V1.url).name
    state = _imagenet_file(offline / file, "mobilenet_v3_large", seed=2)
    model = build_model("deeplabv3_mobilenet_v3_large", pretrained_backbone="IMAGENET1K_V1")
    assert torch.equal(model.backbone.state_dict()["0.0.weight"], state["features.0.0.weight"])


def test_offline_without_the_file_is_one_line_naming_flag_file_and_place(offline):
    with pytest.raises(UserError) as caught:
        build_model("deeplabv3_resnet50", pretrained_backbone="IMAGENET1K_V1")
    message = str(caught.value)
    assert "\n" not in message
    file = Path(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url).name  # resnet50-0676ba61.pth
    assert message.startswith("--pretrained-backbone IMAGENET1K_V1: cannot download")
    assert str(offline / file) in message and f"--pretrained-backbone /path/to/{file}" in message


@pytest.mark.parametrize(("arch", "value", "message"), [
    ("fast_scnn", "IMAGENET1K_V1", "fast_scnn has no ImageNet backbone"),
    ("deeplabv3_resnet50", "IMAGENET9K", "neither a file nor a torchvision weight name of resnet50"),
    ("deeplabv3_resnet50", "missing.pth", "neither a file nor a torchvision weight name"),
])
def test_bad_values_name_the_flag(arch, value, message):
    with pytest.raises(UserError, match=f"--pretrained-backbone.*{message}"):
        build_model(arch, pretrained_backbone=value)


def test_a_file_of_another_backbone_says_so(tmp_path):
    _imagenet_file(tmp_path / "mobilenet.pth", "mobilenet_v3_large", seed=3)
    with pytest.raises(UserError, match=r"--pretrained-backbone: .*mobilenet.pth does not hold the ImageNet resnet50"):
        build_model("fcn_resnet50", pretrained_backbone=str(tmp_path / "mobilenet.pth"))


def test_train_py_starts_the_teacher_from_the_file(synthetic_root, tmp_path):
    state = _imagenet_file(tmp_path / "mobilenet_v3_large.pth", "mobilenet_v3_large", seed=4)
    # A learning rate of ~0 keeps the loaded weights: what best.pth holds is what the flag loaded.
    assert train.main([*TINY_ARGS, "--data-dir", str(synthetic_root), "--output-dir", str(tmp_path),
                       "--experiment-id", "t", "--epochs", "1", "--arch", "lraspp_mobilenet_v3_large",
                       "--pretrained-backbone", str(tmp_path / "mobilenet_v3_large.pth"), "--lr", "1e-12",
                       "--min-lr", "0", "--lr-schedule", "constant", "--previous-model-path", "none"]) == 0
    ckpt = torch.load(tmp_path / "t" / "profile-1" / "best.pth", weights_only=True)
    assert ckpt["config"]["pretrained_backbone"] == str(tmp_path / "mobilenet_v3_large.pth")
    weight = ckpt["model"]["backbone.0.0.weight"]
    assert torch.allclose(weight, state["features.0.0.weight"], atol=1e-6)

    # ... and that teacher then teaches: its checkpoint carries its architecture to train_distillation.py.
    assert train_distillation.main([*TINY_ARGS, "--data-dir", str(synthetic_root), "--output-dir", str(tmp_path),
                                    "--experiment-id", "s", "--epochs", "1", "--previous-student-model-path", "none",
                                    "--trained-teacher-model-path", str(tmp_path / "t" / "profile-1" / "best.pth")]) == 0
    config = json.loads((tmp_path / "s" / "profile-1" / "config.json").read_text())
    assert config["arch"] == "fast_scnn" and config["teacher"]["arch"] == "lraspp_mobilenet_v3_large"
    record = json.loads((tmp_path / "s" / "profile-1" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["train_kd_loss"] > 0 and record["train_ce_loss"] > 0
