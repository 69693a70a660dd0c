"""Does the paper config train on one 24 GB GPU (an RTX 3090)? An estimate from parts measured on this
machine, and, on a GPU, the real peak of training steps under a 24 GiB cap.

    python benchmarks/memory.py [--batches 16,32,64]

Measured here (CPU or GPU, at the paper config with random weights):
  - weights, gradients, Adam's moments (AMSGrad's maximum for the DCG included) and the denoiser's EMA,
    summed over the tensors after one optimiser step;
  - the activations autograd keeps for the backward of one joint training forward (denoiser and DCG),
    counted once per storage with parameters left out, at batches 2 and 4 and extrapolated along that line
    (the intercept holds autocast's bf16 weight copies, which do not grow with the batch).
Arithmetic, not measured: the backward's working set (twice the largest saved activation: the gradients
flowing into and out of the largest layer exist together) and the headroom a 24 GiB card keeps outside
the estimate (CUDA context, cuDNN workspaces, the caching allocator's rounding: ALLOWANCE_GIB).
The frozen-prior pass of the DCG runs without gradients before any activation is kept, so it adds no peak.
"""

from __future__ import annotations

import argparse
import gc
from dataclasses import dataclass

import torch

from diffmic.engine.optim import ExponentialMovingAverage, build_optimizer

from timing import REPO_CONFIGS, device_and_threads, model_for, synthetic_batch
from train_step import one_step

PAPER = "paper (HAM10000, 224 px, C=7)"
GIB = 2**30
CARD_GIB = 24.0  # an RTX 3090
# Kept free of the estimate on a 24 GiB card: about 0.5 GiB of CUDA context and library handles outside
# PyTorch's allocator, and about 1.5 GiB of cuDNN workspaces and allocator rounding inside it.
ALLOWANCE_GIB = 2.0
FIT_POINTS = (2, 4)  # BatchNorm needs 2 images; two points give the line's slope and intercept


