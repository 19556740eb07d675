"""Fast-SCNN (checkpoint layout, reference output, any input size, aux, folding), loading wrapped and plain
state_dicts, MAC counts, build_model."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
import torch
from torch import nn

from fast_scnn import FastSCNN, Model, fold_batchnorm, scaled_channels
from fastseg.checkpoint import (
    fit_aux_heads,
    infer_config,
    infer_width_mult,
    load_checkpoint,
    load_weights,
)
from fastseg.errors import UserError
from fastseg.flops import count_macs, count_params
from fastseg.models import ARCHS, build_model, load_model

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"

# GMACs that thop reports for the default Fast-SCNN at the five curriculum resize resolutions (W, H), as
# published: strings, because the digits shown are what the count has to reproduce.
THOP_GMACS = {(576, 288): "0.565", (768, 384): "1.00", (1024, 512): "1.79", (1536, 768): "4.02",
              (2048, 1024): "7.14"}


def reference_layout(aux: bool) -> dict[str, list[int]]:
    layout = {}
    for line in (DATA / "fast_scnn_state_dict.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape, *flags = line.split("\t")
        if "aux" in flags and not aux:
            continue
        layout[name] = [int(n) for n in shape.strip("[]").split(",") if n.strip()]
    return layout


@pytest.fixture(scope="module")
def reference():
    return torch.load(DATA / "fast_scnn_reference.pt", weights_only=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The 1/32 head that the public layout lacks: 128 -> 32 channels (3×3), then 32 -> 19 classes.
GFE_HEAD = {
    "auxlayer_gfe.0.weight": [32, 128, 3, 3],
    "auxlayer_gfe.1.weight": [32], "auxlayer_gfe.1.bias": [32],
    "auxlayer_gfe.1.running_mean": [32], "auxlayer_gfe.1.running_var": [32],
    "auxlayer_gfe.1.num_batches_tracked": [],
    "auxlayer_gfe.4.weight": [19, 32, 1, 1], "auxlayer_gfe.4.bias": [19],
}


@pytest.mark.parametrize("aux", [False, True])
def test_state_dict_layout_matches_published_checkpoints(aux):
    layout = {k: list(v.shape) for k, v in FastSCNN(aux=aux).state_dict().items()}
    # Without aux: exactly the users' checkpoints. With aux: those with the 1/8 head, then the 1/32 head.
    expected = {**reference_layout(aux), **(GFE_HEAD if aux else {})}
    assert list(layout) == list(expected)
    assert layout == expected


def test_kaiming_init_follows_he_fan_out():
    model = FastSCNN(aux=True, init="kaiming")
    to_classes = {"classifier.conv.1", "auxlayer.4", "auxlayer_gfe.4"}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            w = m.weight
            expected = (2.0 / (w.shape[0] * w[0, 0].numel())) ** 0.5  # fan_out = out channels × kernel area
            if name in to_classes:
                expected = 0.01
            if w.numel() >= 600:  # enough samples for the standard deviation to be within 10 %
                assert w.std().item() == pytest.approx(expected, rel=0.1), name
            assert m.bias is None or not m.bias.any(), name
        elif isinstance(m, torch.nn.BatchNorm2d):
            assert (m.weight == 1).all() and not m.bias.any(), name
    # The first prediction is close to uniform: the loss starts near ln(classes).
    with torch.no_grad():
        logits = model.eval()(torch.randn(2, 3, 64, 128))
    assert logits.std().item() < 0.1


def test_model_alias_and_parameter_count():
    assert Model is FastSCNN
    assert count_params(FastSCNN()) == 1_138_051


def test_reproduces_reference_output(reference):
    model = FastSCNN().eval()
    model.load_state_dict(reference["state_dict"], strict=True)
    with torch.no_grad():
        out = model(reference["input"])
    assert out.shape == (1, 19, *reference["input"].shape[-2:])
    stride = reference["output_stride"]
    torch.testing.assert_close(out[:, :, ::stride, ::stride], reference["output_strided"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("hw", [(1024, 2048), (288, 576), (333, 517), (97, 131)])
def test_output_is_input_size(hw):
    with torch.no_grad():
        out = FastSCNN().eval()(torch.randn(1, 3, *hw))
    assert out.shape == (1, 19, *hw)
    assert torch.isfinite(out).all()


def test_aux_outputs_only_in_training():
    model = FastSCNN(num_classes=5, aux=True)
    x = torch.randn(2, 3, 97, 131)
    out = model.train()(x)
    assert isinstance(out, tuple) and len(out) == 3
    main, aux1, aux2 = out
    assert main.shape == aux1.shape == aux2.shape == (2, 5, 97, 131)
    # The order is (main, 1/8 head, 1/32 head): raising one head's last bias moves its own output only.
    model.eval()
    model.training = True  # forward returns the tuple; dropout and BatchNorm stay in eval mode, deterministic
    last_bias = [model.classifier.conv[1].bias, model.auxlayer[4].bias, model.auxlayer_gfe[4].bias]
    with torch.no_grad():
        before = model(x)
        for index, bias in enumerate(last_bias):
            saved = bias.clone()  # b + 1 - 1 need not give b back in floating point
            bias.add_(1.0)
            after = model(x)
            bias.copy_(saved)
            assert [not torch.equal(b, a) for b, a in zip(before, after)] == [i == index for i in range(3)]
    with torch.no_grad():
        out = model.eval()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5, 97, 131)
    # Without the head, training mode returns the logits alone.
    assert isinstance(FastSCNN(num_classes=5).train()(x), torch.Tensor)


def randomise_batchnorm(model):
    # Fresh BNs are identities (mean 0, var 1, weight 1, bias 0): folding them would prove nothing.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def test_folded_model_equals_eval_model():
    model = FastSCNN(aux=True).train()
    randomise_batchnorm(model)
    folded = fold_batchnorm(model)
    assert model.training, "the original must be left untouched"
    assert not folded.training
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        expected = model.eval()(x)
        torch.testing.assert_close(folded(x), expected, atol=1e-5, rtol=0)


def test_channels_last_matches_contiguous():
    model = FastSCNN().eval()
    randomise_batchnorm(model)
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        expected = model(x)
        out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_every_parameter_gets_a_gradient():
    model = FastSCNN(num_classes=4, aux=True).train()
    sum(out.square().mean() for out in model(torch.randn(2, 3, 64, 96))).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def _checkpoint_with_heads(heads: str) -> dict[str, torch.Tensor]:
    """A state_dict with no auxiliary head, the 1/8 one only (runs before the 1/32 head existed), or both."""
    torch.manual_seed(1)  # not the seed of the models it is loaded into, so every weight differs
    state = FastSCNN(aux=heads != "none").state_dict()
    if heads == "auxlayer":
        state = {k: v for k, v in state.items() if not k.startswith("auxlayer_gfe.")}
    return state


@pytest.mark.parametrize("aux", [False, True])
@pytest.mark.parametrize("heads", ["none", "auxlayer", "both"])
def test_checkpoint_with_any_heads_loads_with_or_without_aux(heads, aux):
    state = _checkpoint_with_heads(heads)
    model = FastSCNN(aux=aux)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    load_weights(model, {"model": fit_aux_heads(model, state)})  # strict: every key of the model, no other
    for key, value in model.state_dict().items():  # the file's weights where it has them, fresh heads otherwise
        assert torch.equal(value, state[key] if key in state else fresh[key]), key


@pytest.mark.parametrize("stored_config", [True, False])
def test_load_model_gives_the_deployed_model_without_training_heads(tmp_path, stored_config):
    # An older run trained with --aux (one head): the model to evaluate or teach with has no aux heads, so
    # its parameter count is the deployed model's.
    state = _checkpoint_with_heads("auxlayer")
    config = {"arch": "fast_scnn", "num_classes": 19, "width_mult": 1.0, "aux": True}
    torch.save({"model": state, "config": config} if stored_config else state, tmp_path / "old.pth")
    model, cfg = load_model(tmp_path / "old.pth")
    assert cfg["aux"] and not hasattr(model, "auxlayer") and not hasattr(model, "auxlayer_gfe")
    assert not model.training and count_params(model) == count_params(FastSCNN())
    assert torch.equal(model.classifier.conv[1].weight, state["classifier.conv.1.weight"])


def test_loading_another_class_count_names_the_keys():
    state = FastSCNN(num_classes=19).state_dict()
    with pytest.raises(RuntimeError, match=r"classifier\.conv\.1\.weight"):
        FastSCNN(num_classes=7).load_state_dict(state, strict=True)
    with pytest.raises(UserError) as info:
        load_weights(FastSCNN(num_classes=7), {"model": state})
    assert "classifier.conv.1.weight" in str(info.value) and "classifier.conv.1.bias" in str(info.value)


class _Wrapper(nn.Module):
    """Holds a model as ``.module``, as DistributedDataParallel does, so its state_dict keys gain ``module.``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    """``model`` with every float parameter and buffer drawn afresh, BatchNorm statistics included."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if name.endswith("running_var"):
                value.copy_(torch.rand(value.shape, generator=generator) + 0.5)
            elif value.is_floating_point():
                value.copy_(torch.randn(value.shape, generator=generator) * 0.1)
    return model


@pytest.mark.parametrize(
    ("wrap", "prefix"),
    [
        (_Wrapper, "module."),
        (torch.compile, "_orig_mod."),  # compiles lazily: wrapping alone gives the prefixed state_dict
        (lambda m: torch.compile(_Wrapper(m)), "_orig_mod.module."),
        (lambda m: _Wrapper(torch.compile(m)), "module._orig_mod."),
    ],
)
def test_prefixed_state_dicts_load_into_a_bare_model(wrap, prefix, tmp_path):
    model = _randomised(FastSCNN(aux=True), seed=1)
    prefixed = wrap(model).state_dict()
    assert set(prefixed) == {prefix + key for key in model.state_dict()}
    expected = model.state_dict()
    for layout in (prefixed, {"model": prefixed}, {"state_dict": prefixed}):
        path = tmp_path / "weights.pth"
        torch.save(layout, path)
        assert set(load_checkpoint(path)["model"]) == set(expected)
        bare = FastSCNN(aux=True)
        assert not all(torch.equal(bare.state_dict()[k], v) for k, v in expected.items())
        load_weights(bare, path)
        loaded, cfg = load_model(path)
        assert cfg["width_mult"] == 1.0 and cfg["aux"]
        assert all(torch.equal(bare.state_dict()[key], value) for key, value in expected.items())
        # load_model gives the deployed model: every weight but the auxiliary heads'
        assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())


@pytest.mark.parametrize("width_mult", [0.3, 0.5, 0.75, 1.0, 1.3, 1.5, 2.0, 3.0])
def test_plain_state_dict_of_any_width_loads_with_its_width(width_mult, tmp_path):
    model = _randomised(FastSCNN(width_mult=width_mult), seed=2)
    path = tmp_path / "plain.pth"
    torch.save(model.state_dict(), path)
    loaded, cfg = load_model(path)
    # The inferred multiplier need not be the one saved, but it must build the same channel widths.
    widths = [scaled_channels(c, cfg["width_mult"]) for c in (32, 48, 64, 96, 128)]
    assert widths == [scaled_channels(c, width_mult) for c in (32, 48, 64, 96, 128)]
    got = loaded.state_dict()
    assert all(torch.equal(got[key], value) for key, value in model.state_dict().items())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = model.eval()(x)
        assert expected.isfinite().all() and torch.equal(loaded(x), expected)


def test_width_is_inferred_from_every_layer_not_only_the_first():
    # 0.3 and 0.5 both give the first layer 16 channels; the widths further in tell them apart.
    assert infer_width_mult({32: 16, 48: 24, 64: 32, 96: 48, 128: 64}) == 0.5
    point_three = infer_width_mult({32: 16, 48: 16, 64: 24, 96: 32, 128: 40})  # what 0.3 builds
    assert [scaled_channels(c, point_three) for c in (32, 48, 64, 96, 128)] == [16, 16, 24, 32, 40]
    assert infer_width_mult({32: 48, 48: 72, 64: 96, 96: 144, 128: 192}) == 1.5
    assert infer_width_mult({32: 24, 48: 40, 64: 48, 96: 72, 128: 96}) == 0.75
    # widths that no multiplier gives are refused with the flag to use
    assert infer_width_mult({32: 32, 48: 48, 64: 64, 96: 96, 128: 256}) is None
    state = FastSCNN().state_dict()
    state["global_feature_extractor.bottleneck3.0.block.2.weight"] = torch.zeros(256, 576, 1, 1)
    with pytest.raises(UserError, match="match no Fast-SCNN --width-mult"):
        infer_config(state)


@pytest.mark.parametrize("width_mult", [0.5, 2.0])
def test_width_mult_scales_channels(width_mult):
    model = FastSCNN(width_mult=width_mult, aux=True).eval()
    first = model.learning_to_downsample.conv.conv[0]
    assert first.out_channels == int(32 * width_mult)
    ratio = count_params(model) / count_params(FastSCNN(aux=True))
    assert (ratio > 3) if width_mult > 1 else (ratio < 0.5)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 97, 131)).shape == (1, 19, 97, 131)


def test_scaled_channels_rounds_to_multiples_of_eight():
    assert [scaled_channels(c, 1.0) for c in (32, 48, 64, 96, 128)] == [32, 48, 64, 96, 128]
    for mult in (0.3, 0.6, 0.75, 1.3):
        for c in (32, 48, 64, 96, 128):
            got = scaled_channels(c, mult)
            assert got % 8 == 0 and got >= 0.9 * c * mult


@pytest.mark.parametrize(("wh", "thop_gmacs"), THOP_GMACS.items())
def test_macs_agree_with_thop(wh, thop_gmacs):
    macs = count_macs(FastSCNN(), (wh[1], wh[0]))
    # Rounded to the digits thop's figure shows, the count is that figure: within half a unit of its last digit.
    half_unit = 0.5 * 10.0 ** Decimal(thop_gmacs).as_tuple().exponent
    assert abs(macs / 1e9 - float(thop_gmacs)) < half_unit, (macs, thop_gmacs)


def test_folding_removes_the_batchnorm_macs():
    model = FastSCNN()
    macs, folded = count_macs(model, (288, 576)), count_macs(fold_batchnorm(model), (288, 576))
    assert 0.9 * macs < folded < 0.97 * macs
    assert model.training, "counting must not switch the model to eval mode"


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "fast_scnn"])
def test_build_torchvision_arch_returns_logits(arch):
    model = build_model(arch, num_classes=19).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 19, 64, 64)


def test_build_torchvision_aux_only_in_training():
    model = build_model("deeplabv3_mobilenet_v3_large", num_classes=3, aux=True)
    main, aux = model.train()(torch.randn(2, 3, 64, 64))
    assert main.shape == aux.shape == (2, 3, 64, 64)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_build_fast_scnn_options():
    model = build_model("fast_scnn", num_classes=5, aux=True, width_mult=0.5)
    assert isinstance(model, FastSCNN) and model.aux and model.width_mult == 0.5
    assert model.classifier.conv[1].out_channels == 5


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"arch": "unet"}, "--arch"),
        ({"arch": "lraspp_mobilenet_v3_large", "aux": True}, "--aux"),
        ({"arch": "fcn_resnet50", "width_mult": 0.5}, "--width-mult"),
        ({"arch": "fast_scnn", "width_mult": 0.0}, "--width-mult"),
    ],
)
def test_build_model_rejects_bad_options(kwargs, flag):
    with pytest.raises(UserError, match=flag):
        build_model(**kwargs)


def test_unknown_arch_lists_choices():
    with pytest.raises(UserError) as info:
        build_model("unet")
    assert all(arch in str(info.value) for arch in ARCHS)


def test_the_package_has_no_import_cycle():
    # Each fastseg module's imports of other fastseg modules (at any depth in the file, lazy ones too).
    import ast

    package = ROOT / "fastseg"
    graph = {}
    for path in package.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastseg."):
                names.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("fastseg.")}
        graph[path.stem] = names - {path.stem}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph.get(start, ()))

    assert "models" not in graph["checkpoint"] and "checkpoint" in graph["models"]
    assert [m for m in graph if reaches(m, m)] == []
