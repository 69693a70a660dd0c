"""`diffmic predict --flag-uncertain T`: the rows whose uncertainty (the run's eval.uncertainty, or --uncertainty)
is above T are marked for a human to check, in the printed table and in the CSV; a threshold or a run that cannot
give that uncertainty is one message."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffmic.config import load_config
from diffmic.data import eval_transform
from diffmic.errors import EvalSettingsError
from diffmic.evaluation.runner import (
    check_flag_threshold,
    flag_uncertain_rows,
    load_checkpoint_model,
    load_images,
)
from diffmic.evaluation.settings import resolve_eval_settings
from engine_helpers import REPO, diffmic_here

pytestmark = pytest.mark.timeout(900)


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Twelve digit-like pictures of varied difficulty: some chains will disagree on them."""
    folder = tmp_path_factory.mktemp("flag_images")
    for i in range(12):
        image = Image.new("RGB", (32, 32), (0, 0, 0))
        for x in range(4 + i, 28 - i // 2):
            image.putpixel((x, 8 + i), (255, 255, 255))
            image.putpixel((16, min(x, 31)), (40 * (i % 6), 255, 255))
        image.save(folder / f"digit{i:02d}.png")
    return folder


def test_flagged_rows_are_exactly_those_above_the_threshold(tiny_run, images, tmp_path):
    out = tmp_path / "flagged.csv"
    threshold = 0.5  # a multiple of 1/8: a row at exactly 0.5 is not above it
    result = diffmic_here(["predict", "--run", str(tiny_run), "--checkpoint", "last", "--n-samples", "8",
                           "--uncertainty", "disagreement", "--flag-uncertain", str(threshold), "--out", str(out),
                           str(images)])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(out)
    assert len(rows) == 12 and list(rows[0])[-1] == "check"
    uncertainties = [float(row["uncertainty"]) for row in rows]
    # Eight chains: each uncertainty is a multiple of 1/8, written without float32's noise. It can be 1: the
    # prediction is the argmax of the chains' mean, which may be no single chain's argmax.
    assert all(abs(u * 8 - round(u * 8)) < 1e-5 and 0 <= u <= 1 for u in uncertainties), uncertainties
    flagged = {row["file"] for row in rows if row["check"] == "yes"}
    assert flagged == {row["file"] for row, u in zip(rows, uncertainties) if u > threshold}
    assert {row["check"] for row in rows} <= {"yes", "no"}
    text = " ".join(result.stdout.split())
    assert "check" in result.stdout and result.stdout.count("CHECK") == len(flagged)
    assert f"{len(flagged)} of 12 image(s) above uncertainty 0.5 (disagreement): check them by hand" in text
    # The same predictions with threshold 0 flag every image on which any chain disagreed, and 1 flags none.
    for edge, expected in ((0.0, {row["file"] for row, u in zip(rows, uncertainties) if u > 0}), (1.0, set())):
        again = tmp_path / f"edge{edge}.csv"
        result = diffmic_here(["predict", "--run", str(tiny_run), "--checkpoint", "last", "--n-samples", "8",
                               "--uncertainty", "disagreement", "--flag-uncertain", str(edge), "--out", str(again),
                               str(images)])
        assert result.returncode == 0, result.stderr[-3000:]
        assert {row["file"] for row in read_csv(again) if row["check"] == "yes"} == expected


def test_predict_without_the_flag_writes_no_check_column(tiny_run, images, tmp_path):
    out = tmp_path / "plain.csv"
    result = diffmic_here(["predict", "--run", str(tiny_run), "--checkpoint", "last", "--n-samples", "2",
                           "--out", str(out), str(images / "digit00.png")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "check" not in read_csv(out)[0] and "CHECK" not in result.stdout


def test_the_default_measure_is_the_dcgs_and_needs_one_chain(tiny_run, images, tmp_path):
    """eval.uncertainty's default, the entropy of the DCG's probabilities over log C, flags with a single chain
    per image."""
    out = tmp_path / "dcg.csv"
    result = diffmic_here(["predict", "--run", str(tiny_run), "--checkpoint", "last", "--n-samples", "1",
                           "--precision", "fp32", "--flag-uncertain", "0.2", "--out", str(out), str(images)])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(out)
    # The DCG's own softmax of the same images, computed here (in fp32, as the command was told to): each row's uncertainty is their entropy / log C.
    info, model, _ = load_checkpoint_model(tiny_run, "last", None, torch.device("cpu"))
    files = [Path(row["file"]) for row in rows]
    with torch.no_grad():
        dcg_probs = model.guidance(load_images(files, eval_transform(info.config.data))).fused.softmax(dim=-1)
    expected = -(dcg_probs * dcg_probs.log()).sum(dim=1) / math.log(dcg_probs.shape[1])
    assert [float(row["uncertainty"]) for row in rows] == pytest.approx(expected.tolist(), abs=1e-5)
    assert [row["check"] for row in rows] == ["yes" if u > 0.2 else "no" for u in expected.tolist()]
    assert "(dcg_entropy)" in " ".join(result.stdout.split())


@pytest.mark.parametrize("problem", ["negative", "above one", "one chain"])
def test_a_flag_that_cannot_mean_anything_is_one_message(problem, tiny_run, images, tmp_path):
    out = tmp_path / "p.csv"
    threshold, samples = {"negative": ("-0.1", "4"), "above one": ("1.5", "4"), "one chain": ("0.3", "1")}[problem]
    expected = {"negative": "--flag-uncertain must be 0..1 for the uncertainty 'disagreement'",
                "above one": "--flag-uncertain must be 0..1 for the uncertainty 'disagreement'",
                "one chain": "'disagreement' is measured across chains, and n_samples is 1"}[problem]
    result = diffmic_here(["predict", "--run", str(tiny_run), "--checkpoint", "last", "--n-samples", samples,
                           "--uncertainty", "disagreement", f"--flag-uncertain={threshold}", "--out", str(out),
                           str(images)])
    assert result.returncode == 2, result.stderr[-3000:]
    message = " ".join(result.stderr.split())
    assert expected in message and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not out.exists()


def test_the_basic_variant_has_no_chain_uncertainty_to_flag():
    config = load_config(REPO / "configs" / "digits.yaml", ["model.variant=basic", "eval.uncertainty=t_test"])
    with pytest.raises(EvalSettingsError, match="'basic' variant"):
        check_flag_threshold(0.3, config, resolve_eval_settings(config))
    basic = load_config(REPO / "configs" / "digits.yaml", ["model.variant=basic"])
    check_flag_threshold(0.3, basic, resolve_eval_settings(basic))  # the DCG's measure needs no chain
    with pytest.raises(EvalSettingsError, match="must be 0..1"):
        check_flag_threshold(float("nan"), basic, resolve_eval_settings(basic))
    spread = load_config(REPO / "configs" / "digits.yaml", ["eval.uncertainty=spread"])
    check_flag_threshold(2.5, spread, resolve_eval_settings(spread))  # a standard deviation has no upper bound
    with pytest.raises(EvalSettingsError, match="must be 0 or more"):
        check_flag_threshold(-1.0, spread, resolve_eval_settings(spread))


def test_rows_without_an_uncertainty_are_never_flagged():
    rows = [{"uncertainty": 0.5}, {"uncertainty": 0.3}, {"uncertainty": None}, {"uncertainty": 0.0}]
    flag_uncertain_rows(rows, 0.3)
    assert [row["check"] for row in rows] == ["yes", "no", "no", "no"]
