"""`diffmic sweep` and `diffmic compare`: experiments the size of a paper's table, and the table."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer
from rich.table import Table

from .common import UserError, app, config_file, console
from .launch import Launch, with_launch_options


@app.command("sweep")
@with_launch_options
def sweep_command(
    configs: list[Path] = typer.Option(..., "--config", "-c", help="Experiment YAML (repeatable: one row each): a "
                                                                  "path, or a name in ./configs/ or the packaged "
                                                                  "configs."),
    seeds: int = typer.Option(1, "--seeds", help="Seeds per configuration: train.seed, train.seed + 1, ..."),
    grid: list[str] = typer.Option(None, "--set", "-s", help="key=v1,v2 sweeps the values; key=v fixes one "
                                                             "(repeatable; a [list] is one value)."),
    folds: int = typer.Option(0, "--folds", help="Cross-validate over the shards' K folds (data.fold = 0..K-1)."),
    out: Path = typer.Option(None, "--out", "-o", help="Sweep folder. Default: sweeps/<first config>-<time>."),
    shards: str = typer.Option(None, "--shards", help="Shard folder (or its URL) for every run. Default: each "
                                                      "config's."),
    array_parallelism: int = typer.Option(4, "--array-parallelism", help="With --slurm: runs of the job array "
                                                                        "running at once.", rich_help_panel="Slurm"),
    *,
    launch: Launch,  # the Slurm panel's options, added by with_launch_options
) -> None:
    """Train and evaluate config files x seeds x values (x folds); re-running resumes.

    Here the runs go one after another; with --slurm they are one Slurm job array, a task per run (one
    process each: --gpus 1, or --gpus 0 --tasks-per-node 1). Re-running the same command finishes only what
    is left: finished runs are skipped, failed ones retried, interrupted ones resume from their checkpoints.

    Examples:
      diffmic sweep --config configs/digits.yaml --set model.variant=basic,full --seeds 2 --out sweeps/digits
      diffmic sweep --config configs/ablations/ham10000-basic.yaml --config configs/ham10000.yaml --seeds 3
      diffmic sweep --config configs/ham10000.yaml --seeds 3 --slurm --gpus 1 --array-parallelism 8
      diffmic compare sweeps/digits
    """
    import time

    from ..config import load_config
    from ..launch.sweep import SweepPlan, merge_with_existing, parse_grid, plan_runs
    from ..run import RunLock

    swept, fixed = parse_grid(grid or [])
    found = [config_file(config, None) for config in configs]  # a path, ./configs/ or the packaged ones
    bases = [(str(path), load_config(path, fixed).train.seed) for path in found]
    planned = plan_runs(bases, seeds, swept, fixed, folds)
    sweep_dir = out or Path("sweeps") / f"{configs[0].stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if launch.processes > 1:
        raise UserError("a sweep without --slurm trains its runs one after another, one process each: drop "
                        "--gpus/--tasks-per-node, or submit it with --slurm")
    new_plan = SweepPlan(shlex.join(["diffmic", *sys.argv[1:]]), str(shards) if shards else None, planned)
    report = lambda line: console.print(line, highlight=False)  # noqa: E731
    if launch.slurm is not None and launch.dry_run:  # writes nothing: no lock
        submit_as_array(merge_with_existing(sweep_dir, new_plan), sweep_dir, launch, array_parallelism, report)
        return
    # One `diffmic sweep` per folder: a second one would find the first one's live run "interrupted" and redo it.
    lock = RunLock(sweep_dir, "diffmic sweep")
    lock.acquire()
    try:
        plan = merge_with_existing(sweep_dir, new_plan)
        if launch.slurm is not None:
            submit_as_array(plan, sweep_dir, launch, array_parallelism, report)
        else:
            run_here(plan, sweep_dir, report)
    finally:
        lock.release()


def run_here(plan, sweep_dir: Path, report) -> None:
    """The runs one after another in this process's children."""
    from ..launch.sweep import run_locally

    plan.save(sweep_dir)
    console.print(f"sweep {sweep_dir}: {len(plan.runs)} run(s); follow it with: diffmic status {sweep_dir}",
                  highlight=False)
    failed = run_locally(plan, sweep_dir, report=report)
    if failed:
        raise UserError(f"{len(failed)} run(s) failed ({', '.join(run.name for run in failed)}); their logs are "
                        f"RUN/sweep.log. Re-run the same command to retry them")
    console.print(f"all runs finished; the table: diffmic compare {sweep_dir}", highlight=False)


