"""Classification metrics over a whole split, from scikit-learn, as a JSON-ready dict and a rich table.

Every metric is computed once from the gathered labels and probabilities of the whole split: averaging
per-batch F1, AUROC or kappa gives a different (wrong) number. scikit-learn is imported inside the
function because it takes about a second to import and the command line should start fast.

Undefined values are None (JSON null), never NaN, so `json.dumps(..., allow_nan=False)` works:
- `auroc_macro_ovr` is None when fewer than two classes occur in the labels (no negatives or no
  positives for any one-vs-rest split);
- `kappa_quadratic` is None when labels and predictions all fall in one class (0 / 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

# The config's `select_metric` names -> keys of the metrics dict.
SELECTION_KEYS = {"accuracy": "accuracy", "macro_f1": "macro_f1", "kappa": "kappa_quadratic"}


@dataclass(frozen=True)
class Metric:
    """A number of metrics.json and where else it is shown. Each registered metric a run's metrics hold is a
    row of `diffmic eval`'s terminal table (in this order); `column` makes it a column of `diffmic compare`'s
    tables (mean ± std over seeds and folds); `logged` makes it part of every validation during training
    (RUN/metrics.jsonl as <split>/<logged>, and the experiment trackers)."""

    key: str  # in metrics.json; dcg_<key>: the DCG's own value of <key>, from its probabilities
    title: str  # in the terminal table
    column: str | None = None
    logged: str | None = None
    with_dcg: bool = False  # the table shows the DCG's own value (dcg_<key>) in brackets beside it


# The registry: the terminal table, `diffmic compare` and the validation rows (and so the trackers) read it.
METRICS = (
    Metric("accuracy", "accuracy", column="accuracy", logged="accuracy"),
    Metric("macro_f1", "macro F1", column="macro F1", logged="macro_f1"),
    Metric("balanced_accuracy", "balanced accuracy"),
    Metric("auroc_macro_ovr", "AUROC (macro, one-vs-rest)", column="AUROC"),
    Metric("kappa_quadratic", "Cohen's kappa (quadratic)", column="kappa", logged="kappa"),
    Metric("num_images", "images"),
    Metric("ece", "ECE (DCG)", column="ECE", with_dcg=True),  # diffmic.evaluation.calibration computes it
    Metric("dcg_accuracy", "DCG accuracy", column="DCG accuracy", logged="dcg_accuracy"),
    Metric("dcg_macro_f1", "DCG macro F1", logged="dcg_macro_f1"),
    Metric("uncertainty_auroc", "uncertainty AUROC (wrong vs right)"),  # with several chains per image
)

# Rows sums further than this from 1 are treated as unnormalised scores and renormalised.
_ROW_SUM_TOLERANCE = 1e-6


def as_numpy(values: Any) -> np.ndarray:
    """A numpy copy of an array, list or tensor (checked by duck typing, so torch is not imported)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def class_indices(values: Any, name: str, rows: int, classes: int) -> np.ndarray:
    """`values` as int64 class indices of shape (rows,), or a ValueError that says what is wrong."""
    indices = as_numpy(values)
    if indices.shape != (rows,):
        raise ValueError(f"{name} must have shape ({rows},), got {indices.shape}")
    if indices.dtype.kind not in "iub" and not np.array_equal(indices, np.round(indices)):
        raise ValueError(f"{name} must hold integer class indices")
    indices = indices.astype(np.int64)
    if rows and (indices.min() < 0 or indices.max() >= classes):
        raise ValueError(f"{name} must lie in [0, {classes}), got values {indices.min()}..{indices.max()}")
    return indices


def _row_normalised(probs: np.ndarray) -> np.ndarray:
    """Probabilities whose rows sum to 1: averaged samples or float32 sums drift a little, and
    one-vs-rest AUROC compares columns across rows, so every row must be on the same scale."""
    if not np.all(np.isfinite(probs)) or np.any(probs < 0):
        raise ValueError("probs must be finite and non-negative (class probabilities, not raw y_0)")
    sums = probs.sum(axis=1, keepdims=True)
    if np.any(sums <= 0):
        raise ValueError("every row of probs must have a positive sum")
    if np.all(np.abs(sums - 1) <= _ROW_SUM_TOLERANCE):
        return probs
    return probs / sums


