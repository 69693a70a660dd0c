"""Bytes per checkpoint at the paper config: the model, its EMA and a filled optimiser state saved the way
the trainer saves them, on the CPU (no training: one Adam step on zero gradients creates every moment,
AMSGrad's included).

    python benchmarks/checkpoint_size.py [--config configs/ham10000.yaml]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from diffmic.accelerator import make_accelerator
from diffmic.checkpoint import CheckpointManager, find_checkpoint, without_pretrained
from diffmic.config import load_config
from diffmic.engine.optim import ExponentialMovingAverage, build_optimizer
from diffmic.engine.trainer import TrainerState
from diffmic.models import build_model

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "ham10000.yaml"))
    args = parser.parse_args()
    config = load_config(args.config, ["train.mixed_precision=no"])
    # Sizes do not depend on the starting weights: no ImageNet file is read or downloaded (offline machines).
    model = build_model(without_pretrained(config))
    optimizer = build_optimizer(model, config.train)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    accelerator = make_accelerator()
    model, optimizer = accelerator.prepare(model, optimizer)
    module = accelerator.unwrap_model(model)
    ema = ExponentialMovingAverage(module.denoiser, config.train.ema_rate) if config.train.ema else None
    classes = [f"class{i}" for i in range(config.data.num_classes)]
    with tempfile.TemporaryDirectory() as folder:
        manager = CheckpointManager(Path(folder), accelerator, model, module, optimizer, ema, TrainerState(step=1),
                                    config, classes, {})
        manager.save_best(1.0, "accuracy", "val")
        manager.state.step = 2  # a step after the best: its weights are not shared with it
        manager.save()
        parameters = sum(p.numel() for p in module.parameters())
        print(f"{args.config}: {parameters / 1e6:.1f} M parameters ({parameters * 4 / 1e9:.2f} GB in fp32)")
        for which in ("last", "best"):
            checkpoint = find_checkpoint(folder, which)
            sizes = checkpoint.record["files"]
            print(f"{which} ({checkpoint.name}): {sum(sizes.values()) / 1e9:.2f} GB")
            for name, size in sorted(sizes.items(), key=lambda item: -item[1]):
                print(f"  {name:34s} {size / 1e9:8.3f} GB")
    accelerator.end_training()


if __name__ == "__main__":
    main()
