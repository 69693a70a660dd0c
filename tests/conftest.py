"""Shared pytest fixtures.

Keep each fixture self-contained: several test modules (and developers) add fixtures here.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess

import pytest

# --------------------------------------------------------------------------------------------
# slurm_cluster: the local Slurm cluster that `.ci/slurm-cluster.sh up` starts.
# --------------------------------------------------------------------------------------------

_SLURM_USABLE_NODE_STATES = {"idle", "mixed", "allocated", "completing"}


@dataclasses.dataclass(frozen=True)
class SlurmClusterInfo:
    """What a Slurm test needs to know about the running cluster."""

    partition: str  # the default partition ("debug" on the CI cluster)
    nodes: tuple[str, ...]  # nodes of that partition that can take jobs


def _slurm_run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


def _slurm_cluster_probe() -> tuple[SlurmClusterInfo | None, str]:
    """Returns (info, "") when jobs can run and be accounted for, else (None, reason)."""
    if shutil.which("sinfo") is None:
        return None, "sinfo not found: Slurm is not installed (run `bash .ci/slurm-cluster.sh up`)"
    try:
        ping = _slurm_run("scontrol", "ping")
        if ping.returncode != 0 or "UP" not in ping.stdout:
            lines = (ping.stdout + ping.stderr).strip().splitlines()
            detail = lines[0] if lines else f"scontrol ping exit status {ping.returncode}"
            return None, f"slurmctld not responding ({detail})"
        sinfo = _slurm_run("sinfo", "-h", "-N", "-o", "%P %N %T")
        sacct = _slurm_run("sacct", "-n", "-X", "-S", "now-1minutes")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"Slurm commands failed: {exc}"
    if sinfo.returncode != 0:
        return None, f"sinfo failed: {sinfo.stderr.strip()!r}"
    partition, nodes = "", []
    for line in sinfo.stdout.splitlines():
        part, node, state = line.split()
        if not part.endswith("*"):
            continue
        partition = part.rstrip("*")
        # A suffix ("idle*": not responding, "idle~": powered off...) makes the node unusable.
        if state in _SLURM_USABLE_NODE_STATES:
            nodes.append(node)
    if not partition:
        return None, f"no default partition in sinfo output {sinfo.stdout!r}"
    if not nodes:
        return None, f"no usable node in partition {partition!r}: {sinfo.stdout.strip()!r}"
    if sacct.returncode != 0:
        return None, f"accounting not working (sacct: {sacct.stderr.strip()!r})"
    return SlurmClusterInfo(partition=partition, nodes=tuple(sorted(set(nodes)))), ""


def service_missing(message: str, start: str) -> None:
    """Skip the test, or fail it under CI=true, where .ci/run must have started the service with `start`."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true requires it: .ci/run starts it with {start})")
    pytest.skip(message)


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmClusterInfo:
    """A usable local Slurm cluster with accounting, or skip (fail under CI=true)."""
    info, reason = _slurm_cluster_probe()
    if info is None:
        service_missing(f"Slurm cluster unavailable: {reason}", ".ci/slurm-cluster.sh up")
    return info


@pytest.fixture(scope="session")
def slurm_training(slurm_cluster, digits_shards, tmp_path_factory):
    """A 2-task single-node `diffmic train --slurm` job (test_slurm_jobs.train_job), trained once a session: the
    one-node tests check it, and the two-node tests compare their job with it."""
    from test_slurm_jobs import train_job

    run_dir = tmp_path_factory.mktemp("slurm") / "run"
    train_job(run_dir, digits_shards, "--wait")
    return run_dir


# --------------------------------------------------------------------------------------------
# object_store: the S3-compatible server that `.ci/s3-server.sh up` starts (SeaweedFS, real signatures).
# --------------------------------------------------------------------------------------------

S3_STATE = os.environ.get("DIFFMIC_S3_STATE", "/var/tmp/diffmic-s3")


@dataclasses.dataclass(frozen=True)
class ObjectStore:
    """The running store: the client variables a process on this host needs, and one bucket for this session."""

    env: dict  # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION
    bucket: str

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def upload(self, folder, name: str) -> str:
        """A local shard folder put into the bucket under `name`, the manifest last (as `diffmic shard` does)."""
        client, url = self.client(), self.url(name)
        for path in sorted(folder.iterdir(), key=lambda path: path.name == "manifest.json"):
            client.put_file(str(path), f"{url}/{path.name}")
        return url

    def env_at(self, address: str) -> dict:
        """The client variables for a host that reaches the store at `address` (the two-node cluster's bridge)."""
        port = self.env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]
        return {**self.env, "AWS_ENDPOINT_URL": f"http://{address}:{port}"}

    def client(self, **overrides):
        """A fresh s3fs filesystem (fsspec caches instances, which would keep old settings) for these variables."""
        import s3fs

        env = {**self.env, **overrides}
        return s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                                 endpoint_url=env["AWS_ENDPOINT_URL"], skip_instance_cache=True,
                                 client_kwargs={"region_name": env["AWS_DEFAULT_REGION"]})


def read_client_env(state: str) -> dict:
    path = os.path.join(state, "client.env")
    with open(path) as handle:
        return dict(line.strip().split("=", 1) for line in handle if "=" in line)


def _object_store_probe() -> tuple[dict | None, str]:
    try:
        env = read_client_env(S3_STATE)
    except OSError as error:
        return None, f"no client settings in {S3_STATE} ({error}): start it with `bash .ci/s3-server.sh up`"
    try:
        ObjectStore(env, "").client().ls("")
    except Exception as error:  # noqa: BLE001 - any failure means the store cannot be used
        return None, f"the store at {env.get('AWS_ENDPOINT_URL')} does not answer ({type(error).__name__}: {error})"
    return env, ""


@pytest.fixture(scope="session")
def object_store():
    """A bucket of its own on the running S3 store, removed at the end; skip (fail under CI=true) without one."""
    import secrets

    env, reason = _object_store_probe()
    if env is None:
        service_missing(f"S3 store unavailable: {reason}", ".ci/s3-server.sh up")
    store = ObjectStore(env, f"diffmic-test-{secrets.token_hex(4)}")
    client = store.client()
    client.mkdir(store.bucket)
    yield store
    client.rm(store.bucket, recursive=True)


# Session fixtures shared by the engine, evaluation and Slurm tests (defined once, here, so a session
# trains the tiny run and shards digits only once).
from engine_helpers import digits_shards, tiny_run  # noqa: E402,F401

# --------------------------------------------------------------------------------------------
# The paper configs start their trunks from ImageNet weights. Tests download nothing: every test (and every
# process it starts) sees a torch hub cache holding stand-in files at the paths torchvision's weights API
# reads, and DIFFMIC_OFFLINE=1, so a file that is missing is an error and never a download.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def offline_imagenet_cache(tmp_path_factory):
    from pretrained_helpers import place_imagenet_file

    torch_home = tmp_path_factory.mktemp("torch_home")
    for arch in ("resnet18", "resnet50"):
        place_imagenet_file(torch_home, arch)
    saved = {key: os.environ.get(key) for key in ("TORCH_HOME", "DIFFMIC_OFFLINE")}
    os.environ.update({"TORCH_HOME": str(torch_home), "DIFFMIC_OFFLINE": "1"})
    yield torch_home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
