import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from diffmic.evaluation import (
    classification_metrics,
    metrics_table,
    plot_confusion_matrix,
    plot_trajectory,
    selection_score,
)
from diffmic.evaluation.plots import _panel_indices, _shared_projection

# sklearn's zero-division and single-label warnings must be handled, not printed.
pytestmark = pytest.mark.filterwarnings("error")

# Ten images, three classes. The argmax of PROBS is PREDS.
LABELS = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
PREDS = [0, 0, 0, 1, 1, 1, 1, 2, 2, 0]
PROBS = [[.8, .1, .1], [.7, .2, .1], [.6, .3, .1], [.3, .6, .1], [.1, .8, .1],
         [.2, .7, .1], [.3, .5, .2], [.1, .1, .8], [.2, .1, .7], [.5, .1, .4]]
NAMES = ["a", "b", "c"]

# Worked by hand:
# confusion rows (true) a: 3 1 0, b: 0 3 0, c: 1 0 2; column sums 4 4 2.
# a: P 3/4 R 3/4 F1 3/4;  b: P 3/4 R 1 F1 6/7;  c: P 1 R 2/3 F1 4/5.
# macro F1 = (3/4 + 6/7 + 4/5) / 3 = 337/420;  balanced accuracy = (3/4 + 1 + 2/3) / 3 = 29/36.
# Quadratic kappa with weights (i - j)^2 (the 1/(C-1)^2 factor cancels): observed sum w*O = 1*1 + 4*1 = 5;
# expected E = outer(rows 4 3 3, cols 4 4 2) / 10 gives sum w*E = (16 + 4*8 + 12 + 6 + 4*12 + 12) / 10 = 12.6;
# kappa = 1 - 5 / 12.6 = 38/63.
# One-vs-rest AUROC = share of (positive, negative) pairs ranked right, ties count 1/2:
# a: positives .8 .7 .6 .3 against .1 .2 .3 .1 .2 .5 -> 6 + 6 + 6 + 4.5 = 22.5 of 24;
# b: positives .8 .7 .5 against .1 .2 .3 .6 .1 .1 .1 -> 7 + 7 + 6 = 20 of 21;  c: 21 of 21.
# macro = (22.5/24 + 20/21 + 1) / 3 = 971/1008.
EXPECTED = {"accuracy": 8 / 10, "macro_f1": 337 / 420, "balanced_accuracy": 29 / 36,
            "kappa_quadratic": 38 / 63, "auroc_macro_ovr": 971 / 1008}
EXPECTED_PER_CLASS = {"a": (3 / 4, 3 / 4, 3 / 4, 4), "b": (3 / 4, 1.0, 6 / 7, 3), "c": (1.0, 2 / 3, 4 / 5, 3)}
EXPECTED_CONFUSION = [[3, 1, 0], [0, 3, 0], [1, 0, 2]]


def check_per_class(per_class, expected):
    assert list(per_class) == list(expected)
    for name, (precision, recall, f1, support) in expected.items():
        got = per_class[name]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((precision, recall, f1))
        assert got["support"] == support


def test_metrics_match_hand_computed_values():
    metrics = classification_metrics(np.array(LABELS), np.array(PROBS), class_names=NAMES)
    for key, value in EXPECTED.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    check_per_class(metrics["per_class"], EXPECTED_PER_CLASS)
    assert metrics["confusion_matrix"] == EXPECTED_CONFUSION
    assert metrics["num_images"] == 10
    json.dumps(metrics, allow_nan=False)  # plain Python types only, no NaN


def test_tensors_and_explicit_predictions():
    from_tensors = classification_metrics(torch.tensor(LABELS), torch.tensor(PROBS), torch.tensor(PREDS), NAMES)
    assert from_tensors["accuracy"] == pytest.approx(0.8)
    # Given predictions win over the argmax: all class 0 -> 4 of 10 right.
    all_zero = classification_metrics(LABELS, PROBS, preds=[0] * 10)
    assert all_zero["accuracy"] == pytest.approx(0.4)
    assert all_zero["confusion_matrix"] == [[4, 0, 0], [3, 0, 0], [3, 0, 0]]
    assert list(all_zero["per_class"]) == ["0", "1", "2"]  # default names are the indices


