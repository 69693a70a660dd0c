"""Shards in a bucket of a real S3 server (SeaweedFS, started by .ci/s3-server.sh; no mock of the client): shard
into it, train from it and resume bitwise, evaluate from it with 1 and 2 processes, the local cache, the faults
a user meets (each one line naming the URL, exit 2), and a store that stops mid-epoch."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ObjectStore, read_client_env

from diffmic import checkpoint as ckpt
from diffmic.data import read_manifest
from diffmic.data.shardio import read_shard
from diffmic.data.storage import Fetching, cache_path
from diffmic.fileio import file_sha256
from engine_helpers import REPO, diffmic, finish, model_weights, start_training

pytestmark = pytest.mark.timeout(900)
S3_SCRIPT = REPO / ".ci" / "s3-server.sh"
# The shards of engine_helpers.shard_digits (the `digits_shards` fixture), made by the command line.
DIGITS_OPTIONS = ["--dataset", "digits", "--size", "32", "--shard-size", "150", "--test-fraction", "0.5",
                  "--val-fraction", "0.5", "--workers", "1"]


@pytest.fixture(scope="module")
def store_env(object_store):
    """The client variables in this process too (for the in-process reads), as a user's shell would have them."""
    saved = {key: os.environ.get(key) for key in object_store.env}
    os.environ.update(object_store.env)
    yield object_store.env
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def bucket_shards(object_store, store_env) -> str:
    """`diffmic shard --out s3://...`: digits as the engine tests shard them, in the bucket."""
    url = object_store.url("digits")
    diffmic(["shard", *DIGITS_OPTIONS, "--out", url], **store_env)
    return url


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The one message a user mistake or a fault gets: exit 2, one `error:` line, no traceback."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-4000:]
    return errors[0]


def logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return max((json.loads(line)["step"] for line in lines), default=0)


def wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "training ended before the interruption point"
        assert time.monotonic() < deadline, "timed out waiting for the interruption point"
        time.sleep(0.05)


def assert_bitwise_equal(run_dir: Path, reference: Path) -> None:
    ours, theirs = ckpt.find_checkpoint(run_dir, "last"), ckpt.find_checkpoint(reference, "last")
    assert ours.step == theirs.step
    first, second = model_weights(ours.path), model_weights(theirs.path)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def copy_prefix(client, source: str, target: str) -> None:
    for path in client.ls(source):
        client.copy(path, f"{target}/{path.rsplit('/', 1)[-1]}")


def test_shards_written_to_a_bucket_are_the_local_shards_byte_for_byte(bucket_shards, digits_shards, object_store):
    remote, local = read_manifest(bucket_shards), read_manifest(digits_shards)
    assert remote.digest == local.digest and remote.folder == bucket_shards
    client = object_store.client()
    for entry in local.splits["train"].shards:
        assert client.cat_file(f"{bucket_shards}/{entry.file}") == (digits_shards / entry.file).read_bytes()
    assert diffmic(["verify", bucket_shards], **object_store.env).stdout.count("OK") == 1


def test_sharding_over_a_bucket_folder_replaces_it_whole(bucket_shards, object_store, store_env):
    """--overwrite at a URL: the old manifest goes first, the new shards are put, objects the new folder does not
    have are removed, and the manifest comes last; without --overwrite nothing is touched."""
    client, target = object_store.client(), object_store.url("rewritten")
    copy_prefix(client, bucket_shards, target)
    client.pipe_file(f"{target}/train-000099.tar", b"left from another run")
    refused = diffmic(["shard", *DIGITS_OPTIONS, "--out", target], check=False, **store_env)
    assert "--overwrite" in one_error_line(refused)
    diffmic(["shard", "--dataset", "digits", "--size", "32", "--shard-size", "600", "--workers", "1", "--out", target,
             "--overwrite"], **store_env)
    listed = {entry.file for info in read_manifest(target).splits.values() for entry in info.shards}
    before = sum(len(info.shards) for info in read_manifest(bucket_shards).splits.values())
    found = {path.rsplit("/", 1)[-1] for path in client.ls(target, refresh=True)}
    assert found == listed | {"manifest.json"} and len(listed) < before  # the stale shards and the stray are gone
    assert "OK" in diffmic(["verify", target], **store_env).stdout


