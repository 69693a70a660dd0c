"""`diffmic train --slurm --nodes 2` and `diffmic eval --slurm --nodes 2` on a real two-node cluster:
`SLURM_CI_NODES=2 bash .ci/slurm-cluster.sh up` runs each node's slurmd in its own network and UTS
namespace (ci-node1, ci-node2, each with its own address), so the two tasks of a job run on two hosts
and torch.distributed (gloo) connects across them. On such a cluster test_slurm_jobs.py's preemption test
runs its job across the two hosts too (a requeue gathers both again).

Skipped when the cluster has fewer than two usable nodes; under CI=true with SLURM_CI_NODES=2 (what
.ci/run sets) that is a failure instead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from test_slurm_jobs import (
    PREEMPT_STEPS,
    SLURM_STEPS,
    TWO_NODE_JOB,
    job_state,
    rank_hosts,
    record,
    train_job,
    wait_until,
)

from diffmic import checkpoint as ckpt
from engine_helpers import REPO, diffmic, training_losses

CLUSTER_SCRIPT = REPO / ".ci" / "slurm-cluster.sh"
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def two_nodes(slurm_cluster) -> tuple[str, ...]:
    if len(slurm_cluster.nodes) >= 2:
        return slurm_cluster.nodes
    reason = (f"the Slurm cluster has {len(slurm_cluster.nodes)} usable node(s) {slurm_cluster.nodes}; these tests need "
              f"two (SLURM_CI_NODES=2 bash .ci/slurm-cluster.sh up)")
    if os.environ.get("CI") == "true" and os.environ.get("SLURM_CI_NODES") == "2":
        pytest.fail(f"{reason}, and CI=true with SLURM_CI_NODES=2 requires them")
    pytest.skip(reason)


def two_node_train(run_dir: Path, shards: Path | str, *extra_args: str, check: bool = True, extra_overrides=(), **env):
    return train_job(run_dir, shards, *extra_args, check=check, extra_overrides=extra_overrides, job=TWO_NODE_JOB,
                     **env)



@pytest.fixture(scope="module")
def two_node_training(two_nodes, digits_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("slurm2") / "run"
    started = time.monotonic()
    two_node_train(run_dir, digits_shards, "--wait")
    print(f"two-node training job: {time.monotonic() - started:.1f} s")
    return run_dir


def test_a_two_node_training_job_runs_one_rank_on_each_host(two_nodes, two_node_training):
    entry = record(two_node_training)
    assert job_state(entry) == "COMPLETED"
    hosts = rank_hosts(entry)
    print(f"ranks' hostnames: {hosts}")
    assert sorted(hosts) == [0, 1]
    assert len(set(hosts.values())) == 2 and set(hosts.values()) <= set(two_nodes), hosts
    nodelist = subprocess.run(["sacct", "-n", "-X", "-P", "-j", entry["job_id"], "-o", "NNodes,NodeList"],
                              capture_output=True, text=True).stdout.split()[0]
    assert nodelist.startswith("2|"), nodelist
    run = json.loads((two_node_training / "run.json").read_text())
    assert run["world_size"] == 2
    assert ckpt.find_checkpoint(two_node_training, "last").step == SLURM_STEPS
    assert training_losses(two_node_training)


def test_two_nodes_train_as_a_two_task_job_on_one_node_does(two_nodes, two_node_training, slurm_training):
    """Same config, same world size: the same steps and the same losses, whether the two ranks share a host."""
    one_node = record(slurm_training)
    assert len(set(rank_hosts(one_node).values())) == 1
    assert ckpt.find_checkpoint(two_node_training, "last").step == ckpt.find_checkpoint(slurm_training, "last").step
    two, one = training_losses(two_node_training), training_losses(slurm_training)
    print(f"losses, two nodes: {two}\nlosses, one node: {one}")
    assert [step for step, _ in two] == [step for step, _ in one]
    assert [loss for _, loss in two] == pytest.approx([loss for _, loss in one], rel=1e-5, abs=1e-6)


def test_a_two_node_job_trains_from_s3_with_no_shard_folder_on_either_node(two_nodes, two_node_training, object_store,
                                                                        digits_shards, tmp_path):
    """The nodes reach the S3 store over the bridge (10.77.77.1); the job reads every shard from the bucket."""
    url = object_store.upload(digits_shards, "digits-slurm")
    run_dir = tmp_path / "run"
    two_node_train(run_dir, url, "--wait", **object_store.env_at("10.77.77.1"))
    entry = record(run_dir)
    assert job_state(entry) == "COMPLETED"
    assert len(set(rank_hosts(entry).values())) == 2
    run = json.loads((run_dir / "run.json").read_text())
    assert run["shards"] == url and run["world_size"] == 2
    ours, theirs = training_losses(run_dir), training_losses(two_node_training)
    assert [step for step, _ in ours] == [step for step, _ in theirs]
    assert [loss for _, loss in ours] == pytest.approx([loss for _, loss in theirs], rel=1e-5, abs=1e-6)


def test_two_node_eval_gives_the_same_predictions_as_a_local_eval(two_nodes, two_node_training, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "slurm"
    diffmic(["eval", "--run", str(two_node_training), "--checkpoint", "last", "--out", str(local), "--no-progress"],
            threads=1)
    diffmic(["eval", "--run", str(two_node_training), "--checkpoint", "last", "--out", str(remote), "--slurm",
             "--partition", "debug", *TWO_NODE_JOB, "--wait"], threads=1)
    entry = record(two_node_training, "eval")
    assert job_state(entry) == "COMPLETED"
    assert len(set(rank_hosts(entry).values())) == 2
    assert (local / "predictions.csv").read_bytes() == (remote / "predictions.csv").read_bytes()


def test_a_node_that_dies_mid_job_ends_the_job_failed_or_requeued_never_a_hang(two_nodes, digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    two_node_train(run_dir, digits_shards, "--max-requeues", "0",
                   extra_overrides=["train.epochs=2", f"train.max_steps={PREEMPT_STEPS}"])
    entry = record(run_dir)
    metrics = run_dir / "metrics.jsonl"
    try:
        wait_until(lambda: metrics.is_file() and any('"joint"' in line for line in metrics.read_text().splitlines()))
        # The second node dies: its slurmd, slurmstepd and training task get SIGKILL.
        killed = subprocess.run(["bash", str(CLUSTER_SCRIPT), "kill-node", "2"], capture_output=True, text=True)
        assert killed.returncode == 0, killed.stderr
        started = time.monotonic()
        # Slurm notices a silent node within SlurmdTimeout (30 s on the CI cluster) and ends its job.
        wait_until(lambda: job_state(entry) not in {"RUNNING", "COMPLETING", "UNKNOWN"}, timeout=300, poll=2)
        state = job_state(entry)
        print(f"after the node died: {state} in {time.monotonic() - started:.0f} s")
        ended = {"FAILED", "NODE_FAIL", "PENDING", "REQUEUED", "REQUEUE_HOLD", "CANCELLED"}
        assert state in ended, state
        # `diffmic status` says which (a NODE_FAIL job may have been requeued, PENDING, meanwhile).
        status = diffmic(["status", str(run_dir)], check=False)
        said = re.search(rf"train job {entry['job_id']}: (\w+)", status.stdout)
        assert said and said.group(1) in ended, status.stdout
    finally:
        subprocess.run(["scancel", entry["job_id"]], check=False)
        revived = subprocess.run(["bash", str(CLUSTER_SCRIPT), "revive-node", "2"], capture_output=True, text=True)
        assert revived.returncode == 0, revived.stdout + revived.stderr
