"""PNG figures of an evaluation: the confusion matrix and the reverse-diffusion trajectory.

matplotlib is imported inside the functions (it is slow to import and only evaluation draws), and the
figures are drawn on an explicit Agg canvas rather than through pyplot: no display is needed and the
process-wide backend of a caller (a notebook, say) is left alone. Every PNG is written to a temporary
file in the target folder and moved into place, so a crash never leaves a truncated image behind.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import write_atomic
from .metrics import as_numpy, class_indices


def _save_atomically(figure: Any, path: str | os.PathLike) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    return write_atomic(path, lambda temporary: figure.savefig(temporary, format="png", dpi=120))


def _class_colours(classes: int) -> list:
    from matplotlib import colormaps

    # Qualitative maps keep neighbouring classes distinguishable; tab20 covers up to 20 classes.
    palette = colormaps["tab10" if classes <= 10 else "tab20"]
    return [palette(c % palette.N) for c in range(classes)]


def plot_confusion_matrix(confusion: Any, class_names: Sequence[str], path: str | os.PathLike,
                          normalise: bool = True) -> Path:
    """Confusion matrix (rows = true, columns = predicted) annotated with counts; the colour is the
    row fraction when `normalise` (so rare classes are as readable as common ones), else the count."""
    from matplotlib.figure import Figure

    counts = as_numpy(confusion).astype(np.int64)
    classes = len(class_names)
    if counts.shape != (classes, classes):
        raise ValueError(f"confusion must be {classes}x{classes} for {classes} class names, got {counts.shape}")
    row_totals = counts.sum(axis=1, keepdims=True)
    # A class without true samples has an all-zero row: keep it at 0 instead of dividing by zero.
    colour = np.divide(counts, row_totals, out=np.zeros(counts.shape), where=row_totals > 0) if normalise else counts
    top = 1.0 if normalise else max(int(counts.max()), 1)

    size = 2.5 + 0.6 * classes
    figure = Figure(figsize=(size + 1, size), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(colour, cmap="Blues", vmin=0, vmax=top)
    figure.colorbar(image, ax=axes, label="fraction of true class" if normalise else "images")
    for true in range(classes):
        for predicted in range(classes):
            dark = colour[true, predicted] > 0.6 * top
            axes.text(predicted, true, str(counts[true, predicted]), ha="center", va="center",
                      color="white" if dark else "black", fontsize=9)
    axes.set_xticks(range(classes), labels=list(class_names), rotation=45, ha="right")
    axes.set_yticks(range(classes), labels=list(class_names))
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(f"confusion matrix ({int(counts.sum())} images)")
    return _save_atomically(figure, path)


def _panel_indices(length: int, max_panels: int) -> list[int]:
    """Up to `max_panels` indices spread evenly over 0..length-1, always the first and the last."""
    count = min(length, max_panels)
    if count == 1:
        return [0]
    # count <= length makes the spacing >= 1, so the rounded indices are distinct.
    return [int(i) for i in np.round(np.linspace(0, length - 1, count))]


def _shared_projection(states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Principal components of all (rows, C) states together: one basis for every panel, so a point's
    position means the same thing at every step. Returns the 2-D coordinates and the explained
    variance ratio of each axis. C == 2, a single point or zero variance give zero-padded axes."""
    centred = states - states.mean(axis=0)
    _, singular, basis = np.linalg.svd(centred, full_matrices=False)
    # The SVD's signs are arbitrary; fix them so the same data always gives the same picture.
    largest = np.argmax(np.abs(basis), axis=1)
    basis = basis * np.sign(basis[np.arange(len(basis)), largest])[:, None]
    coordinates = np.zeros((len(states), 2))
    kept = min(2, basis.shape[0])
    coordinates[:, :kept] = centred @ basis[:kept].T
    variance = singular ** 2
    ratio = np.zeros(2)
    if variance.sum() > 0:
        ratio[:kept] = variance[:kept] / variance.sum()
    return coordinates, ratio


def _clip_outliers(states: np.ndarray, percent: float = 1.0) -> np.ndarray:
    """Clips each class coordinate to its [percent, 100 - percent] percentile range: one diverging chain
    would otherwise take the first principal axis and squeeze every other point into a line."""
    if len(states) < 10:
        return states
    low, high = np.percentile(states, [percent, 100 - percent], axis=0)
    return np.clip(states, low, high)


def _trajectory_states(trajectory: Sequence[tuple[int, Any]], labels: np.ndarray, classes: int) -> list:
    if len(trajectory) == 0 or len(labels) == 0:
        raise ValueError("plot_trajectory needs at least one step and one image")
    steps = [(int(t), as_numpy(states).astype(np.float64)) for t, states in trajectory]
    expected = (len(labels), classes)
    for t, states in steps:
        if states.shape != expected:
            raise ValueError(f"states at t = {t} have shape {states.shape}, expected {expected}")
        if not np.all(np.isfinite(states)):
            raise ValueError(f"states at t = {t} are not finite")
    return steps


def _draw_panels(grid: Sequence[Any], chosen: list, per_panel: list, labels: np.ndarray,
                 class_names: Sequence[str]) -> None:
    colours = _class_colours(len(class_names))
    # Big dots for a handful of images, small ones for thousands.
    marker_size = float(np.clip(3000 / len(labels), 2, 30))
    present = np.unique(labels)
    for axes, (t, _), points in zip(grid, chosen, per_panel):
        for c in present:
            mine = labels == c
            axes.scatter(points[mine, 0], points[mine, 1], s=marker_size, color=colours[c], alpha=0.7,
                         linewidths=0, label=class_names[c])
        axes.set_title(f"t = {t}")


