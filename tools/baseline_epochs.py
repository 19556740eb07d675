"""Epochs of one full-resolution stage that cost the same training compute as the curriculum's stages.

``submit_curriculum.sh --baseline`` runs it to size the A/B job: the curriculum (profiles 1..k) against one
stage at profile k from scratch with a whole decay, on the same budget. A stage's compute is its epochs times
the FLOPs of a training step at its crop size (same images and batch at every profile); the ratio between
profiles is taken from the model's forward pass at each crop size, which scales like its backward.

    python tools/baseline_epochs.py --profiles 1 2 3 4 5 -- --curriculum-epochs 40,30,20,15,10
    python tools/baseline_epochs.py --profiles 1 2 3 -- --epochs 50         # 50 epochs at each of profiles 1-3

Prints the number of epochs. The pass-through arguments are train.py's; its constants fill the rest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402
from fastseg.config import build_parser, stage_profile  # noqa: E402
from fastseg.errors import run_cli  # noqa: E402
from fastseg.flops import count_flops  # noqa: E402
from fastseg.models import build_model  # noqa: E402


def baseline_epochs(stage_epochs: dict[int, int], step_flops: dict[int, int], baseline_profile: int) -> int:
    """Epochs at ``baseline_profile`` whose compute equals the stages' (``profile -> epochs``), at least 1."""
    budget = sum(epochs * step_flops[k] for k, epochs in stage_epochs.items())
    return max(1, round(budget / step_flops[baseline_profile]))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profiles", type=int, nargs="+", required=True, help="the curriculum's stages, ascending")
    own = p.parse_args(argv[:split])
    args = build_parser(train.__doc__, train.constants()).parse_args(argv[split + 1 :])
    model = build_model(args.arch, width_mult=args.width_mult)
    flops = {k: count_flops(model, stage_profile(k, args.resize, args.patch).patch_hw) for k in own.profiles}
    epochs = {k: args.epochs if args.epochs is not None else args.curriculum_epochs[k - 1] for k in own.profiles}
    print(baseline_epochs(epochs, flops, own.profiles[-1]))
    return 0


if __name__ == "__main__":
    run_cli(main)
