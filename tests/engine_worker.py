"""Trains under `accelerate launch` like `diffmic train`, then writes each rank's parameter digest, so
a test can check that every process holds the same weights."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from diffmic.config import load_config
from diffmic.engine.trainer import Trainer


def parameter_digest(module) -> str:
    """Parameters only: BatchNorm running statistics are per-rank under DDP (rank 0's are saved)."""
    digest = hashlib.sha256()
    for name, value in sorted(module.named_parameters()):
        digest.update(name.encode())
        digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(config: str, shards: str, run_dir: str, *overrides: str) -> None:
    trainer = Trainer(load_config(config, list(overrides)), shards, run_dir, progress=False)
    try:
        trainer.prepare_run()
        trainer.resume()
        result = trainer.fit()
        report = {"rank": trainer.rank, "world": trainer.world, "digest": parameter_digest(trainer.module),
                  "step": result.step, "distributed": trainer.accelerator.distributed_type.value}
        Path(run_dir, f"rank{trainer.rank}.json").write_text(json.dumps(report))
    finally:
        trainer.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
