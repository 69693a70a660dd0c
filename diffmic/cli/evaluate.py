"""`diffmic eval` and `diffmic predict`: parse options, call diffmic.evaluation.runner, print."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from . import launch as slurm
from .common import app, console

RUN_OPTION = typer.Option(..., "--run", help="Run folder made by `diffmic train`, e.g. runs/digits-20261125-101500.")
CHECKPOINT_OPTION = typer.Option("best", "--checkpoint", help="best, last or step-N.")
STEPS_OPTION = typer.Option(None, "--steps", help="Reverse diffusion steps. Default: eval.steps of the run's config.")
SAMPLER_OPTION = typer.Option(None, "--sampler", help="respaced, truncated (the authors') or ddim. Default: eval.sampler.")
SAMPLES_OPTION = typer.Option(None, "--n-samples", help="Chains per image, averaged (their spread is the "
                                                        "uncertainty). Default: eval.n_samples.")
EMA_OPTION = typer.Option(True, "--ema/--no-ema", help="Use the EMA weights of the denoiser (default) or the raw ones.")


@app.command("eval")
def eval_command(
    run: Path = RUN_OPTION,
    checkpoint: str = CHECKPOINT_OPTION,
    split: str = typer.Option("test", "--split", help="Split of the shards to evaluate: test, val or train."),
    steps: int = STEPS_OPTION,
    sampler: str = SAMPLER_OPTION,
    n_samples: int = SAMPLES_OPTION,
    ema: bool = EMA_OPTION,
    out: Path = typer.Option(None, "--out", "-o", help="Output folder. Default: RUN/eval/<split>-<checkpoint>-"
                                                       "<sampler><steps>/."),
    shards: Path = typer.Option(None, "--shards", help="Shard folder. Default: the one the run trained on."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    use_slurm: bool = slurm.SLURM, local: bool = slurm.LOCAL, gpus: int = slurm.GPUS, nodes: int = slurm.NODES,
    tasks_per_node: int = slurm.TASKS, partition: str = slurm.PARTITION, time_limit: str = slurm.TIME,
    cpus_per_task: int = slurm.CPUS, mem: int = slurm.MEM, account: str = slurm.ACCOUNT, qos: str = slurm.QOS,
    constraint: str = slurm.CONSTRAINT, exclude: str = slurm.EXCLUDE, max_requeues: int = slurm.REQUEUES,
    dry_run: bool = slurm.DRY_RUN, wait: bool = slurm.WAIT,
) -> None:
    """Evaluate a checkpoint on a split: metrics.json, predictions.csv, confusion_matrix.png, trajectory.png.

    Runs on one process or shards the sampling over many. Examples:
      diffmic eval --run runs/digits-1
      accelerate launch --num_processes 8 -m diffmic eval --run runs/ham-1 --steps 250
      diffmic eval --run runs/ham-1 --sampler truncated --steps 250 --no-ema   (the authors' protocol)
      diffmic eval --run runs/ham-1 --slurm --gpus 4
    """
    from ..evaluation.runner import eval_settings, evaluate_run, print_metrics

    if use_slurm or local:
        from ..checkpoint import find_checkpoint

        # A wrong run, checkpoint or sampling setting fails here, not in the queue.
        eval_settings(find_checkpoint(run, checkpoint).config, steps, sampler, n_samples)
        options = slurm.slurm_options(gpus, nodes, tasks_per_node, partition, time_limit, cpus_per_task, mem, account,
                                      qos, constraint, exclude, max_requeues, local)
        absolute = lambda path: str(Path(path).resolve()) if path else None  # noqa: E731
        arguments = {"run_dir": absolute(run), "checkpoint": checkpoint, "split": split, "steps": steps,
                     "sampler": sampler, "n_samples": n_samples, "use_ema": ema, "out_dir": absolute(out),
                     "shards": absolute(shards)}
        slurm.launch("eval", arguments, Path(run).resolve(), options, dry_run, wait)
        return

    result = evaluate_run(run, checkpoint, split, steps, sampler, n_samples, ema, out, shards, progress)
    if result.out_dir is not None:
        metrics = result.metrics
        print_metrics(metrics, f"{split} split, {checkpoint} checkpoint (step {metrics['checkpoint_step']})")
        console.print(f"wrote {result.out_dir}/metrics.json, predictions.csv, confusion_matrix.png"
                      + (", trajectory.png" if (result.out_dir / "trajectory.png").is_file() else ""), highlight=False)


@app.command("predict")
def predict_command(
    paths: list[Path] = typer.Argument(..., help="Image files or folders of images."),
    run: Path = RUN_OPTION,
    checkpoint: str = CHECKPOINT_OPTION,
    steps: int = STEPS_OPTION,
    sampler: str = SAMPLER_OPTION,
    n_samples: int = SAMPLES_OPTION,
    ema: bool = EMA_OPTION,
    out: Path = typer.Option(None, "--out", "-o", help="CSV to write. Default: RUN/predictions/<time>.csv."),
) -> None:
    """Classify image files with a trained run (the same preprocessing as the shards).

    Example: diffmic predict --run runs/digits-1 photos/ lesion_042.jpg
    """
    from ..evaluation.runner import predict_files, write_rows_csv

    rows, classes = predict_files(run, paths, checkpoint, steps, sampler, n_samples, ema)
    table = Table(title=f"{len(rows)} image(s), {checkpoint} checkpoint of {run}")
    table.add_column("file", overflow="fold")
    for column in ("predicted", "probability", "DCG", "uncertainty"):
        table.add_column(column, justify="right")
    for row in rows:
        uncertainty = "" if row["uncertainty"] is None else f"{row['uncertainty']:.2f}"
        table.add_row(row["file"], row["predicted"], f"{row['prob_' + row['predicted']]:.3f}", row["dcg_predicted"],
                      uncertainty)
    console.print(table)
    path = out or Path(run) / "predictions" / f"{time.strftime('%Y%m%d-%H%M%S')}.csv"
    write_rows_csv(rows, path)
    console.print(f"wrote {path}", highlight=False)
