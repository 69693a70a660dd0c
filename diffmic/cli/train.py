"""`diffmic train`: resolve the config, the shards and the run folder, then call the engine."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

from ..data.storage import basename
from .common import SET_OPTION, UserError, app, config_file, console
from .launch import Launch, with_launch_options

SHARDS_ROOT = Path("shards")


def shard_folders(root: Path = SHARDS_ROOT) -> list[Path]:
    return sorted(p for p in root.iterdir() if (p / "manifest.json").is_file()) if root.is_dir() else []


def resolve_inputs(config: Path | None, dataset: str | None, shards: str | None) -> tuple[Path, Path | str | None]:
    """(config file, shard folder or None for the config's own) from the short forms:
    --dataset NAME means configs/NAME.yaml (here, else packaged) and shards/NAME; with neither flag, the
    only shard folder."""
    if config is None and dataset is None:
        if shards is not None:
            dataset = basename(shards)
        else:
            found = shard_folders()
            if len(found) != 1:
                choices = ", ".join(p.name for p in found) or "none"
                raise UserError(f"pass --config FILE or --dataset NAME: {SHARDS_ROOT}/ holds {len(found)} shard "
                                f"folders ({choices}); make one with `diffmic shard --dataset NAME`")
            dataset, shards = found[0].name, found[0]
    config = config_file(config, dataset)
    if shards is None and dataset is not None:
        shards = SHARDS_ROOT / dataset
    return config, shards


@app.command("train")
@with_launch_options
def train_command(
    config: Path = typer.Option(None, "--config", "-c", help="Experiment YAML: a path, or a name in ./configs/ "
                                                            "or among the packaged configs. Default: "
                                                            "configs/<dataset>.yaml."),
    dataset: str = typer.Option(None, "--dataset", "-d", help="Short form: configs/NAME.yaml (here, else packaged) "
                                                              "and shards/NAME."),
    shards: str = typer.Option(None, "--shards", help="Shard folder, or its URL (s3://bucket/prefix). Default: "
                                                      "data.shards of the config, else shards/<data.dataset>."),
    run_dir: Path = typer.Option(None, "--run-dir", "-r", help="Run folder; an existing one is resumed from its "
                                                               "latest checkpoint. Default: runs/<dataset>-<time>."),
    overrides: list[str] = SET_OPTION,
    allow_changes: str = typer.Option("", "--allow-changes", help="Settings a resume may change from the run's "
                                                                  "own, comma-separated: train.lr,train.epochs "
                                                                  "(recorded in run.json)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    *,
    launch: Launch,  # the Slurm panel's options, added by with_launch_options
) -> None:
    """Train DiffMIC (DCG warm-up, then DCG + denoiser jointly) on shards; resumes a run folder.

    Examples:
      diffmic train --config configs/digits.yaml
      accelerate launch -m diffmic train --dataset ham10000 --set train.batch_size=32
      diffmic train --config configs/ham10000.yaml --run-dir runs/ham-1   (resumes runs/ham-1)
      diffmic train --config configs/ham10000.yaml --slurm --gpus 8 --nodes 2 --partition gpu
    """
    from ..checkpoint import complete_checkpoints
    from ..config import load_config
    from ..data import as_location, read_manifest, shard_dir_for
    from ..launch.job import TrainJob
    from ..models.pretrained import fetch_all
    from ..run import RunFolder

    config_path, shard_dir = resolve_inputs(config, dataset, shards)
    cfg = load_config(config_path, overrides or [])
    shard_dir = as_location(shard_dir or shard_dir_for(cfg.data))
    allowed = [key.strip() for key in allow_changes.split(",") if key.strip()]
    job = TrainJob(cfg, str(shard_dir), str(run_dir) if run_dir else None, allowed,
                   {"config_file": str(config_path.resolve())})
    if launch.elsewhere:
        job.facts["command"] = shlex.join(["diffmic", *sys.argv[1:]])  # run.json's record, not the worker's argv
        read_manifest(shard_dir)  # a missing or broken shard folder fails here, not in the queue
        if run_dir is None or not complete_checkpoints(run_dir):  # a resume starts from its checkpoint
            for request in fetch_all(cfg):  # missing starting weights fail here too: job nodes read this cache
                console.print(request.describe(), highlight=False, soft_wrap=True)
        job.run_dir = job.run_dir or str(RunFolder.new(cfg.data.dataset).path)  # every process writes there
    launch.run(job, progress)