def _label_axes(grid: Sequence[Any], panels: int, columns: int, ratio: np.ndarray) -> None:
    for index, axes in enumerate(grid):
        if index >= panels:
            axes.set_visible(False)
            continue
        if index + columns >= panels:  # nothing visible below: this panel carries the x axis
            axes.xaxis.set_tick_params(labelbottom=True)
            axes.set_xlabel(f"PC1 ({ratio[0]:.0%} var.)")
        if index % columns == 0:
            axes.set_ylabel(f"PC2 ({ratio[1]:.0%} var.)")


def plot_trajectory(trajectory: Sequence[tuple[int, Any]], labels: Any, class_names: Sequence[str],
                    path: str | os.PathLike, max_panels: int = 6) -> Path:
    """The reverse diffusion of N images, y_T (first entry) to y_0 (last), as up to `max_panels`
    scatter panels of a shared 2-D PCA, coloured by true class (the DiffMIC paper's Figure 2)."""
    from matplotlib.figure import Figure

    if max_panels < 2:
        raise ValueError(f"max_panels must be at least 2 (first and last step), got {max_panels}")
    labels = as_numpy(labels).reshape(-1)
    labels = class_indices(labels, "labels", len(labels), len(class_names))
    steps = _trajectory_states(trajectory, labels, len(class_names))
    chosen = [steps[i] for i in _panel_indices(len(steps), max_panels)]
    coordinates, ratio = _shared_projection(_clip_outliers(np.concatenate([states for _, states in chosen])))

    columns = min(len(chosen), 3)
    rows = math.ceil(len(chosen) / columns)
    figure = Figure(figsize=(3.4 * columns + 1.6, 3.2 * rows), layout="constrained")
    grid = figure.subplots(rows, columns, sharex=True, sharey=True, squeeze=False).ravel()
    _draw_panels(grid, chosen, np.split(coordinates, len(chosen)), labels, class_names)
    _label_axes(grid, len(chosen), columns, ratio)
    handles, names = grid[0].get_legend_handles_labels()
    legend = figure.legend(handles, names, loc="outside right center", title="true class")
    for handle in legend.legend_handles:  # readable swatches even when the points are tiny
        handle.set_sizes([30])
    figure.suptitle(f"reverse diffusion y_T -> y_0, {len(labels)} images")
    return _save_atomically(figure, path)


def plot_reliability(labels: Any, probs_by_model: dict[str, Any], path: str | os.PathLike,
                     bins: int = 15) -> Path:
    """Reliability diagrams side by side (one per model, e.g. the diffusion and the DCG): per confidence
    bin, the accuracy as a bar against the diagonal of perfect calibration, the gap shaded, and the
    number of images written on each bar; the ECE in each title."""
    from matplotlib.figure import Figure

    from .calibration import reliability_bins

    figure = Figure(figsize=(4.6 * len(probs_by_model), 4.6), layout="constrained")
    grid = figure.subplots(1, len(probs_by_model), sharey=True, squeeze=False).ravel()
    for axes, (name, probs) in zip(grid, probs_by_model.items()):
        found = reliability_bins(labels, probs, bins)
        centres, width = (found.edges[:-1] + found.edges[1:]) / 2, 1.0 / bins
        filled = found.counts > 0
        axes.bar(centres[filled], found.accuracy[filled], width=width, color="#4c72b0", edgecolor="white",
                 label="accuracy")
        gap_low = np.minimum(found.accuracy[filled], found.confidence[filled])
        axes.bar(centres[filled], np.abs(found.accuracy[filled] - found.confidence[filled]), bottom=gap_low,
                 width=width, fill=False, hatch="///", edgecolor="#c44e52", linewidth=0.8,
                 label="gap to confidence")  # hatched, not tinted: over an accuracy bar a tint changes its colour
        axes.plot([0, 1], [0, 1], color="0.3", linestyle="--", linewidth=1, label="perfect calibration")
        for centre, accuracy, count in zip(centres[filled], found.accuracy[filled], found.counts[filled]):
            axes.text(centre, min(accuracy, 0.93) + 0.02, str(int(count)), ha="center", va="bottom", fontsize=7,
                      rotation=90)
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1.05)
        axes.set_xlabel("confidence (top-label probability)")
        axes.set_title(f"{name}: ECE {found.ece:.3f}")
    grid[0].set_ylabel("accuracy")
    grid[0].legend(loc="upper left", fontsize=8)
    figure.suptitle(f"reliability, {bins} bins, {int(found.counts.sum())} images (numbers: images per bin)")
    return _save_atomically(figure, path)


def plot_selective(curves: dict[str, tuple[Any, Any]], path: str | os.PathLike,
                   marks: Sequence[float] = (1.0, 0.9, 0.8, 0.7)) -> Path:
    """Accuracy against coverage when the least certain images are referred (selective prediction), one
    line per model; the coverages of the metrics table are marked."""
    from matplotlib.figure import Figure

    from .calibration import kept_count

    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    axes = figure.add_subplot()
    for name, (coverage, accuracy) in curves.items():
        coverage, accuracy = as_numpy(coverage), as_numpy(accuracy)
        line, = axes.plot(coverage, accuracy, linewidth=1.6, label=name)
        index = [kept_count(mark, len(coverage)) - 1 for mark in marks]
        axes.scatter(coverage[index], accuracy[index], color=line.get_color(), s=18, zorder=3)
    for mark in marks:
        axes.axvline(mark, color="0.85", linewidth=0.8, zorder=0)
    axes.set_xlim(0, 1.01)
    axes.set_xlabel("coverage (share of images kept; the rest referred for review)")
    axes.set_ylabel("accuracy of the kept images")
    axes.invert_xaxis()
    axes.legend(loc="lower right")  # the curves start at the lower left (full coverage)
    axes.set_title("selective prediction: the most uncertain images referred first")
    return _save_atomically(figure, path)
