"""The training engine on the CPU: DDP and DeepSpeed with two processes, exact resume, crash safety."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from diffmic import checkpoint as ckpt
from diffmic.cli.common import UserError
from diffmic.cli.train import resolve_inputs
from diffmic.fileio import file_sha256, sealed
from engine_helpers import (
    REPO,
    TINY,
    accelerate_launch,
    diffmic_here,
    evil_torch_file,
    finish,
    model_weights,
    shard_digits,
    start_training,
)

CONFIG = str(REPO / "configs" / "digits.yaml")
pytestmark = pytest.mark.timeout(900)


def rank_reports(run_dir: Path) -> list[dict]:
    return [json.loads((run_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def validation_rows(run_dir: Path) -> list[dict]:
    return [row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "split" in row]


def launch_worker(run_dir: Path, shards: Path, deepspeed: bool, *extra: str, check: bool = True) -> str:
    overrides = TINY + ["train.batch_size=16", *extra] + (["train.distributed=deepspeed"] if deepspeed else [])
    result = accelerate_launch([str(REPO / "tests" / "engine_worker.py"), CONFIG, str(shards), str(run_dir),
                                *overrides], deepspeed=deepspeed, check=check)
    assert check or result.returncode != 0, "the launch succeeded"
    return result.stdout + result.stderr


@pytest.fixture(scope="module", params=[False, True], ids=["ddp", "deepspeed-zero2"])
def two_process_run(request, digits_shards, tmp_path_factory) -> tuple[Path, bool]:
    run_dir = tmp_path_factory.mktemp("two") / "run"
    launch_worker(run_dir, digits_shards, request.param, "train.max_steps=3")
    return run_dir, request.param


def test_two_processes_train_validate_checkpoint_and_hold_identical_weights(two_process_run):
    run_dir, deepspeed = two_process_run
    first, second = rank_reports(run_dir)
    assert first["world"] == second["world"] == 2
    assert first["distributed"] == ("DEEPSPEED" if deepspeed else "MULTI_CPU")
    assert first["digest"] == second["digest"] and first["step"] == second["step"] > 3
    run = json.loads((run_dir / "run.json").read_text())
    assert run["world_size"] == 2 and run["global_batch"] == 32 and len(run["manifest_sha256"]) == 64
    assert validation_rows(run_dir) and validation_rows(run_dir)[-1]["split"] == "val"
    last = ckpt.find_checkpoint(run_dir, "last")
    assert last.step == first["step"] and (last.path / "training" / "rng-1.safetensors").is_file()
    assert ckpt.find_checkpoint(run_dir, "best").path.is_dir()
    assert first["provenance"] == second["provenance"] == run["manifest_sha256"]
    if deepspeed:  # DeepSpeed's own files (it loads them itself) pass the weights-only loader
        engine_files = sorted((last.path / ckpt.record.DEEPSPEED_DIR).glob("*.pt"))
        assert len(engine_files) == 3 and not list(last.path.rglob("*.py"))
        for path in engine_files:
            ckpt.load_weights_only(path)


def test_two_processes_resume_exactly_with_an_allowed_change(two_process_run, digits_shards, tmp_path):
    """The training state of every rank (DeepSpeed's through its weights-only loader) comes back; a resume on
    the same data with train.max_steps raised continues where the first session stopped."""
    source, deepspeed = two_process_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    before = rank_reports(run_dir)[0]["step"]
    output = launch_worker(run_dir, digits_shards, deepspeed, "train.max_steps=5",
                           "--allow-changes=train.max_steps")
    first, second = rank_reports(run_dir)
    said = " ".join(output.split())
    assert "resumed from" in said and f"(step {before}, epoch" in said
    assert first["step"] == second["step"] == before + 2 and first["digest"] == second["digest"]
    assert json.loads((run_dir / "run.json").read_text())["sessions"][-1]["changes"] == {"train.max_steps": [3, 5]}


# Files of a two-process checkpoint that the one-process planting tests (test_run_safety.py) never reach:
# rank 1's generators, and DeepSpeed's engine files, which DeepSpeed itself loads (the model states every rank
# reads, and rank 1's optimizer partition).
RANK_FILES = {False: ["training/rng-1.safetensors"],
              True: ["training/deepspeed/mp_rank_00_model_states.pt",
                     "training/deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"]}


def test_a_pickle_planted_in_any_process_s_checkpoint_file_is_refused_naming_it(two_process_run, digits_shards,
                                                                                tmp_path):
    source, deepspeed = two_process_run
    for name in RANK_FILES[deepspeed]:
        run_dir, marker = tmp_path / Path(name).stem / "run", tmp_path / f"pwned-{Path(name).stem}"
        shutil.copytree(source, run_dir)
        sessions = json.loads((run_dir / "run.json").read_text())["sessions"]
        last = ckpt.find_checkpoint(run_dir, "last")
        path = last.file(name)
        path.unlink()
        path.write_bytes(evil_torch_file(marker))
        # The planter rewrote the record's size and sha256 too, and sealed it again: only the weights-only loader
        # stands in the way.
        record = json.loads(last.file(ckpt.MARKER).read_text())
        record["files"][name] = path.stat().st_size
        record["sha256"][name] = file_sha256(path)
        last.file(ckpt.MARKER).write_text(json.dumps(sealed(record)))
        result = launch_worker(run_dir, digits_shards, deepspeed, "train.max_steps=5",
                               "--allow-changes=train.max_steps", check=False)
        said = " ".join(result.split())
        assert f"refusing {path}" in said and "nothing in it was used" in said, result[-4000:]
        assert not marker.exists(), "the planted file ran code"
        assert json.loads((run_dir / "run.json").read_text())["sessions"] == sessions, "rank 0 went on writing"
        assert rank_reports(run_dir) == rank_reports(source), "a process trained on"


def logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return max((json.loads(line)["step"] for line in lines), default=0)


def wait_for(condition, process: subprocess.Popen, timeout: float = 300, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "training ended before the interruption point"
        assert time.monotonic() < deadline, "timed out waiting for the interruption point"
        time.sleep(poll)


def max_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max((first[k].float() - second[k].float()).abs().max().item() for k in first if first[k].numel())


def test_sigterm_saves_and_a_resumed_run_ends_with_the_same_parameters(digits_shards, tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    process = start_training(run_dir, digits_shards)
    wait_for(lambda: logged_step(run_dir) >= 16, process)  # joint training (from step 15) has started
    process.send_signal(signal.SIGTERM)
    output = finish(process)
    assert "signal at step" in output
    interrupted = ckpt.find_checkpoint(run_dir, "last")
    final = ckpt.find_checkpoint(tiny_run, "last")
    assert 16 <= interrupted.step < final.step
    finish(start_training(run_dir, digits_shards))
    resumed = ckpt.find_checkpoint(run_dir, "last")
    assert resumed.step == final.step
    assert max_difference(model_weights(resumed.path), model_weights(final.path)) < 1e-6


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_usable(digits_shards, tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    root = ckpt.checkpoint_root(run_dir)
    process = start_training(run_dir, digits_shards, "train.checkpoint_every=1", save_delay=2)
    # Kill while a checkpoint after the first complete one is being written.
    wait_for(lambda: len(ckpt.complete_checkpoints(run_dir)) >= 1 and any(root.glob(".step-*.partial")),
             process, poll=0.005)
    process.kill()
    process.wait()
    partial = sorted(root.glob(".step-*.partial"))
    survivors = ckpt.complete_checkpoints(run_dir)
    assert partial and survivors, "the kill did not land inside a save"
    assert all(info.step < int(partial[0].name.split("-")[1].split(".")[0]) for info in survivors)
    finish(start_training(run_dir, digits_shards, "train.checkpoint_every=1"))
    assert not list(root.glob(".step-*.partial"))
    final = ckpt.find_checkpoint(tiny_run, "last")
    resumed = ckpt.find_checkpoint(run_dir, "last")
    assert resumed.step == final.step
    assert max_difference(model_weights(resumed.path), model_weights(final.path)) < 1e-6


def test_a_checkpoint_of_another_config_is_refused_with_a_clear_message(digits_shards, tiny_run, tmp_path):
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(tiny_run), str(copy)], check=True)
    result = diffmic_here(["train", "--config", CONFIG, "--shards", str(digits_shards), "--run-dir", str(copy),
                           *[x for o in TINY + ["model.denoiser.feature_dim=32"] for x in ("--set", o)]])
    assert result.returncode == 2
    assert "another configuration" in result.stderr and "model.denoiser.feature_dim" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_non_finite_loss_stops_the_run_naming_the_step(digits_shards, tmp_path):
    result = diffmic_here(["train", "--config", CONFIG, "--shards", str(digits_shards), "--run-dir",
                           str(tmp_path / "r"), "--no-progress",
                           *[x for o in TINY + ["train.dcg_lr=1e12", "train.dcg_amsgrad=false"] for x in ("--set", o)]])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "non-finite at step" in result.stderr


def test_shards_without_a_validation_split_are_refused_before_training(tmp_path):
    shards = shard_digits(tmp_path / "shards", val_fraction=0.0)
    result = diffmic_here(["train", "--config", CONFIG, "--shards", str(shards), "--run-dir", str(tmp_path / "r"),
                           "--no-progress", *[x for o in TINY for x in ("--set", o)]])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no 'val' split" in result.stderr and "--val-fraction" in result.stderr
    assert not list((tmp_path / "r").glob("checkpoints/step-*"))


def test_short_forms_pick_the_config_and_shards(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "digits.yaml").write_text("data: {dataset: digits}\n")
    with pytest.raises(UserError, match="holds 0 shard folders"):
        resolve_inputs(None, None, None)
    (tmp_path / "shards" / "digits").mkdir(parents=True)
    (tmp_path / "shards" / "digits" / "manifest.json").write_text("{}")
    assert resolve_inputs(None, None, None) == (Path("configs/digits.yaml"), Path("shards/digits"))
    assert resolve_inputs(None, "digits", None) == (Path("configs/digits.yaml"), Path("shards/digits"))
    (tmp_path / "shards" / "other").mkdir()
    (tmp_path / "shards" / "other" / "manifest.json").write_text("{}")
    with pytest.raises(UserError, match="digits, other"):
        resolve_inputs(None, None, None)
    with pytest.raises(UserError, match="no config configs/nope.yaml"):
        resolve_inputs(None, "nope", None)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "no"])
def test_deepspeed_keeps_fp32_weights_and_autocasts_like_ddp(precision):
    # DeepSpeed's own bf16 mode casts weights and BatchNorm statistics and rejects fp32 images (seen on an
    # H200); torch_autocast gives the numerics of DDP + autocast.
    from diffmic.config import TrainConfig
    from diffmic.engine.distributed import deepspeed_config

    values = deepspeed_config(TrainConfig(batch_size=16, grad_accum=2, grad_clip=0.5), precision)
    assert values["bf16"]["enabled"] is False and values["fp16"]["enabled"] is False
    assert values["torch_autocast"]["enabled"] is (precision != "no")
    if precision != "no":
        assert values["torch_autocast"]["dtype"] == precision
    assert (values["train_micro_batch_size_per_gpu"], values["gradient_accumulation_steps"],
            values["gradient_clipping"]) == (16, 2, 0.5)
