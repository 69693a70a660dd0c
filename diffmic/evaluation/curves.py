"""`curves.png`: how a training run went, drawn from the rows of its metrics.jsonl.

Four panels over optimiser steps: the loss terms, the two learning rates, the validation accuracy and
macro F1 of the diffusion beside the DCG's own, and the throughput. The DCG warm-up (the guidance model
trained alone) is shaded in each. Works on a run that is still going: only the rows so far are drawn.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from ..run import RunFolder, read_metrics
from .plots import _save_atomically

LOSS_TERMS = (("loss", "total"), ("mse", "MSE (fused branch)"), ("mmd", "MMD (global + local)"),
              ("dcg_loss", "guidance cross-entropy"))
RATES = (("lr_denoiser", "denoiser"), ("lr_dcg", "guidance model"))
OLD_KEYS = {"guide_loss": "dcg_loss", "lr_guide": "lr_dcg"}  # runs logged before the guidance network was `dcg`


def training_rows(rows: Iterable[dict]) -> list[dict]:
    """Training-interval rows, one per step (the last one written wins: a resumed run may have logged a
    step twice), in step order."""
    latest = {row["step"]: {OLD_KEYS.get(key, key): value for key, value in row.items()}
              for row in rows if "loss" in row and "step" in row}
    return [latest[step] for step in sorted(latest)]


def validation_rows(rows: Iterable[dict]) -> list[dict]:
    latest = {row["step"]: row for row in rows if "split" in row and "step" in row}
    return [latest[step] for step in sorted(latest)]


def _series(rows: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
    if not points:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*points)
    return np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)


def warmup_end(rows: Sequence[dict]) -> float | None:
    """The step at which joint training started, as far as the log shows it: halfway between the last
    warm-up row and the first joint row (exact to the logging interval), or None without a warm-up."""
    warmup = [row["step"] for row in rows if row.get("phase") == "dcg_warmup"]
    joint = [row["step"] for row in rows if row.get("phase") == "joint"]
    if not warmup:
        return None
    return (max(warmup) + min(joint)) / 2 if joint else float(max(warmup))


def _shade_warmup(axes, end: float | None, label: str | None) -> None:
    if end:
        axes.axvspan(0, end, color="0.9", zorder=0, label=label)


def _draw_losses(axes, train: Sequence[dict]) -> None:
    positive = True
    for key, label in LOSS_TERMS:
        steps, values = _series(train, key)
        if len(steps):
            axes.plot(steps, values, linewidth=1.2, label=label)
            positive = positive and bool(np.all(values > 0))
    if positive:  # the terms differ by orders of magnitude (MMD is ~1e-3 of the MSE)
        axes.set_yscale("log")
    axes.set_title("training losses (mean per logging interval)")


def _draw_rates(axes, train: Sequence[dict]) -> None:
    for key, label in RATES:
        steps, values = _series(train, key)
        if len(steps):
            axes.plot(steps, values, linewidth=1.2, label=label)
    axes.set_title("learning rates")


def _draw_validation(axes, validation: Sequence[dict]) -> None:
    split = validation[0]["split"] if validation else "val"
    styles = ((f"{split}/accuracy", "diffusion accuracy", "-", "o"), (f"{split}/macro_f1", "diffusion macro F1", "-", "s"),
              (f"{split}/dcg_accuracy", "DCG accuracy", "--", "o"), (f"{split}/dcg_macro_f1", "DCG macro F1", "--", "s"))
    drawn = False
    for key, label, line, marker in styles:
        steps, values = _series(validation, key)
        if len(steps):
            axes.plot(steps, values, linestyle=line, marker=marker, markersize=4, linewidth=1.2, label=label)
            drawn = True
    best = [row for row in validation if row.get("best")]
    if best:
        axes.axvline(best[-1]["step"], color="0.5", linewidth=0.8, linestyle=":", label="best checkpoint")
    axes.set_title(f"validation on the {split} split" if drawn else "validation: none logged (yet, or train.val_every=0)")


def _draw_throughput(axes, train: Sequence[dict]) -> None:
    steps, values = _series(train, "images_per_s")
    if len(steps):
        axes.plot(steps, values, linewidth=1.2, color="#55a868", label="images/s")
    axes.set_title("throughput (all processes)")


def plot_training_curves(rows: Iterable[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Writes curves.png from metrics.jsonl rows; raises ValueError when no training step is logged yet."""
    from matplotlib.figure import Figure

    rows = list(rows)
    train, validation = training_rows(rows), validation_rows(rows)
    if not train:
        raise ValueError("no training step is logged yet (metrics.jsonl has no training rows)")
    end = warmup_end(train)
    figure = Figure(figsize=(12, 7.5), layout="constrained")
    grid = figure.subplots(2, 2, sharex=True).ravel()
    for index, (axes, draw, rows_of) in enumerate(zip(grid, (_draw_losses, _draw_rates, _draw_validation,
                                                             _draw_throughput), (train, train, validation, train))):
        _shade_warmup(axes, end, "DCG warm-up (guidance model alone)" if index == 0 else None)
        draw(axes, rows_of)
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8, loc="best")
    for axes in grid[2:]:
        axes.set_xlabel("optimiser step")
    figure.suptitle(title or f"training curves, {len(train)} logged intervals up to step {train[-1]['step']}")
    return _save_atomically(figure, path)


def draw_run_curves(folder: RunFolder, warn: Callable[[str], None] | None = None) -> Path:
    """RUN/curves.png from RUN/metrics.jsonl (the trainer at the end of a session, `diffmic report` at any time);
    ValueError while no training step is logged. `warn` hears of a last line still being written (read_metrics)."""
    return plot_training_curves(read_metrics(folder, warn), folder.curves_file,
                                title=f"{folder.name}: training curves")
