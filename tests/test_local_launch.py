"""`--gpus N` without --slurm: N local processes from one command (`--gpus 0 --tasks-per-node N` on the CPU),
started through Accelerate's launcher, each running the job a Slurm task runs."""

from __future__ import annotations

import json

import pytest

from engine_helpers import REPO, TINY, diffmic, digits_shards, tiny_run  # noqa: F401

pytestmark = pytest.mark.timeout(900)
CONFIG = str(REPO / "configs" / "digits.yaml")
TWO_CPU_PROCESSES = ["--gpus", "0", "--tasks-per-node", "2"]


def overrides(*extra: str) -> list[str]:
    budget = [*TINY, "train.dcg_warmup_epochs=0", "train.max_steps=3", "train.val_every=0", "train.batch_size=8"]
    return [item for override in [*budget, *extra] for item in ("--set", override)]


def test_one_command_trains_with_two_cpu_processes(digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    result = diffmic(["train", "--config", CONFIG, "--shards", str(digits_shards), "--run-dir", str(run_dir),
                      "--no-progress", *TWO_CPU_PROCESSES, *overrides()], threads=1, COLUMNS="1000")
    said = " ".join((result.stdout + result.stderr).split())  # the log goes to stderr, the closing line to stdout
    assert "2 local CPU process(es)" in said
    assert said.count(f"run {run_dir}: 2 process(es) on cpu") == 1  # the banner, from rank 0 only
    assert said.count("max_steps at step 3 (epoch 0) with 2 process(es)") == 1
    run = json.loads((run_dir / "run.json").read_text())
    assert run["world_size"] == 2 and run["sessions"][-1]["processes"] == 2
    assert run["command"].startswith("diffmic train --config") and "--tasks-per-node 2" in run["command"]
    assert (run_dir / "checkpoints" / "step-3" / "COMPLETE").is_file()


def test_two_process_evaluation_equals_the_single_process_one(tiny_run, tmp_path):
    single, double = tmp_path / "one", tmp_path / "two"
    diffmic(["eval", "--run", str(tiny_run), "--checkpoint", "last", "--out", str(single), "--no-progress"])
    result = diffmic(["eval", "--run", str(tiny_run), "--checkpoint", "last", "--out", str(double), "--no-progress",
                      *TWO_CPU_PROCESSES], threads=1, COLUMNS="1000")
    assert "accuracy" in result.stdout and f"wrote {double}/metrics.json" in result.stdout  # from rank 0
    assert (double / "predictions.csv").read_bytes() == (single / "predictions.csv").read_bytes()


@pytest.mark.parametrize("flags, message", [
    (["--gpus", "2"], "this machine has no GPU visible to torch; for CPU processes pass --gpus 0 --tasks-per-node 2"),
    (["--tasks-per-node", "2"], "--tasks-per-node 2 without --slurm runs CPU processes: add --gpus 0"),
    (["--gpus", "0"], "--gpus 0 runs CPU processes here: say how many with --tasks-per-node N"),
    (["--nodes", "2", "--gpus", "0", "--tasks-per-node", "1"], "--nodes 2 needs --slurm"),
])
def test_impossible_local_launches_fail_before_anything_starts(digits_shards, tmp_path, flags, message):
    import torch

    if flags == ["--gpus", "2"] and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has 2 GPUs: --gpus 2 is possible here")
    run_dir = tmp_path / "run"
    result = diffmic(["train", "--config", CONFIG, "--shards", str(digits_shards), "--run-dir", str(run_dir),
                      *flags, *overrides()], check=False)
    assert result.returncode == 2 and message in result.stderr, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not run_dir.exists()
