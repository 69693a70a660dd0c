"""Child processes of the engine tests.

`python engine_worker.py CONFIG SHARDS RUN [overrides] [--allow-changes=a,b]` trains (or resumes) under
`accelerate launch` like `diffmic train`, then writes each rank's parameter digest, so a test can check that
every process holds the same weights.

`python engine_worker.py --save-delay SECONDS diffmic-args...` runs the `diffmic` command with every
checkpoint held back SECONDS before it is renamed into place: the fault injection of the crash-safety test,
from outside the production code.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
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
    allowed = [name for item in overrides if item.startswith("--allow-changes=")
               for name in item.split("=", 1)[1].split(",")]
    overrides = [item for item in overrides if not item.startswith("--allow-changes=")]
    trainer = Trainer(load_config(config, overrides), shards, run_dir, progress=False, allow_changes=allowed)
    try:
        trainer.resume()
        trainer.prepare_run()
        result = trainer.fit()
        report = {"rank": trainer.rank, "world": trainer.world, "digest": parameter_digest(trainer.module),
                  "step": result.step, "distributed": trainer.accelerator.distributed_type.value,
                  "provenance": trainer.provenance["manifest_sha256"]}
        Path(run_dir, f"rank{trainer.rank}.json").write_text(json.dumps(report))
    finally:
        trainer.close()


def run_with_slow_saves(seconds: float, arguments: list[str]) -> None:
    """Widens the window in which a kill lands mid-save: the partial folder is complete, not yet renamed."""
    from diffmic.checkpoint import record
    from diffmic.cli import main as diffmic_main

    finalise = record.finalise

    def slow_finalise(partial, final, values, written):
        time.sleep(seconds)
        return finalise(partial, final, values, written)

    record.finalise = slow_finalise
    sys.argv = ["diffmic", *arguments]
    diffmic_main()


if __name__ == "__main__":
    if sys.argv[1] == "--save-delay":
        run_with_slow_saves(float(sys.argv[2]), sys.argv[3:])
    else:
        main(*sys.argv[1:])
