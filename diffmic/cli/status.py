"""`diffmic status`: the Slurm jobs of a run and its last metrics."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import UserError, app, console, warn


@app.command("status")
def status_command(
    run_argument: Path = typer.Argument(None, metavar="RUN", help="Run folder of a job submitted with --slurm."),
    run_option: Path = typer.Option(None, "--run", help="The same, spelt as in eval and predict."),
) -> None:
    """Show a run's Slurm jobs (if any) and last metrics, or every run of a sweep; non-zero exit if one failed.

    Examples:
      diffmic status runs/ham10000-20261125-101500
      diffmic status --run runs/ham10000-20261125-101500
    """
    from ..launch.slurm import FINISHED_OK, UNFINISHED, job_records, job_state
    from ..launch.sweep import looks_like_sweep
    from ..run import RunFolder, read_metrics

    if (run_argument is None) == (run_option is None):
        raise UserError("give the run folder once: diffmic status RUN (or --run RUN)")
    run = run_argument or run_option
    if looks_like_sweep(run):
        from .sweep import print_sweep_status

        failed_runs = print_sweep_status(run)
        if failed_runs:
            raise UserError(f"{len(failed_runs)} run(s) failed: {', '.join(failed_runs)}")
        return

    folder = RunFolder(run)
    records = job_records(run)
    if not records and not folder.metrics_file.is_file() and not folder.record_file.is_file():
        raise UserError(f"{run} is neither a run folder (no run.json or metrics.jsonl) nor a sweep folder (no "
                        f"sweep.json); pass the folder `diffmic train` or `diffmic sweep` wrote")
    if not records:
        console.print(f"{run}: no Slurm job recorded (it ran here)", highlight=False)
    failed = []
    for record in records:
        state = job_state(record)
        console.print(f"{record['kind']} job {record['job_id']}: [bold]{state}[/]  logs {record['log_dir']}",
                      highlight=False)
        if state not in UNFINISHED and state not in FINISHED_OK:
            failed.append(f"{record['kind']} job {record['job_id']} {state} (logs in {record['log_dir']})")
    rows = read_metrics(run, warn)
    training = [row for row in rows if "loss" in row]
    validation = [row for row in rows if "split" in row]
    if training:
        last = training[-1]
        console.print(f"last step {last['step']} (epoch {last['epoch']}, {last['phase']}): loss {last['loss']:.4f}, "
                      f"{last['images_per_s']:.1f} images/s", highlight=False)
    if validation:
        last = validation[-1]
        console.print(f"last validation at step {last['step']}: {last['split']} accuracy "
                      f"{last[last['split'] + '/accuracy']:.4f}", highlight=False)
    curves = folder.curves_file
    console.print(f"training curves: {curves} (redraw with: diffmic report {run})" if curves.is_file()
                  else f"training curves: draw them with: diffmic report {run}", highlight=False)
    if failed:
        raise UserError("; ".join(failed))
