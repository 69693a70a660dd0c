"""DiffMIC learns on real images that ship offline: the full model on scikit-learn's digits, trained for
at most three minutes on the CPU, classifies the held-out 30% well."""

from __future__ import annotations

import json
import time

import pytest

from engine_helpers import REPO, diffmic, shard_digits

# 32 px digits (the 8x8 scans lose nothing) keep the three ResNets cheap; one DCG warm-up epoch, three
# joint ones, 48 noise draws per image for the denoiser, one checkpoint at the end; the rest is
# configs/digits.yaml. Measured on 2 cores: 161 s of training, test accuracy 0.93.
FAST = ["data.image_size=32", "model.dcg.k=1", "train.dcg_warmup_epochs=1", "train.epochs=3", "train.val_every=0",
        "train.checkpoint_every=10", "data.num_workers=0", "diffusion.noise_draws=48", "train.lr=0.006",
        "eval.n_samples=10"]
BUDGET_S = 180


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_full_diffmic_reaches_85_percent_on_digits_within_three_minutes(tmp_path):
    shards = shard_digits(tmp_path / "digits", size=32, shard_size=256, test_fraction=0.3, val_fraction=0.1)
    run = tmp_path / "run"
    started = time.monotonic()
    diffmic(["train", "--config", str(REPO / "configs" / "digits.yaml"), "--shards", str(shards), "--run-dir",
             str(run), "--no-progress", *[x for o in FAST for x in ("--set", o)]])
    trained_s = time.monotonic() - started
    diffmic(["eval", "--run", str(run), "--checkpoint", "last", "--out", str(tmp_path / "eval"), "--no-progress"])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    print(f"trained in {trained_s:.0f} s: test accuracy {metrics['accuracy']:.4f} (DCG {metrics['dcg_accuracy']:.4f})")
    assert trained_s < BUDGET_S
    assert metrics["accuracy"] >= 0.85
