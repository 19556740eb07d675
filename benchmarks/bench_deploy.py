"""Which CPU deployment of a checkpoint is fastest at the same accuracy: latency, file size and mIoU of each path.

Paths, each at every size (batch 1, ``--threads`` threads):
- PyTorch eager (the model as trained, NCHW);
- PyTorch with BatchNorm folded and channels_last (what evaluate_efficiency.py times);
- torch.compile of that (its compile time is printed; ``--no-compile`` skips it);
- onnxruntime fp32 on the BN-folded ONNX export (what ``--export-onnx`` writes);
- onnxruntime int8, static quantization calibrated on real training images at the input size: QDQ and
  QOperator formats, weights per channel, with the classifier and the final ×8 upsampling of its 19 channels
  kept in fp32, and for comparison QDQ with every operator quantized.

mIoU is scored on the val split as evaluate_efficiency.py scores it (logits bilinearly upsampled to the full label
size, one confusion matrix), so each path's accuracy is comparable to the fp32 one of the same size::

    python benchmarks/bench_deploy.py --checkpoint checkpoints/demo_teacher/profile-2/best.pth --data-dir data/synthetic
    python benchmarks/bench_deploy.py --checkpoint best.pth --data-dir data/cityscapes --val-images 50 --sizes 2048x1024

The goal a deployed path must meet to be worth shipping: at most 0.25× the BN-folded channels_last PyTorch
latency at 2048×1024, with mIoU within 1 point of fp32. Latencies depend on the machine and its load: the run
prints the CPU and the load average beside the table.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastseg.augment import prepare_batch  # noqa: E402
from fastseg.cityscapes import list_samples, load_sample, read_label  # noqa: E402
from fastseg.deploy import export_onnx  # noqa: E402
from fastseg.engine import main_logits, upsample_logits  # noqa: E402
from fastseg.errors import UserError, run_cli  # noqa: E402
from fastseg.measure import prepare_for_speed  # noqa: E402
from fastseg.metrics import ConfusionMatrix  # noqa: E402
from fastseg.models import load_model  # noqa: E402

GOAL_SPEEDUP = 0.25  # a deployed path pays at <= this fraction of the BN-folded channels_last latency ...
GOAL_MIOU_POINTS = 1.0  # ... with mIoU within this many points of fp32


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint of this repo (best.pth) or a plain state_dict")
    p.add_argument("--data-dir", required=True, help="Cityscapes layout: val is scored, train calibrates int8")
    p.add_argument("--sizes", nargs="+", default=["2048x1024", "1024x512"], metavar="WxH")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of PyTorch and onnxruntime")
    p.add_argument("--runs", type=int, default=20, help="timed passes per latency")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--val-images", type=int, default=8, help="val images scored per path (0: all)")
    p.add_argument("--calibration-images", type=int, default=8, help="training images that calibrate int8")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="also torch.compile")
    p.add_argument("--work-dir", default=None, help="where the ONNX files go (default: a temporary folder)")
    args = p.parse_args(argv)
    args.sizes = [_size(s) for s in args.sizes]
    return args


def _size(text: str) -> tuple[int, int]:
    """``WxH`` -> (H, W)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--sizes {text}: expected WxH such as 2048x1024") from None
    return height, width


# --------------------------------------------------------------------------------------------------
# Data: the evaluation's input and labels, and calibration batches


