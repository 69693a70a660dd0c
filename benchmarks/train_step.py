"""Images/s of one full training step (denoiser update on L_diff + DCG update on cross-entropy, gradient
clipping, Adam and the denoiser's EMA, as the trainer does) at the paper config (224 px, C = 7, batch 8)
and the digits config, and where the time goes.

    python benchmarks/train_step.py [--repeats 3] [--batch 64 --amp bf16]   (the last two for a GPU)

The shares come from timing each part's forward and backward on its own; the hook counts show that the
image encoder runs once per step, not once per branch.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from diffmic.engine.optim import ExponentialMovingAverage, build_optimizer, clip_group_gradients

from timing import (
    REPO_CONFIGS,
    PartTimer,
    add_device_options,
    autocast,
    batch_for,
    device_and_threads,
    model_for,
    synthetic_batch,
    timed,
)

BATCH = {"paper (HAM10000, 224 px, C=7)": 8, "digits (64 px, C=10)": 32}


def one_step(model, optimizer, ema, batch, precision) -> None:
    """What the trainer does per step: forward, backward, per-group clipping, Adam, the denoiser's EMA."""
    optimizer.zero_grad(set_to_none=True)
    with precision:  # autocast around the forward only, as Accelerate does (fp16 is timed without loss scaling)
        loss = model(batch)["loss"]
    loss.backward()
    clip_group_gradients(optimizer)
    optimizer.step()
    ema.update(model.denoiser)


def seconds(fn, repeats: int) -> float:
    fn()
    with timed() as clock:
        for _ in range(repeats):
            fn()
    return clock["seconds"] / repeats


def parts(model, batch, repeats: int, precision) -> dict[str, float]:
    images, labels = batch["image"], batch["label"]

    device = images.device

    def dcg():
        with precision:
            model.frozen_priors(images)
            loss = F.cross_entropy(model.guidance(images).fused, labels)
        loss.backward()

    def encoder():
        with precision:
            total = model.denoiser.encode(images).float().sum()
        total.backward()

    with precision:
        features = model.denoiser.encode(images).detach().repeat(model.noise_draws, 1)

    def denoiser_mlp():
        # The three branches' MLP passes of a step, on precomputed features.
        rows = features.shape[0]
        y_t = torch.randn(rows, model.num_classes, device=device)
        prior = torch.rand(rows, model.num_classes, device=device)
        t = torch.randint(1, model.timesteps + 1, (rows,), device=device)
        with precision:
            loss = sum(model.denoiser(features, y_t, prior, t).float().square().mean() for _ in range(3))
        loss.backward()

    return {"DCG (priors + CE update)": seconds(dcg, repeats), "image encoder": seconds(encoder, repeats),
            "denoiser MLP (3 branches)": seconds(denoiser_mlp, repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    add_device_options(parser)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {device_and_threads(args)}")
    for name, path in REPO_CONFIGS.items():
        model, config = model_for(path, device, args)
        model.train()
        optimizer = build_optimizer(model, config.train)
        ema = ExponentialMovingAverage(model.denoiser, config.train.ema_rate)
        batch_size = batch_for(name, BATCH, args)
        batch = synthetic_batch(batch_size, config.data.image_size, config.data.num_classes, device)
        counter = PartTimer({"encoder": model.denoiser.encoder, "dcg": model.dcg})
        step = seconds(lambda: one_step(model, optimizer, ema, batch, autocast(args, device)), args.repeats)
        calls = {k: v / (args.repeats + 1) for k, v in counter.calls.items()}
        counter.remove()
        shares = parts(model, batch, args.repeats, autocast(args, device))
        total = sum(shares.values())
        split = ", ".join(f"{part} {100 * s / total:.0f}%" for part, s in shares.items())
        print(f"{name:30s} batch {batch_size}: {batch_size / step:7.2f} images/s ({step:.2f} s/step); {split}; "
              f"per step: image encoder x{calls['encoder']:.0f}, DCG x{calls['dcg']:.0f} "
              f"(frozen priors + CE update)", flush=True)


if __name__ == "__main__":
    main()
