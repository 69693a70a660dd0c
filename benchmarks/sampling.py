"""Images/s of `DiffMIC.predict` for 10, 100 and 1000 reverse steps, split into the seconds spent in
the image encoder + guidance model (once per image) and in the reverse steps (the denoiser's MLP only).

    python benchmarks/sampling.py [--steps 10,100,1000] [--repeats 2] [--batch 256 --amp bf16]   (the last two for a GPU)

The encoder + DCG seconds should stay flat as the steps grow; the reverse seconds grow by about one
small MLP pass per step.
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext

import torch

from diffmic.evaluation.settings import resolve_eval_settings

from timing import (
    REPO_CONFIGS,
    PartTimer,
    add_device_options,
    autocast,
    batch_for,
    device_and_threads,
    model_for,
    timed,
)

BATCH = {"paper (HAM10000, 224 px, C=7)": 4, "digits (64 px, C=10)": 64}


def measure(model, config, batch: int, steps: int, repeats: int, device, precision=None) -> dict:
    with precision or nullcontext():
        return _measure(model, config, batch, steps, repeats, device)


def _measure(model, config, batch: int, steps: int, repeats: int, device) -> dict:
    images = torch.randn(batch, 3, config.data.image_size, config.data.image_size, device=device)
    timer = PartTimer({"encoder+dcg": model.dcg, "encoder": model.denoiser.encoder})
    # The config's chains per image and their aggregation, at the steps measured.
    warm_up, sampling = (resolve_eval_settings(config, steps=n, sampler="respaced") for n in (min(steps, 5), steps))
    model.predict(images, warm_up)
    timer.seconds = {k: 0.0 for k in timer.seconds}
    timer.calls = {k: 0 for k in timer.calls}
    with timed() as total:
        for _ in range(repeats):
            model.predict(images, sampling)
    timer.remove()
    encode = timer.seconds["encoder+dcg"] + timer.seconds["encoder"]
    return {"images_per_s": batch * repeats / total["seconds"], "encode_s": encode / repeats,
            "reverse_s": (total["seconds"] - encode) / repeats, "encoder_calls": timer.calls["encoder"] / repeats,
            "dcg_calls": timer.calls["encoder+dcg"] / repeats}


def report(name: str, batch: int, steps: int, r: dict) -> None:
    print(f"{name:30s} batch {batch:3d} steps {steps:5d}: {r['images_per_s']:8.2f} images/s  "
          f"encoder+DCG {r['encode_s']:.3f} s ({r['encoder_calls']:.0f} encoder, {r['dcg_calls']:.0f} DCG "
          f"call per batch)  reverse steps {r['reverse_s']:.3f} s ({1000 * r['reverse_s'] / steps:.2f} ms/step)",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="10,100,1000")
    parser.add_argument("--repeats", type=int, default=2)
    add_device_options(parser)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {device_and_threads(args)}")
    for name, path in REPO_CONFIGS.items():
        model, config = model_for(path, device, args)
        model.eval()
        batch = batch_for(name, BATCH, args)
        for steps in map(int, args.steps.split(",")):
            report(name, batch, steps, measure(model, config, batch, steps, args.repeats, device, autocast(args, device)))


if __name__ == "__main__":
    main()
