"""benchmarks/gpu_suite.py cannot rot between GPU windows: its --smoke run goes through every step at tiny
sizes on the CPU and writes the report a GPU run writes; a failing step is recorded and the next one runs;
the 24 GB recipe's arithmetic is checked on its own; step 7's launcher runs on two CPU processes."""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys

import pytest

from engine_helpers import REPO, cpu_environment

STEP_NAMES = ["environment", "latency", "sampling", "training", "loader", "memory", "multi_gpu"]
EIGHT_MINUTES = 480
START_UP_S = 15  # python, torch and CUDA before the first step


@pytest.fixture
def suite_module(monkeypatch):
    """The suite imported as its command runs it: with benchmarks/ first on the path (its siblings)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    return importlib.import_module("gpu_suite")


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory) -> tuple[dict, str, str]:
    out = tmp_path_factory.mktemp("smoke")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--out", str(out), "--smoke"],
                            cwd=REPO, env=cpu_environment(1), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads((out / "gpu_report.json").read_text()), (out / "gpu_report.md").read_text(), result.stdout


def numbers(figures: list[dict]) -> list[float]:
    return [item["value"] for item in figures
            if isinstance(item["value"], (int, float)) and math.isfinite(item["value"])]


@pytest.mark.timeout(600)
def test_the_smoke_run_reports_every_step_in_order_with_numbers_or_its_error(smoke_report):
    report, _, _ = smoke_report
    assert report["smoke"] is True and report["device"].startswith("CPU")
    assert {"torch", "commit", "date"} <= set(report)
    assert list(report["steps"]) == STEP_NAMES
    for name, entry in report["steps"].items():
        outcomes = [key for key in ("result", "error", "skipped") if key in entry]
        assert len(outcomes) == 1, f"{name}: {outcomes}"
        assert entry["seconds"] >= 0 and entry["budget_s"] > 0
        if "error" in entry:
            assert entry["error"].strip() and entry["traceback"].strip()
        if "result" in entry:
            assert numbers(entry["result"]["figures"]), f"{name} produced no numbers: {entry['result']}"
    # On a CPU every step but the multi-GPU one can run: an error here is the suite rotting.
    errors = {name: entry.get("error") or entry["result"].get("errors")
              for name, entry in report["steps"].items() if "error" in entry or entry.get("result", {}).get("errors")}
    assert not errors, errors
    assert report["steps"]["multi_gpu"]["skipped"] == "needs 2+ GPUs (found 0)"


def test_the_smoke_run_measures_what_each_step_promises(smoke_report):
    steps = {name: entry["result"] for name, entry in smoke_report[0]["steps"].items() if "result" in entry}
    latency = steps["latency"]["details"]
    measured = {precision: row for precision, row in latency.items() if isinstance(row, dict)}
    assert "fp32" in measured  # bf16 only where the CPU has it natively
    for row in measured.values():
        assert row["eager_ms"] > 0 and row["compiled_ms"] > 0
        assert row["agree"] == 1.0  # the compiled chain labels as the eager one
    assert {"eager", "--compile"} <= set(steps["sampling"]["details"])
    training = steps["training"]["details"]
    assert training["processes"] == 1 and training["distributed"] == "MULTI_CPU"  # DDP on one device
    assert 0 < training["dcg_share"] < 1
    loader = steps["loader"]["details"]
    assert loader["training_images_per_s"] == pytest.approx(training["images_per_s"])
    memory = steps["memory"]["details"]
    assert memory["cap"].startswith("skipped")
    for target in (32, 64):
        for precision, recipe in memory["recipe"][f"global batch {target}"].items():
            assert recipe["train.batch_size"] * recipe["train.grad_accum"] == target, (precision, recipe)


def test_the_markdown_table_has_a_row_per_figure_and_the_budgets_fit_eight_minutes(smoke_report, suite_module):
    report, table, stdout = smoke_report
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| step")]
    figures = sum(len(entry["result"]["figures"]) for entry in report["steps"].values() if "result" in entry)
    assert len(rows) == figures + 1  # the skipped multi-GPU step is one row
    assert "smoke run" in table.splitlines()[0] and table in stdout
    assert sum(budget for _, _, budget in suite_module.STEPS) + START_UP_S <= EIGHT_MINUTES


def test_a_failing_step_is_recorded_and_the_next_one_still_runs(tmp_path, suite_module):
    import torch

    def broken(suite):
        raise RuntimeError("the GPU fell off the bus")

    def working(suite):
        return {"figures": [suite_module.figure("after", 1.5, "x")]}

    from suite_report import run_steps

    suite = suite_module.Suite(torch.device("cpu"), suite_module.SMOKE_SIZES, smoke=True)
    steps = [("first", broken, 1), ("second", working, 1)]
    heading = {"device": "CPU", "torch": "-", "date": "-", "commit": "-", "smoke": True}
    report = run_steps(steps, suite, tmp_path, heading)
    written = json.loads((tmp_path / "gpu_report.json").read_text())
    assert written["steps"] == json.loads(json.dumps(report["steps"]))
    assert written["steps"]["first"]["error"] == "RuntimeError: the GPU fell off the bus"
    assert "raise RuntimeError" in written["steps"]["first"]["traceback"]
    assert written["steps"]["second"]["result"]["figures"][0]["value"] == 1.5
    assert "| first (" in (tmp_path / "gpu_report.md").read_text()


def test_the_batch_search_finds_the_largest_that_fits_in_few_tries(suite_module):
    from memory import largest_training_batch

    tried = []

    def fits(batch: int) -> bool:
        tried.append(batch)
        return batch <= 300

    largest = largest_training_batch(fits, 64, [96, 128, 192, 256, 384, 512], resolution=8)
    assert 300 - 8 < largest <= 300
    assert len(tried) <= 10 and 512 not in tried  # stops going up at the first failure
    assert largest_training_batch(lambda batch: False, 0, [96, 128]) == 0


def test_the_recipe_keeps_the_global_batch_with_the_largest_micro_batch_that_fits(suite_module):
    from memory import split_for_card

    assert split_for_card(32, 300) == (32, 1)
    assert split_for_card(32, 20) == (16, 2)
    assert split_for_card(64, 31) == (16, 4)
    with pytest.raises(ValueError, match="not even one image"):
        split_for_card(32, 0)


@pytest.mark.timeout(600)
def test_step_7_launches_ddp_and_zero2_as_the_readme_does(suite_module, monkeypatch):
    """On two CPU processes, since no multi-GPU machine is lent here: the launcher, the workers and the
    report of step 7, with DeepSpeed really engaged for ZeRO-2."""
    import torch

    for key, value in cpu_environment(1).items():
        monkeypatch.setenv(key, value)
    suite = suite_module.Suite(torch.device("cpu"), suite_module.SMOKE_SIZES, smoke=True)
    suite.results["training"] = {"details": {"images_per_s": 10.0}}
    result = suite_module.multi_gpu_scaling(suite, processes=2, cpu=True)
    assert not result["errors"], result["errors"]
    assert result["details"]["ddp"]["distributed"] == "MULTI_CPU"
    assert result["details"]["zero2"]["distributed"] == "DEEPSPEED"
    assert all(row["processes"] == 2 for row in result["details"].values())
    names = [item["name"] for item in result["figures"]]
    assert names[2:] == ["DDP scaling efficiency 1 -> 2", "ZeRO-2 / DDP"]
