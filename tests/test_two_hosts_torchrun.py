"""A two-node run without Slurm, started the way cloud users start one on plain VMs: one `torchrun` (or one
`accelerate launch`) per host, meeting at a rendezvous address. The hosts are the two network namespaces of
the two-node CI cluster (`SLURM_CI_NODES=2 bash .ci/slurm-cluster.sh up`: ci-node1 at 10.77.77.11, ci-node2 at
10.77.77.12), used here as bare hosts: no Slurm daemon takes part. The shards are in the S3 store, reached
over the bridge (10.77.77.1), so neither host reads a shard folder from its disk.

Skipped without the two namespaces; under CI=true with SLURM_CI_NODES=2 that is a failure instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_slurm_jobs import SLURM_TRAINING

from engine_helpers import REPO, cpu_environment, free_port, training_losses

pytestmark = pytest.mark.timeout(900)
HOSTS = {"ci-node1": ("slurmci-n1", "10.77.77.11"), "ci-node2": ("slurmci-n2", "10.77.77.12")}
BRIDGE = "10.77.77.1"  # the root namespace as the hosts see it: where the S3 store answers them
CONFIG = str(REPO / "configs" / "digits.yaml")


@pytest.fixture(scope="module")
def two_hosts() -> dict:
    missing = [name for name, (namespace, _) in HOSTS.items() if not Path("/run/netns", namespace).exists()]
    if not missing:
        return HOSTS
    reason = f"no network namespace for {', '.join(missing)} (SLURM_CI_NODES=2 bash .ci/slurm-cluster.sh up)"
    if os.environ.get("CI") == "true" and os.environ.get("SLURM_CI_NODES") == "2":
        pytest.fail(f"{reason}, and CI=true with SLURM_CI_NODES=2 requires them")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def remote_shards(object_store, digits_shards) -> str:
    return object_store.upload(digits_shards, "digits-two-hosts")


def training_args(shards: str, run_dir: Path) -> list[str]:
    return ["-m", "diffmic", "train", "--config", CONFIG, "--shards", shards, "--run-dir", str(run_dir),
            "--no-progress",
            *[item for override in SLURM_TRAINING for item in ("--set", override)]]


def launcher(kind: str, host_rank: int, endpoint: str) -> list[str]:
    """The README's commands for host `host_rank` of two (one process each)."""
    address, port = endpoint.split(":")
    if kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "diffmic-two-hosts"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
            "--num_processes", "2", "--machine_rank", str(host_rank), "--main_process_ip", address,
            "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no"]


def on_host(name: str, argv: list[str]) -> list[str]:
    """argv run inside the host's network namespace, under its own host name (a UTS namespace)."""
    namespace, _ = HOSTS[name]
    return ["ip", "netns", "exec", namespace, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', name, *argv]



@pytest.fixture(scope="module")
def single_host_run(remote_shards, object_store, tmp_path_factory) -> Path:
    """The same config as 2 processes on one host (`torchrun --standalone`)."""
    run_dir = tmp_path_factory.mktemp("one-host") / "run"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
            *training_args(remote_shards, run_dir)]
    result = subprocess.run(argv, cwd=REPO, env=cpu_environment(1, ACCELERATE_USE_CPU="1", **object_store.env),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return run_dir


@pytest.mark.parametrize("kind", ["torchrun", "accelerate"])
def test_two_hosts_started_by_hand_train_from_s3_as_two_processes_on_one_host_do(kind, two_hosts, remote_shards,
                                                                                   object_store, single_host_run,
                                                                                   tmp_path):
    run_dir = tmp_path / "run"
    endpoint = f"{HOSTS['ci-node1'][1]}:{free_port()}"
    # gloo binds to the interface of the host's own address (eth0 in each namespace), as on a VM with one NIC.
    env = cpu_environment(1, ACCELERATE_USE_CPU="1", GLOO_SOCKET_IFNAME="eth0", **object_store.env_at(BRIDGE))
    commands = [on_host(name, [*launcher(kind, rank, endpoint), *training_args(remote_shards, run_dir)])
                for rank, name in enumerate(HOSTS)]
    processes = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for command in commands]
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-6000:]
    run = json.loads((run_dir / "run.json").read_text())
    print(f"{kind}: ranks on {run['hosts']}")
    assert run["world_size"] == 2 and run["hosts"] == "0:ci-node1 1:ci-node2"
    assert "ranks on 0:ci-node1 1:ci-node2" in outputs[0]
    assert run["shards"] == remote_shards
    two_hosts_losses, one_host_losses = training_losses(run_dir), training_losses(single_host_run)
    print(f"losses, two hosts: {two_hosts_losses}\nlosses, one host: {one_host_losses}")
    assert two_hosts_losses[-1][0] == one_host_losses[-1][0]  # the same final step
    assert two_hosts_losses == one_host_losses
