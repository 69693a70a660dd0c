"""The GPU suite's runner and report: guarded steps, gpu_report.json and gpu_report.md.

A step is a function of the suite that returns {"figures": [figure(...)], "details": {...}, "errors": {...}};
it may raise Skipped (recorded with its reason) or fail (recorded with its error, and the next step runs).
The report is rewritten after every step, so a run stopped by a time limit keeps what it finished.
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import subprocess
import time
import traceback
from pathlib import Path

import torch

from timing import REPO


class Skipped(Exception):
    """A step that cannot run on this machine, with the reason."""


def figure(name: str, value, unit: str = "", goal: str = "", met: bool | None = None) -> dict:
    """One number of the table; `met` is None where the goal is not judged (no goal, or not a GPU)."""
    return {"name": name, "value": value, "unit": unit, "goal": goal, "met": met}


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def attempt(errors: dict, name: str, call):
    """One part of a step, guarded like a step: its error is kept under `name` and the step goes on."""
    try:
        return call()
    except Exception as error:  # noqa: BLE001 - a benchmark reports every failure and carries on
        errors[name] = describe(error)
        return None


def run_step(name: str, step, budget_s: float, suite) -> dict:
    """Runs one step; its result also goes to `suite.results` for the steps after it."""
    entry = {"budget_s": budget_s}
    started = time.perf_counter()
    try:
        entry["result"] = step(suite)
    except Skipped as reason:
        entry["skipped"] = str(reason)
    except Exception as error:  # noqa: BLE001 - one step's failure must not lose the others
        entry["error"] = describe(error)
        entry["traceback"] = traceback.format_exc(limit=-4)
    entry["seconds"] = round(time.perf_counter() - started, 1)
    suite.results[name] = entry.get("result")
    gc.collect()  # the step's models, before the next step measures memory or speed
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return entry


def commit() -> str:
    try:
        found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                               timeout=10)
    except OSError:
        return "unknown (no git)"
    return found.stdout.strip() or "unknown (not a git checkout)"


def header(device: str, smoke: bool) -> dict:
    """What a table needs to be quoted: device, torch, date and commit."""
    return {"device": device, "torch": torch.__version__, "commit": commit(), "smoke": smoke,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def as_markdown(report: dict) -> str:
    lines = [f"Device: {report['device']}; torch {report['torch']}; {report['date']}; commit {report['commit']}"
             + ("; smoke run (tiny sizes, CPU)" if report["smoke"] else ""), "",
             "| step | figure | value | goal | met |", "|---|---|---|---|---|"]
    for name, entry in report["steps"].items():
        timing = f"{name} ({entry['seconds']:g} s of {entry['budget_s']:g})"
        if "skipped" in entry:
            lines.append(f"| {timing} | skipped | {entry['skipped']} | | |")
        elif "error" in entry:
            lines.append(f"| {timing} | error | {entry['error'][:200]} | | |")
        else:
            lines += [row(timing, item) for item in entry["result"]["figures"]]
            lines += [f"| {timing} | {part}: error | {error[:200]} | | |"
                      for part, error in entry["result"].get("errors", {}).items()]
    return "\n".join(lines) + "\n"


def row(timing: str, item: dict) -> str:
    met = "" if item["met"] is None else ("yes" if item["met"] else "no")
    value = "-" if item["value"] is None else f"{item['value']:g} {item['unit']}".strip()
    return f"| {timing} | {item['name']} | {value} | {item['goal']} | {met} |"


def finite(value):
    """JSON has no infinity or NaN: a broken measurement is written as null, not as invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_report.json").write_text(json.dumps(finite(report), indent=2, default=str) + "\n")
    (out / "gpu_report.md").write_text(as_markdown(report))


def run_steps(steps, suite, out: Path, report: dict, only: set[str] | None = None) -> dict:
    """Runs `steps` [(name, function, budget_s)] in order (those named in `only`, when given) into
    report["steps"], writing the report to `out` after each."""
    report["steps"] = {}
    for name, step, budget_s in steps:
        if only and name not in only:
            continue
        print(f"[{name}] budget {budget_s} s", flush=True)
        report["steps"][name] = entry = run_step(name, step, budget_s, suite)
        print(f"[{name}] {entry['seconds']} s: {entry.get('error') or entry.get('skipped') or 'done'}", flush=True)
        write_report(report, out)
    return report
