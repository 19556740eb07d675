"""Fast-SCNN: fast semantic segmentation network (Poudel, Liwicki, Cipolla, BMVC 2019).

    from fast_scnn import Model          # same class as FastSCNN
    model = Model(num_classes=19).eval()
    logits = model(images)               # N×19×H×W for any H×W

    python fast_scnn.py                  # parameters, MACs and FLOPs at the five curriculum resolutions

The module names and shapes follow the widely used public PyTorch layout, so the checkpoints trained with it
load with ``load_state_dict(strict=True)``, and the logits equal that implementation's. Where it differs:

* the fusion module upsamples the 1/32 branch to the 1/8 branch's actual size instead of by a fixed factor 4,
  so any input size works, not only multiples of 32 (for those the result is the same);
* ``forward`` returns the logits tensor, N×C×H×W like the input, rather than a tuple; with the auxiliary
  heads it returns ``(main, aux1, aux2)`` in training mode only, where the auxiliary losses need them;
* with ``aux=True`` there are two auxiliary heads, as in the paper's training recipe (weight 0.4 each):
  ``auxlayer`` on the learning-to-downsample output (1/8), the public layout's only one, and ``auxlayer_gfe``
  on the global feature extractor's output (1/32); ``fastseg.checkpoint.fit_aux_heads`` loads files with
  either, both or none into a model with or without them;
* weights start from PyTorch's layer defaults (what the public layout used, and both training recipes'
  choice); ``init="kaiming"`` asks for He initialisation, as torchvision's and mmsegmentation's models use.

This file depends on torch only, so it can be copied on its own into another project.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FastSCNN", "INITS", "Model", "fold_batchnorm", "scaled_channels"]

INITS = ("pytorch", "kaiming")  # each layer's PyTorch default | He fan_out (torchvision's and mmseg's choice)


def scaled_channels(channels: int, width_mult: float, divisor: int = 8) -> int:
    """``channels × width_mult`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``).

    Multiples of 8 keep the convolutions on fast tensor-core paths; rounding never loses more than 10 % of the
    width, as in MobileNet. With ``width_mult=1.0`` every Fast-SCNN width (32, 48, 64, 96, 128) is unchanged.
    """
    scaled = channels * width_mult
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return rounded


def _upsample(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    # align_corners=True everywhere: it is what the trained checkpoints were trained with.
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class ConvBNReLU(nn.Module):
    """Convolution (no bias) + BatchNorm + ReLU."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, padding: int = 0
    ):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class DepthwiseConv(nn.Module):
    """Depthwise 3×3 convolution + BatchNorm + ReLU."""

    def __init__(self, channels: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class DepthwiseSeparableConv(nn.Module):
    """Depthwise 3×3 + BN + ReLU, then pointwise 1×1 + BN + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class LinearBottleneck(nn.Module):
    """MobileNetV2 inverted residual: expand 1×1, depthwise 3×3, linear project 1×1."""

    def __init__(self, in_channels: int, out_channels: int, expansion: int = 6, stride: int = 1):
        super().__init__()
        hidden = in_channels * expansion
        self.use_shortcut = stride == 1 and in_channels == out_channels
        self.block = nn.Sequential(
            ConvBNReLU(in_channels, hidden, 1),
            DepthwiseConv(hidden, stride),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_shortcut else out


class PyramidPooling(nn.Module):
    """Average-pool to 1×1, 2×2, 3×3 and 6×6 bins, reduce each to C/4, upsample, concatenate, project."""

    bins = (1, 2, 3, 6)

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        inter = in_channels // 4
        # Named conv1..conv4 (not a ModuleList) to keep the checkpoint layout.
        self.conv1 = ConvBNReLU(in_channels, inter, 1)
        self.conv2 = ConvBNReLU(in_channels, inter, 1)
        self.conv3 = ConvBNReLU(in_channels, inter, 1)
        self.conv4 = ConvBNReLU(in_channels, inter, 1)
        self.out = ConvBNReLU(in_channels + 4 * inter, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        feats = [x]
        for bins, conv in zip(self.bins, (self.conv1, self.conv2, self.conv3, self.conv4)):
            feats.append(_upsample(conv(F.adaptive_avg_pool2d(x, bins)), size))
        return self.out(torch.cat(feats, dim=1))


class LearningToDownsample(nn.Module):
    """Three stride-2 stages to 1/8 resolution: conv 3×3, then two depthwise-separable convs."""

    def __init__(self, in_channels: int, channels1: int, channels2: int, out_channels: int):
        super().__init__()
        # Unpadded, as the checkpoints were trained: padding=1 would shift every later feature by half a pixel.
        self.conv = ConvBNReLU(in_channels, channels1, 3, stride=2, padding=0)
        self.dsconv1 = DepthwiseSeparableConv(channels1, channels2, stride=2)
        self.dsconv2 = DepthwiseSeparableConv(channels2, out_channels, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dsconv2(self.dsconv1(self.conv(x)))


class GlobalFeatureExtractor(nn.Module):
    """Three stages of bottlenecks (1/16, 1/32, 1/32) followed by pyramid pooling."""

    def __init__(
        self,
        in_channels: int,
        block_channels: tuple[int, int, int],
        out_channels: int,
        expansion: int = 6,
        num_blocks: tuple[int, int, int] = (3, 3, 3),
        strides: tuple[int, int, int] = (2, 2, 1),
    ):
        super().__init__()
        stages = []
        for channels, blocks, stride in zip(block_channels, num_blocks, strides):
            layers = [LinearBottleneck(in_channels, channels, expansion, stride)]
            layers += [LinearBottleneck(channels, channels, expansion, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            in_channels = channels
        self.bottleneck1, self.bottleneck2, self.bottleneck3 = stages
        self.ppm = PyramidPooling(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ppm(self.bottleneck3(self.bottleneck2(self.bottleneck1(x))))


class FeatureFusion(nn.Module):
    """Add the 1/8 branch (1×1 conv) to the upsampled 1/32 branch (depthwise 3×3, 1×1 conv), then ReLU."""

    def __init__(self, higher_in_channels: int, lower_in_channels: int, out_channels: int):
        super().__init__()
        # Depthwise needs in == out; the compatible layout has both at 128.
        if lower_in_channels != out_channels:
            raise ValueError("the fusion's depthwise conv needs lower_in_channels == out_channels")
        self.dwconv = DepthwiseConv(out_channels, 1)
        self.conv_lower_res = nn.Sequential(
            nn.Conv2d(out_channels, out_channels, 1), nn.BatchNorm2d(out_channels)
        )
        self.conv_higher_res = nn.Sequential(
            nn.Conv2d(higher_in_channels, out_channels, 1), nn.BatchNorm2d(out_channels)
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, higher: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
        # The actual size, not a factor of 4: for sides that are not multiples of 32 the two branches differ.
        lower = _upsample(lower, higher.shape[-2:])
        lower = self.conv_lower_res(self.dwconv(lower))
        return self.relu(self.conv_higher_res(higher) + lower)


class Classifier(nn.Module):
    """Two depthwise-separable convs, dropout, 1×1 conv to the classes."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.dsconv1 = DepthwiseSeparableConv(channels, channels)
        self.dsconv2 = DepthwiseSeparableConv(channels, channels)
        self.conv = nn.Sequential(nn.Dropout(0.1), nn.Conv2d(channels, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.dsconv2(self.dsconv1(x)))


def auxiliary_head(in_channels: int, channels: int, num_classes: int) -> nn.Sequential:
    """Conv 3×3 + BN + ReLU, dropout, 1×1 conv to the classes: a training-only head on intermediate features.

    A plain Sequential, so its keys (``0.weight``, ``1.*``, ``4.*``) are those of the published ``auxlayer``.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.Dropout(0.1),
        nn.Conv2d(channels, num_classes, 1),
    )


class FastSCNN(nn.Module):
    """Fast-SCNN for semantic segmentation.

    Args:
        num_classes: output channels (19 for Cityscapes train ids).
        in_channels: input channels (3 for RGB).
        aux: add the two auxiliary heads of the paper's recipe (each trained with loss weight 0.4):
            ``auxlayer`` on the learning-to-downsample output (64 channels at 1/8) and ``auxlayer_gfe`` on the
            global feature extractor's output (128 channels at 1/32). In training mode ``forward`` then returns
            ``(main, aux1, aux2)`` in that order, all N×classes×H×W. In eval mode, and always without ``aux``,
            it returns the logits. Without ``aux`` the state_dict is that of the published checkpoints.
        width_mult: scales every channel width (rounded to multiples of 8), e.g. 0.5 for a smaller student,
            2.0 for a wider teacher. 1.0 is the layout of the published checkpoints (~1.14 M parameters).

    Inputs need at least 3 pixels per side (the first convolution is unpadded, as in the published layout;
    padding it would change the trained checkpoints' outputs). Training needs a batch of at least 2: the
    1×1 pyramid-pooling bin leaves BatchNorm a single value per channel otherwise.

    ``init="pytorch"`` (the default) keeps each layer's own default initialisation. ``init="kaiming"``: fresh
    weights follow He et al. (2015) with fan_out, as torchvision's classification and segmentation backbones
    and mmsegmentation's Fast-SCNN do (BatchNorm weight 1, bias 0; conv biases 0); the final 1×1 convs to the
    classes start at std 0.01, so the first predictions are close to uniform. Behind BatchNorm a conv's
    weight scale sets only its effective step size, and He fan_out rescales every conv against PyTorch's
    default (bottleneck projections up to 6× larger, wide depthwise convs up to 8× smaller), so the early
    steps differ. On synthetic scenes He init trained slower with both recipes: AdamW's best mIoU after 10
    epochs fell by a third to two thirds (three seeds on the tests' data), and the SGD recipe was behind at every budget
    of benchmarks/bench_recipes.py, three seeds each (docs/recipe.md).
    """

    def __init__(
        self, num_classes: int = 19, in_channels: int = 3, aux: bool = False, width_mult: float = 1.0,
        init: str = "pytorch",
    ):
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        c = [scaled_channels(ch, width_mult) for ch in (32, 48, 64, 96, 128)]
        self.num_classes = num_classes
        self.aux = aux
        self.width_mult = width_mult
        self.learning_to_downsample = LearningToDownsample(in_channels, c[0], c[1], c[2])
        self.global_feature_extractor = GlobalFeatureExtractor(c[2], (c[2], c[3], c[4]), c[4])
        self.feature_fusion = FeatureFusion(c[2], c[4], c[4])
        self.classifier = Classifier(c[4], num_classes)
        if aux:
            # Registered in this order so the state_dict lists the published ``auxlayer`` keys first.
            self.auxlayer = auxiliary_head(c[2], c[0], num_classes)
            self.auxlayer_gfe = auxiliary_head(c[4], c[0], num_classes)
        if init == "kaiming":  # "pytorch" keeps each layer's own default initialisation
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """He (fan_out) initialisation for the convolutions, std 0.01 for those to the classes; BatchNorm to
        the identity; biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # The 1×1 convs to the classes start small, as torchvision's MobileNet classifiers and mmsegmentation's
        # decode heads do: at He scale the first logits spread over several units and the first loss is far
        # above ln(classes).
        heads = [self.classifier.conv[1]]
        if self.aux:
            heads += [self.auxlayer[4], self.auxlayer_gfe[4]]
        for conv in heads:
            nn.init.normal_(conv.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        size = x.shape[-2:]
        higher = self.learning_to_downsample(x)
        lower = self.global_feature_extractor(higher)
        out = _upsample(self.classifier(self.feature_fusion(higher, lower)), size)
        if self.aux and self.training:
            return out, _upsample(self.auxlayer(higher), size), _upsample(self.auxlayer_gfe(lower), size)
        return out


Model = FastSCNN


def _fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    # BN(conv(x)) = scale * (W x + b - mean) + beta with scale = gamma / sqrt(var + eps).
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = copy.deepcopy(conv)
    fused.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
    return fused


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Return an eval-mode copy of ``model`` with every BatchNorm folded into the convolution before it.

    The folded BatchNorms become ``nn.Identity``, so the copy runs fewer kernels at inference; its outputs
    equal the original's in eval mode (to float rounding). Its ``state_dict`` differs (convs gain biases, BN
    buffers vanish): keep the original for training and checkpoints, use the copy to deploy or export.
    The original is not modified.
    """
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if not isinstance(module, nn.Sequential):
            continue
        # Every conv→BN pair in Fast-SCNN sits next to each other inside one Sequential.
        for i in range(len(module) - 1):
            conv, bn = module[i], module[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                module[i] = _fuse_conv_bn(conv, bn)
                module[i + 1] = nn.Identity()
    return folded


def _summary() -> None:
    # Imported here so that the model itself stays a single copyable file.
    from fastseg.cityscapes import PROFILES
    from fastseg.flops import count_macs, count_params

    model = FastSCNN()
    print(f"Fast-SCNN (19 classes): {count_params(model):,} parameters")
    print("Per 1×3×H×W image in eval mode. MACs = multiply-accumulates (convolutions, plus BatchNorm counted")
    print("as thop does; see fastseg/flops.py); FLOPs = 2 × MACs (one multiply and one add each).")
    print(f"{'profile':>7}  {'input W×H':>10}  {'GMACs':>7}  {'GFLOPs':>7}")
    for index, profile in sorted(PROFILES.items()):
        width, height = profile.resize
        macs = count_macs(model, (height, width))
        print(f"{index:>7}  {f'{width}×{height}':>10}  {macs / 1e9:7.3f}  {2 * macs / 1e9:7.3f}")


if __name__ == "__main__":
    _summary()
