"""Which recipe, and which schedule, train the better Fast-SCNN for the same training compute?

    python -m benchmarks.bench_recipes                    # all runs, resumable (time: docs/recipes.md)
    python -m benchmarks.bench_recipes --plot-only        # redraw the plot and table from the JSON

Synthetic street scenes (tools/synthetic.py, seed 7: none of the tests' or the demo's images), 64 train and
16 val at 1024x512, and the curriculum at half its linear scale: profile k resizes to half of profile k's
Cityscapes size and crops half its patch (profile 1: 288x144 -> 224x112 crops; profile 3: 512x256 -> 384x192).
Validation is at the labels' full 1024x512. Every run is ``python train.py`` with the recipe's defaults except
the batch (8) and the epochs; nothing here trains differently from what a user runs.

Two questions, three seeds each:

* recipes, at reduced profile 1 for ``--epochs-recipe`` epochs (one whole decay in the stage):
  ``adamw`` (the earlier runs: AdamW 1e-3, poly per stage, PyTorch init, no aux heads, no scale aug),
  ``paper`` (SGD 0.00375 x batch, poly, two aux heads, scale 0.5-2.0, PyTorch init) and ``paper`` with
  ``--init kaiming`` (He init, as mmsegmentation's Fast-SCNN starts);
* schedule: the curriculum (reduced profiles 1 -> 2 -> 3, ``--epochs-stage`` each, the recipe's decay) against
  one stage at reduced profile 3 from scratch with the same training compute, for ``--schedule-recipes``
  (by default ``paper`` and ``paper+kaiming-init``).

Each run's stages write their own ``metrics.jsonl`` under ``--work-dir``; a rerun resumes unfinished runs and
skips finished ones (train.py's own resume). The JSON (``--out``) is a list of runs, each with its ``recipe``,
``seed``, ``schedule`` and curve (epoch, profile, cumulative training TFLOP, val mIoU); the plot shows val
mIoU against training TFLOP, the mean over seeds as a line and min-max as a band. These are synthetic scenes:
the figures show how the mechanisms behave on small data, not what Cityscapes will give.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
# Half the curriculum's linear size: (resize, patch) of reduced profiles 1-3.
REDUCED = {1: ("288x144", "224x112"), 2: ("384x192", "288x144"), 3: ("512x256", "384x192")}
PATCH_PIXELS = {k: int(p.split("x")[0]) * int(p.split("x")[1]) for k, (_, p) in REDUCED.items()}
RECIPES = {  # name in the results -> train.py flags (the init named, so a later default cannot change a run)
    "adamw": ["--recipe", "adamw", "--init", "pytorch"],
    "paper": ["--recipe", "paper", "--init", "pytorch"],
    "paper+kaiming-init": ["--recipe", "paper", "--init", "kaiming"],
}


def plan(args) -> list[dict]:
    """Every run, seed-major: a partial benchmark already has whole seeds of everything."""
    baseline_epochs = round(sum(args.epochs_stage * PATCH_PIXELS[k] for k in (1, 2, 3)) / PATCH_PIXELS[3])
    runs = []
    for seed in SEEDS:
        for recipe in RECIPES:
            runs.append({"name": f"{recipe}-s{seed}", "recipe": recipe, "seed": seed, "schedule": "single",
                         "stages": [(1, args.epochs_recipe)]})
        for recipe in args.schedule_recipes:
            runs.append({"name": f"{recipe}-curriculum-s{seed}", "recipe": recipe, "seed": seed,
                         "schedule": "curriculum", "stages": [(k, args.epochs_stage) for k in (1, 2, 3)]})
            runs.append({"name": f"{recipe}-baseline-s{seed}", "recipe": recipe, "seed": seed,
                         "schedule": "baseline", "stages": [(3, baseline_epochs)]})
    return runs


def stage_command(run: dict, profile: int, epochs: int, args) -> list[str]:
    planned = [0] * 5
    for k, e in run["stages"]:
        planned[k - 1] = e
    resize, patch = REDUCED[profile]
    first = profile == run["stages"][0][0]
    return [sys.executable, str(REPO / "train.py"), *RECIPES[run["recipe"]], "--data-dir", str(args.data_dir),
            "--output-dir", str(args.work_dir), "--experiment-id", run["name"], "--profile", str(profile),
            "--resize", resize, "--patch", patch, "--curriculum-epochs", ",".join(map(str, planned)),
            "--epochs", str(epochs), "--batch-size", str(args.batch_size), "--seed", str(run["seed"]),
            "--previous-model-path", "none" if first else "auto", "--device", "cpu",
            "--num-workers", str(args.num_workers), "--wandb", "disabled", "--log-every", "1000000",
            "--cache-dir", str(args.work_dir / "cache")]


def init_of(recipe: str) -> str:
    flags = RECIPES[recipe]
    return flags[flags.index("--init") + 1]


def curve(run: dict, work_dir: Path) -> list[dict] | None:
    """The run's epochs across its stages, or None while a stage is unfinished. A stage in the work dir that
    was trained with another recipe or init than the run's name says (a work dir from an older version of
    this benchmark) stops the benchmark rather than being counted as this run."""
    points = []
    for profile, epochs in run["stages"]:
        stage = work_dir / run["name"] / f"profile-{profile}"
        if (stage / "config.json").is_file():
            config = json.loads((stage / "config.json").read_text())
            trained = (config.get("recipe"), config.get("init"))
            if trained != (RECIPES[run["recipe"]][1], init_of(run["recipe"])):
                sys.exit(f"{stage} was trained with recipe {trained[0]}, init {trained[1]}, not as "
                         f"{run['name']} is defined; move it away (or use another --work-dir) and rerun")
        path = stage / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        if len(records) < epochs:
            return None
        points += [{"profile": profile, "epoch": r["epoch"], "cum_train_tflop": r["cum_train_tflop"],
                    "val_miou": r["val_miou"], "lr": r["lr"], "epoch_s": r.get("epoch_s")}
                   for r in records[:epochs]]
    return points


def run_all(args) -> None:
    runs = plan(args)
    done = 0
    for i, run in enumerate(runs, 1):
        if curve(run, args.work_dir) is not None:
            done += 1
            continue
        print(f"[{i}/{len(runs)}] {run['name']}: stages {run['stages']}", flush=True)
        t0 = time.time()
        for profile, epochs in run["stages"]:
            cmd = stage_command(run, profile, epochs, args)
            proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout.splitlines():
                if line.startswith(("epoch ", "done:", "resumed")) or "Error" in line or "error" in line:
                    print(f"    p{profile} {line}", flush=True)
            if proc.returncode != 0:
                sys.exit(f"{run['name']} profile {profile} failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
        print(f"    {run['name']} finished in {time.time() - t0:.0f} s", flush=True)
        write_results(args)
    print(f"{done} runs were already complete", flush=True)


def write_results(args) -> list[dict]:
    results = []
    for run in plan(args):
        points = curve(run, args.work_dir)
        if points is not None:
            results.append({k: run[k] for k in ("name", "recipe", "seed", "schedule")}
                           | {"init": init_of(run["recipe"]), "flags": RECIPES[run["recipe"]],
                              "stages": [list(s) for s in run["stages"]], "curve": points})
    meta = {"data": f"tools/synthetic.py --seed 7, {args.train} train / {args.val} val at 1024x512",
            "profiles": {str(k): {"resize": r, "patch": p} for k, (r, p) in REDUCED.items()},
            "batch_size": args.batch_size, "epochs_recipe": args.epochs_recipe, "epochs_stage": args.epochs_stage,
            "command": "python -m benchmarks.bench_recipes", "runs": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, args.out)
    return results


def late_rise(miou: list[float]) -> float:
    """How far a curve still climbs at its end: the mean of its last 5 epochs minus the mean of the 5 epochs
    ending at 80% of the run (about 0 once it has flattened)."""
    mark = int(len(miou) * 0.8)
    return sum(miou[-5:]) / 5 - sum(miou[mark - 5:mark]) / 5


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (recipe, schedule): best and final val mIoU, mean and min-max over its seeds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["recipe"], run["schedule"]), []).append(run)
    rows = []
    for (recipe, schedule), members in groups.items():
        seconds = [sum(p.get("epoch_s") or 0.0 for p in r["curve"]) for r in members]
        rise = [late_rise([p["val_miou"] for p in r["curve"]]) for r in members]
        best = [max(p["val_miou"] for p in r["curve"]) for r in members]
        final = [r["curve"][-1]["val_miou"] for r in members]
        rows.append({"recipe": recipe, "schedule": schedule, "seeds": len(members),
                     "tflop": members[0]["curve"][-1]["cum_train_tflop"],
                     "best": (sum(best) / len(best), min(best), max(best)),
                     "final": (sum(final) / len(final), min(final), max(final)),
                     "train_s": (min(seconds), max(seconds)), "rise": sum(rise) / len(rise)})
    return rows


BUDGETS = (0.2, 0.4, 0.8, 1.2, 1.6)  # TFLOP: where the budget table reads each curve


def budget_table(runs: list[dict]) -> str:
    """Best val mIoU reached within each training budget, mean over a group's seeds (- past a run's end)."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(f"{run['recipe']} {run['schedule']}", []).append(run)
    lines = ["| TFLOP | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
    for budget in BUDGETS:
        cells = []
        for members in groups.values():
            best = [max((p["val_miou"] for p in r["curve"] if p["cum_train_tflop"] <= budget), default=0.0)
                    for r in members if r["curve"][-1]["cum_train_tflop"] >= budget * 0.98]
            cells.append(f"{100 * sum(best) / len(best):.1f}" if len(best) == len(members) else "-")
        lines.append(f"| {budget:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = ["| recipe | schedule | seeds | training TFLOP | best val mIoU, mean (min-max) | final val mIoU | "
             "rise over the last fifth | training s per run |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda v: f"{100 * v[0]:.1f} ({100 * v[1]:.1f}-{100 * v[2]:.1f})"  # noqa: E731
        lines.append(f"| {r['recipe']} | {r['schedule']} | {r['seeds']} | {r['tflop']:.1f} | {fmt(r['best'])} | "
                     f"{fmt(r['final'])} | {100 * r['rise']:+.1f} | {r['train_s'][0]:.0f}-{r['train_s'][1]:.0f} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    panels = {0: ("single", "Recipes at reduced profile 1"), 1: (("curriculum", "baseline"),
                                                                 "Curriculum 1->3 vs profile 3 from scratch")}
    for ax_index, (schedules, title) in panels.items():
        ax = axes[ax_index]
        groups: dict[str, list[dict]] = {}
        for run in runs:
            if run["schedule"] in (schedules if isinstance(schedules, tuple) else (schedules,)):
                label = run["recipe"] if run["schedule"] == "single" else f"{run['recipe']} {run['schedule']}"
                groups.setdefault(label, []).append(run)
        for label, members in sorted(groups.items()):
            n = min(len(r["curve"]) for r in members)
            x = [members[0]["curve"][i]["cum_train_tflop"] for i in range(n)]
            ys = [[r["curve"][i]["val_miou"] * 100 for r in members] for i in range(n)]
            # One colour per recipe in both panels; the baseline dashed beside its curriculum.
            colour = f"C{list(RECIPES).index(members[0]['recipe'])}"
            style = "--" if members[0]["schedule"] == "baseline" else "-"
            ax.plot(x, [sum(y) / len(y) for y in ys], style, color=colour, label=f"{label} ({len(members)} seeds)")
            ax.fill_between(x, [min(y) for y in ys], [max(y) for y in ys], color=colour, alpha=0.2)
        ax.set(title=title, xlabel="training compute (TFLOP)", ylabel="val mIoU (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Synthetic scenes at half the curriculum's scale (mechanisms, not Cityscapes figures)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", type=Path, default=REPO / "results" / "bench_recipes")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "bench_recipes.json")
    p.add_argument("--plot", type=Path, default=REPO / "docs" / "bench_recipes.png")
    p.add_argument("--train", type=int, default=64)
    p.add_argument("--val", type=int, default=16)
    p.add_argument("--epochs-recipe", type=int, default=50)
    p.add_argument("--epochs-stage", type=int, default=8)
    p.add_argument("--schedule-recipes", type=lambda text: text.split(","), default=["paper", "paper+kaiming-init"],
                   help="recipes of the curriculum-against-baseline runs, comma-separated, among "
                   f"{', '.join(RECIPES)} (default: paper,paper+kaiming-init)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--plot-only", action="store_true",
                   help="redraw the plot and print the tables from --out (the committed JSON); trains nothing")
    args = p.parse_args(argv)
    unknown = [name for name in args.schedule_recipes if name not in RECIPES]
    if unknown:
        p.error(f"--schedule-recipes: unknown {', '.join(unknown)}; choose among {', '.join(RECIPES)}")
    args.work_dir = args.work_dir.resolve()
    args.data_dir = args.work_dir / "data"
    if not args.plot_only:
        t0 = time.time()
        subprocess.run([sys.executable, str(REPO / "tools" / "synthetic.py"), str(args.data_dir), "--train",
                        str(args.train), "--val", str(args.val), "--width", "1024", "--height", "512", "--seed", "7"],
                       check=True)
        run_all(args)
        print(f"benchmark time this call: {(time.time() - t0) / 60:.1f} min", flush=True)
        runs = write_results(args)
    elif args.out.is_file():
        runs = json.loads(args.out.read_text())["runs"]
    else:
        sys.exit(f"--plot-only: {args.out} does not exist; run the benchmark first (without --plot-only)")
    plot(runs, args.plot)
    print(table(summarise(runs)))
    print("\nbest val mIoU (%) within each training budget, mean over seeds:")
    print(budget_table(runs))
    print(f"wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
