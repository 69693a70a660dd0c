"""`diffmic sweep` and `diffmic compare`: the plan, resuming after a kill, and the comparison table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from diffmic.evaluation.compare import CompareError, compare_runs, markdown_table, write_comparison
from diffmic.launch.sweep import SweepError, SweepPlan, merge_with_existing, parse_grid, plan_runs
from engine_helpers import REPO, TINY, cpu_environment, diffmic_here

pytestmark = pytest.mark.timeout(900)


def test_a_grid_expands_configs_values_seeds_and_folds_in_order():
    grid, fixed = parse_grid(["model.variant=basic,full", "train.lr=0.01", "data.mean=[0.5, 0.5, 0.5]"])
    assert grid == {"model.variant": ["basic", "full"]}
    assert fixed == ["train.lr=0.01", "data.mean=[0.5, 0.5, 0.5]"]
    runs = plan_runs([("configs/digits.yaml", 2000)], seeds=2, grid=grid, fixed=fixed, folds=3)
    assert len(runs) == 2 * 2 * 3
    assert runs[0].name == "digits-variant=basic-seed2000-fold0"
    assert runs[-1].name == "digits-variant=full-seed2001-fold2"
    assert runs[0].overrides == ["train.lr=0.01", "data.mean=[0.5, 0.5, 0.5]", "model.variant=basic",
                                 "train.seed=2000", "data.fold=0"]


def test_a_folder_of_another_sweep_is_not_mixed_with_a_new_one(tmp_path):
    first = SweepPlan("diffmic sweep A", None, plan_runs([("a.yaml", 1)], 2, {}, []))
    first.save(tmp_path)
    assert [run.name for run in merge_with_existing(tmp_path, first).runs] == ["a-seed1", "a-seed2"]
    other = SweepPlan("diffmic sweep B", None, plan_runs([("a.yaml", 1)], 3, {}, []))
    with pytest.raises(SweepError, match="holds another sweep"):
        merge_with_existing(tmp_path, other)


def test_status_tells_a_run_whose_process_died_from_one_that_trains(tmp_path):
    from diffmic.run.lock import this_holder

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = {**this_holder(""), "pid": int(ended.stdout), "pid_started": None}
    plan = SweepPlan("diffmic sweep A", None, plan_runs([("a.yaml", 1)], 3, {}, []))
    for run, status, executor in zip(plan.runs, ("training", "evaluating", "training"),
                                     (dead, dead, this_holder(""))):  # the last one: this live process
        run.status, run.executor = status, executor
        run.write_status(tmp_path)
    plan.save(tmp_path)
    shown = [run.shown_status() for run in SweepPlan.load(tmp_path).runs]
    assert shown == ["interrupted", "interrupted", "training"]
    status = diffmic_here(["status", str(tmp_path)])
    assert status.stdout.count("interrupted") == 2 and "resume" in status.stdout  # the note says how


def fake_run(folder, variant, seed, accuracy, ece, digest="abc"):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"variant": variant}, "train": {"seed": seed}}))
    (folder / "eval" / "test").mkdir(parents=True)
    metrics = {"split": "test", "accuracy": accuracy, "macro_f1": accuracy - 0.1, "auroc_macro_ovr": 0.9,
               "kappa_quadratic": None, "ece": ece, "dcg_accuracy": 0.8, "manifest_sha256": digest}
    (folder / "eval" / "test" / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_compare_gives_mean_and_spread_per_configuration(tmp_path):
    runs = [fake_run(tmp_path / "b1", "basic", 1, 0.8, 0.1), fake_run(tmp_path / "b2", "basic", 2, 0.9, 0.2),
            fake_run(tmp_path / "f1", "full", 1, 0.7, 0.05)]
    rows = compare_runs(runs)
    assert [(row.label, row.runs) for row in rows] == [("variant=basic", 2), ("variant=full", 1)]
    mean, std = rows[0].stats["accuracy"]
    assert mean == pytest.approx(0.85) and std == pytest.approx(0.0707107, abs=1e-6)  # sample std of .8, .9
    assert rows[1].stats["accuracy"] == (pytest.approx(0.7), None)
    assert rows[0].stats["kappa_quadratic"] == (None, None)
    table = markdown_table(rows)
    assert "| variant=basic | 2 | 0.8500 ± 0.0707 |" in table and "n/a" in table
    written = write_comparison(rows, tmp_path / "out")
    assert [path.name for path in written] == ["compare.md", "compare.csv", "compare.png"]


def test_compare_refuses_runs_of_different_test_splits(tmp_path):
    runs = [fake_run(tmp_path / "a", "basic", 1, 0.8, 0.1, digest="aaa"),
            fake_run(tmp_path / "b", "basic", 2, 0.9, 0.2, digest="bbb")]
    with pytest.raises(CompareError, match="different test splits"):
        compare_runs(runs)


def sweep_args(digits_shards, out):
    budget = [*TINY, "train.dcg_warmup_epochs=1", "train.max_steps=4", "train.val_every=0", "eval.n_samples=1"]
    return ["sweep", "--config", str(REPO / "configs" / "digits.yaml"), "--shards", str(digits_shards),
            "--out", str(out), "--set", "model.variant=basic,full", *[i for o in budget for i in ("--set", o)]]


def read_plan(out):
    return json.loads((out / "sweep.json").read_text())["runs"] if (out / "sweep.json").is_file() else []


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


@pytest.mark.slow
def test_a_killed_sweep_finishes_only_what_was_left_when_run_again(digits_shards, tmp_path):
    out = tmp_path / "sweep"
    sweep = subprocess.Popen([sys.executable, "-m", "diffmic", *sweep_args(digits_shards, out)], cwd=REPO,
                             env=cpu_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline:  # kill it while the second run trains
        runs = read_plan(out)
        # The status says "training" a moment before the training starts: wait for its command in the run's log.
        if (len(runs) == 2 and runs[0]["status"] == "finished" and runs[1]["status"] == "training"
                and "$ diffmic train" in _text(out / "runs" / runs[1]["name"] / "sweep.log")):
            break
        assert sweep.poll() is None, sweep.stdout.read()
        time.sleep(0.5)
    else:
        pytest.fail("the sweep never reached its second run")
    os.kill(sweep.pid, signal.SIGKILL)
    sweep.wait()
    assert "interrupted" in diffmic_here(["status", str(out)]).stdout  # not "training": its process is dead

    result = diffmic_here(sweep_args(digits_shards, out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 of 2 run(s) already finished" in result.stdout
    runs = read_plan(out)
    assert [run["status"] for run in runs] == ["finished", "finished"]
    logs = [(out / "runs" / run["name"] / "sweep.log").read_text() for run in runs]
    assert logs[0].count("$ diffmic train") == 1  # the finished run was not trained again
    assert logs[1].count("$ diffmic train") == 2  # the interrupted one was resumed

    table = diffmic_here(["compare", str(out)])
    assert table.returncode == 0, table.stderr
    assert "variant=basic" in table.stdout and "variant=full" in table.stdout
    assert (out / "compare.png").is_file() and (out / "compare.csv").read_text().count("\n") == 3
    status = diffmic_here(["status", str(out)])
    assert status.returncode == 0 and status.stdout.count("finished") == 2


ARRAY_TASK = ["--gpus", "0", "--tasks-per-node", "1", "--cpus-per-task", "1", "--time", "00:20:00"]


def test_a_slurm_sweep_dry_run_shows_one_array_and_submits_nothing(digits_shards, tmp_path):
    out = tmp_path / "sweep"
    result = diffmic_here([*sweep_args(digits_shards, out), "--seeds", "2", "--slurm", *ARRAY_TASK,
                           "--array-parallelism", "3", "--dry-run"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "#SBATCH --array=0-3%3" in result.stdout and "#SBATCH --ntasks-per-node=1" in result.stdout
    assert "nothing was submitted" in result.stdout and not out.exists()


def test_a_slurm_sweep_refuses_runs_of_several_processes_before_submitting(digits_shards, tmp_path):
    result = diffmic_here([*sweep_args(digits_shards, tmp_path / "sweep"), "--slurm", "--gpus", "2", "--dry-run"])
    assert result.returncode != 0 and "one process on one node: pass --gpus 1" in result.stdout + result.stderr
    assert len((result.stdout + result.stderr).strip().splitlines()) <= 3


@pytest.mark.slurm
def test_a_sweep_runs_as_one_job_array_on_slurm_and_resumes_without_resubmitting(slurm_cluster, digits_shards,
                                                                                 tmp_path):
    out = tmp_path / "sweep"
    command = [*sweep_args(digits_shards, out), "--slurm", "--partition", slurm_cluster.partition, *ARRAY_TASK,
               "--array-parallelism", "2"]
    result = diffmic_here([*command, "--wait"])
    assert result.returncode == 0, result.stdout + result.stderr
    plan = json.loads((out / "sweep.json").read_text())
    array_ids = {record["job_id"].split("_")[0] for record in plan["jobs"].values()}
    assert len(array_ids) == 1 and sorted(record["job_id"].split("_")[1] for record in plan["jobs"].values()) == ["0", "1"]
    runs = SweepPlan.load(out).runs
    assert [run.status for run in runs] == ["finished", "finished"]
    assert all(run.metrics_file(out).is_file() for run in runs)

    again = diffmic_here(command)  # the same command: nothing left, nothing submitted
    assert again.returncode == 0 and "2 of 2 run(s) already finished" in again.stdout
    assert json.loads((out / "sweep.json").read_text())["jobs"] == plan["jobs"]
    table = diffmic_here(["compare", str(out)])
    assert table.returncode == 0 and "variant=basic" in table.stdout and "variant=full" in table.stdout
    status = diffmic_here(["status", str(out)])
    assert status.returncode == 0 and status.stdout.count("finished") == 2