def test_sharding_to_a_bucket_removes_the_old_manifest_first_and_puts_the_new_one_last(object_store, store_env,
                                                                                      monkeypatch):
    """While the shards go up, the prefix holds no manifest, so no reader takes a half-written upload for a folder."""
    from diffmic.data import ShardOptions, shard_dataset, storage

    url, client = object_store.url("upload-order"), object_store.client()
    manifest_path = f"{url}/manifest.json"[len("s3://"):]
    steps: list[tuple[str, str, bool]] = []  # (action, object, whether a manifest was in the store just before)

    def manifest_there() -> bool:
        client.invalidate_cache()
        return client.exists(manifest_path)

    def recorded(action: str, real):
        def call(*args):
            steps.append((action, args[-1].rsplit("/", 1)[-1], manifest_there()))
            return real(*args)
        return call

    monkeypatch.setattr(storage, "upload_file", recorded("put", storage.upload_file))
    monkeypatch.setattr(storage, "remove", recorded("remove", storage.remove))
    for overwrite in (False, True):
        steps.clear()
        shard_dataset(ShardOptions(dataset="digits", out=url, size=32, shard_size=600, workers=1, overwrite=overwrite))
        shards = [name for action, name, _ in steps if name.endswith(".tar")]
        assert shards and steps[-1] == ("put", "manifest.json", False), steps
        assert [step for step in steps if step[1] == "manifest.json"][:-1] == ([("remove", "manifest.json", True)]
                                                                               if overwrite else []), steps
        assert not any(there for _, name, there in steps if name != "manifest.json"), steps
    assert manifest_there()


class CountingFilesystem:
    """An fsspec filesystem that records every object it is asked to read, whichever way it is read."""

    def __init__(self, fs, reads: list[str]):
        self._fs, self._reads = fs, reads

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def open(self, path, *args, **kwargs):
        self._reads.append(path)
        return self._fs.open(path, *args, **kwargs)

    def cat_file(self, path, *args, **kwargs):
        self._reads.append(path)
        return self._fs.cat_file(path, *args, **kwargs)

    async def open_async(self, path, *args, **kwargs):
        self._reads.append(path)
        return await self._fs.open_async(path, *args, **kwargs)


def test_a_remote_shard_is_fetched_once_to_check_and_to_read_it(bucket_shards, store_env, monkeypatch):
    """The sha256 is computed as the bytes arrive: evaluating from the bucket, and `verify`, fetch each shard once."""
    from collections import Counter

    from diffmic.config import DataConfig
    from diffmic.data import eval_loader, storage
    from diffmic.data.verify import verify_shards

    manifest, reads = read_manifest(bucket_shards), []
    real = storage.filesystem
    monkeypatch.setattr(storage, "filesystem", lambda url: (CountingFilesystem(real(url)[0], reads), real(url)[1]))

    def shard_reads() -> Counter:
        return Counter(path.rsplit("/", 1)[-1] for path in reads if path.endswith(".tar"))

    data = DataConfig(dataset="digits", num_classes=10, image_size=32, num_workers=0)
    keys = [key for batch in eval_loader(bucket_shards, "test", data, 64) for key in batch["key"]]
    assert keys == manifest.splits["test"].keys
    assert shard_reads() == Counter(entry.file for entry in manifest.splits["test"].shards)
    reads.clear()
    assert verify_shards(bucket_shards) == []
    assert shard_reads() == Counter(entry.file for info in manifest.splits.values() for entry in info.shards)


