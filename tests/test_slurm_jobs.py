"""`diffmic train --slurm` and `diffmic eval --slurm` on the local Slurm cluster (.ci/slurm-cluster.sh),
plus the paths that need no cluster (--local, --dry-run, no sbatch)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffmic import checkpoint as ckpt
from engine_helpers import REPO, TINY, diffmic, diffmic_here

CONFIG = str(REPO / "configs" / "digits.yaml")
CPU_JOB = ["--gpus", "0", "--tasks-per-node", "2", "--time", "00:15:00"]
# The same two CPU tasks, one on each host of a two-node cluster (SLURM_CI_NODES=2, test_slurm_two_nodes.py).
TWO_NODE_JOB = ["--nodes", "2", "--gpus", "0", "--tasks-per-node", "1", "--time", "00:15:00"]
pytestmark = pytest.mark.timeout(900)


# No warm-up and 8 joint steps of 2 x 8 images (an epoch is 27): long enough to preempt mid-run (it is
# sent after the first logged step), short enough for CI, where the two tasks share two cores.
SLURM_STEPS = 8
PREEMPT_STEPS = 12
SLURM_TRAINING = TINY + ["train.dcg_warmup_epochs=0", f"train.max_steps={SLURM_STEPS}", "train.batch_size=8"]


def overrides(*extra: str) -> list[str]:
    return [item for override in SLURM_TRAINING + list(extra) for item in ("--set", override)]


def train_job(run_dir: Path, shards: Path | str, *extra_args: str, check: bool = True, extra_overrides=(),
              job: list[str] = CPU_JOB, **env) -> subprocess.CompletedProcess:
    """`env`: more variables for the submitting process, which sbatch passes on to the job's tasks."""
    return diffmic(["train", "--config", CONFIG, "--shards", str(shards), "--run-dir", str(run_dir), "--slurm",
                    "--partition", "debug", *job, *extra_args, *overrides(*extra_overrides)], check=check, **env)


def record(run_dir: Path, kind: str = "train") -> dict:
    return json.loads((run_dir / f"slurm_{kind}.json").read_text())


def job_state(entry: dict) -> str:
    from diffmic.launch.slurm import job_state as state

    return state(entry)


def rank_hosts(entry: dict, job_id: str | None = None) -> dict[int, str]:
    """{global rank: hostname} from the line submitit logs as each task starts
    ("Starting with JobEnvironment(job_id=..., hostname=ci-node1, local_rank=0(1), node=0(2), global_rank=0(2))")."""
    hosts = {}
    for path in Path(entry["log_dir"]).glob(f"{job_id or entry['job_id']}_*_log.*"):
        for line in path.read_text(errors="replace").splitlines():
            found = re.search(r"Starting with JobEnvironment\(.*hostname=([^,]+),.*global_rank=(\d+)\(", line)
            if found:
                hosts[int(found.group(2))] = found.group(1)
    return hosts


def wait_until(condition, timeout: float = 600, poll: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll)


# `slurm_training` (conftest.py): the 2-task single-node training job of `train_job`, shared by this module and
# test_slurm_two_nodes.py.


