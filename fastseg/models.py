"""Every architecture the trainers can build, behind one call: ``build_model(arch, ...)``.

All of them take a normalised N×3×H×W batch and return N×classes×H×W logits. In training mode, a model built
with ``aux=True`` returns ``(main, aux1, ...)`` instead, all N×classes×H×W, for the auxiliary losses: two
auxiliary outputs for Fast-SCNN (1/8 and 1/32 features), one for torchvision's models.

* ``fast_scnn``: the student (``fast_scnn.FastSCNN``); the only one ``width_mult`` applies to.
* torchvision's segmentation models, e.g. as larger teachers, built from scratch (``weights=None,
  weights_backbone=None``), or with ``pretrained_backbone`` set, with the ImageNet weights of their
  backbone (a torchvision weight name, downloaded when the network allows, or a file the user downloaded:
  compute nodes are often offline). ``aux=True`` adds torchvision's auxiliary classifier where
  the architecture has one (DeepLabV3, FCN); LR-ASPP has none, so asking for it is a UserError rather than a
  silently missing loss term. Their ``state_dict`` keys are torchvision's own (``backbone.*``,
  ``classifier.*``, ``aux_classifier.*``), so torchvision-format weights load into them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import get_model_weights
from torchvision.models import segmentation as tv_segmentation

from fast_scnn import FastSCNN
from fastseg.checkpoint import fit_aux_heads, load_checkpoint, load_weights, model_config
from fastseg.errors import UserError

# torchvision builder and whether it has an auxiliary classifier.
_TORCHVISION: dict[str, tuple[Callable[..., nn.Module], bool]] = {
    "deeplabv3_mobilenet_v3_large": (tv_segmentation.deeplabv3_mobilenet_v3_large, True),
    "lraspp_mobilenet_v3_large": (tv_segmentation.lraspp_mobilenet_v3_large, False),
    "deeplabv3_resnet50": (tv_segmentation.deeplabv3_resnet50, True),
    "fcn_resnet50": (tv_segmentation.fcn_resnet50, True),
}

ARCHS: tuple[str, ...] = ("fast_scnn", *_TORCHVISION)

# The ImageNet classifier each backbone is cut from, and the prefix of the backbone's tensors in that
# classifier's state_dict (torchvision keeps ResNet's layers by name and MobileNetV3's ``features`` by index).
_BACKBONES: dict[str, tuple[str, str]] = {
    "deeplabv3_mobilenet_v3_large": ("mobilenet_v3_large", "features."),
    "lraspp_mobilenet_v3_large": ("mobilenet_v3_large", "features."),
    "deeplabv3_resnet50": ("resnet50", ""),
    "fcn_resnet50": ("resnet50", ""),
}


class TorchvisionSegmenter(nn.Module):
    """A torchvision segmentation model that returns the logits tensor instead of a dict.

    Holds torchvision's own ``backbone``/``classifier``/``aux_classifier`` as direct children (same state_dict
    keys as the torchvision model) and runs the auxiliary classifier only in training, where its output is
    used; torchvision runs it in eval mode too, which would inflate the measured inference cost.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone = model.backbone
        self.classifier = model.classifier
        self.aux_classifier = getattr(model, "aux_classifier", None)
        # LR-ASPP's head reads two backbone levels and takes the whole feature dict; the others take "out".
        self.head_takes_dict = isinstance(model, tv_segmentation.LRASPP)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        size = x.shape[-2:]
        features = self.backbone(x)
        out = self.classifier(features if self.head_takes_dict else features["out"])
        # align_corners=False: how torchvision's models were designed and trained.
        out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        if self.training and self.aux_classifier is not None:
            aux = F.interpolate(
                self.aux_classifier(features["aux"]), size=size, mode="bilinear", align_corners=False
            )
            return out, aux
        return out


