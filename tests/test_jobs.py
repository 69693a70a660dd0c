"""One typed job (diffmic.launch.job), one serialisation: what the command resolved is what a local process, a
Slurm task or a sweep's child runs."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

from diffmic.config import load_config
from diffmic.evaluation.settings import resolve_eval_settings
from diffmic.launch.job import EvalJob, TrainJob, job_from_json, to_json
from diffmic.launch.slurm import DistributedJob
from engine_helpers import REPO, cpu_environment

CONFIG = REPO / "configs" / "digits.yaml"


def test_a_train_job_survives_its_json_whole():
    config = load_config(CONFIG, ["train.lr=0.002", "eval.use_ema=false"])
    job = TrainJob(config, "shards/digits", "runs/x", ["train.lr"], {"config_file": str(CONFIG), "command": "diffmic"})
    again = job_from_json(to_json(job))
    assert isinstance(again, TrainJob) and again == job and again.config.train.lr == 0.002


def test_an_eval_job_keeps_its_resolved_settings_and_unset_ones_stay_unset():
    settings = resolve_eval_settings(load_config(CONFIG), precision="bf16", use_ema=False, steps=7)
    job = EvalJob("runs/x", "last", "val", settings, "out", None)
    again = job_from_json(to_json(job))
    assert isinstance(again, EvalJob) and again == job and again.settings.steps == 7
    assert job_from_json(to_json(EvalJob("runs/x"))).settings is None  # the checkpoint's own, read when it runs


def test_a_slurm_task_carries_the_same_json():
    job = EvalJob("runs/x", settings=load_config(CONFIG).eval)
    task = pickle.loads(pickle.dumps(DistributedJob(to_json(job), max_requeues=2)))
    assert task.kind == "eval" and job_from_json(task.job) == job
    assert task.checkpoint().function.job == task.job  # a requeued task runs the very same job


def test_a_launched_job_reports_a_users_mistake_in_one_line(tmp_path):
    spec = tmp_path / "job.json"
    spec.write_text(to_json(EvalJob(str(tmp_path / "nowhere"))))
    result = subprocess.run([sys.executable, "-m", "diffmic.launch.job", str(spec)], cwd=tmp_path,
                            env=cpu_environment(1), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: run folder") and len(result.stderr.strip().splitlines()) == 1
    assert json.loads(spec.read_text())["kind"] == "eval"
