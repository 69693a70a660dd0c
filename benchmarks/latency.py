"""Warm `DiffMIC.predict` latency, eager against one compiled reverse step (`eval.compile`, `--compile`).

What a clinician waits for: one 224 px image at T = 250 reverse steps (and a small batch beside it), the paper
config with random weights, measured warm: one untimed call first (it pays the compile), then the median of
--repeats calls. Per precision it prints ms per image, the compiled speed-up, the compile seconds and how far
the compiled chain's y_0 lies from the eager one's (same noise) and whether the labels agree.

    python benchmarks/latency.py [--batch 1,8] [--steps 250] [--repeats 3] [--precision fp32,bf16]

On a GPU the compiled step is also a CUDA graph; there the reverse loop is launch-bound and the gain is the
point. On a CPU it is only the frozen bf16 weights and the fused update.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffmic.accelerator import inference_precision
from diffmic.evaluation.settings import resolve_eval_settings

from timing import REPO_CONFIGS, device_and_threads, model_for, timed

PAPER = "paper (HAM10000, 224 px, C=7)"


def median_seconds(call, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        with timed() as box:
            call()
        runs.append(box["seconds"])
    return statistics.median(runs)


def measure(model, config, device, batch: int, steps: int, repeats: int, bf16: bool) -> dict:
    sampling = resolve_eval_settings(config, steps=steps, sampler="respaced", n_samples=1)
    generator = torch.Generator().manual_seed(batch)
    images = torch.randn(batch, 3, config.data.image_size, config.data.image_size, generator=generator).to(device)
    noise = torch.randn(steps + 1, batch, config.data.num_classes, generator=generator).to(device)
    predict = lambda: model.predict(images, sampling, noise=noise)  # noqa: E731
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        model.compiled_step = None
        eager = predict()
        eager_s = median_seconds(predict, repeats)
        model.compile_sampling(device)
        with timed() as first:
            compiled = predict()
        compiled_s = median_seconds(predict, repeats)
    model.compiled_step = None
    return {"eager_ms": 1000 * eager_s / batch, "compiled_ms": 1000 * compiled_s / batch,
            "compile_s": first["seconds"] - compiled_s, "y0_diff": (eager.y0 - compiled.y0).abs().max().item(),
            "y0_scale": eager.y0.abs().max().item(), "agree": (eager.label == compiled.label).float().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="fp32,bf16",
                        help="comma-separated; bf16 is skipped where the device lacks native bf16")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precisions = [p for p in args.precision.split(",") if p == "fp32" or inference_precision("auto") == "bf16"]
    model, config = model_for(REPO_CONFIGS[PAPER], device)
    model.eval()
    print(f"device: {device_and_threads()}")
    print(f"{PAPER}, T={args.steps}, one chain per image, warm, median of {args.repeats}")
    print(f"{'precision':<10}{'batch':>6}{'eager ms/img':>14}{'compiled ms/img':>17}{'speed-up':>10}"
          f"{'compile s':>11}{'max |dy0|':>11}{'of |y0|':>9}{'labels':>8}")
    for precision in precisions:
        for batch in map(int, args.batch.split(",")):
            row = measure(model, config, device, batch, args.steps, args.repeats, precision == "bf16")
            print(f"{precision:<10}{batch:>6}{row['eager_ms']:>14.1f}{row['compiled_ms']:>17.1f}"
                  f"{row['eager_ms'] / row['compiled_ms']:>9.2f}x{row['compile_s']:>11.1f}{row['y0_diff']:>11.2g}"
                  f"{row['y0_scale']:>9.2g}{row['agree']:>8.0%}")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"({time.perf_counter() - started:.0f} s)")
