"""`diffmic compare`: one row per configuration, mean +- standard deviation over its seeds and folds.

Runs are grouped by their resolved config with the seed and the fold left out, so the same code serves a
sweep folder and any list of run folders; each group is labelled by the settings that tell it apart from
the others. Runs evaluated on different test splits (another shard manifest) are refused: averaging
them would mix two experiments.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ..config import flatten
from ..errors import UserError
from ..fileio import read_sealed_json, write_text_atomic
from ..run import RunFolder
from .metrics import METRICS

# (metrics.json key, column title) of the registered metrics that have a column (diffmic.evaluation.metrics).
COLUMNS = tuple((metric.key, metric.column) for metric in METRICS if metric.column)
IGNORED_KEYS = ("train.seed", "data.fold")  # what varies inside a group


class CompareError(UserError, ValueError):
    """The runs cannot be compared as given; the message names the run and the fix."""


@dataclass
class RunResult:
    run_dir: Path
    settings: dict  # flattened resolved config, seed and fold left out
    metrics: dict
    metrics_file: Path


def read_evaluation(path: Path) -> dict:
    """An evaluation's metrics.json, its checksum checked; UserError naming it when it is damaged."""
    fix = "delete it and evaluate the run again (a sweep's run: run the sweep's command again)"
    values = read_sealed_json(path, fix)
    if not isinstance(values.get("accuracy"), (int, float)) or isinstance(values["accuracy"], bool):
        raise CompareError(f"{path} is damaged (it has no accuracy); {fix}")
    return values


def test_metrics_file(run_dir: Path) -> Path:
    """RUN/eval/test/metrics.json (what a sweep writes), else the newest test-split metrics.json under RUN/eval."""
    folder = RunFolder(run_dir)
    preferred = folder.test_evaluation / "metrics.json"
    if preferred.is_file():
        return preferred
    found = [path for path in folder.evaluations() if read_evaluation(path).get("split") == "test"]
    if not found:
        raise CompareError(f"{run_dir} has no evaluation of its test split; run `diffmic eval --run {run_dir}`")
    return max(found, key=os.path.getmtime)


def load_result(run_dir: Path) -> RunResult:
    config_file = RunFolder(run_dir).config_file
    if not config_file.is_file():
        raise CompareError(f"{config_file} is missing: is {run_dir} a run folder made by `diffmic train`?")
    try:
        values = yaml.safe_load(RunFolder(run_dir).read_config_text())
    except yaml.YAMLError as error:
        raise CompareError(f"{config_file} is damaged (it is not valid YAML: {str(error).splitlines()[0]}); restore "
                           f"it from a copy") from None
    if not isinstance(values, dict):
        raise CompareError(f"{config_file} is damaged (it holds no config sections); restore it from a copy")
    settings = {key: value for key, value in flatten(values).items() if key not in IGNORED_KEYS}
    path = test_metrics_file(run_dir)
    return RunResult(run_dir, settings, read_evaluation(path), path)


def short_names(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other key ends in: model.variant -> variant."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for length in range(1, len(parts) + 1):
            suffix = ".".join(parts[-length:])
            if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
                break
        names[key] = suffix
    return names


def group_label(settings: dict, varying: list[str]) -> str:
    if not varying:
        return "all runs"
    names = short_names(varying)
    return ", ".join(f"{names[key]}={settings.get(key)}" for key in varying)


def group_runs(results: list[RunResult]) -> list[tuple[str, list[RunResult]]]:
    """(label, runs) per distinct configuration, in the order the first run of each appears."""
    digests = sorted({result.metrics.get("manifest_sha256") for result in results}, key=str)
    if len(digests) > 1:
        by_digest = {result.metrics.get("manifest_sha256"): result.run_dir for result in results}
        examples = "; ".join(f"{run} (manifest {str(digest)[:12]})" for digest, run in by_digest.items())
        raise CompareError(f"the runs were evaluated on different test splits ({examples}): compare runs of "
                           f"one shard folder only")
    keys = sorted({key for result in results for key in result.settings})
    varying = [key for key in keys if len({json.dumps(r.settings.get(key), sort_keys=True) for r in results}) > 1]
    groups: dict[str, list[RunResult]] = {}
    for result in results:
        groups.setdefault(group_label(result.settings, varying), []).append(result)
    return list(groups.items())


def summarise(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None with a single run) of the defined values."""
    defined = [v for v in values if v is not None]
    if not defined:
        return None, None
    return float(np.mean(defined)), float(np.std(defined, ddof=1)) if len(defined) > 1 else None


@dataclass
class ComparisonRow:
    label: str
    runs: int
    stats: dict  # metric key -> (mean, std)


def compare_runs(run_dirs: list[Path]) -> list[ComparisonRow]:
    if not run_dirs:
        raise CompareError("no runs to compare: pass a sweep folder or run folders")
    results = [load_result(Path(run)) for run in run_dirs]
    return [ComparisonRow(label, len(members), {key: summarise([m.metrics.get(key) for m in members])
                                                for key, _ in COLUMNS})
            for label, members in group_runs(results)]


def format_stat(stat: tuple[float | None, float | None]) -> str:
    mean, std = stat
    if mean is None:
        return "n/a"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def markdown_table(rows: list[ComparisonRow]) -> str:
    header = ["configuration", "runs", *(title for _, title in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.label, str(row.runs), *(format_stat(row.stats[key]) for key, _ in COLUMNS)]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def csv_table(rows: list[ComparisonRow]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["configuration", "runs", *(f"{key}_{part}" for key, _ in COLUMNS for part in ("mean", "std"))])
    for row in rows:
        writer.writerow([row.label, row.runs, *("" if value is None else f"{value:.6f}"
                                                for key, _ in COLUMNS for value in row.stats[key])])
    return buffer.getvalue()


def plot_comparison(rows: list[ComparisonRow], path: Path) -> Path:
    """compare.png: one panel per metric, a point per configuration with its standard deviation."""
    from matplotlib.figure import Figure

    from .plots import _save_atomically

    shown = [(key, title) for key, title in COLUMNS if any(row.stats[key][0] is not None for row in rows)]
    figure = Figure(figsize=(3.3 * len(shown), 1.6 + 0.45 * len(rows)), layout="constrained")
    grid = figure.subplots(1, len(shown), sharey=True, squeeze=False).ravel()
    positions = np.arange(len(rows))[::-1]
    for axes, (key, title) in zip(grid, shown):
        means = [row.stats[key][0] for row in rows]
        errors = [row.stats[key][1] or 0.0 for row in rows]
        defined = [i for i, mean in enumerate(means) if mean is not None]
        axes.errorbar([means[i] for i in defined], positions[defined], xerr=[errors[i] for i in defined],
                      fmt="o", capsize=3)
        axes.set_title(title)
        axes.set_ylim(-0.6, len(rows) - 0.4)
        axes.grid(axis="x", alpha=0.3)
    grid[0].set_yticks(positions, labels=[f"{row.label} (n={row.runs})" for row in rows])
    figure.suptitle("mean ± standard deviation over seeds and folds (test split)")
    return _save_atomically(figure, path)


def write_comparison(rows: list[ComparisonRow], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [write_text_atomic(out_dir / "compare.md", markdown_table(rows)),
               write_text_atomic(out_dir / "compare.csv", csv_table(rows))]
    return written + [plot_comparison(rows, out_dir / "compare.png")]