def _auroc_macro_ovr(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """Mean of the one-vs-rest AUROCs of the classes present in `labels`. sklearn's multi-class
    roc_auc_score refuses a class without positives, so absent classes are skipped here instead."""
    from sklearn.metrics import roc_auc_score

    present = np.unique(labels)
    if len(present) < 2:
        return None
    scores = [roc_auc_score(labels == c, probs[:, c]) for c in present]
    return float(np.mean(scores))


def _kappa_quadratic(labels: np.ndarray, preds: np.ndarray, classes: int) -> float | None:
    from sklearn.metrics import cohen_kappa_score

    # With a single class in both, expected and observed disagreement are both 0: undefined.
    if len(np.union1d(labels, preds)) < 2:
        return None
    return float(cohen_kappa_score(labels, preds, labels=list(range(classes)), weights="quadratic"))


def _per_class(labels: np.ndarray, preds: np.ndarray, class_names: Sequence[str]) -> dict[str, dict]:
    from sklearn.metrics import precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(
        labels, preds, labels=list(range(len(class_names))), average=None, zero_division=0)
    return {name: {"precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
                   "support": int(support[c])} for c, name in enumerate(class_names)}


def classification_metrics(labels: Any, probs: Any, preds: Any = None,
                           class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Metrics of a whole split: labels (N,) class indices, probs (N, C), preds (N,) (default: the
    argmax of probs). Returns a JSON-serialisable dict (see the module docstring for None values)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

    probs = as_numpy(probs).astype(np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(f"probs must have shape (N, C) with N, C > 0, got {probs.shape}")
    rows, classes = probs.shape
    class_names = [str(c) for c in range(classes)] if class_names is None else [str(n) for n in class_names]
    if len(class_names) != classes or len(set(class_names)) != classes:
        raise ValueError(f"class_names must be {classes} distinct names, got {class_names}")
    probs = _row_normalised(probs)
    labels = class_indices(labels, "labels", rows, classes)
    preds = probs.argmax(axis=1) if preds is None else class_indices(preds, "preds", rows, classes)

    return {
        "num_images": rows,
        "class_names": class_names,
        "accuracy": float(accuracy_score(labels, preds)),
        # sklearn's default class set: those in labels or predictions. A class never seen and never
        # predicted has no F1 to speak of; one predicted but absent rightly counts as 0.
        "macro_f1": float(f1_score(labels, preds, average="macro", zero_division=0)),
        # Mean recall over the classes present in labels, i.e. balanced accuracy; recall_score with
        # explicit labels avoids balanced_accuracy_score's warning when a prediction is of an absent class.
        "balanced_accuracy": float(recall_score(labels, preds, labels=np.unique(labels),
                                                average="macro", zero_division=0)),
        "auroc_macro_ovr": _auroc_macro_ovr(labels, probs),
        "kappa_quadratic": _kappa_quadratic(labels, preds, classes),
        "per_class": _per_class(labels, preds, class_names),
        "confusion_matrix": confusion_matrix(labels, preds, labels=list(range(classes))).tolist(),
    }


def split_metrics(labels: Any, probs: Any, dcg_probs: Any, class_names: Sequence[str]) -> dict[str, Any]:
    """`classification_metrics` of the diffusion's probabilities, with the DCG's own value of every registered
    dcg_<key> metric that `classification_metrics` computes (from the DCG's probabilities)."""
    metrics = classification_metrics(labels, probs, class_names=class_names)
    dcg = classification_metrics(labels, dcg_probs, class_names=class_names)
    own = {metric.key: metric.key.removeprefix("dcg_") for metric in METRICS if metric.key.startswith("dcg_")}
    metrics.update({key: dcg[name] for key, name in own.items() if name in dcg})
    return metrics


def selection_score(metrics: Mapping[str, Any], name: str) -> float:
    """The value the trainer maximises for `select_metric` `name`. An undefined value (kappa on a
    single-class split) is -inf, so it never wins a comparison the way NaN would silently do."""
    if name not in SELECTION_KEYS:
        raise ValueError(f"unknown select metric {name!r}; expected one of {', '.join(SELECTION_KEYS)}")
    value = metrics[SELECTION_KEYS[name]]
    return float("-inf") if value is None else float(value)


def _formatted(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4f}"
    return str(value)


def _overall_table(metrics: Mapping[str, Any], extra_rows: Iterable[tuple[str, Any]]) -> Table:
    table = Table(show_edge=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for metric in METRICS:
        if metric.key in metrics:
            value = _formatted(metrics[metric.key])
            dcg = f" ({_formatted(metrics[f'dcg_{metric.key}'])})" if metric.with_dcg else ""
            table.add_row(metric.title, value + dcg)
    for label, value in extra_rows:
        table.add_row(str(label), _formatted(value))
    return table


def _per_class_table(per_class: Mapping[str, Mapping[str, Any]]) -> Table:
    table = Table(show_edge=False)
    table.add_column("class")
    for column in ("precision", "recall", "f1", "support"):
        table.add_column(column, justify="right")
    for name, scores in per_class.items():
        table.add_row(name, *(_formatted(scores[k]) for k in ("precision", "recall", "f1", "support")))
    return table


class _BesideOrStacked:
    """Two tables beside each other when the terminal is wide enough for both, else one above the other
    (rich would otherwise squeeze both and cut every number to "0.9…" in an 80-column terminal)."""

    def __init__(self, title: str, left: Table, right: Table, gap: int = 2):
        self.title, self.left, self.right, self.gap = title, left, right, gap

    def __rich_console__(self, console, options):
        widths = [Measurement.get(console, options, part).maximum for part in (self.left, self.right)]
        if sum(widths) + self.gap <= options.max_width:
            grid = Table(title=self.title, show_header=False, show_edge=False, box=None, padding=(0, self.gap // 2))
            grid.add_column()
            grid.add_column()
            grid.add_row(self.left, self.right)
            yield grid
        else:
            yield Text(self.title, style="italic")
            yield self.left
            yield Text("")
            yield self.right


def metrics_table(metrics: Mapping[str, Any], title: str,
                  extra_rows: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None) -> _BesideOrStacked:
    """A terminal table: overall metrics (plus `extra_rows`, e.g. the DCG's accuracy or images/s)
    beside per-class precision, recall, F1 and support. The two parts have different columns, so
    they are two inner tables, side by side where the terminal is wide enough."""
    extra = extra_rows.items() if isinstance(extra_rows, Mapping) else (extra_rows or ())
    return _BesideOrStacked(title, _overall_table(metrics, extra), _per_class_table(metrics["per_class"]))