def test_unnormalised_probabilities_are_renormalised():
    # Class 0 scores .75 .5 (positives) vs .25 .5: 2 + 1.5 of 4 pairs -> 0.875, class 1 the same.
    probs = np.array([[.75, .25], [.5, .5], [.25, .75], [.5, .5]])
    assert classification_metrics([0, 0, 1, 1], probs)["auroc_macro_ovr"] == pytest.approx(0.875)
    # Rows scaled differently (exact in binary): raw column 0 would be .75 1.5 vs .125 3.5 -> AUROC 0.5.
    scaled = probs * np.array([[1], [3], [0.5], [7]])
    assert classification_metrics([0, 0, 1, 1], scaled)["auroc_macro_ovr"] == pytest.approx(0.875)
    with pytest.raises(ValueError, match="non-negative"):
        classification_metrics(LABELS, np.array(PROBS) - 0.5)


def test_class_absent_from_labels_gets_zero_row_and_changes_nothing_else():
    probs = np.hstack([np.array(PROBS), np.zeros((10, 1))])
    metrics = classification_metrics(LABELS, probs, class_names=NAMES + ["d"])
    for key, value in EXPECTED.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    check_per_class(metrics["per_class"], {**EXPECTED_PER_CLASS, "d": (0.0, 0.0, 0.0, 0)})
    assert metrics["confusion_matrix"] == [row + [0] for row in EXPECTED_CONFUSION] + [[0, 0, 0, 0]]


