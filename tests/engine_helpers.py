"""Shared pieces of the engine, evaluation and Slurm tests: small digits shards, a tiny model config and
a way to start several CPU processes with `accelerate launch`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A model small enough for CPU tests: 32 px digits (a 1x1 saliency map, one ROI tile), narrow denoiser.
TINY = ["data.image_size=32", "model.dcg.k=1", "model.denoiser.feature_dim=64", "train.batch_size=32",
        "train.log_every=2", "train.dcg_warmup_epochs=1", "train.epochs=1", "train.val_every=1",
        "eval.steps=5", "eval.n_samples=2", "eval.batch_size=32", "data.num_workers=0", "train.keep_last=3",
        "diffusion.noise_draws=2"]


def shard_digits(out: Path, size: int = 32, shard_size: int = 150, test_fraction: float = 0.5,
                 val_fraction: float = 0.5) -> Path:
    """Digits shards for the engine tests: by default 449 train images (14 batches of 32), so a TINY run
    is 14 warm-up + 14 joint steps; 449 validation and 899 test images."""
    from diffmic.data import ShardOptions, shard_dataset

    shard_dataset(ShardOptions(dataset="digits", out=out, size=size, shard_size=shard_size, workers=1,
                               test_fraction=test_fraction, val_fraction=val_fraction))
    return out


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """Digits at 32 px, half of them for testing (short epochs), in shards of 150: uneven shards per
    split. Reused by the whole session."""
    return shard_digits(tmp_path_factory.mktemp("shards") / "digits")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_environment(threads: int = 2, **extra) -> dict:
    """The environment of a child process; results compared bit for bit need equal thread counts."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO), **extra})
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    return env


def accelerate_launch(args: list[str], processes: int = 2, timeout: int = 600, deepspeed: bool = False,
                      cwd: Path = REPO, check: bool = True) -> subprocess.CompletedProcess:
    """`accelerate launch` with real CPU processes (plain `--cpu` would start only one; see STACK.md)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port())]
    command += ["--use_deepspeed", "--zero_stage", "2"] if deepspeed else ["--multi_gpu"]
    # DeepSpeed picks its CPU accelerator itself; Accelerate's CPU flag would turn DeepSpeed off.
    environment = cpu_environment(1) if deepspeed else cpu_environment(1, ACCELERATE_USE_CPU="1")
    environment.pop("ACCELERATE_USE_CPU", None) if deepspeed else None
    result = subprocess.run(command + args, cwd=cwd, env=environment,
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"launch failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def diffmic(args: list[str], timeout: int = 600, cwd: Path = REPO, check: bool = True, threads: int = 2,
            **env) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "diffmic", *args], cwd=cwd, env=cpu_environment(threads, **env),
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"diffmic {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def diffmic_here(args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`diffmic ARGS` inside this process: the console script's entry point, exit status and output,
    without the ~6 s of imports a new interpreter pays (torch, torchvision, scikit-learn, matplotlib)."""
    import contextlib
    import io

    from diffmic.cli import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    previous_argv, previous_cwd = sys.argv, os.getcwd()
    try:
        sys.argv = ["diffmic", *args]
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else int(done.code is not None)
    finally:
        sys.argv = previous_argv
        os.chdir(previous_cwd)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


class Payload:
    """A pickle that runs a shell command when loaded with plain pickle (or weights_only=False)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def evil_pickle(marker: Path, size: int | None = None) -> bytes:
    import pickle

    data = pickle.dumps(Payload(marker))
    return data + b" " * (size - len(data)) if size and size > len(data) else data  # same size: past the size check


def evil_torch_file(marker: Path) -> bytes:
    """A torch.save file, as DeepSpeed writes them, whose loading with weights_only=False touches `marker`."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"state": Payload(marker)}, buffer)
    return buffer.getvalue()


def training_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training row of a run's metrics.jsonl (validation rows left out)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["loss"]) for row in rows if "loss" in row and row.get("split") != "val"]


def model_weights(checkpoint: Path) -> dict:
    from diffmic.checkpoint import MODEL_FILE, load_tensors

    return load_tensors(checkpoint / MODEL_FILE)[0]


def start_training(run_dir: Path, shards: Path, *extra: str, config: str | None = None, save_delay: float = 0,
                   arguments: tuple[str, ...] = (), **env) -> subprocess.Popen:
    """`diffmic train` on the tiny setting in a child process (so a test can signal or kill it); with
    `save_delay`, every checkpoint waits that long before it is renamed into place (engine_worker.py)."""
    args = ["train", "--config", config or str(REPO / "configs" / "digits.yaml"), "--shards", str(shards),
            "--run-dir", str(run_dir), "--no-progress", *arguments,
            *[item for override in TINY + list(extra) for item in ("--set", override)]]
    program = (["-m", "diffmic"] if not save_delay else
               [str(REPO / "tests" / "engine_worker.py"), "--save-delay", str(save_delay)])
    return subprocess.Popen([sys.executable, *program, *args], cwd=REPO, env=cpu_environment(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: int = 600) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


@pytest.fixture(scope="session")
def tiny_run(digits_shards, tmp_path_factory) -> Path:
    """One uninterrupted tiny training run, shared by the engine and evaluation tests."""
    run_dir = tmp_path_factory.mktemp("tiny_run") / "run"
    finish(start_training(run_dir, digits_shards))
    return run_dir
