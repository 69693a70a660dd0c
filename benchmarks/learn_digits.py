"""Proof that DiffMIC learns on real images that ship offline: each ablation of the paper's Table 2
(basic, c1, c2, full) trained on scikit-learn's digits with the same budget, then scored on a seeded,
stratified 30% test split.

    python benchmarks/learn_digits.py [--variants full,c2] [--epochs 6] [--size 64]
    python benchmarks/learn_digits.py --demo [--seeds 3] [--threads 2] [--set KEY=VALUE ...] [--json FILE]
    python benchmarks/learn_digits.py --test-run [--seeds 3] [--threads 1]

Prints one line per ablation ending `accuracy=<float> f1=<float>`.

`--demo` runs what `make demo` runs, the figure users see first: 64 px digits with the default split (a
validation split picks the best checkpoint), configs/digits.yaml, two evaluating processes, once per
training seed (0, 1, ...), then the mean and sample standard deviation. `--threads` sets each training's
intra-op threads (OMP_NUM_THREADS): the result depends on it, since the order of a convolution's sums does,
and at this budget that order moves the test accuracy by several points (README, quickstart).

`--test-run` is `--demo` at the reduced budget of tests/test_learning.py (32 px and the settings defined
here), which runs make demo so and asserts floors on its accuracy: this measures the figures the floors stand
on, and the time, which the test never asserts (a busy machine stretches it while nothing is wrong).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# tests/test_learning.py's run: make demo at a reduced budget. 32 px digits (the 8x8 scans lose nothing) keep the
# three ResNets cheap; one DCG warm-up epoch, three joint ones, 48 noise draws per image for the denoiser, one
# validation and checkpoint at the end (make demo evaluates the best one); the rest is configs/digits.yaml and
# make demo's split and evaluation.
TEST_RUN_SIZE = 32
TEST_RUN_SETTINGS = ["model.dcg.k=1", "train.dcg_warmup_epochs=1", "train.epochs=3",
                     "train.val_every=3", "train.checkpoint_every=10", "data.num_workers=0", "diffusion.noise_draws=48",
                     "train.lr=0.006", "eval.n_samples=10"]


def run(*args: str, threads: int | None = None) -> None:
    environment = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    result = subprocess.run([sys.executable, "-m", "diffmic", *args], cwd=REPO, capture_output=True, text=True,
                            env=environment)
    if result.returncode:
        sys.exit(f"diffmic {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="basic,c1,c2,full")
    parser.add_argument("--epochs", type=int, default=None, help="joint epochs (default: configs/digits.yaml)")
    parser.add_argument("--size", type=int, default=64, help="image size in px (64: make demo's)")
    parser.add_argument("--config", default=str(REPO / "configs" / "digits.yaml"))
    parser.add_argument("--test-run", action="store_true", help="--demo at tests/test_learning.py's budget")
    parser.add_argument("--demo", action="store_true", help="make demo's shards, config and evaluation, per seed")
    parser.add_argument("--seeds", type=seed_list, default=seed_list("3"),
                        help="--demo: N for the training seeds 0..N-1, or a list such as 1,2")
    parser.add_argument("--threads", type=int, default=None, help="--demo: OMP_NUM_THREADS of each training "
                        "(default: torch's own choice, one per core)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="--demo: config override")
    parser.add_argument("--json", type=Path, help="--demo: also write every seed's figures here")
    args = parser.parse_args()
    if args.test_run:  # tests/test_learning.py's run, one seed unless told otherwise
        seeds = args.seeds if "--seeds" in sys.argv else [0]
        demo_seeds(args.config, TEST_RUN_SIZE, seeds, args.threads, [*TEST_RUN_SETTINGS, *args.overrides], args.json)
        return
    if args.demo:
        demo_seeds(args.config, args.size, args.seeds, args.threads, args.overrides, args.json)
        return
    with tempfile.TemporaryDirectory() as scratch:
        shards = Path(scratch) / "digits"
        # 70/30 stratified split (seed 0) and no validation split: the same budget for every ablation,
        # scored once on the test split with the last checkpoint.
        run("shard", "--dataset", "digits", "--out", str(shards), "--size", str(args.size), "--test-fraction", "0.3",
            "--val-fraction", "0", "--seed", "0")
        for variant in args.variants.split(","):
            run_dir = Path(scratch) / variant
            overrides = [f"model.variant={variant}", "train.val_every=0", f"data.image_size={args.size}"]
            if args.epochs is not None:
                overrides.append(f"train.epochs={args.epochs}")
            started = time.perf_counter()
            run("train", "--config", args.config, "--shards", str(shards), "--run-dir", str(run_dir), "--no-progress",
                *[item for override in overrides for item in ("--set", override)])
            trained = time.perf_counter() - started
            run("eval", "--run", str(run_dir), "--checkpoint", "last", "--out", str(run_dir / "eval"), "--no-progress")
            metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
            total = time.perf_counter() - started
            print(f"{variant:5s} train_s={trained:.0f} total_s={total:.0f} dcg_accuracy={metrics['dcg_accuracy']:.4f} "
                  f"accuracy={metrics['accuracy']:.4f} f1={metrics['macro_f1']:.4f}", flush=True)


DEMO_FIGURES = ("accuracy", "macro_f1", "dcg_accuracy", "checkpoint_step")


def seed_list(text: str) -> list[int]:
    """"3" is the seeds 0, 1, 2; "1,2" (or "2," for one) names them."""
    return [int(seed) for seed in text.split(",") if seed] if "," in text else list(range(int(text)))


def demo_seeds(config: str, size: int, seeds: list[int], threads: int | None, overrides: list[str],
               json_path: Path | None) -> None:
    """`make demo`'s three commands (shard with the default split at `size` px, train, evaluate the best
    checkpoint with two processes) once per training seed."""
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        shards = Path(scratch) / "digits"
        run("shard", "--dataset", "digits", "--out", str(shards), "--size", str(size))
        for seed in seeds:
            run_dir = Path(scratch) / f"seed-{seed}"
            settings = [f"train.seed={seed}", f"data.image_size={size}", *overrides]
            started = time.perf_counter()
            run("train", "--config", config, "--shards", str(shards), "--run-dir", str(run_dir), "--no-progress",
                *[item for setting in settings for item in ("--set", setting)], threads=threads)
            trained = time.perf_counter() - started
            run("eval", "--run", str(run_dir), "--out", str(run_dir / "eval" / "test"), "--gpus", "0",
                "--tasks-per-node", "2", "--no-progress")
            metrics = json.loads((run_dir / "eval" / "test" / "metrics.json").read_text())
            rows.append({"seed": seed, "threads": threads, "train_s": trained,
                         **{key: metrics[key] for key in DEMO_FIGURES}})
            print(f"demo seed={seed} threads={threads or 'default'} train_s={trained:.0f} "
                  + " ".join(f"{key}={metrics[key]:.4f}" for key in DEMO_FIGURES[:3])
                  + f" best_step={metrics['checkpoint_step']}", flush=True)
            if json_path:  # after every seed, so that an interrupted measurement keeps what it has
                json_path.write_text(json.dumps({"overrides": overrides, "runs": rows}, indent=2))
    for key in DEMO_FIGURES[:3]:
        values = [row[key] for row in rows]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{key}: mean {statistics.mean(values):.4f} ± {spread:.4f} (min {min(values):.4f}, max "
              f"{max(values):.4f}, {len(values)} seeds)")


if __name__ == "__main__":
    main()
