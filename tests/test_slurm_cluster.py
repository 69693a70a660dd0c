"""Smoke test of the local Slurm cluster through submitit (see .ci/slurm-cluster.sh).

The submitted functions live in this module, which the job cannot import: pytest puts tests/ on
its own sys.path only. cloudpickle is therefore told to pickle this module's functions by value,
so the job needs nothing but submitit, which the submitting interpreter (the venv's python,
submitit's default `python`) provides.
"""

from __future__ import annotations

import os
import sys
import time

import cloudpickle
import pytest

submitit = pytest.importorskip("submitit")

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

_UNFINISHED = {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED", "RESIZING", "UNKNOWN", "SUSPENDED"}


def report_task() -> dict:
    """Runs inside each Slurm task."""
    env = submitit.JobEnvironment()
    return {
        "global_rank": env.global_rank,
        "local_rank": env.local_rank,
        "num_tasks": env.num_tasks,
        "job_id": env.job_id,
        "hostname": env.hostname,
        "python": sys.executable,
        "slurm_procid": os.environ.get("SLURM_PROCID"),
    }


def raise_in_task() -> None:
    """Runs inside the Slurm task and fails."""
    raise RuntimeError(f"deliberate failure in task {submitit.JobEnvironment().global_rank}")


@pytest.fixture(autouse=True)
def _pickle_this_module_by_value():
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    yield
    cloudpickle.unregister_pickle_by_value(module)


def _executor(folder, partition: str):
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    executor.update_parameters(
        slurm_partition=partition,
        nodes=1,
        tasks_per_node=2,
        cpus_per_task=1,
        # submitit signals USR2 90 s before the limit; leave a slow, loaded CI machine room to start python.
        timeout_min=10,
        name="diffmic-slurm-smoke",
    )
    return executor


def _final_state(job, timeout_s: float = 90.0) -> str:
    """Polls sacct (through submitit) until the job reaches a terminal state."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = job.watcher.get_state(job.job_id, mode="force")
        if state.split()[0] not in _UNFINISHED or time.monotonic() > deadline:
            return job.state
        time.sleep(1)


def test_two_tasks_return_their_ranks_and_job_completes(slurm_cluster, tmp_path):
    assert slurm_cluster.partition == "debug"
    job = _executor(tmp_path, "debug").submit(report_task)
    assert job.job_id.isdigit(), job.job_id

    results = job.results()  # one result per task

    assert len(results) == 2, results
    assert sorted(r["global_rank"] for r in results) == [0, 1]
    assert sorted(r["local_rank"] for r in results) == [0, 1]
    assert sorted(r["slurm_procid"] for r in results) == ["0", "1"]
    for r in results:
        assert r["num_tasks"] == 2
        assert r["job_id"] == job.job_id
        assert r["hostname"] in slurm_cluster.nodes
        assert os.path.realpath(r["python"]) == os.path.realpath(sys.executable)
    # COMPLETED (not UNKNOWN) proves accounting through slurmdbd works.
    assert _final_state(job) == "COMPLETED"


def test_job_whose_function_raises_ends_failed(slurm_cluster, tmp_path):
    job = _executor(tmp_path, slurm_cluster.partition).submit(raise_in_task)

    with pytest.raises(submitit.core.utils.FailedJobError, match="deliberate failure in task"):
        job.results()

    assert _final_state(job) == "FAILED"