@pytest.mark.slurm
def test_a_two_task_training_job_completes_with_checkpoint_and_metrics(slurm_training):
    entry = record(slurm_training)
    assert job_state(entry) == "COMPLETED"
    run = json.loads((slurm_training / "run.json").read_text())
    assert run["world_size"] == 2
    assert ckpt.find_checkpoint(slurm_training, "last").step == SLURM_STEPS
    rows = [json.loads(line) for line in (slurm_training / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in row for row in rows) and any(row.get("split") == "val" for row in rows)
    logs = list(Path(entry["log_dir"]).glob("*_log.out"))
    assert len(logs) == 2  # one log per task
    status = diffmic(["status", str(slurm_training)])
    assert "COMPLETED" in status.stdout and "last step" in status.stdout


@pytest.mark.slurm
def test_slurm_eval_gives_the_same_predictions_as_a_local_eval(slurm_training, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "slurm"
    diffmic(["eval", "--run", str(slurm_training), "--checkpoint", "last", "--out", str(local), "--no-progress"],
            threads=1)
    diffmic(["eval", "--run", str(slurm_training), "--checkpoint", "last", "--out", str(remote), "--slurm",
             "--partition", "debug", *CPU_JOB, "--wait"], threads=1)
    assert (local / "predictions.csv").read_bytes() == (remote / "predictions.csv").read_bytes()
    assert job_state(record(slurm_training, "eval")) == "COMPLETED"


@pytest.mark.slurm
def test_a_preempted_job_is_requeued_and_ends_at_the_uninterrupted_step(slurm_cluster, digits_shards, tmp_path):
    import submitit

    # On a two-node cluster (CI) the job's two tasks run on two hosts, so the requeued job must gather both
    # hosts again and resume across them; on one node they share it. One test: the same run either way.
    two_hosts = len(slurm_cluster.nodes) >= 2
    run_dir = tmp_path / "run"
    # Longer than the fixture's run, so the preemption (sent at the first logged step) lands mid-run even on a
    # slow machine; two epochs (an epoch is 27 steps) so that max_steps, not the end of the data, stops it.
    train_job(run_dir, digits_shards, extra_overrides=["train.epochs=2", f"train.max_steps={PREEMPT_STEPS}"],
              job=TWO_NODE_JOB if two_hosts else CPU_JOB)
    entry = record(run_dir)
    metrics = run_dir / "metrics.jsonl"
    wait_until(lambda: metrics.is_file() and any('"joint"' in line for line in metrics.read_text().splitlines()))
    job = submitit.SlurmJob(folder=entry["folder"] + "/%j", job_id=entry["job_id"])
    job._interrupt()  # SIGTERM + SIGUSR2 to every task (on every node), as a preemption
    wait_until(lambda: job_state(entry) in {"PENDING", "REQUEUED", "REQUEUE_HOLD", "COMPLETED"}, poll=0.5)
    assert job_state(entry) != "COMPLETED", "the job finished before the preemption reached it"

    def ended() -> bool:
        # Slurm gives a requeued job a begin time in the future once its tasks are gone (35 s later here), so a
        # release sent before that is undone: release it while it waits, so that the test does not wait too.
        state = job_state(entry)
        if state in {"PENDING", "REQUEUED", "REQUEUE_HOLD"}:
            subprocess.run(["scontrol", "update", f"JobId={entry['job_id']}", "StartTime=now"], check=False,
                           capture_output=True)
        return state not in {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "COMPLETING", "UNKNOWN"}

    wait_until(ended)
    assert job_state(entry) == "COMPLETED"
    restarts = subprocess.run(["scontrol", "show", "job", entry["job_id"]], capture_output=True, text=True).stdout
    assert "Restarts=1" in restarts or "Restarts=" not in restarts  # accounting may have forgotten the job
    assert "signal at step" not in metrics.read_text()  # the run logged on as usual after the resume
    rank0_logs = "".join(path.read_text() for path in Path(entry["log_dir"]).glob(f"{entry['job_id']}_0_log.*"))
    assert "resumed from" in rank0_logs  # the requeued job continued from the checkpoint saved on the signal
    assert ckpt.find_checkpoint(run_dir, "last").step == PREEMPT_STEPS  # where the uninterrupted run ends
    if two_hosts:  # the resumed attempt (the last "Starting with" line of each rank) ran on two hosts again
        assert len(set(rank_hosts(entry).values())) == 2


@pytest.mark.slurm
def test_a_job_with_a_bad_config_fails_and_the_command_says_where_the_logs_are(slurm_cluster, digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    result = train_job(run_dir, digits_shards, "--wait", check=False,
                       # Found only once the job counts its batches (a missing weights file fails before submission).
                       extra_overrides=["train.grad_accum=100000"])
    entry = record(run_dir)
    assert result.returncode != 0
    assert "FAILED" in result.stderr and entry["log_dir"] in result.stderr
    status = diffmic(["status", str(run_dir)], check=False)
    assert status.returncode != 0 and "FAILED" in status.stdout


def test_local_executor_runs_the_same_evaluation_without_slurm(tiny_run, tmp_path):
    local, submitted = tmp_path / "direct", tmp_path / "local"
    diffmic(["eval", "--run", str(tiny_run), "--checkpoint", "last", "--out", str(local), "--no-progress"], threads=1)
    diffmic(["eval", "--run", str(tiny_run), "--checkpoint", "last", "--out", str(submitted), "--local",
             "--gpus", "0", "--tasks-per-node", "2", "--wait"], threads=1)
    assert (local / "predictions.csv").read_bytes() == (submitted / "predictions.csv").read_bytes()


def test_dry_run_prints_the_script_and_submits_nothing(digits_shards, tmp_path):
    result = diffmic_here(["train", "--config", CONFIG, "--shards", str(digits_shards), "--run-dir",
                           str(tmp_path / "r"), "--slurm", "--gpus", "4", "--nodes", "2", "--partition", "gpu",
                           "--account", "lab", "--time", "1-00:00:00", "--dry-run"])
    assert result.returncode == 0, result.stderr
    for expected in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                     "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --time=1440", "nothing was submitted"):
        assert expected in result.stdout
    assert not (tmp_path / "r" / "slurm_train.json").exists()


def test_without_sbatch_slurm_says_so(digits_shards, tmp_path):
    result = subprocess.run([sys.executable, "-m", "diffmic", "train", "--config", CONFIG, "--shards",
                             str(digits_shards), "--slurm", "--gpus", "1"], cwd=REPO, capture_output=True, text=True,
                            env={"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path)})
    assert result.returncode == 2
    assert "sbatch" in result.stderr and "--local" in result.stderr
