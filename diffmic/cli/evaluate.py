"""`diffmic eval` and `diffmic predict`: parse options, call diffmic.evaluation.runner, print."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..config import EvalConfig
from ..run import RunFolder
from .common import app, console, field_options, with_options
from .launch import Launch, with_launch_options

RUN_OPTION = typer.Option(..., "--run", help="Run folder made by `diffmic train`, e.g. runs/digits-20261125-101500.")
CHECKPOINT_OPTION = typer.Option("best", "--checkpoint", help="best, last or step-N.")
# The evaluation settings that have a flag, generated from their one declaration (EvalConfig); each option left
# unset is the run's own value. The command receives the choices as one dict, `choices`.
with_eval_settings = with_options("choices", field_options(EvalConfig, unset="Default: the run's eval.{name}."), dict)


def resolved_settings(run: Path, checkpoint: str, choices: dict) -> EvalConfig:
    """The settings chosen on the command line on top of the checkpoint's own `eval` config."""
    from ..checkpoint import find_checkpoint
    from ..evaluation.settings import resolve_eval_settings

    return resolve_eval_settings(find_checkpoint(run, checkpoint).config, **choices)


@app.command("eval")
@with_launch_options
@with_eval_settings
def eval_command(
    run: Path = RUN_OPTION,
    checkpoint: str = CHECKPOINT_OPTION,
    split: str = typer.Option("test", "--split", help="Split of the shards to evaluate: test, val or train."),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder. Default: RUN/eval/<split>-<checkpoint>-"
                                                       "<sampler><steps>/."),
    shards: str = typer.Option(None, "--shards", help="Shard folder, or its URL. Default: the one the run trained "
                                                      "on."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    *,
    choices: dict,  # the evaluation settings' options, added by with_eval_settings
    launch: Launch,  # the Slurm panel's options, added by with_launch_options
) -> None:
    """Evaluate a checkpoint on a split: metrics.json, predictions.csv, confusion_matrix.png, trajectory.png.

    Runs on one process or shards the sampling over many. Examples:
      diffmic eval --run runs/digits-1
      accelerate launch --num_processes 8 -m diffmic eval --run runs/ham-1 --steps 250
      diffmic eval --run runs/ham-1 --sampler truncated --steps 250 --no-ema   (the authors' protocol)
      diffmic eval --run runs/ham-1 --slurm --gpus 4
    """
    from ..launch.job import EvalJob

    # A wrong run, checkpoint or sampling setting fails here, before any image is read or a job is queued.
    settings = resolved_settings(run, checkpoint, choices)
    launch.run(EvalJob(str(run), checkpoint, split, settings, out and str(out), shards and str(shards)), progress)


@app.command("predict")
@with_eval_settings
def predict_command(
    paths: list[Path] = typer.Argument(..., help="Image files or folders of images."),
    run: Path = RUN_OPTION,
    checkpoint: str = CHECKPOINT_OPTION,
    out: Path = typer.Option(None, "--out", "-o", help="CSV to write. Default: RUN/predictions/<time>.csv."),
    flag_uncertain: float = typer.Option(None, "--flag-uncertain", metavar="T",
                                         help="Mark the rows whose uncertainty (the run's eval.uncertainty, or "
                                              "--uncertainty; 1 - the DCG's top probability by default, 0..1) "
                                              "is above T, e.g. 0.3: a 'check' column in the table and the CSV."),
    *,
    choices: dict,  # the evaluation settings' options, added by with_eval_settings
) -> None:
    """Classify image files with a trained run (the same preprocessing as the shards).

    Examples:
      diffmic predict --run runs/digits-1 photos/ lesion_042.jpg
      diffmic predict --run runs/ham-1 --n-samples 10 --flag-uncertain 0.3 lesions/
      diffmic predict --run runs/ham-1 --n-samples 10 --uncertainty t_test --flag-uncertain 0.05 lesions/
    """
    from ..evaluation.runner import check_flag_threshold, flag_uncertain_rows, predict_files, write_rows_csv
    from ..fileio import check_writable

    settings = resolved_settings(run, checkpoint, choices)
    path = out or RunFolder(run).predictions_file()
    # Found before any image is read, not after the table is printed.
    check_writable(path.parent, "choose another --out" if out else "pass --out with a file in a folder that can be written")
    if flag_uncertain is not None:  # refused before any image is read
        from ..checkpoint import find_checkpoint

        check_flag_threshold(flag_uncertain, find_checkpoint(run, checkpoint).config, settings)
    rows, classes = predict_files(run, paths, checkpoint, settings)
    if flag_uncertain is not None:
        flag_uncertain_rows(rows, flag_uncertain)
    table = Table(title=f"{len(rows)} image(s), {checkpoint} checkpoint of {run}")
    table.add_column("file", overflow="fold")
    flag_column = ("check",) if flag_uncertain is not None else ()
    for column in ("predicted", "probability", "DCG", f"uncertainty ({settings.uncertainty})", *flag_column):
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
        console.print(f"{flagged} of {len(rows)} image(s) above uncertainty {flag_uncertain:g} ({settings.uncertainty}): "
                      "check them by hand", highlight=False)
    write_rows_csv(rows, path)
    console.print(f"wrote {path}", highlight=False)
