"""How far to trust the probabilities and the uncertainty of an evaluation, over a whole split.

- Calibration: expected calibration error (top-label, equal-width bins), the multi-class Brier score and
  the negative log-likelihood. Brier and NLL come from scikit-learn. ECE is a few lines over the same
  bins the reliability diagram draws; torchmetrics has it too, but importing it costs ~6 s per
  evaluation process, so the test suite checks our value against torchmetrics' instead.
- Uncertainty (the measures of diffmic.diffusion.uncertainty): the AUROC of each for telling wrong
  predictions from right ones, and selective prediction (accuracy of the most certain share of the images
  when the rest is referred to a clinician) at fixed coverages.
- Temperature scaling: the temperature of the softmax of the chains' mean state that fits a split best.

Pure numpy and scikit-learn, no torch; undefined values are None (JSON null), as in metrics.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..diffusion.uncertainty import top_label_uncertainty
from .metrics import _row_normalised, as_numpy, class_indices

ECE_BINS = 15
COVERAGES = (1.0, 0.9, 0.8, 0.7)


@dataclass(frozen=True)
class ReliabilityBins:
    """Top-label confidence in `len(counts)` equal-width bins over [0, 1]; empty bins hold NaN means."""

    edges: np.ndarray  # (bins + 1,)
    counts: np.ndarray  # (bins,) images per bin
    confidence: np.ndarray  # (bins,) mean top-label probability of the bin's images
    accuracy: np.ndarray  # (bins,) share of the bin's images whose top label is right

    @property
    def ece(self) -> float:
        """Sum over bins of (share of images) x |accuracy - confidence|."""
        filled = self.counts > 0
        weights = self.counts[filled] / self.counts.sum()
        return float(np.sum(weights * np.abs(self.accuracy[filled] - self.confidence[filled])))


def _checked(labels: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    probs = as_numpy(probs).astype(np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"probs must have shape (N, C) with N > 0, got {probs.shape}")
    return class_indices(labels, "labels", probs.shape[0], probs.shape[1]), _row_normalised(probs)


def reliability_bins(labels: Any, probs: Any, bins: int = ECE_BINS) -> ReliabilityBins:
    """A confidence c falls in bin i when edges[i] <= c < edges[i + 1]; c = 1 falls in the last bin
    (torchmetrics' convention, so the two ECEs agree exactly)."""
    labels, probs = _checked(labels, probs)
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=False), 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / counts
        accuracy = np.bincount(index, weights=(predicted == labels).astype(np.float64), minlength=bins) / counts
    return ReliabilityBins(edges, counts, mean_confidence, accuracy)


def calibration_metrics(labels: Any, probs: Any, bins: int = ECE_BINS) -> dict[str, float]:
    """ece (top-label, `bins` equal-width bins), brier (mean over images of the squared distance between
    the probability vector and the one-hot label, 0..2) and nll (mean -log p(true class); scikit-learn
    clips probabilities at the float epsilon, so a zero probability on the true class costs about 36)."""
    from sklearn.metrics import log_loss

    labels, probs = _checked(labels, probs)
    one_hot = np.eye(probs.shape[1])[labels]
    # Written out, not sklearn's brier_score_loss: with two classes that one switches to the binary score
    # (half of this), so the same model would score differently on two classes than on seven.
    return {"ece": reliability_bins(labels, probs, bins).ece,
            "brier": float(np.mean(np.sum((probs - one_hot) ** 2, axis=1))),
            # Rescaled exactly: float32 rows are 1 only to ~1e-7, and scikit-learn warns at its float64 tolerance.
            "nll": float(log_loss(labels, probs / probs.sum(axis=1, keepdims=True),
                                  labels=list(range(probs.shape[1]))))}


def certainty_order(uncertainty: Any, probs: Any) -> np.ndarray:
    """Image indices from the most to the least certain: by uncertainty, ties (chains' disagreement takes
    few values) broken by the lower top-label probability counting as less certain, then by index."""
    uncertainty = as_numpy(uncertainty).astype(np.float64).reshape(-1)
    top = as_numpy(probs).astype(np.float64).max(axis=1)
    return np.lexsort((np.arange(len(uncertainty)), -top, uncertainty))