def submit_as_array(plan, sweep_dir: Path, launch: Launch, parallelism: int, report) -> None:
    """--slurm: the unfinished runs as one job array (or, with --dry-run, its sbatch script)."""
    from ..launch.slurm import check_array, sbatch_script
    from ..launch.sweep import SweepPlan, runs_to_do, submit_sweep, sweep_logs

    check_array(launch.slurm, parallelism)
    if launch.dry_run:
        todo = len(runs_to_do(plan, sweep_dir, report))
        console.print(sbatch_script(launch.slurm, sweep_logs(sweep_dir), f"diffmic-sweep-{sweep_dir.name}", todo,
                                    parallelism), highlight=False, markup=False)
        console.print(f"dry run: a job array of {todo} run(s), at most {parallelism} at once; nothing was submitted")
        return
    plan.save(sweep_dir)
    jobs = submit_sweep(plan, sweep_dir, launch.slurm, parallelism, report)
    if not jobs:
        report(f"all runs finished; the table: diffmic compare {sweep_dir}")
        return
    report(f"submitted job array {jobs[0].job_id.split('_')[0]}: {len(jobs)} run(s), at most {parallelism} at "
           f"once; follow it with: diffmic status {sweep_dir}")
    if launch.wait:
        for job in jobs:
            job.wait()
        plan = SweepPlan.load(sweep_dir)  # the tasks wrote each run's status in its folder
        plan.save(sweep_dir)
        failed = [run.name for run in plan.runs if run.status != "finished"]
        if failed:
            raise UserError(f"{len(failed)} run(s) did not finish ({', '.join(failed)}); their logs are "
                            f"RUN/sweep.log and {sweep_dir}/slurm. Re-run the same command to retry them")
        report(f"all runs finished; the table: diffmic compare {sweep_dir}")


def runs_of(paths: list[Path]) -> list[Path]:
    """Run folders from sweep folders (their runs, in plan order) and run folders (as given). A sweep with runs
    not yet evaluated is refused with the command that finishes it."""
    from ..launch.sweep import SweepPlan, is_done, looks_like_sweep

    found = []
    for path in paths:
        if looks_like_sweep(path):  # SweepPlan.load names a sweep.json that went missing
            plan = SweepPlan.load(path)
            unfinished = [unfinished_run(run, path) for run in plan.runs if not is_done(run, path)]
            if unfinished:
                raise UserError(f"{len(unfinished)} of the {len(plan.runs)} run(s) of {path} are not finished "
                                f"({', '.join(unfinished[:4])}{', ...' if len(unfinished) > 4 else ''}); run the "
                                f"sweep's command again to finish them: {plan.command}")
            found += [run.run_dir(path) for run in plan.runs]
        elif path.is_dir():
            found.append(path)
        else:
            raise UserError(f"{path} does not exist; pass a sweep folder or run folders")
    return found


def unfinished_run(run, sweep_dir: Path) -> str:
    """A run that is not done, and why where it says finished (its evaluation is gone)."""
    if run.status == "finished":
        return f"{run.name}: {run.metrics_file(sweep_dir)} is missing"
    return f"{run.name}: {run.shown_status()}"


@app.command("compare")
def compare_command(
    paths: list[Path] = typer.Argument(..., help="A sweep folder, or run folders."),
    out: Path = typer.Option(None, "--out", "-o", help="Where compare.md/.csv/.png go. Default: the sweep "
                                                       "folder (the current folder for run folders)."),
) -> None:
    """Compare configurations: mean ± standard deviation over their seeds and folds.

    One row per configuration with accuracy, macro F1, AUROC, kappa and ECE, and the DCG's own accuracy;
    also written as compare.md, compare.csv and compare.png.

    Examples:
      diffmic compare sweeps/digits
      diffmic compare runs/ham10000-a runs/ham10000-b
    """
    from ..evaluation.compare import COLUMNS, compare_runs, format_stat, write_comparison
    from ..launch.sweep import SWEEP_FILE

    rows = compare_runs(runs_of(paths))
    table = Table(title=f"{sum(row.runs for row in rows)} run(s), test split")
    table.add_column("configuration", no_wrap=True)
    table.add_column("runs", justify="right")
    for _, title in COLUMNS:
        table.add_column(title, justify="right")
    for row in rows:
        table.add_row(row.label, str(row.runs), *(format_stat(row.stats[key]) for key, _ in COLUMNS))
    console.print(table)
    target = out or (paths[0] if len(paths) == 1 and (paths[0] / SWEEP_FILE).is_file() else Path("."))
    written = write_comparison(rows, target)
    console.print("wrote " + ", ".join(str(path) for path in written), highlight=False)


def print_sweep_status(sweep_dir: Path) -> list[str]:
    """One line per run of a sweep; returns the failed ones."""
    from ..evaluation.compare import read_evaluation
    from ..launch.sweep import SweepPlan

    plan = SweepPlan.load(sweep_dir)
    table = Table(title=f"sweep {sweep_dir}: {len(plan.runs)} run(s)")
    for column in ("run", "status", "accuracy", "job", "note"):
        table.add_column(column)
    unevaluated = []  # finished runs whose evaluation is gone: a table alone would show them as done
    for run in plan.runs:
        accuracy = ""
        if run.metrics_file(sweep_dir).is_file():
            accuracy = f"{read_evaluation(run.metrics_file(sweep_dir))['accuracy']:.4f}"
        elif run.status == "finished":
            unevaluated.append(run.metrics_file(sweep_dir))
        status = run.shown_status()
        note = run.error[:80] or ("run the sweep command again to resume it" if status == "interrupted" else "")
        table.add_row(run.name, status, accuracy, plan.jobs.get(run.name, {}).get("job_id", ""), note)
    console.print(table)
    if unevaluated:
        raise UserError(f"{unevaluated[0]} is missing ({len(unevaluated)} finished run(s) without their evaluation); "
                        f"run the sweep's command again to evaluate them: {plan.command}")
    return [run.name for run in plan.runs if run.status == "failed"]
