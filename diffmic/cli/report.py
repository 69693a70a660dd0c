"""`diffmic report`: the run's training curves as a picture, at any time (also while it trains)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import UserError, app, console, warn


def write_curves(run: Path) -> Path:
    """RUN/curves.png from RUN/metrics.jsonl; UserError when there is nothing to draw yet."""
    from ..evaluation.curves import draw_run_curves
    from ..run import RunFolder

    folder = RunFolder(run)
    if not folder.metrics_file.is_file():
        raise UserError(f"{folder.metrics_file} is missing: is {run} a run folder made by `diffmic train`?")
    try:
        return draw_run_curves(folder, warn)
    except UserError:  # a damaged metrics.jsonl: its own message names the line
        raise
    except ValueError as error:
        raise UserError(f"{run}: {error}; try again after the first logging interval (train.log_every steps)") from None


@app.command("report")
def report_command(
    run_argument: Path = typer.Argument(None, metavar="RUN", help="Run folder made by `diffmic train`."),
    run_option: Path = typer.Option(None, "--run", help="The same, spelt as in eval and predict."),
) -> None:
    """Draw RUN/curves.png, how a training run went (also while it trains).

    The loss terms, the learning rates, validation accuracy and macro F1 of the diffusion and of the DCG
    alone, and images/s over the steps, with the DCG warm-up shaded.

    Example: diffmic report runs/digits-20261125-101500
    """
    if (run_argument is None) == (run_option is None):
        raise UserError("give the run folder once: diffmic report RUN (or --run RUN)")
    path = write_curves(run_argument or run_option)
    console.print(f"wrote {path}", highlight=False)
