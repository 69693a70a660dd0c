"""Images/s of one full training step (denoiser update on L_diff + DCG update on cross-entropy) at the
paper config (224 px, C = 7, batch 8) and the digits config, and where the time goes.

    python benchmarks/train_step.py [--repeats 3]

The shares come from timing each part's forward and backward on its own; the hook counts show that the
image encoder runs once per step, not once per branch.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from diffmic.engine.optim import build_optimizer
from timing import REPO_CONFIGS, PartTimer, device_and_threads, model_for, timed

BATCH = {"paper (HAM10000, 224 px, C=7)": 8, "digits (64 px, C=10)": 32}


def one_step(model, optimizer, batch) -> None:
    optimizer.zero_grad(set_to_none=True)
    model(batch)["loss"].backward()
    optimizer.step()


def seconds(fn, repeats: int) -> float:
    fn()
    with timed() as clock:
        for _ in range(repeats):
            fn()
    return clock["seconds"] / repeats


def parts(model, batch, repeats: int) -> dict[str, float]:
    images, labels = batch["image"], batch["label"]

    def dcg():
        model.frozen_priors(images)
        F.cross_entropy(model.guidance(images).fused, labels).backward()

    def encoder():
        model.denoiser.encode(images).sum().backward()

    features = model.denoiser.encode(images).detach().repeat(model.noise_draws, 1)

    def denoiser_mlp():
        # The three branches' MLP passes of a step, on precomputed features.
        rows = features.shape[0]
        y_t, prior = torch.randn(rows, model.num_classes), torch.rand(rows, model.num_classes)
        t = torch.randint(1, model.timesteps + 1, (rows,))
        sum(model.denoiser(features, y_t, prior, t).square().mean() for _ in range(3)).backward()

    return {"DCG (priors + CE update)": seconds(dcg, repeats), "image encoder": seconds(encoder, repeats),
            "denoiser MLP (3 branches)": seconds(denoiser_mlp, repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {device_and_threads()}, fp32")
    for name, path in REPO_CONFIGS.items():
        model, config = model_for(path, device)
        model.train()
        optimizer = build_optimizer(model, config.train)
        size, batch_size = config.data.image_size, BATCH[name]
        batch = {"image": torch.randn(batch_size, 3, size, size, device=device),
                 "label": torch.randint(0, config.data.num_classes, (batch_size,), device=device)}
        counter = PartTimer({"encoder": model.denoiser.encoder, "guide": model.guide})
        step = seconds(lambda: one_step(model, optimizer, batch), args.repeats)
        calls = {k: v / (args.repeats + 1) for k, v in counter.calls.items()}
        counter.remove()
        shares = parts(model, batch, args.repeats)
        total = sum(shares.values())
        split = ", ".join(f"{part} {100 * s / total:.0f}%" for part, s in shares.items())
        print(f"{name:30s} batch {batch_size}: {batch_size / step:7.2f} images/s ({step:.2f} s/step); {split}; "
              f"per step: image encoder x{calls['encoder']:.0f}, DCG x{calls['guide']:.0f} "
              f"(frozen priors + CE update)", flush=True)


if __name__ == "__main__":
    main()
