"""Parameter and multiply-accumulate counts of a segmentation model, for the summary and efficiency reports.

What ``count_macs`` counts, per forward pass of one 1×C×H×W image in eval mode:

* convolutions and matrix products, as ``torch.utils.flop_counter.FlopCounterMode`` counts them
  (2 FLOPs per multiply-accumulate, so they contribute FLOPs / 2 MACs; a convolution's bias is not counted);
* batch normalisation, 4 per output element (2 to normalise, 2 for the affine scale and shift). This is the
  convention of ``thop`` (``count_normalization``), which produced the published figures we compare with;
  flop_counter alone ignores BatchNorm, which leaves it about 6 % below thop on Fast-SCNN.

Not counted, by either tool: ReLU, dropout, pooling, bilinear upsampling, residual additions and
concatenations (thop treats ReLU and dropout as free and does not see functional calls such as
``F.interpolate``). Together they touch about 2 % as many elements as Fast-SCNN has convolution MACs.

FLOPs are reported as 2 × MACs. After :func:`fast_scnn.fold_batchnorm` the BatchNorm term disappears, which is
what folding saves at inference.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# thop's count for a BatchNorm element: 2 (normalise) × 2 (affine), reported as MACs.
BATCHNORM_MACS_PER_ELEMENT = 4

# Which aten op a BatchNorm lowers to depends on device, mode and backend; count whichever runs.
_BATCHNORM_OPS = tuple(
    getattr(torch.ops.aten, name)
    for name in (
        "native_batch_norm",
        "_native_batch_norm_legit",
        "_native_batch_norm_legit_no_training",
        "cudnn_batch_norm",
        "miopen_batch_norm",
    )
    if hasattr(torch.ops.aten, name)
)


def _batchnorm_flops(input_shape, *args, out_shape=None, **kwargs) -> int:
    # Expressed in FLOPs (2 per MAC) so that the counter's total stays "2 × MACs" throughout.
    return 2 * BATCHNORM_MACS_PER_ELEMENT * math.prod(input_shape)


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers such as BatchNorm statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def _meta_copy(model: nn.Module) -> nn.Module:
    # Parameters and buffers without storage: the counter needs shapes only, so a 2048×1024 pass takes
    # milliseconds and no memory, and the caller's model (maybe on a GPU) is not duplicated.
    memo: dict[int, object] = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers()})
    return copy.deepcopy(model, memo)


def _count(model: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False, custom_mapping=dict.fromkeys(_BATCHNORM_OPS, _batchnorm_flops))
    with torch.no_grad(), counter:
        model.eval()(x)
    return counter.get_total_flops()


def count_flops(model: nn.Module, input_hw: tuple[int, int], in_channels: int = 3) -> int:
    """FLOPs (2 × :func:`count_macs`) of one eval-mode forward pass on a 1×in_channels×H×W input."""
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    try:
        return _count(_meta_copy(model), torch.zeros(1, in_channels, *input_hw, device="meta", dtype=dtype))
    except (NotImplementedError, RuntimeError):
        pass  # an op without a meta kernel: count on the real device instead
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    try:
        return _count(model, torch.zeros(1, in_channels, *input_hw, device=device, dtype=dtype))
    finally:
        model.train(was_training)


def count_macs(model: nn.Module, input_hw: tuple[int, int], in_channels: int = 3) -> int:
    """Multiply-accumulates of one eval-mode forward pass on a 1×in_channels×H×W input (see module docstring).

    ``input_hw`` is (height, width). The model is left as it was: the count runs on a storage-less copy.
    """
    return count_flops(model, input_hw, in_channels) // 2


def count_train_step_flops(model: nn.Module, objective, images: torch.Tensor, labels: torch.Tensor) -> int:
    """FLOPs of one training step of ``objective`` on this batch: everything its forward runs (the trained
    model in training mode, auxiliary heads included, and a frozen teacher's forward), plus the trained
    model's backward, counted as twice its forward (gradients for the inputs and for the weights, each a
    product as large as the forward's). The optimiser's update is not counted.

    The backward is not measured with the counter: torch's flop_counter counts a grouped convolution's
    backward as if it were dense (65x the forward for a depthwise 3x3 on 64 channels instead of 2x), which
    would inflate Fast-SCNN's figure about eightfold. Counted on a copy of the model with the random state
    restored (dropout), so the run's own BatchNorm statistics and random draws stay untouched.
    """
    copied = copy.deepcopy(model).train()
    devices = [images.device] if images.device.type == "cuda" else []

    def forward_flops(run) -> int:
        counter = FlopCounterMode(display=False, custom_mapping=dict.fromkeys(_BATCHNORM_OPS, _batchnorm_flops))
        with torch.random.fork_rng(devices=devices), torch.no_grad(), counter:
            run()
        return counter.get_total_flops()

    whole_forward = forward_flops(lambda: objective(copied, images, labels))
    trained_forward = forward_flops(lambda: copied(images))
    return whole_forward + 2 * trained_forward