def val_set(data_dir: str, hw: tuple[int, int], limit: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(normalised 1×3×H×W image at ``hw``, full-size train-id label) per val image: the evaluation's pairs."""
    samples = list_samples(data_dir, "val")
    pairs = []
    for sample in samples[:limit] if limit else samples:
        image, _ = load_sample(sample, hw)
        label = torch.from_numpy(read_label(sample.label)).long()
        x, _ = prepare_batch(image[None], label[None], "cpu", train=False)
        pairs.append((x, label))
    return pairs


def calibration_batches(data_dir: str, hw: tuple[int, int], count: int) -> list[np.ndarray]:
    """Training images at the input size, normalised as in training: what int8 ranges are calibrated on."""
    samples = list_samples(data_dir, "train")
    step = max(1, len(samples) // count)  # spread over the split rather than the first city's frames
    batches = []
    for sample in samples[::step][:count]:
        image, label = load_sample(sample, hw)
        x, _ = prepare_batch(image[None], label[None], "cpu", train=False)
        batches.append(x.numpy())
    return batches


# --------------------------------------------------------------------------------------------------
# Paths


def onnx_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def final_nodes(path: Path) -> list[str]:
    """The node that makes the graph's output (the ×8 bilinear upsampling) and the one that feeds it (the 1×1
    conv to the classes): the two that int8 would hurt most for least gain."""
    import onnx

    graph = onnx.load(str(path)).graph
    producer = {out: node for node in graph.node for out in node.output}
    last = producer[graph.output[0].name]
    before = producer[last.input[0]]
    return [last.name, before.name]


def quantize_int8(fp32: Path, out: Path, calibration: list[np.ndarray], fmt: str, keep_final_fp32: bool) -> Path:
    """Static int8 quantization with onnxruntime: per-channel int8 weights, uint8 activations, MinMax ranges
    from the calibration batches; ``fmt`` is ``QDQ`` or ``QOperator``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calibration)

        def get_next(self):
            item = next(self.items, None)
            return None if item is None else {"image": item}

    prepared = out.with_name(out.stem + "_pre.onnx")
    quant_pre_process(str(fp32), str(prepared))
    quantize_static(
        str(prepared), str(out), Reader(),
        quant_format=QuantFormat.QDQ if fmt == "QDQ" else QuantFormat.QOperator,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
        nodes_to_exclude=final_nodes(prepared) if keep_final_fp32 else [],
    )
    prepared.unlink()
    return out


def state_dict_bytes(model: torch.nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def build_paths(model, hw, work: Path, calibration, threads: int, compile_model: bool):
    """``(name, forward(x) -> logits, file bytes, note)`` for every path at input size ``hw``."""
    folded, _ = prepare_for_speed(model, fold_bn=True, channels_last=True)
    to_cl = lambda x: x.contiguous(memory_format=torch.channels_last)  # noqa: E731
    paths = [
        ("PyTorch eager", lambda x: main_logits(model(x)), state_dict_bytes(model), ""),
        ("PyTorch BN-folded channels_last", lambda x: folded(to_cl(x)), state_dict_bytes(folded), ""),
    ]
    if compile_model:
        compiled = torch.compile(folded)
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                compiled(to_cl(torch.zeros(1, 3, *hw)))
            note = f"compile {time.perf_counter() - start:.0f} s"
            paths.append(("torch.compile (BN-folded, CL)", lambda x: compiled(to_cl(x)), state_dict_bytes(folded), note))
        except Exception as exc:  # report, keep the other paths
            print(f"torch.compile failed at {hw}: {type(exc).__name__}: {exc}", file=sys.stderr)
    h, w = hw
    fp32 = export_onnx(model, hw, work / f"fast_scnn_{w}x{h}.onnx")
    paths.append(("onnxruntime fp32", onnx_session(fp32, threads), fp32.stat().st_size, ""))
    for fmt, keep, label in (
        ("QDQ", True, "onnxruntime int8 QDQ, classifier+upsample fp32"),
        ("QOperator", True, "onnxruntime int8 QOperator, classifier+upsample fp32"),
        ("QDQ", False, "onnxruntime int8 QDQ, all ops"),
    ):
        name = f"fast_scnn_{w}x{h}_int8_{fmt.lower()}{'' if keep else '_all'}.onnx"
        start = time.perf_counter()
        path = quantize_int8(fp32, work / name, calibration, fmt, keep)
        note = f"calibration {time.perf_counter() - start:.0f} s"
        paths.append((label, onnx_session(path, threads), path.stat().st_size, note))
    return paths


# --------------------------------------------------------------------------------------------------
# Measuring


@torch.inference_mode()
def score(forward, pairs) -> float:
    cm = ConfusionMatrix(19)
    for x, label in pairs:
        logits = upsample_logits(forward(x).float(), label.shape[-2:])
        cm.update(label[None], logits.argmax(1))
    return float(cm.compute()["miou"])


@torch.inference_mode()
def latencies(forwards: list, x: torch.Tensor, runs: int, warmup: int) -> list[tuple[float, float]]:
    """(median, p90) ms of each forward at batch 1. The paths take turns, one pass each per round, so that a
    machine whose load changes during the run slows them all alike rather than whichever ran then."""
    for forward in forwards:
        for _ in range(warmup):
            forward(x)
    times: list[list[float]] = [[] for _ in forwards]
    for _ in range(runs):
        for forward, kept in zip(forwards, times):
            start = time.perf_counter()
            forward(x)
            kept.append((time.perf_counter() - start) * 1e3)
    return [(float(np.median(t)), float(np.percentile(t, 90))) for t in times]


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.checkpoint, "cpu", flag="--checkpoint")
    cpu = platform.processor() or platform.machine()
    print(f"{args.checkpoint}: {cpu}, {os.cpu_count()} cores, {args.threads} threads, torch {torch.__version__}; "
          f"load average at start {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for hw in args.sizes:
            pairs = val_set(args.data_dir, hw, args.val_images)
            calibration = calibration_batches(args.data_dir, hw, args.calibration_images)
            x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(0))
            paths = build_paths(model, hw, work, calibration, args.threads, args.compile)
            timed = latencies([forward for _, forward, _, _ in paths], x, args.runs, args.warmup)
            for (name, forward, nbytes, note), (median, p90) in zip(paths, timed):
                rows.append({"size": f"{hw[1]}x{hw[0]}", "path": name, "ms": median, "p90": p90,
                             "mb": nbytes / 2**20, "miou": score(forward, pairs), "note": note})
                print(f"  {rows[-1]['size']} {name}: {median:.1f} ms, mIoU {100 * rows[-1]['miou']:.2f}",
                      file=sys.stderr, flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}; val images scored: {len(pairs)}\n")
    print("| input W×H | path | latency ms (median) | p90 ms | × BN-folded CL | file MB | mIoU % | Δ mIoU vs fp32 | note |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for size in dict.fromkeys(r["size"] for r in rows):
        group = [r for r in rows if r["size"] == size]
        base = next(r for r in group if r["path"] == "PyTorch BN-folded channels_last")
        fp32 = next(r for r in group if r["path"] == "PyTorch eager")
        for r in group:
            print(f"| {size} | {r['path']} | {r['ms']:.1f} | {r['p90']:.1f} | {r['ms'] / base['ms']:.2f} | "
                  f"{r['mb']:.2f} | {100 * r['miou']:.2f} | {100 * (r['miou'] - fp32['miou']):+.2f} | {r['note']} |")
    big = [r for r in rows if r["size"] == "2048x1024"]
    if big:
        base = next(r for r in big if r["path"] == "PyTorch BN-folded channels_last")
        fp32 = next(r for r in big if r["path"] == "PyTorch eager")
        paying = [r["path"] for r in big if r["ms"] <= GOAL_SPEEDUP * base["ms"]
                  and 100 * abs(r["miou"] - fp32["miou"]) <= GOAL_MIOU_POINTS]
        print(f"\npaths at <= {GOAL_SPEEDUP}x the BN-folded channels_last latency at 2048x1024 with mIoU within "
              f"{GOAL_MIOU_POINTS} point of fp32: {', '.join(paying) or 'none'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