class ClassifierLogits:
    """The logits of a model's ``classifier`` in its last forward: on the grid of the model's output stride
    (1/8 of the input for Fast-SCNN), before the model upsamples them to the input size.

    Read by a forward hook, so the models keep returning what they return; it works through DDP and
    ``torch.compile`` of the model. ``take()`` hands each forward's logits over once and keeps no reference.
    """

    def __init__(self, model: nn.Module, name: str = "classifier"):
        head = getattr(model, name, None)
        if not isinstance(head, nn.Module):
            raise ValueError(f"{type(model).__name__} has no {name} module to read the logits of")
        self._logits: torch.Tensor | None = None
        self._handle = head.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        self._logits = output

    def __deepcopy__(self, memo) -> ClassifierLogits:
        # A deep copy of the model (train.py counts a step's FLOPs on one) copies its hooks; the copy's hook
        # must report here too, where the objective reads.
        return self

    def take(self) -> torch.Tensor:
        logits, self._logits = self._logits, None
        if logits is None:
            raise RuntimeError("the classifier has not run since the last take(); run the model first")
        return logits

    def remove(self) -> None:
        self._handle.remove()


def _imagenet_weights(classifier: str, name: str, flag: str) -> tuple[dict[str, torch.Tensor], str]:
    """torchvision's ImageNet state_dict of ``classifier`` called ``name``: from torch's hub cache, else
    downloaded into it. Offline and not cached, a UserError says which file to put where."""
    enum = get_model_weights(classifier)
    try:
        weights = enum.verify(name)
    except KeyError:
        names = ", ".join(w.name for w in enum)
        raise UserError(f"{flag} {name}: neither a file nor a torchvision weight name of {classifier} ({names}); "
                        "give a weight name or the path of a downloaded weights file") from None
    file = Path(urlparse(weights.url).path).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / file
    try:
        return weights.get_state_dict(progress=False, check_hash=True), weights.url
    except OSError as exc:  # URLError, timeouts, refused connections: no network on this node
        reason = getattr(exc, "reason", None) or exc
        raise UserError(f"{flag} {name}: cannot download {weights.url} ({reason}); download {file} where there is "
                        f"internet and put it at {cached} (or $TORCH_HOME/hub/checkpoints/{file}), or pass its "
                        f"path: {flag} /path/to/{file}") from None


def load_pretrained_backbone(model: TorchvisionSegmenter, arch: str, source: str,
                             flag: str = "--pretrained-backbone") -> str:
    """Load ImageNet weights into ``model.backbone``; returns where they came from.

    ``source`` is a file (torchvision's classifier state_dict such as ``resnet50-0676ba61.pth``, or the
    backbone's own state_dict) or a torchvision weight name of the backbone (``IMAGENET1K_V1``, ``DEFAULT``).
    Every backbone tensor must be in it with its shape; the classifier's head (``fc``, ``classifier``) is
    not used.
    """
    classifier, prefix = _BACKBONES[arch]
    path = Path(source).expanduser()
    if path.is_file():
        state, where = load_checkpoint(path, flag)["model"], str(path)
    else:
        state, where = _imagenet_weights(classifier, source, flag)
    own = model.backbone.state_dict()
    fitted, missing, misshapen = {}, [], []
    for key, value in own.items():
        found = state.get(prefix + key, state.get(key))
        if found is None and key.endswith("num_batches_tracked"):
            found = value  # older files predate this counter; BatchNorm does the same when loading them
        if found is None:
            missing.append(key)
        elif found.shape != value.shape:
            misshapen.append(key)
        else:
            fitted[key] = found
    if missing or misshapen:
        example = (missing or misshapen)[0]
        raise UserError(f"{flag}: {where} does not hold the ImageNet {classifier} backbone of {arch} ({len(missing)} "
                        f"of its {len(own)} tensors missing, {len(misshapen)} of another shape, e.g. "
                        f"{prefix}{example}); use torchvision's {classifier} weights file")
    model.backbone.load_state_dict(fitted, strict=True)
    return where


