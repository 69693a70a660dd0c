"""Evaluation outputs: whole-split metrics, the terminal table and the PNG figures.

Importing this package is cheap: scikit-learn and matplotlib are imported by the functions that use them.
"""

from .metrics import METRICS, SELECTION_KEYS, Metric, as_numpy, classification_metrics, metrics_table, selection_score
from .plots import plot_confusion_matrix, plot_trajectory

__all__ = ["METRICS", "Metric", "SELECTION_KEYS", "as_numpy", "classification_metrics", "metrics_table",
           "plot_confusion_matrix", "plot_trajectory", "selection_score"]