@dataclass
class Training:
    """A model with the state a training step keeps: its optimiser and the denoiser's EMA."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: ExponentialMovingAverage
    image_size: int
    num_classes: int


def paper_training(device: torch.device, overrides: dict | None = None) -> Training:
    model, config = model_for(REPO_CONFIGS[PAPER], device, **(overrides or {}))
    model.train()
    model.check_values = device.type == "cpu"  # as the trainer: value checks would sync a GPU
    ema = ExponentialMovingAverage(model.denoiser, config.train.ema_rate)
    return Training(model, build_optimizer(model, config.train), ema, config.data.image_size, config.data.num_classes)


def training_batch(training: Training, batch_size: int, device: torch.device) -> dict:
    return synthetic_batch(batch_size, training.image_size, training.num_classes, device)


def _bytes(tensors) -> int:
    return sum(tensor.untyped_storage().nbytes() for tensor in tensors)


def state_bytes(training: Training) -> dict[str, int]:
    """Bytes of what lives through every step, once the optimiser has stepped (zero gradients are enough
    to create every moment; nothing is trained)."""
    for parameter in training.model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    training.optimizer.step()
    moments = [value for state in training.optimizer.state.values() for value in state.values()
               if torch.is_tensor(value)]
    sizes = {"weights": _bytes(training.model.parameters()) + _bytes(training.model.buffers()),
             "gradients": _bytes(p.grad for p in training.model.parameters()),
             "optimizer": _bytes(moments), "ema": _bytes(training.ema.shadow.values())}
    training.optimizer.zero_grad(set_to_none=True)
    return sizes


def saved_activations(training: Training, batch_size: int, device: torch.device, bf16: bool) -> list[int]:
    """Bytes of every tensor autograd keeps for the backward of one joint training forward, in the order
    they are first kept: each storage once (an in-place ReLU and the next convolution save the same one),
    parameters left out (autocast's bf16 copies of them stay in: they live until the backward too)."""
    parameters = {p.untyped_storage().data_ptr() for p in training.model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    batch = training_batch(training, batch_size, device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        losses = training.model(batch)
    del losses
    return list(kept.values())


@dataclass
class ActivationLine:
    """Saved activations as intercept + per_image x batch, and the per-image size of the largest one that
    grows with the batch."""

    intercept: float
    per_image: float
    largest_per_image: float

    def at(self, batch_size: int) -> float:
        return self.intercept + self.per_image * batch_size

    def backward_working_set(self, batch_size: int) -> float:
        return 2 * self.largest_per_image * batch_size


def activation_line(training: Training, device: torch.device, bf16: bool) -> ActivationLine:
    small, large = (saved_activations(training, batch, device, bf16) for batch in FIT_POINTS)
    if len(small) != len(large):
        raise RuntimeError(f"the forward kept {len(small)} tensors at batch {FIT_POINTS[0]} and {len(large)} at "
                           f"{FIT_POINTS[1]}: the line through them would mix different tensors")
    images = FIT_POINTS[1] - FIT_POINTS[0]
    # The same forward keeps the same tensors in the same order: the one that grows fastest is the largest
    # activation (a bf16 weight copy is larger at these batches but does not grow).
    growth = [(b - a) / images for a, b in zip(small, large)]
    per_image = sum(growth)
    return ActivationLine(sum(small) - per_image * FIT_POINTS[0], per_image, max(growth))


def estimate_rows(states: dict[str, int], lines: dict[str, ActivationLine], batches: list[int]) -> list[dict]:
    """One row per precision and batch: every part in bytes, and the total."""
    rows = []
    for precision, line in lines.items():
        for batch in batches:
            row = {"precision": precision, "batch": batch, **states, "activations": line.at(batch),
                   "backward": line.backward_working_set(batch)}
            row["total"] = sum(value for key, value in row.items() if key not in ("precision", "batch"))
            rows.append(row)
    return rows


def largest_estimated_batch(states: dict[str, int], line: ActivationLine) -> int:
    """The largest batch whose estimate stays under the card less the allowance."""
    room = (CARD_GIB - ALLOWANCE_GIB) * GIB - sum(states.values()) - line.intercept
    return max(0, int(room // (line.per_image + 2 * line.largest_per_image)))


def split_for_card(global_batch: int, largest: int) -> tuple[int, int]:
    """(train.batch_size, train.grad_accum) giving `global_batch` with the largest micro-batch that fits."""
    fitting = [size for size in range(1, global_batch + 1) if global_batch % size == 0 and size <= largest]
    if not fitting:
        raise ValueError(f"not even one image per step fits (largest batch {largest})")
    return fitting[-1], global_batch // fitting[-1]


def estimate(device: torch.device, batches: list[int], overrides: dict | None = None) -> dict:
    """The measured parts and the estimate table, for fp32 and bf16 autocast."""
    training = paper_training(device, overrides)
    states = state_bytes(training)
    lines = {precision: activation_line(training, device, precision == "bf16") for precision in ("bf16", "fp32")}
    largest = {precision: largest_estimated_batch(states, line) for precision, line in lines.items()}
    return {"states": states, "lines": {name: vars(line) for name, line in lines.items()},
            "rows": estimate_rows(states, lines, batches), "largest": largest,
            "parameters": sum(p.numel() for p in training.model.parameters())}


# --- measured on a GPU, under a cap ------------------------------------------------------------------
def peak_gib(training: Training, batch_size: int, device: torch.device, bf16: bool) -> float | None:
    """Peak memory in GiB of two training steps at `batch_size` (the allocator's reserved bytes, which is
    what a cap limits), or None when it runs out of memory."""
    batch = training_batch(training, batch_size, device)
    precision = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        for _ in range(2):  # the first step of a size pays cuDNN's choices; the second is the steady state
            one_step(training.model, training.optimizer, training.ema, batch, precision)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_reserved(device) / GIB
    except torch.OutOfMemoryError:
        return None
    finally:
        training.optimizer.zero_grad(set_to_none=True)
        del batch
        gc.collect()
        torch.cuda.empty_cache()


def largest_training_batch(fits, known_good: int, candidates: list[int], resolution: int = 8) -> int:
    """The largest batch for which `fits(batch)` holds: up the candidates until one fails, then halving
    the gap to `resolution` images. `known_good` fits already (0: none does)."""
    good, bad = known_good, None
    for batch in (c for c in candidates if c > known_good):
        if not fits(batch):
            bad = batch
            break
        good = batch
    while bad is not None and bad - good > resolution:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good


def print_estimate(result: dict) -> None:
    states = result["states"]
    print(f"{result['parameters'] / 1e6:.1f} M parameters; measured: " +
          ", ".join(f"{name} {value / GIB:.2f} GiB" for name, value in states.items()))
    for precision, line in result["lines"].items():
        print(f"{precision}: saved activations {line['intercept'] / GIB:.2f} GiB + {line['per_image'] / 2**20:.1f} MiB "
              f"per image (measured at batches {FIT_POINTS}); estimated largest batch under "
              f"{CARD_GIB - ALLOWANCE_GIB:.0f} GiB: {result['largest'][precision]}")
    print("| precision | batch | weights | gradients | optimiser | EMA | activations (measured line) | "
          "backward working set (arithmetic) | total |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in result["rows"]:
        parts = [row[key] / GIB for key in ("weights", "gradients", "optimizer", "ema", "activations", "backward",
                                            "total")]
        print(f"| {row['precision']} | {row['batch']} | " + " | ".join(f"{value:.2f} GiB" for value in parts) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="16,32,64")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {device_and_threads()}")
    print_estimate(estimate(device, [int(b) for b in args.batches.split(",")]))


if __name__ == "__main__":
    main()
