"""Experiment trackers through Accelerate (train.log_with), read back from their own files, no network; and
the curves a run draws of itself."""

from __future__ import annotations

import json
import os
import warnings

import pytest

from diffmic.config import load_config
from engine_helpers import REPO, TINY, diffmic_here, finish, start_training

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def tracked_run(digits_shards, tmp_path_factory):
    """One tiny run logging to TensorBoard and to MLflow with a local file store."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    folder = tmp_path_factory.mktemp("tracked")
    store = f"file:{folder / 'mlruns'}"
    # MLflow 3 keeps the file store in maintenance mode behind this switch; it needs no database server.
    output = finish(start_training(folder / "run", digits_shards, "train.log_with=[tensorboard, mlflow]",
                                   MLFLOW_TRACKING_URI=store, MLFLOW_ALLOW_FILE_STORE="true"))
    rows = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    return folder / "run", store, rows, output


def logged(rows, key):
    return {row["step"]: row[key] for row in rows if key in row}


def test_tensorboard_gets_every_logged_scalar_at_its_step(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, rows, output = tracked_run
    assert "logging to tensorboard, mlflow" in output
    (events,) = {path.parent for path in (run / "tensorboard").rglob("events.out.tfevents.*")
                 if "hparams" not in str(path.parent.name) and path.parent.parent.name == "tensorboard"}
    accumulator = EventAccumulator(str(events)).Reload()
    for key in ("loss", "val/accuracy", "val/dcg_macro_f1", "lr_denoiser"):
        written = {event.step: event.value for event in accumulator.Scalars(key)}
        assert written == pytest.approx(logged(rows, key)), key


def test_mlflow_gets_the_same_metrics_and_the_config_as_parameters(tracked_run):
    from mlflow.tracking import MlflowClient

    run, store, rows, _ = tracked_run
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = MlflowClient(tracking_uri=store)
    (experiment,) = [e for e in client.search_experiments() if e.name == "diffmic-digits"]
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == run.name
    for key in ("loss", "val/accuracy"):
        history = {metric.step: metric.value for metric in client.get_metric_history(found.info.run_id, key)}
        assert history == pytest.approx(logged(rows, key)), key
    params = found.data.params
    assert params["train.batch_size"] == "32" and params["model.variant"] == "full"
    assert params["run.manifest_sha256"] == json.loads((run / "run.json").read_text())["manifest_sha256"]


def test_a_run_draws_its_curves_when_it_ends(tracked_run):
    run, _, _, output = tracked_run
    assert (run / "curves.png").is_file() and f"training curves: {run / 'curves.png'}" in output


def test_a_tracker_that_is_not_installed_is_named_before_anything_starts(digits_shards, tmp_path):
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    result = diffmic_here(["train", "--config", str(REPO / "configs" / "digits.yaml"), "--shards", str(digits_shards),
                           "--run-dir", str(tmp_path / "run"), "--set", "train.log_with=[wandb]",
                           *[item for override in TINY for item in ("--set", override)]])
    assert result.returncode == 2
    assert "wandb is not installed: pip install wandb" in result.stderr
    assert not (tmp_path / "run").exists()


def test_the_old_tensorboard_key_still_loads_as_log_with(tmp_path):
    with pytest.warns(FutureWarning, match="train.tensorboard is deprecated"):
        config = load_config(REPO / "configs" / "digits.yaml", ["train.tensorboard=true"])
    assert config.train.log_with == ["tensorboard"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config(REPO / "configs" / "digits.yaml").train.log_with == []
