"""Does bf16 inference change the answers? Evaluates trained runs in fp32 and in bf16 (same seeds, so the same
noise) and prints, per run, the share of test images whose predicted class agrees, how far each metric
moves, and images/s of both in this one process.

    python benchmarks/precision_agreement.py RUN [RUN ...] [--checkpoint last] [--steps N] [--n-samples N]

eval.precision's default (auto: bf16 where the device has native bf16) was taken because this measured
>= 99.5% agreement and every metric within 0.005 on the digits test split; bf16 needs avx512_bf16 or AMX on
a CPU (the line it prints says whether this CPU has it: without, "bf16" runs fp32 and agrees trivially).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

METRICS = ("accuracy", "macro_f1", "auroc_macro_ovr", "kappa_quadratic", "ece", "dcg_accuracy")


def evaluate(run: Path, checkpoint: str, precision: str, steps: int | None, n_samples: int | None, out: Path):
    from diffmic.checkpoint import find_checkpoint
    from diffmic.evaluation.runner import evaluate_run
    from diffmic.evaluation.settings import resolve_eval_settings

    settings = resolve_eval_settings(find_checkpoint(run, checkpoint).config, steps=steps, n_samples=n_samples,
                                     precision=precision)
    return evaluate_run(run, checkpoint, "test", settings, out_dir=out, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--checkpoint", default="last")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--n-samples", type=int, default=None)
    args = parser.parse_args()

    import torch

    from diffmic.hardware import cpu_has_native_bf16, cpu_info

    print(f"{cpu_info()[0]}; native bf16: {cpu_has_native_bf16()}; {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as scratch:
        for run in args.runs:
            results = {p: evaluate(run, args.checkpoint, p, args.steps, args.n_samples, Path(scratch) / p)
                       for p in ("fp32", "bf16")}
            full, half = results["fp32"], results["bf16"]
            agree = float(np.mean(full.predictions.predicted == half.predictions.predicted))
            print(f"{run}: {full.metrics['sampler']} x {full.metrics['steps']} steps, "
                  f"{full.metrics['n_samples']} chain(s), {len(full.predictions.keys)} test images, "
                  f"bf16 ran as {half.metrics['precision']}")
            print(f"  labels agree: {agree:.2%}")
            for key in METRICS:
                a, b = full.metrics.get(key), half.metrics.get(key)
                if a is not None and b is not None:
                    print(f"  {key:16s} fp32 {a:.4f}  bf16 {b:.4f}  moved {b - a:+.4f}")
            speed = half.metrics["images_per_s"] / full.metrics["images_per_s"]
            print(f"  images/s        fp32 {full.metrics['images_per_s']:.1f}  bf16 {half.metrics['images_per_s']:.1f}"
                  f"  ({speed:.2f}x)")


if __name__ == "__main__":
    main()