def test_prediction_of_a_class_absent_from_labels():
    # a: P 1 R 1/2 F1 2/3; b: P 1 R 1 F1 1; c (never true, predicted once): 0 -> macro F1 5/9.
    metrics = classification_metrics([0, 0, 1, 1], np.eye(3)[[0, 2, 1, 1]], class_names=NAMES)
    assert metrics["macro_f1"] == pytest.approx(5 / 9)
    assert metrics["balanced_accuracy"] == pytest.approx(3 / 4)  # recall over the true classes a, b only
    assert metrics["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # a: positive scores 1, 0 vs negatives 0, 0 -> 2 + 1 of 4; b: 1, 1 vs 0, 0 -> 4 of 4.
    assert metrics["auroc_macro_ovr"] == pytest.approx((3 / 4 + 1) / 2)


def test_single_class_split_has_undefined_auroc_and_kappa():
    metrics = classification_metrics([1, 1, 1], np.eye(3)[[1, 1, 1]])
    assert metrics["accuracy"] == 1.0
    assert metrics["auroc_macro_ovr"] is None and metrics["kappa_quadratic"] is None
    json.dumps(metrics, allow_nan=False)
    assert selection_score(metrics, "kappa") == float("-inf")


def test_selection_score_names():
    metrics = classification_metrics(LABELS, PROBS)
    assert selection_score(metrics, "accuracy") == pytest.approx(0.8)
    assert selection_score(metrics, "macro_f1") == pytest.approx(337 / 420)
    assert selection_score(metrics, "kappa") == pytest.approx(38 / 63)
    with pytest.raises(ValueError, match="unknown select metric"):
        selection_score(metrics, "auroc")


@pytest.mark.parametrize("labels, probs, names, message", [
    (LABELS[:9], PROBS, None, "labels must have shape"),
    ([0] * 9 + [3], PROBS, None, r"labels must lie in \[0, 3\)"),
    (LABELS, PROBS, ["a", "b"], "class_names"),
    (LABELS, PROBS, ["a", "a", "b"], "distinct"),
    ([], np.zeros((0, 3)), None, "N, C > 0"),
    ([0.5] * 10, PROBS, None, "integer"),
])
def test_bad_inputs_fail_with_a_message(labels, probs, names, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(labels, probs, class_names=names)


@pytest.mark.parametrize("width", [160, 80, 60])  # a wide terminal, the 80 columns of a pipe or CI log, narrow
def test_metrics_table_shows_overall_and_per_class_rows_whole_at_any_width(width):
    metrics = classification_metrics(LABELS, PROBS, class_names=["MEL", "NV", "BCC"])
    console = Console(file=io.StringIO(), width=width, record=True)
    console.print(metrics_table(metrics, "test split", extra_rows={"DCG accuracy": 0.7}))
    text = console.export_text()
    assert "…" not in text  # no number or header cut short
    for expected in ("test split", "macro F1", "0.8024", "Cohen's kappa", "0.6032", "DCG accuracy", "0.7000",
                     "MEL", "BCC", "0.8571"):
        assert expected in text


def assert_png(path):
    with Image.open(path) as image:
        image.verify()  # checks the PNG's structure and CRCs
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode in ("RGB", "RGBA")
        assert image.width > 100 and image.height > 100
    # Only the PNG is left: the temporary file was renamed, not copied.
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_confusion_matrix_png(tmp_path):
    path = tmp_path / "eval" / "confusion_matrix.png"
    # Class b without true images: its row must not divide by zero.
    plot_confusion_matrix([[3, 1, 0], [0, 0, 0], [1, 0, 2]], NAMES, path)
    assert_png(path)
    first = path.read_bytes()
    plot_confusion_matrix(EXPECTED_CONFUSION, NAMES, path, normalise=False)  # overwrites in place
    assert_png(path)
    assert path.read_bytes() != first
    with pytest.raises(ValueError, match="3x3"):
        plot_confusion_matrix([[1, 2], [3, 4]], NAMES, path)


def test_panel_indices_keep_first_and_last():
    assert _panel_indices(1, 6) == [0]
    assert _panel_indices(4, 6) == [0, 1, 2, 3]
    assert _panel_indices(11, 6) == [0, 2, 4, 6, 8, 10]
    picked = _panel_indices(251, 6)
    assert picked[0] == 0 and picked[-1] == 250 and len(set(picked)) == 6


def test_shared_projection_two_classes_and_zero_variance():
    points = np.random.default_rng(0).normal(size=(20, 2))
    coordinates, ratio = _shared_projection(points)
    # With C = 2 the projection is a rotation of the centred points: distances are kept.
    centred = points - points.mean(axis=0)
    np.testing.assert_allclose(np.linalg.norm(coordinates, axis=1), np.linalg.norm(centred, axis=1))
    assert ratio.sum() == pytest.approx(1.0)
    flat, flat_ratio = _shared_projection(np.ones((5, 7)))
    assert not flat.any() and not flat_ratio.any()


def random_trajectory(images, classes, steps, seed=0):
    generator = np.random.default_rng(seed)
    labels = generator.integers(0, classes, images)
    target = np.eye(classes)[labels]
    trajectory = []
    for i, t in enumerate(np.linspace(1000, 0, steps).astype(int)):
        weight = i / max(steps - 1, 1)
        states = weight * target + (1 - weight) * generator.normal(size=(images, classes))
        trajectory.append((int(t), torch.tensor(states, dtype=torch.float32) if i % 2 else states))
    return trajectory, labels


@pytest.mark.parametrize("images, classes, steps", [(10, 2, 11), (3, 7, 11), (40, 7, 3), (1, 2, 1)])
def test_trajectory_png(tmp_path, images, classes, steps):
    trajectory, labels = random_trajectory(images, classes, steps)
    path = tmp_path / "trajectory.png"
    plot_trajectory(trajectory, labels, [f"class {c}" for c in range(classes)], path)
    assert_png(path)


def test_trajectory_of_identical_states_and_bad_shapes(tmp_path):
    path = tmp_path / "trajectory.png"
    plot_trajectory([(10, np.zeros((4, 3))), (0, np.zeros((4, 3)))], [0, 1, 2, 0], NAMES, path)
    assert_png(path)
    with pytest.raises(ValueError, match="expected"):
        plot_trajectory([(10, np.zeros((4, 3))), (0, np.zeros((4, 2)))], [0, 1, 2, 0], NAMES, path)
    with pytest.raises(ValueError, match="max_panels"):
        plot_trajectory([(0, np.zeros((4, 3)))], [0, 1, 2, 0], NAMES, path, max_panels=1)


def test_the_registry_decides_the_terminal_rows_and_a_registered_metric_shows_with_its_dcg_twin():
    from diffmic.evaluation.metrics import METRICS, split_metrics

    metrics = split_metrics(LABELS, PROBS, PROBS[::-1], class_names=["MEL", "NV", "BCC"])
    assert {"dcg_accuracy", "dcg_macro_f1"} <= set(metrics)  # every registered dcg_ metric classification computes
    metrics.update({"ece": 0.125, "dcg_ece": 0.25})
    console = Console(file=io.StringIO(), width=160, record=True)
    console.print(metrics_table(metrics, "test split"))
    text = console.export_text()
    assert "ECE (DCG)" in text and "0.1250 (0.2500)" in text
    rows = [metric.title for metric in METRICS if metric.key in metrics]
    positions = [text.index(title) for title in rows]  # each title's first place is its own row
    assert positions == sorted(positions)  # in the registry's order
    assert "uncertainty AUROC" not in text  # no uncertainty measured: not in the metrics, not in the table
