"""Calibration and uncertainty metrics against hand-computed values, ECE against torchmetrics, and the
figures they draw."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from diffmic.evaluation.calibration import (
    calibration_metrics,
    reliability_bins,
    selective_accuracy,
    selective_curve,
    trust_metrics,
    uncertainty_auroc,
)
from diffmic.evaluation.curves import plot_training_curves, training_rows, warmup_end
from diffmic.evaluation.plots import plot_reliability, plot_selective

pytestmark = pytest.mark.filterwarnings("error")

# Five images, two classes; confidences kept away from the 15 bin edges (multiples of 1/15).
LABELS = [0, 1, 1, 1, 1]
PROBS = [[.95, .05], [.9, .1], [.3, .7], [.62, .38], [.04, .96]]
UNCERTAINTY = [0.0, 0.5, 0.5, 0.75, 0.0]
# By hand: top labels 0 0 1 0 1 -> right, wrong, right, wrong, right.
# Bins: .95 and .96 share bin 14 (acc 1, mean conf .955), .9 bin 13 (acc 0), .7 bin 10 (acc 1), .62 bin 9 (acc 0).
# ECE = (2 * .045 + .9 + .3 + .62) / 5 = 1.91 / 5.
# Brier = mean of sum of squares: (.005 + 1.62 + .18 + .7688 + .0032) / 5 = 2.577 / 5.
# NLL = -mean log p(true) = -(log .95 + log .1 + log .7 + log .38 + log .96) / 5.
# Uncertainty AUROC, wrong {.5, .75} against right {0, .5, 0}: (1 + .5 + 1) + 3 = 5.5 of 6 pairs.
# Certainty order (uncertainty, then higher top probability first): 5 R, 1 R, 2 W, 3 R, 4 W
# -> accuracy of the k most certain: 1, 1, 2/3, 3/4, 3/5.


def test_calibration_metrics_equal_the_hand_computed_values():
    found = calibration_metrics(LABELS, PROBS)
    assert found["ece"] == pytest.approx(1.91 / 5)
    assert found["brier"] == pytest.approx(2.577 / 5)
    assert found["nll"] == pytest.approx(-(math.log(.95) + math.log(.1) + math.log(.7) + math.log(.38)
                                           + math.log(.96)) / 5)
    bins = reliability_bins(LABELS, PROBS)
    assert bins.counts.tolist() == [0] * 9 + [1, 1, 0, 0, 1, 2]
    assert bins.confidence[14] == pytest.approx(.955) and bins.accuracy[13] == 0.0


def test_float32_probabilities_are_scored_without_a_warning():
    # What the evaluator passes: float32 softmax rows, which sum to 1 only to float32 rounding.
    logits = np.random.default_rng(0).normal(size=(64, 7)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert np.abs(probs.astype(np.float64).sum(axis=1) - 1).max() > 1e-8
    scores = calibration_metrics(np.arange(64) % 7, probs)  # the module turns any warning into an error
    assert math.isfinite(scores["nll"]) and scores["nll"] > 0


def test_brier_equals_scikit_learn_with_more_than_two_classes():
    from sklearn.metrics import brier_score_loss

    rng = np.random.default_rng(2)
    probs, labels = rng.dirichlet([1] * 5, size=50), rng.integers(0, 5, size=50)
    assert calibration_metrics(labels, probs)["brier"] == pytest.approx(
        brier_score_loss(labels, probs, labels=list(range(5))))


def test_ece_equals_torchmetrics_on_random_predictions():
    torch = pytest.importorskip("torch")
    from torchmetrics.functional.classification import multiclass_calibration_error

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 7)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, 7, size=500)
    theirs = multiclass_calibration_error(torch.tensor(probs), torch.tensor(labels), num_classes=7, n_bins=15,
                                          norm="l1")
    assert calibration_metrics(labels, probs)["ece"] == pytest.approx(float(theirs), abs=1e-6)


def test_uncertainty_auroc_and_selective_accuracy_equal_the_hand_computed_values():
    assert uncertainty_auroc(LABELS, PROBS, UNCERTAINTY) == pytest.approx(5.5 / 6)
    coverage, accuracy = selective_curve(LABELS, PROBS, UNCERTAINTY)
    assert coverage.tolist() == pytest.approx([.2, .4, .6, .8, 1.0])
    assert accuracy.tolist() == pytest.approx([1, 1, 2 / 3, 3 / 4, 3 / 5])
    # At least the coverage's share is kept: 90% of 5 keeps all 5, 80% and 70% keep 4.
    assert selective_accuracy(LABELS, PROBS, UNCERTAINTY) == pytest.approx(
        {"100%": 3 / 5, "90%": 3 / 5, "80%": 3 / 4, "70%": 3 / 4})


def test_uncertainty_auroc_is_undefined_without_wrong_predictions():
    assert uncertainty_auroc([0, 1], [[.9, .1], [.2, .8]], [0.1, 0.2]) is None


def test_trust_metrics_cover_the_diffusion_and_the_dcg():
    dcg = [[.6, .4], [.45, .55], [.4, .6], [.3, .7], [.2, .8]]
    without_measures = trust_metrics(LABELS, PROBS, dcg, {}, "disagreement")
    assert set(without_measures) == {"ece", "brier", "nll", "dcg_ece", "dcg_brier", "dcg_nll", "uncertainty_measure",
                                     "dcg_uncertainty_auroc", "dcg_selective_accuracy"}
    assert without_measures["dcg_brier"] == pytest.approx(calibration_metrics(LABELS, dcg)["brier"])
    measures = {"disagreement": np.array(UNCERTAINTY), "dcg_max_prob": 1 - np.max(dcg, axis=1)}
    with_chains = trust_metrics(LABELS, PROBS, dcg, measures, "disagreement")
    assert with_chains["uncertainty_measure"] == "disagreement"
    assert with_chains["uncertainty_auroc"] == pytest.approx(5.5 / 6)
    # Every measure is scored against the prediction's own mistakes (the second and fourth images): the DCG's
    # 1 - max probability .45, .3 of the wrong ones against .4, .4, .2 of the right ones: 4 of 6 pairs.
    assert with_chains["uncertainty_auroc_by_measure"] == {"disagreement": pytest.approx(5.5 / 6),
                                                           "dcg_max_prob": pytest.approx(4 / 6)}
    assert with_chains["selective_accuracy"] == selective_accuracy(LABELS, PROBS, UNCERTAINTY)
    assert set(with_chains["dcg_selective_accuracy"]) == {"100%", "90%", "80%", "70%"}
    # The DCG is right on every image, so its uncertainty cannot separate its own wrong from right.
    assert with_chains["dcg_uncertainty_auroc"] is None
    # A measure these predictions cannot give (one chain) is named but not scored.
    assert "uncertainty_auroc" not in trust_metrics(LABELS, PROBS, dcg, {"dcg_max_prob": measures["dcg_max_prob"]},
                                                    "disagreement")


def test_fitted_temperature_minimises_the_nll_and_recovers_a_known_one():
    from diffmic.evaluation.calibration import fitted_temperature

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4000, 5)) * 3
    labels = np.array([rng.choice(5, p=np.exp(row) / np.exp(row).sum()) for row in logits])
    # States that are the true logits scaled by 0.2: the best temperature divides by 0.2 again.
    assert fitted_temperature(logits * 0.2, labels) == pytest.approx(0.2, rel=0.1)


def _png(path):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.format, image.size


def test_reliability_and_selective_figures_are_pngs(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, size=200)
    probs = rng.dirichlet([1, 1, 1], size=200)
    plot_reliability(labels, {"diffusion": probs, "DCG": probs[::-1]}, tmp_path / "reliability.png")
    plot_selective({"diffusion": selective_curve(labels, probs, rng.random(200))}, tmp_path / "selective.png")
    for name in ("reliability.png", "selective.png"):
        kind, size = _png(tmp_path / name)
        assert kind == "PNG" and min(size) > 300


ROWS = [{"step": 2, "epoch": 0, "phase": "dcg_warmup", "loss": 2.0, "dcg_loss": 2.0, "lr_denoiser": 0.0,
         "lr_dcg": 2e-4, "images_per_s": 50.0},
        {"step": 4, "epoch": 1, "phase": "joint", "loss": 1.5, "mse": 0.9, "mmd": 0.01, "dcg_loss": 0.59,
         "lr_denoiser": 1e-4, "lr_dcg": 2e-4, "images_per_s": 40.0},
        {"step": 4, "epoch": 1, "split": "val", "val/accuracy": 0.5, "val/macro_f1": 0.4, "val/dcg_accuracy": 0.6,
         "best": True},
        {"step": 6, "epoch": 1, "phase": "joint", "loss": 1.2, "mse": 0.7, "mmd": 0.01, "dcg_loss": 0.49,
         "lr_denoiser": 2e-4, "lr_dcg": 2e-4, "images_per_s": 41.0},
        # The same step logged again after a resume: the later row counts.
        {"step": 6, "epoch": 1, "phase": "joint", "loss": 1.1, "mse": 0.6, "mmd": 0.01, "dcg_loss": 0.49,
         "lr_denoiser": 2e-4, "lr_dcg": 2e-4, "images_per_s": 42.0}]


def test_training_curves_keep_one_row_per_step_and_find_the_warmup(tmp_path):
    train = training_rows(ROWS)
    assert [row["step"] for row in train] == [2, 4, 6] and train[-1]["loss"] == 1.1
    assert warmup_end(train) == 3.0
    kind, size = _png(plot_training_curves(ROWS, tmp_path / "curves.png"))
    assert kind == "PNG" and min(size) > 500


def test_training_curves_need_a_logged_step(tmp_path):
    with pytest.raises(ValueError, match="no training step"):
        plot_training_curves([ROWS[2]], tmp_path / "curves.png")


def test_report_draws_the_curves_of_a_run_that_is_still_writing(tmp_path):
    import json

    from engine_helpers import diffmic_here

    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps(row) for row in ROWS]
    # The trainer is in the middle of appending a row.
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 8, "epoch": 1, "pha')
    result = diffmic_here(["report", str(run)])
    assert result.returncode == 0, result.stderr
    assert _png(run / "curves.png")[0] == "PNG"
    assert f"line {len(ROWS) + 1} is incomplete" in " ".join(result.stderr.split())  # said, not silently dropped


def test_report_on_a_folder_without_metrics_names_it(tmp_path):
    from engine_helpers import diffmic_here

    result = diffmic_here(["report", "--run", str(tmp_path)])
    assert result.returncode == 2 and f"{tmp_path / 'metrics.jsonl'} is missing" in " ".join(result.stderr.split())
