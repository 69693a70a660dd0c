"""Does bf16 training change what is learned? Trains the same digits run (same shards, seed and budget) with
`train.mixed_precision=no` (fp32) and `=bf16`, then compares the loss curves step by step, the test metrics
of the last checkpoint (evaluated in fp32, so only training differs) and the training time. A third run, fp32
with the next seed, gives the scale: how far two fp32 runs that differ only in their seed already drift.

    python benchmarks/train_precision.py [--variant full] [--epochs 4] [--size 32] [--seed 0] [--work-dir DIR]

On a CPU, bf16 autocasts only with avx512_bf16 or AMX (the first line says whether this one has them);
elsewhere both runs are fp32 and the comparison is trivially equal. `train.mixed_precision: bf16` is the
default because this matched fp32 on a digits run (README, Performance). The loss curves are also drawn to
DIR/loss_fp32_vs_bf16.png.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from learn_digits import REPO, run

TERMS = ("loss", "mse", "mmd", "dcg_loss")
METRICS = ("accuracy", "macro_f1", "auroc_macro_ovr", "dcg_accuracy")


def train_and_evaluate(shards: Path, run_dir: Path, precision: str, seed: int, args) -> dict:
    overrides = [f"model.variant={args.variant}", f"data.image_size={args.size}", "train.val_every=0",
                 f"train.epochs={args.epochs}", "train.log_every=1", "data.num_workers=0",
                 f"train.mixed_precision={precision}", f"train.seed={seed}"]
    started = time.perf_counter()
    run("train", "--config", args.config, "--shards", str(shards), "--run-dir", str(run_dir), "--no-progress",
        *[item for override in overrides for item in ("--set", override)])
    seconds = time.perf_counter() - started
    run("eval", "--run", str(run_dir), "--checkpoint", "last", "--precision", "fp32", "--out",
        str(run_dir / "eval"), "--no-progress")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "phase" in row]
    return {"seconds": seconds, "rows": steps, "metrics": json.loads((run_dir / "eval" / "metrics.json").read_text()),
            "ran_as": ran_as(run_dir)}


def ran_as(run_dir: Path) -> str:
    """The precision the trainer resolved (bf16 asked for on a CPU without it runs fp32, "no")."""
    resolved = json.loads((run_dir / "run.json").read_text())["mixed_precision"]
    return "fp32" if resolved == "no" else resolved


def compare(reference: dict, other: dict, name: str) -> None:
    """`other` against the fp32 run: each loss term step by step, then the test metrics."""
    assert [r["step"] for r in reference["rows"]] == [r["step"] for r in other["rows"]], "different steps logged"
    print(f"{name} against fp32:")
    for term in TERMS:
        a = np.array([r.get(term, np.nan) for r in reference["rows"]], dtype=float)
        b = np.array([r.get(term, np.nan) for r in other["rows"]], dtype=float)
        both = ~np.isnan(a) & ~np.isnan(b)
        if not both.any():
            continue
        a, b = a[both], b[both]
        last = max(1, len(a) // 5)
        print(f"  {term:9s} mean over steps {a.mean():.4f} -> {b.mean():.4f}; last fifth {a[-last:].mean():.4f} -> "
              f"{b[-last:].mean():.4f}; median |difference| / fp32 per step "
              f"{np.median(np.abs(b - a) / np.maximum(np.abs(a), 1e-12)):.3f}")
    for key in METRICS:
        a, b = reference["metrics"].get(key), other["metrics"].get(key)
        if a is not None and b is not None:
            print(f"  test {key:16s} {a:.4f} -> {b:.4f} ({b - a:+.4f})")
    print(f"  training seconds {reference['seconds']:.0f} -> {other['seconds']:.0f} "
          f"({reference['seconds'] / other['seconds']:.2f}x faster); ran as {other['ran_as']}")


def draw(results: dict[str, dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = [t for t in TERMS if any(t in r for r in results["fp32"]["rows"])]
    fig, axes = plt.subplots(1, len(terms), figsize=(4 * len(terms), 3.2), squeeze=False)
    styles = {"fp32": "-", "bf16": "--", "fp32, next seed": ":"}
    for ax, term in zip(axes[0], terms):
        for name, result in results.items():
            points = [(r["step"], r[term]) for r in result["rows"] if term in r]
            ax.plot(*zip(*points), styles[name], label=name, linewidth=1.2)
        ax.set_title(term)
        ax.set_xlabel("step")
        ax.legend()
    fig.suptitle("digits training: bf16 autocast and an fp32 run with the next seed, against fp32 (same shards "
                 "and budget)")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="full")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default=str(REPO / "configs" / "digits.yaml"))
    parser.add_argument("--work-dir", type=Path, default=None, help="keep shards, runs and the plot here")
    args = parser.parse_args()

    from diffmic.accelerator import inference_precision

    from timing import device_and_threads

    native = inference_precision("auto") == "bf16"  # the device's native bf16, as diffmic decides it
    print(f"device: {device_and_threads()}; native bf16: {native}; precisions compared: fp32, bf16")
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        shards = work / "digits"
        if not (shards / "manifest.json").is_file():
            run("shard", "--dataset", "digits", "--out", str(shards), "--size", str(args.size), "--test-fraction",
                "0.3", "--val-fraction", "0", "--seed", "0")
        runs = {"fp32": ("no", args.seed), "bf16": ("bf16", args.seed), "fp32, next seed": ("no", args.seed + 1)}
        results = {name: train_and_evaluate(shards, work / name.replace(", ", "-").replace(" ", "-"), precision, seed,
                                            args) for name, (precision, seed) in runs.items()}
        print(f"{args.variant}, {args.epochs} epochs at {args.size} px, {len(results['fp32']['rows'])} logged steps")
        for name in ("bf16", "fp32, next seed"):
            compare(results["fp32"], results[name], name)
        if args.work_dir:
            draw(results, work / "loss_fp32_vs_bf16.png")
            print(f"loss curves: {work / 'loss_fp32_vs_bf16.png'}")


if __name__ == "__main__":
    main()