def aux_head_names(model: nn.Module) -> list[str]:
    """The auxiliary heads ``model`` has, in the order its training-mode forward returns their outputs."""
    return [name for name in ("auxlayer", "auxlayer_gfe", "aux_classifier")
            if isinstance(getattr(model, name, None), nn.Module)]


def has_aux(arch: str) -> bool:
    """Whether ``arch`` can train with an auxiliary head."""
    return arch == "fast_scnn" or (arch in _TORCHVISION and _TORCHVISION[arch][1])


def build_model(
    arch: str = "fast_scnn",
    num_classes: int = 19,
    aux: bool = False,
    width_mult: float = 1.0,
    pretrained_backbone: str | None = None,
    init: str = "pytorch",
) -> nn.Module:
    """Build ``arch`` with freshly initialised weights (see the module docstring for what each returns).

    ``pretrained_backbone`` (torchvision models only): a torchvision weight name or a file of the backbone's
    ImageNet weights, loaded by :func:`load_pretrained_backbone`; the heads stay freshly initialised.
    ``init`` (fast_scnn only; torchvision's models keep their builders' own): ``pytorch`` or ``kaiming``.
    """
    if arch not in ARCHS:
        raise UserError(f"--arch: unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if num_classes < 1:
        raise UserError(f"--num-classes: must be at least 1, got {num_classes}")
    if arch == "fast_scnn":
        if pretrained_backbone is not None:
            raise UserError(f"--pretrained-backbone: fast_scnn has no ImageNet backbone; drop the flag, or use it with "
                            f"a torchvision --arch ({', '.join(_TORCHVISION)})")
        if width_mult <= 0:
            raise UserError(f"--width-mult: must be positive, got {width_mult}")
        return FastSCNN(num_classes=num_classes, aux=aux, width_mult=width_mult, init=init)
    if width_mult != 1.0:
        raise UserError(f"--width-mult: only fast_scnn can be scaled; use 1.0 with --arch {arch}")
    builder, has_aux = _TORCHVISION[arch]
    if aux and not has_aux:
        with_aux = ", ".join(name for name, (_, a) in _TORCHVISION.items() if a)
        raise UserError(f"--aux: {arch} has no auxiliary head; drop --aux or use fast_scnn, {with_aux}")
    kwargs = {"aux_loss": aux} if has_aux else {}
    model = TorchvisionSegmenter(builder(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs))
    if pretrained_backbone is not None:
        load_pretrained_backbone(model, arch, pretrained_backbone)
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu", flag: str = "checkpoint", aux: bool = False):
    """Build the checkpoint's architecture, load it, and return ``(model in eval mode, config)``.

    The model is the one that is deployed and evaluated: without the auxiliary heads, which only training
    uses (so its parameter count is the model's, not the training aids'). Strict for every other weight.
    ``aux=True`` keeps the heads too (a teacher whose heads are distilled): each must be in the file.
    """
    ckpt = load_checkpoint(path, flag)
    cfg = model_config(ckpt)
    arch = cfg.get("arch", "fast_scnn")
    if aux and not has_aux(arch):
        raise UserError(f"{flag}: {path} is a {arch}, which has no auxiliary head to distil")
    model = build_model(arch, num_classes=int(cfg.get("num_classes", 19)), aux=aux,
                        width_mult=float(cfg.get("width_mult", 1.0)))
    if aux:
        missing = [n for n in aux_head_names(model) if not any(k.startswith(n + ".") for k in ckpt["model"])]
        if missing:
            raise UserError(f"{flag}: {path} holds no weights of the auxiliary head(s) {', '.join(missing)}; "
                            "use a teacher trained with --aux")
    else:
        ckpt = {**ckpt, "model": fit_aux_heads(model, ckpt["model"])}
    load_weights(model, ckpt, flag=flag, where=path)
    return model.to(device).eval(), cfg