def test_a_run_from_the_bucket_killed_and_resumed_is_bitwise_the_local_run(bucket_shards, tiny_run, store_env,
                                                                            tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    process = start_training(run_dir, bucket_shards, f"data.cache_dir={cache}", **store_env)
    wait_for(lambda: logged_step(run_dir) >= 16, process)  # joint training (from step 15) has started
    process.kill()  # no save on the way out: the resume starts from the last checkpoint
    process.wait()
    assert ckpt.find_checkpoint(run_dir, "last").step < ckpt.find_checkpoint(tiny_run, "last").step
    output = finish(start_training(run_dir, bucket_shards, f"data.cache_dir={cache}", **store_env))
    assert "resumed from" in output
    assert_bitwise_equal(run_dir, tiny_run)
    manifest = read_manifest(bucket_shards)
    for entry in manifest.splits["train"].shards:  # every shard the stream drew is on disk, checked
        assert file_sha256(cache_path(f"{bucket_shards}/{entry.file}", str(cache))) == entry.sha256


def test_eval_from_the_bucket_with_one_and_two_processes_matches_a_local_eval(bucket_shards, tiny_run, store_env,
                                                                              tmp_path):
    outputs = {name: tmp_path / name for name in ("local", "one", "two")}
    common = ["eval", "--run", str(tiny_run), "--checkpoint", "last", "--no-progress"]
    diffmic([*common, "--out", str(outputs["local"])], threads=1)
    diffmic([*common, "--out", str(outputs["one"]), "--shards", bucket_shards], threads=1, **store_env)
    diffmic([*common, "--out", str(outputs["two"]), "--shards", bucket_shards, "--gpus", "0", "--tasks-per-node", "2"],
            threads=1, **store_env)
    local = (outputs["local"] / "predictions.csv").read_bytes()
    assert (outputs["one"] / "predictions.csv").read_bytes() == local
    assert (outputs["two"] / "predictions.csv").read_bytes() == local
    assert json.loads((outputs["two"] / "metrics.json").read_text())["manifest"] == f"{bucket_shards}/manifest.json"


def test_the_cache_fetches_a_shard_once_and_again_only_when_it_no_longer_matches(bucket_shards, tmp_path,
                                                                                 monkeypatch):
    from diffmic.data import storage

    entry = read_manifest(bucket_shards).splits["test"].shards[0]
    shard = read_manifest(bucket_shards).shard_file(entry)
    fetching = Fetching(cache_dir=str(tmp_path))
    keys = [sample["__key__"] for sample in read_shard(shard, fetching)]
    copy = cache_path(shard.location, str(tmp_path))
    fetched = copy.stat().st_ino
    assert len(keys) == entry.count and file_sha256(copy) == entry.sha256
    assert [sample["__key__"] for sample in read_shard(shard, fetching)] == keys
    assert copy.stat().st_ino == fetched  # read from disk, not fetched again
    data = bytearray(copy.read_bytes())
    data[1000] ^= 0xFF
    copy.write_bytes(bytes(data))  # the cached copy no longer matches the manifest: fetched again
    assert [sample["__key__"] for sample in read_shard(shard, fetching)] == keys
    assert copy.stat().st_ino != fetched and file_sha256(copy) == entry.sha256
    # A restart (nothing remembered in the process) reads a good copy without asking the storage.
    storage._MATCHED.clear()
    monkeypatch.setattr(storage, "filesystem", lambda url: pytest.fail(f"{url} was fetched again"))
    assert [sample["__key__"] for sample in read_shard(shard, fetching)] == keys


def test_storage_faults_are_one_line_naming_the_url_with_exit_2(bucket_shards, object_store, store_env):
    url, client = bucket_shards, object_store.client()
    unfinished = object_store.url("unfinished")  # an upload cut before its manifest
    for path in client.ls(bucket_shards):
        if not path.endswith("manifest.json"):
            client.copy(path, f"{unfinished}/{path.rsplit('/', 1)[-1]}")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]  # nothing listens here once the probe closes
    cases = {
        "wrong endpoint": ({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed}", "AWS_MAX_ATTEMPTS": "1"},
                           url, "cannot reach the storage"),
        "bad credentials": ({"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, url, "access denied"),
        "missing bucket": ({}, "s3://diffmic-no-such-bucket/digits", "does not exist"),
        "missing folder": ({}, object_store.url("nothing-here"), "does not exist"),
        "unfinished upload": ({}, unfinished, "is not a finished `diffmic shard` output"),
    }
    for case, (changes, target, said) in cases.items():
        line = one_error_line(diffmic(["info", target], check=False, **{**store_env, **changes}))
        assert target in line and said in line, f"{case}: {line}"


def test_a_missing_or_changed_object_stops_training_with_one_line_naming_it(bucket_shards, object_store, store_env,
                                                                          tmp_path):
    client = object_store.client()
    train_shards = read_manifest(bucket_shards).splits["train"].shards
    missing, changed = object_store.url("missing-shard"), object_store.url("changed-shard")
    for target in (missing, changed):
        copy_prefix(client, bucket_shards, target)
    client.rm_file(f"{missing}/{train_shards[0].file}")
    for entry in train_shards:  # the same size, one byte different: only the checksum can tell
        data = bytearray(client.cat_file(f"{changed}/{entry.file}"))
        data[len(data) // 2] ^= 0xFF
        client.pipe_file(f"{changed}/{entry.file}", bytes(data))
    verified = diffmic(["verify", changed], check=False, **store_env)  # names every changed object, fetching each once
    assert f"problem(s) in {changed}:" in one_error_line(verified)
    for entry in train_shards:
        assert f"problem: {entry.file}: sha256 differs from the manifest" in verified.stderr
    for target, said in ((missing, "missing"), (changed, "sha256 differs from the manifest")):
        process = start_training(tmp_path / target.rsplit("/", 1)[-1], target, **store_env)
        output, _ = process.communicate(timeout=600)
        result = subprocess.CompletedProcess(process.args, process.returncode, "", output)
        line = one_error_line(result)
        assert f"{target}/train-" in line and said in line and f"diffmic verify {target}" in line, line


# --- a store that stops mid-epoch ------------------------------------------------------------------
def free_port_block() -> int:
    """A base port whose SeaweedFS ports (base..base+3 and each + 10000) are all free."""
    for _ in range(50):
        base = random.randrange(20000, 25000)
        ports = [base + offset for offset in (0, 1, 2, 3, 10000, 10001, 10002, 10003)]
        try:
            for port in ports:
                with socket.socket() as probe:
                    probe.bind(("0.0.0.0", port))
            return base
        except OSError:
            continue
    raise AssertionError("no free block of ports for a second store")


def store_script(command: str, state: Path, port: int) -> None:
    env = {**os.environ, "DIFFMIC_S3_STATE": str(state), "DIFFMIC_S3_PORT": str(port),
           "DIFFMIC_S3_WEED": str(Path(sys.executable).parent / "weed")}  # the test extra's, beside this Python
    result = subprocess.run(["bash", str(S3_SCRIPT), command], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_store_that_stops_mid_epoch_stops_the_run_cleanly_and_it_resumes_exactly(digits_shards, tiny_run, tmp_path):
    state, port = tmp_path / "store", free_port_block()
    store_script("up", state, port)
    try:
        # One try per request inside botocore, so that diffmic's own tries are what the test counts.
        env = {**read_client_env(str(state)), "AWS_MAX_ATTEMPTS": "1"}
        store = ObjectStore(env, "outage")
        store.client().mkdir(store.bucket)
        url = store.url("digits")
        diffmic(["shard", *DIGITS_OPTIONS, "--out", url], **env)
        run_dir = tmp_path / "run"
        process = start_training(run_dir, url, "data.fetch_retries=2", **env)
        wait_for(lambda: logged_step(run_dir) >= 16, process)
        pid = int((state / "weed.pid").read_text())
        os.kill(pid, signal.SIGKILL)  # the server dies: its next requests are refused
        output, _ = process.communicate(timeout=600)
        line = one_error_line(subprocess.CompletedProcess(process.args, process.returncode, "", output))
        assert url in line and "did not answer after 3 tries" in line and "resumes" in line, line
        assert "trying again in 1 s" in output and "trying again in 2 s" in output
        store_script("up", state, port)  # back, with the objects it had
        finish(start_training(run_dir, url, "data.fetch_retries=2", **env))
        assert_bitwise_equal(run_dir, tiny_run)
    finally:
        store_script("down", state, port)


# --- another scheme fsspec understands: a plain https/http server ---------------------------------
@pytest.fixture
def http_shards(digits_shards):
    """The digits shard folder served over http on the loopback (a static web server: no listing, no bucket)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(digits_shards.parent))
    handler.log_message = lambda *args: None
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield f"http://127.0.0.1:{server.server_address[1]}/{digits_shards.name}"
        server.shutdown()


def test_shards_over_http_read_as_from_the_local_folder(http_shards, digits_shards):
    from diffmic.config import DataConfig
    from diffmic.data import eval_loader

    data = DataConfig(dataset="digits", num_classes=10, image_size=32, num_workers=0)
    assert read_manifest(http_shards).digest == read_manifest(digits_shards).digest
    remote = [key for batch in eval_loader(http_shards, "test", data, 64) for key in batch["key"]]
    local = [key for batch in eval_loader(digits_shards, "test", data, 64) for key in batch["key"]]
    assert remote == local == read_manifest(digits_shards).splits["test"].keys
    assert "OK" in diffmic(["verify", http_shards]).stdout
    missing = http_shards.rsplit("/", 1)[0] + "/no-such-folder"
    assert "does not exist" in one_error_line(diffmic(["info", missing], check=False))


STREAM_SCRIPT = """
import sys, torch
from diffmic.config import DataConfig
from diffmic.data import train_loader
data = DataConfig(dataset="digits", num_classes=10, image_size=32, num_workers=2)
for epoch in range(2):  # each epoch forks its workers from a process that has used the storage
    local = list(train_loader(sys.argv[1], data, 32, seed=0, epoch=epoch))
    remote = list(train_loader(sys.argv[2], data, 32, seed=0, epoch=epoch))
    assert [b["key"] for b in local] == [b["key"] for b in remote], epoch
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(local, remote)), epoch
print("same batches")
"""


def test_loader_workers_read_the_bucket_as_the_local_folder_across_epochs(bucket_shards, digits_shards, store_env):
    """Two worker processes per epoch, forked each epoch from a process that has used the storage: the batches
    equal the local folder's, epoch after epoch."""
    result = subprocess.run([sys.executable, "-c", STREAM_SCRIPT, str(digits_shards), bucket_shards], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **store_env},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "same batches" in result.stdout, result.stderr[-4000:]


FORK_SCRIPT = """
import gc, os, sys, time
from diffmic.data import storage
storage.read_bytes(sys.argv[1])  # the parent's connection pool holds a connection now
pid = os.fork()
if pid == 0:  # as a DataLoader worker does: a filesystem of its own (fsspec drops the inherited ones)
    storage.read_bytes(sys.argv[1])
    gc.collect()
    os._exit(0)
os.waitpid(pid, 0)
started = time.perf_counter()
storage.read_bytes(sys.argv[1])
print(f"{time.perf_counter() - started:.3f}")
"""


def test_a_forked_worker_leaves_the_parent_s_connections_alone(bucket_shards, store_env):
    """A child that closed the filesystem it inherited would take the parent's sockets out of the epoll set they
    share: the parent's next request then waited 15 s for its timeout (storage._OPENED keeps them unclosed)."""
    result = subprocess.run([sys.executable, "-c", FORK_SCRIPT, f"{bucket_shards}/manifest.json"], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **store_env},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split()[-1]) < 3.0 and "different loop" not in result.stderr, result.stderr[-3000:]