def selective_curve(labels: Any, probs: Any, uncertainty: Any) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, accuracy) when only the k most certain images are kept, for k = 1..N."""
    labels, probs = _checked(labels, probs)
    right = (probs.argmax(axis=1) == labels)[certainty_order(uncertainty, probs)]
    kept = np.arange(1, len(right) + 1)
    return kept / len(right), np.cumsum(right) / kept


def kept_count(coverage: float, total: int) -> int:
    """How many images a coverage keeps: at least that share of `total` (and at least one). The small
    tolerance stops float products such as 0.7 * 10 = 7.000000000000001 from keeping one image more."""
    return max(1, math.ceil(coverage * total - 1e-9))


def selective_accuracy(labels: Any, probs: Any, uncertainty: Any,
                       coverages: tuple[float, ...] = COVERAGES) -> dict[str, float]:
    """Accuracy of the most certain `kept_count(coverage, N)` images, keyed "100%", "90%", ..."""
    coverage, accuracy = selective_curve(labels, probs, uncertainty)
    return {f"{round(c * 100)}%": float(accuracy[kept_count(c, len(coverage)) - 1]) for c in coverages}


def uncertainty_auroc(labels: Any, probs: Any, uncertainty: Any) -> float | None:
    """AUROC of the uncertainty as a detector of wrong predictions (1: every wrong prediction is more
    uncertain than every right one; 0.5: no better than chance). None when all are right or all wrong."""
    from sklearn.metrics import roc_auc_score

    labels, probs = _checked(labels, probs)
    wrong = probs.argmax(axis=1) != labels
    if wrong.all() or not wrong.any():
        return None
    return float(roc_auc_score(wrong, as_numpy(uncertainty).astype(np.float64).reshape(-1)))


def fitted_temperature(states: Any, labels: Any) -> float:
    """The temperature T > 0 that minimises the NLL of softmax(states / T) on these images (Guo et al.'s
    temperature scaling): `states` (N, C) are the chains' mean final states. Searched on log T in
    [1e-3, 1e3]; the argmax of the probabilities does not depend on T."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    states = as_numpy(states).astype(np.float64)
    labels = class_indices(labels, "labels", states.shape[0], states.shape[1])
    rows = np.arange(len(labels))

    def nll(log_temperature: float) -> float:
        return float(-log_softmax(states / np.exp(log_temperature), axis=1)[rows, labels].mean())

    best = minimize_scalar(nll, bounds=(np.log(1e-3), np.log(1e3)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(best.x))


def trust_metrics(labels: Any, probs: Any, dcg_probs: Any, measures: dict[str, np.ndarray],
                  chosen: str) -> dict[str, Any]:
    """The calibration of the diffusion and of the DCG alone; how well each uncertainty measure in `measures`
    (name -> (N,) values, those these predictions allow) flags the prediction's mistakes, and for the `chosen`
    one (eval.uncertainty) the selective accuracy; the DCG's 1 - max probability against the DCG's own
    mistakes beside them."""
    metrics: dict[str, Any] = dict(calibration_metrics(labels, probs))
    metrics.update({f"dcg_{key}": value for key, value in calibration_metrics(labels, dcg_probs).items()})
    metrics["uncertainty_measure"] = chosen
    if measures:
        metrics["uncertainty_auroc_by_measure"] = {name: uncertainty_auroc(labels, probs, values)
                                                   for name, values in measures.items()}
    if chosen in measures:
        metrics["uncertainty_auroc"] = metrics["uncertainty_auroc_by_measure"][chosen]
        metrics["selective_accuracy"] = selective_accuracy(labels, probs, measures[chosen])
    dcg_uncertainty = top_label_uncertainty(dcg_probs)
    metrics["dcg_uncertainty_auroc"] = uncertainty_auroc(labels, dcg_probs, dcg_uncertainty)
    metrics["dcg_selective_accuracy"] = selective_accuracy(labels, dcg_probs, dcg_uncertainty)
    return metrics
