"""Images/s of evaluation (`DiffMIC.predict`) for 10, 60, 250 and 1000 reverse steps at the paper config
(224 px, C = 7) and the digits config, split into the seconds spent in the image encoder + guidance model
(once per image) and in the reverse steps (the denoiser's MLP only).

    python benchmarks/eval.py [--steps 10,60,250,1000] [--repeats 2] [--baseline-steps 10] [--batch 256 --amp bf16]

For comparison it also times the authors' way: their sampler computes the DCG's priors once per batch
but their denoiser encodes the image inside its forward, so every reverse step runs the image encoder
(a ResNet-18) again. That baseline only runs at --baseline-steps, as it costs one encoder pass per step.
"""

from __future__ import annotations

import argparse

import torch

from diffmic.diffusion.sampler import sample

from sampling import BATCH, measure, report
from timing import REPO_CONFIGS, add_device_options, autocast, batch_for, device_and_threads, model_for, timed


@torch.no_grad()
def encode_every_step(model, images, steps: int) -> None:
    """The authors' sampling loop: the DCG once per batch, the image encoder inside every denoiser call."""
    prior = model.priors(model.guidance(images))["fused"]

    def denoise(y_t, t):
        return model.denoiser(model.denoiser.encode(images), y_t, prior, t)

    sample(denoise, prior, model.schedule, "respaced", steps)


def baseline_images_per_s(model, images, steps: int, repeats: int, precision) -> float:
    with precision, timed() as total:
        for _ in range(repeats):
            encode_every_step(model, images, steps)
    return images.shape[0] * repeats / total["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="10,60,250,1000")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline-steps", type=int, default=10, help="0 skips the per-step-encoder baseline")
    add_device_options(parser)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {device_and_threads(args)}")
    for name, path in REPO_CONFIGS.items():
        model, config = model_for(path, device, args)
        model.eval()
        rates, batch = {}, batch_for(name, BATCH, args)
        for steps in map(int, args.steps.split(",")):
            r = measure(model, config, batch, steps, args.repeats, device, autocast(args, device))
            rates[steps] = r["images_per_s"]
            report(name, batch, steps, r)
        first, last = min(rates), max(rates)
        print(f"{name:30s} images/s at {last} steps / at {first} steps: {rates[last] / rates[first]:.2f}")
        if args.baseline_steps:
            images = torch.randn(batch, 3, config.data.image_size, config.data.image_size, device=device)
            ours = measure(model, config, batch, args.baseline_steps, args.repeats, device,
                           autocast(args, device))["images_per_s"]
            theirs = baseline_images_per_s(model, images, args.baseline_steps, args.repeats, autocast(args, device))
            print(f"{name:30s} steps {args.baseline_steps}: encoder once {ours:.2f} images/s vs encoder every step "
                  f"{theirs:.2f} images/s: {ours / theirs:.1f}x", flush=True)


if __name__ == "__main__":
    main()
