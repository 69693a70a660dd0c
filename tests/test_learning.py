"""DiffMIC learns on real images that ship offline: the full model on scikit-learn's digits, trained for a
fixed budget of steps on the CPU, classifies the held-out 30% well. The run's time is measured by
`python benchmarks/learn_digits.py --test-run`, not asserted: a busy machine stretches it while nothing is wrong."""

from __future__ import annotations

import importlib.util
import json

import pytest

from engine_helpers import REPO, diffmic, shard_digits


def learning_run() -> tuple[dict, list[str]]:
    """The shards and settings of this test, owned by the benchmark that times them."""
    spec = importlib.util.spec_from_file_location("learn_digits", REPO / "benchmarks" / "learn_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TEST_RUN_SHARDS, module.TEST_RUN_SETTINGS


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_full_diffmic_reaches_85_percent_on_digits_in_a_fixed_step_budget(tmp_path):
    split, settings = learning_run()
    shards = shard_digits(tmp_path / "digits", **split)
    run = tmp_path / "run"
    diffmic(["train", "--config", str(REPO / "configs" / "digits.yaml"), "--shards", str(shards), "--run-dir",
             str(run), "--no-progress", *[x for o in settings for x in ("--set", o)]])
    diffmic(["eval", "--run", str(run), "--checkpoint", "last", "--out", str(tmp_path / "eval"), "--no-progress"])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    print(f"test accuracy {metrics['accuracy']:.4f} (DCG {metrics['dcg_accuracy']:.4f})")
    # The budget: one DCG warm-up epoch and three joint ones, every step of them, nothing more.
    steps_per_epoch = json.loads((run / "run.json").read_text())["steps_per_epoch"]
    assert metrics["checkpoint_step"] == (1 + 3) * steps_per_epoch
    assert metrics["accuracy"] >= 0.85
