"""The checkpoint module on its own, without training: the policy, exact round trips of the training state,
a full disk, and the run-folder lock."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from diffmic import checkpoint as ckpt
from diffmic.checkpoint import files
from diffmic.checkpoint.manager import CheckpointManager, choose_start
from diffmic.config import ConfigError, load_config
from diffmic.engine.trainer import TrainerState
from diffmic.errors import CheckpointError, DiskFullError, RunLockError
from diffmic.run import RunFolder
from diffmic.run.lock import RunLock, process_start


# --- when to save ------------------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_checkpoint_every_takes_epochs_steps_or_minutes():
    assert load_config(None, ["train.checkpoint_every=2"]).train.checkpoint_every == 2
    epochs = ckpt.CheckpointPolicy.from_setting(2)
    assert [epochs.due_after_epoch(n, last_epoch=False) for n in (1, 2, 3, 4)] == [False, True, False, True]
    assert epochs.due_after_epoch(3, last_epoch=True) and not epochs.due_after_step(2)
    steps = ckpt.CheckpointPolicy.from_setting(load_config(None, ["train.checkpoint_every=500 steps"]).train.checkpoint_every)
    assert [steps.due_after_step(n) for n in (499, 500, 1000)] == [False, True, True]
    assert not steps.due_after_epoch(1, last_epoch=False) and steps.due_after_epoch(1, last_epoch=True)
    clock = Clock()
    timed = ckpt.CheckpointPolicy.from_setting("30m", clock)
    clock.now += 29 * 60
    assert not timed.due_by_time()
    clock.now += 60
    assert timed.due_by_time()
    timed.saved()
    assert not timed.due_by_time()
    assert ckpt.CheckpointPolicy.from_setting("2h").count == 120
    for bad in ("0m", "10 seconds", "soon", 0):
        with pytest.raises(ConfigError, match="checkpoint_every"):
            load_config(None, [f"train.checkpoint_every={bad}"])


# --- exact round trips -------------------------------------------------------------------------------
def adam_with_state(amsgrad: bool = True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    optimizer = torch.optim.Adam([{"params": model[0].parameters(), "lr": 1e-2, "name": "a", "max_norm": 1.0},
                                  {"params": model[2].parameters(), "lr": 2e-3, "amsgrad": amsgrad}], fused=True)
    for _ in range(3):
        model(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def test_optimizer_state_survives_safetensors_exactly(tmp_path):
    model, optimizer = adam_with_state()
    tensors, metadata = files.flatten_optimizer(optimizer.state_dict())
    files.save_tensors(tmp_path / "optimizer.safetensors", tensors, metadata)
    twin_model, twin = adam_with_state()
    for p in twin_model.parameters():  # different moments, to be overwritten
        p.grad = torch.ones_like(p)
    twin.step()
    twin.zero_grad()
    twin.load_state_dict(files.unflatten_optimizer(*files.load_tensors(tmp_path / "optimizer.safetensors")))
    twin_model.load_state_dict(model.state_dict())
    batch = torch.randn(5, 4)
    for net, opt in ((model, optimizer), (twin_model, twin)):
        net(batch).square().mean().backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin_model.state_dict().values()))
    assert twin.param_groups[0]["betas"] == optimizer.param_groups[0]["betas"] and twin.param_groups[1]["amsgrad"]


def test_random_generators_come_back_exactly(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    files.save_tensors(tmp_path / "rng.safetensors", *files.capture_rng())
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    files.restore_rng(*files.load_tensors(tmp_path / "rng.safetensors"))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


# --- the manager on a small module -------------------------------------------------------------------
CONFIG = load_config(None, ["data.num_classes=3", "train.keep_last=1", "train.mixed_precision=no"])


@pytest.fixture
def manager(tmp_path):
    from diffmic.accelerator import make_accelerator

    accelerator = make_accelerator()
    model, optimizer = adam_with_state()
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainerState(step=7, epoch=1, batch_in_epoch=2)
    return CheckpointManager(tmp_path / "run", accelerator, model, model, optimizer, None, state, CONFIG,
                             ["a", "b", "c"], {"manifest_sha256": "0" * 64, "shards": "shards/x"})


def test_a_training_checkpoint_restores_weights_optimizer_and_position(manager):
    path = manager.save()
    saved = {k: v.clone() for k, v in manager.module.state_dict().items()}
    moments = {k: v.clone() for k, v in files.flatten_optimizer(manager.optimizer.state_dict())[0].items()}
    checkpoint = ckpt.verify(ckpt.read_checkpoint(path))
    assert checkpoint.has_training_state and checkpoint.step == 7 and checkpoint.position["batch_in_epoch"] == 2
    assert sorted(checkpoint.record["files"]) == ["model.safetensors", "training/optimizer.safetensors",
                                                  "training/rng-0.safetensors", "training/state.json"]
    with torch.no_grad():
        for value in manager.module.parameters():
            value.add_(1.0)
    manager.optimizer.state_dict()["state"][0]["exp_avg"].add_(1.0)
    manager.state.step, manager.state.epoch = 0, 0
    manager.restore(checkpoint)
    assert all(torch.equal(saved[k], v) for k, v in manager.module.state_dict().items())
    assert all(torch.equal(moments[k], v) for k, v in files.flatten_optimizer(manager.optimizer.state_dict())[0].items())
    assert (manager.state.step, manager.state.epoch, manager.state.batch_in_epoch) == (7, 1, 2)


def test_pruning_keeps_the_last_training_checkpoints_and_weights_only_ones(manager):
    ckpt.write_weights_checkpoint(manager.run_dir, manager.module.state_dict(), CONFIG, ["a", "b", "c"], step=3)
    for step in (7, 8, 9):
        manager.state.step = step
        manager.save()
    assert [c.name for c in ckpt.complete_checkpoints(manager.run_dir)] == ["step-3", "step-9"]


def test_a_save_that_cannot_fit_says_disk_full_and_keeps_the_previous_checkpoint(manager, monkeypatch):
    manager.save()
    manager.state.step = 8
    usage = shutil.disk_usage(manager.run_dir)
    monkeypatch.setattr("diffmic.checkpoint.manager.shutil.disk_usage",
                        lambda path: usage._replace(free=1000))
    with pytest.raises(DiskFullError) as caught:
        manager.save()
    message = str(caught.value)
    assert message.startswith("disk full: saving step-8 needs about") and "0.00 GB free" in message
    assert "step-7 is intact" in message and "\n" not in message
    assert [c.name for c in ckpt.complete_checkpoints(manager.run_dir)] == ["step-7"]
    assert not list(ckpt.checkpoint_root(manager.run_dir).glob(".*partial"))


def test_the_space_a_save_needs_covers_moments_that_appeared_since_the_last_checkpoint(manager):
    moments = manager.optimizer.optimizer.state
    largest = max(moments, key=lambda parameter: parameter.numel())
    held = moments.pop(largest)  # a warm-up checkpoint: this parameter has not trained yet, no moments
    manager.save()
    moments[largest] = held  # it trains now: a joint checkpoint is larger than the warm-up one
    manager.state.step = 8
    needed = manager._expected_bytes()
    saved = ckpt.read_checkpoint(manager.save())
    assert needed >= sum(saved.record["files"].values())


def test_a_disk_that_fills_up_during_a_save_leaves_no_partial_folder(manager, monkeypatch):
    manager.save()
    manager.state.step = 8
    written = []
    write = files.HashingFile.write

    def full_disk(self, data):
        written.append(len(data))
        if len(written) > 2:  # the disk takes a header or two, then is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, data)

    monkeypatch.setattr(files.HashingFile, "write", full_disk)
    # The partial folder is gone, so the space it took is free again: more free than needed says the disk filled up
    # while the checkpoint was written, not that the estimate was wrong.
    with pytest.raises(DiskFullError, match=r"disk full: saving step-8 needs about .* GB free \(the disk filled up "
                                            r"while it was written\); .* step-7 is intact"):
        manager.save()
    assert written and not list(ckpt.checkpoint_root(manager.run_dir).glob(".*partial"))
    assert [c.name for c in ckpt.complete_checkpoints(manager.run_dir)] == ["step-7"]


def test_a_run_with_only_weights_starts_a_fine_tuning(manager):
    config = manager.config
    ckpt.write_weights_checkpoint(manager.run_dir, manager.module.state_dict(), config, ["a", "b", "c"], step=5,
                                  folder=ckpt.record.best_folder(manager.run_dir, 5))
    files.write_json(ckpt.checkpoint_root(manager.run_dir) / ckpt.BEST_FILE, {"step": 5})
    start = choose_start(manager.run_dir, config, ["a", "b", "c"], "0" * 64, 1)
    assert start.mode == "fine-tune" and start.checkpoint.name == "best-5" and start.step == 5
    manager.save()  # a training checkpoint now exists: it wins
    start = choose_start(manager.run_dir, config, ["a", "b", "c"], "0" * 64, 1)
    assert start.mode == "resume" and start.checkpoint.name == "step-7"
    with pytest.raises(CheckpointError, match="classes"):
        choose_start(manager.run_dir, config, ["a", "b", "d"], "0" * 64, 1)
    with pytest.raises(CheckpointError, match="data changed since the run started"):
        choose_start(manager.run_dir, config, ["a", "b", "c"], "1" * 64, 1)
    with pytest.raises(CheckpointError, match="written by 1 process"):
        choose_start(manager.run_dir, config, ["a", "b", "c"], "0" * 64, 2)
    with pytest.raises(CheckpointError, match="not a setting"):
        choose_start(manager.run_dir, config, ["a", "b", "c"], "0" * 64, 1, ["train.lr", "train.speed"])


def test_a_resume_lists_every_changed_setting_and_accepts_only_the_named_ones(manager):
    manager.save()
    changed = load_config(None, ["data.num_classes=3", "train.keep_last=1", "train.mixed_precision=no",
                                 "train.lr=0.5", "eval.steps=10"])
    with pytest.raises(CheckpointError) as caught:
        choose_start(manager.run_dir, changed, ["a", "b", "c"], "0" * 64, 1)
    message = str(caught.value)
    assert "another configuration" in message and "train.lr: checkpoint 0.001, now 0.5" in message
    assert "eval.steps" in message and "--allow-changes eval.steps,train.lr" in message
    start = choose_start(manager.run_dir, changed, ["a", "b", "c"], "0" * 64, 1, ["train.lr", "eval.steps"])
    assert start.mode == "resume" and start.changes == {"eval.steps": (250, 10), "train.lr": (0.001, 0.5)}
    other_model = load_config(None, ["data.num_classes=3", "train.keep_last=1", "train.mixed_precision=no",
                                     "model.dcg.k=2"])
    with pytest.raises(CheckpointError, match="weights do not fit this model"):
        choose_start(manager.run_dir, other_model, ["a", "b", "c"], "0" * 64, 1, ["model.dcg.k"])


# --- one writer per run folder -----------------------------------------------------------------------
def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def plant_lock(run_dir, **holder):
    run_dir.mkdir(parents=True, exist_ok=True)
    RunFolder(run_dir).lock_file.write_text(json.dumps({"host": socket.gethostname(), "token": "theirs", **holder}))


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunLockError, match=rf"in use by another diffmic train \(host {socket.gethostname()}, "
                                           rf"pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    first.release()
    assert not RunFolder(tmp_path).lock_file.exists()
    second = RunLock(tmp_path)
    second.acquire()
    second.release()


def test_a_stale_lock_of_a_dead_or_reused_pid_is_taken_over(tmp_path):
    plant_lock(tmp_path, pid=dead_pid())
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads(RunFolder(tmp_path).lock_file.read_text())["pid"] == os.getpid()
    lock.release()
    plant_lock(tmp_path, pid=os.getpid(), pid_started="1")  # this pid, but a process started at another time
    RunLock(tmp_path).acquire()


def test_slurm_locks_a_requeued_job_and_a_job_that_ended_are_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    plant_lock(tmp_path / "a", host="node7", pid=1, slurm_job_id="4242", slurm_restart_count=0)
    RunLock(tmp_path / "a").acquire()  # the same job, requeued: its earlier run held the lock
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    plant_lock(tmp_path / "b", host="node7", pid=1, slurm_job_id="4242", slurm_restart_count=0)
    with pytest.raises(RunLockError, match="Slurm job 4242"):
        RunLock(tmp_path / "b").acquire()  # the same run of the same job on another node: a live writer
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for state, stale in (("RUNNING", False), (None, True)):
        script = (f"echo {state}" if state else
                  "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1")
        squeue.write_text(f"#!/bin/sh\n{script}\n")
        squeue.chmod(0o755)
        plant_lock(tmp_path / "c", host="node7", pid=1, slurm_job_id="99", slurm_restart_count=0)
        if stale:
            RunLock(tmp_path / "c").acquire()
        else:
            with pytest.raises(RunLockError, match="Slurm job 99"):
                RunLock(tmp_path / "c").acquire()


def test_process_start_tells_processes_apart():
    assert process_start(os.getpid()) is not None and process_start(dead_pid()) is None
