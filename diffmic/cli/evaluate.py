"""`diffmic eval` and `diffmic predict`: parse options, call diffmic.evaluation.runner, print."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from .common import app, console
from .launch import Launch, with_launch_options

if TYPE_CHECKING:
    from ..evaluation.settings import EvalSettings

RUN_OPTION = typer.Option(..., "--run", help="Run folder made by `diffmic train`, e.g. runs/digits-20261125-101500.")
CHECKPOINT_OPTION = typer.Option("best", "--checkpoint", help="best, last or step-N.")
STEPS_OPTION = typer.Option(None, "--steps", help="Reverse diffusion steps. Default: eval.steps of the run's config.")
SAMPLER_OPTION = typer.Option(None, "--sampler", help="respaced, truncated (the authors') or ddim. Default: eval.sampler.")
SAMPLES_OPTION = typer.Option(None, "--n-samples", help="Chains per image, averaged (their spread is the "
                                                        "uncertainty). Default: eval.n_samples.")
EMA_OPTION = typer.Option(True, "--ema/--no-ema", help="Use the EMA weights of the denoiser (default) or the raw ones.")
PRECISION_OPTION = typer.Option(None, "--precision", help="auto (bf16 where the GPU or CPU has native bf16, fp32 "
                                                          "elsewhere), fp32 or bf16. Default: the run's eval.precision.")
COMPILE_OPTION = typer.Option(None, "--compile/--no-compile", help="Compile one reverse step into one graph (a CUDA "
                                                                   "graph on a GPU): faster chains after a compile "
                                                                   "of seconds. Default: the run's eval.compile.")


def resolved_settings(run: Path, checkpoint: str, steps: int | None, sampler: str | None, n_samples: int | None,
                      ema: bool, precision: str | None, compile: bool | None) -> EvalSettings:
    """The sampling settings of the command line on top of the checkpoint's own `eval` config."""
    from ..checkpoint import find_checkpoint
    from ..evaluation.settings import resolve_eval_settings

    return resolve_eval_settings(find_checkpoint(run, checkpoint).config, steps, sampler, n_samples, ema,
                                 precision, compile)


@app.command("eval")
@with_launch_options
def eval_command(
    run: Path = RUN_OPTION,
    checkpoint: str = CHECKPOINT_OPTION,
    split: str = typer.Option("test", "--split", help="Split of the shards to evaluate: test, val or train."),
    steps: int = STEPS_OPTION,
    sampler: str = SAMPLER_OPTION,
    n_samples: int = SAMPLES_OPTION,
    ema: bool = EMA_OPTION,
    precision: str = PRECISION_OPTION,
    compile: bool = COMPILE_OPTION,
    out: Path = typer.Option(None, "--out", "-o", help="Output folder. Default: RUN/eval/<split>-<checkpoint>-"
                                                       "<sampler><steps>/."),
    shards: str = typer.Option(None, "--shards", help="Shard folder, or its URL. Default: the one the run trained "
                                                      "on."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    *,
    launch: Launch,  # the Slurm panel's options, added by with_launch_options
) -> None:
    """Evaluate a checkpoint on a split: metrics.json, predictions.csv, confusion_matrix.png, trajectory.png.

    Runs on one process or shards the sampling over many. Examples:
      diffmic eval --run runs/digits-1
      accelerate launch --num_processes 8 -m diffmic eval --run runs/ham-1 --steps 250
      diffmic eval --run runs/ham-1 --sampler truncated --steps 250 --no-ema   (the authors' protocol)
      diffmic eval --run runs/ham-1 --slurm --gpus 4
    """
    from ..data import absolute_location
    from ..evaluation.runner import evaluate_run, print_result

    # A wrong run, checkpoint or sampling setting fails here, before any image is read or a job is queued.
    settings = resolved_settings(run, checkpoint, steps, sampler, n_samples, ema, precision, compile)
    if launch.elsewhere:
        absolute = lambda path: str(Path(path).resolve()) if path else None  # noqa: E731
        arguments = {"run_dir": absolute(run), "checkpoint": checkpoint, "split": split, "settings": settings,
                     "out_dir": absolute(out), "shards": absolute_location(shards)}
        launch.start("eval", arguments, Path(run).resolve(), progress)
        return

    result = evaluate_run(run, checkpoint, split, settings, out, shards, progress)
    if result.out_dir is not None:
        print_result(result, split, checkpoint)


@app.command("predict")
def predict_command(
    paths: list[Path] = typer.Argument(..., help="Image files or folders of images."),
    run: Path = RUN_OPTION,
    checkpoint: str = CHECKPOINT_OPTION,
    steps: int = STEPS_OPTION,
    sampler: str = SAMPLER_OPTION,
    n_samples: int = SAMPLES_OPTION,
    ema: bool = EMA_OPTION,
    precision: str = PRECISION_OPTION,
    compile: bool = COMPILE_OPTION,
    out: Path = typer.Option(None, "--out", "-o", help="CSV to write. Default: RUN/predictions/<time>.csv."),
    flag_uncertain: float = typer.Option(None, "--flag-uncertain", metavar="T",
                                         help="Mark the rows whose uncertainty (share of chains that disagree "
                                              "with the prediction, 0..1) is above T, e.g. 0.3: a 'check' "
                                              "column in the table and the CSV. Needs --n-samples > 1."),
) -> None:
    """Classify image files with a trained run (the same preprocessing as the shards).

    Examples:
      diffmic predict --run runs/digits-1 photos/ lesion_042.jpg
      diffmic predict --run runs/ham-1 --n-samples 10 --flag-uncertain 0.3 lesions/
    """
    from ..evaluation.runner import check_flag_threshold, flag_uncertain_rows, predict_files, write_rows_csv

    settings = resolved_settings(run, checkpoint, steps, sampler, n_samples, ema, precision, compile)
    if flag_uncertain is not None:  # refused before any image is read
        from ..checkpoint import find_checkpoint

        check_flag_threshold(flag_uncertain, find_checkpoint(run, checkpoint).config, settings)
    rows, classes = predict_files(run, paths, checkpoint, settings)
    if flag_uncertain is not None:
        flag_uncertain_rows(rows, flag_uncertain)
    table = Table(title=f"{len(rows)} image(s), {checkpoint} checkpoint of {run}")
    table.add_column("file", overflow="fold")
    flag_column = ("check",) if flag_uncertain is not None else ()
    for column in ("predicted", "probability", "DCG", "uncertainty", *flag_column):
        table.add_column(column, justify="right")
    for row in rows:
        uncertainty = "" if row["uncertainty"] is None else f"{row['uncertainty']:.2f}"
        cells = [row["file"], row["predicted"], f"{row['prob_' + row['predicted']]:.3f}", row["dcg_predicted"],
                 uncertainty]
        if flag_uncertain is not None:
            cells.append("[bold yellow]CHECK[/]" if row["check"] == "yes" else "")
        table.add_row(*cells)
    console.print(table)
    if flag_uncertain is not None:
        flagged = sum(row["check"] == "yes" for row in rows)
        console.print(f"{flagged} of {len(rows)} image(s) above uncertainty {flag_uncertain:g}: check them by hand",
                      highlight=False)
    path = out or Path(run) / "predictions" / f"{time.strftime('%Y%m%d-%H%M%S')}.csv"
    write_rows_csv(rows, path)
    console.print(f"wrote {path}", highlight=False)
