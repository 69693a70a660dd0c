"""What a run folder must survive: planted files, changed shards or settings, a second writer, a full disk,
re-runs of a finished run, and resumes that must not log a step twice."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from diffmic import checkpoint as ckpt
from diffmic.errors import CheckpointError
from diffmic.run import RunFolder
from diffmic.run.lock import RunLock
from engine_helpers import REPO, TINY, cpu_environment, diffmic_here, evil_pickle, evil_torch_file, model_weights

CONFIG = str(REPO / "configs" / "digits.yaml")
pytestmark = pytest.mark.timeout(900)


def plant(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)  # never write through a hard link into the shared tiny run
    path.write_bytes(data)


def linked_copy(source: Path, target: Path) -> Path:
    """A copy of a run folder whose big tensor files are hard links (instant, no space); the rest copied."""
    def link_or_copy(src, dst):
        return os.link(src, dst) if src.endswith(".safetensors") else shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link_or_copy)
    return target


@pytest.fixture
def half_run(tiny_run, tmp_path) -> Path:
    """The tiny run as it stood after its first epoch: its latest checkpoint is step-13, mid-schedule."""
    run = linked_copy(tiny_run, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "step-26")
    return run


def tiny_settings(*extra: str) -> list[str]:
    return [item for override in TINY + list(extra) for item in ("--set", override)]


def train_args(run: Path, shards: Path, *extra: str, options: tuple[str, ...] = ()) -> list[str]:
    return ["train", "--config", CONFIG, "--shards", str(shards), "--run-dir", str(run), "--no-progress", *options,
            *tiny_settings(*extra)]


def one_image(tmp_path: Path) -> Path:
    path = tmp_path / "image.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return path


def command(kind: str, run: Path, shards: Path, tmp_path: Path) -> list[str]:
    if kind == "resume":
        return train_args(run, shards)
    if kind == "eval":
        return ["eval", "--run", str(run), "--checkpoint", "step-13", "--out", str(tmp_path / "out"), "--no-progress"]
    return ["predict", "--run", str(run), "--checkpoint", "step-13", "--out", str(tmp_path / "p.csv"),
            str(one_image(tmp_path))]


def assert_refused(result, named: str, marker: Path) -> None:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0] and "refusing" in errors[0], result.stderr[-3000:]
    assert not marker.exists(), "the planted file ran code"


# --- nothing runs from a data file ------------------------------------------------------------------
READ_BY = {"resume": ("model.safetensors", "ema.safetensors", "training/optimizer.safetensors",
                      "training/rng-0.safetensors", "training/state.json", "COMPLETE"),
           "eval": ("model.safetensors", "ema.safetensors", "COMPLETE"),
           "predict": ("model.safetensors", "ema.safetensors", "COMPLETE")}
REPLACED = [(kind, name) for kind, names in READ_BY.items() for name in names]
# What diffmic 0.1 (Accelerate's save_state) left in a checkpoint, and other pickles.
PLANTED = ["custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "optimizer.bin", "random_states_0.pkl", "model.pt",
           "pytorch_model.bin", "training/scaler.pt"]


@pytest.mark.parametrize("kind,name", REPLACED, ids=[f"{k}-{n}" for k, n in REPLACED])
def test_a_checkpoint_file_replaced_by_a_pickle_is_refused_naming_it(kind, name, half_run, digits_shards, tmp_path):
    marker = tmp_path / "pwned"
    target = half_run / "checkpoints" / "step-13" / name
    # Same size as the original where it was recorded, so it is the parser, not the size check, that refuses.
    plant(target, evil_pickle(marker, target.stat().st_size if target.stat().st_size < 1_000_000 else None))
    assert_refused(diffmic_here(command(kind, half_run, digits_shards, tmp_path)), name.split("/")[-1], marker)


@pytest.mark.parametrize("kind", ["resume", "eval", "predict"])
@pytest.mark.parametrize("name", PLANTED)
def test_a_pickle_planted_in_a_checkpoint_is_refused_naming_it(kind, name, half_run, digits_shards, tmp_path):
    marker = tmp_path / "pwned"
    plant(half_run / "checkpoints" / "step-13" / name, evil_torch_file(marker))
    assert_refused(diffmic_here(command(kind, half_run, digits_shards, tmp_path)), name.split("/")[-1], marker)


@pytest.mark.parametrize("kind", ["resume", "eval", "predict"])
def test_a_checkpoint_of_diffmic_0_1_is_refused_naming_its_pickle(kind, half_run, digits_shards, tmp_path):
    """diffmic 0.1 resumed through Accelerate, which unpickled custom_checkpoint_*.pkl with weights_only=False."""
    marker = tmp_path / "pwned"
    folder = half_run / "checkpoints" / "step-13"
    record = json.loads((folder / "COMPLETE").read_text())
    plant(folder / "COMPLETE", json.dumps({"step": 13, "config": record["config"], "classes": record["classes"]}).encode())
    plant(folder / "custom_checkpoint_0.pkl", evil_torch_file(marker))
    result = diffmic_here(command(kind, half_run, digits_shards, tmp_path))
    assert_refused(result, "custom_checkpoint_0.pkl", marker)
    assert "diffmic 0.1" in result.stderr


@pytest.mark.parametrize("kind", ["eval", "predict"])
def test_a_pickle_in_place_of_best_json_is_refused_naming_it(kind, half_run, digits_shards, tmp_path):
    """`--checkpoint best` reads checkpoints/best.json before any checkpoint folder."""
    marker = tmp_path / "pwned"
    plant(half_run / "checkpoints" / "best.json", evil_pickle(marker))
    args = [("best" if arg == "step-13" else arg) for arg in command(kind, half_run, digits_shards, tmp_path)]
    assert_refused(diffmic_here(args), "best.json", marker)


def test_deepspeed_files_are_read_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "mp_rank_00_model_states.pt").write_bytes(evil_torch_file(marker))
    with pytest.raises(CheckpointError, match=r"refusing .*mp_rank_00_model_states.pt: it is a pickle "
                                                         r"that refers to posix.system"):
        ckpt.load_weights_only(tmp_path / "mp_rank_00_model_states.pt")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["eval", "resume"])
def test_a_model_file_changed_in_place_at_its_size_is_refused_by_name(kind, half_run, tmp_path, digits_shards):
    path = half_run / "checkpoints" / "step-13" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55  # one weight's byte: the file still parses, only its sha256 tells
    plant(path, bytes(data))
    result = diffmic_here(command(kind, half_run, digits_shards, tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    message = " ".join(result.stderr.split())
    assert f"refusing {path}: its content changed since it was written" in message, message
    assert message.endswith("or train into a new --run-dir"), message  # not cut mid-sentence
    assert not (tmp_path / "out").exists()  # nothing further was written


# --- the data and the settings of a resume ------------------------------------------------------------
def test_a_resume_on_shards_that_changed_is_refused(half_run, digits_shards, tmp_path):
    changed = tmp_path / "shards"
    shutil.copytree(digits_shards, changed)
    manifest = json.loads((changed / "manifest.json").read_text())
    manifest["source_root"] = "elsewhere"
    (changed / "manifest.json").write_text(json.dumps(manifest))
    result = diffmic_here(train_args(half_run, changed))
    assert result.returncode == 2 and "the data changed since the run started" in result.stderr
    assert not list((half_run / "checkpoints").glob("step-1[4-9]"))


def test_a_resume_with_another_setting_is_refused_unless_named_and_the_change_is_recorded(half_run, digits_shards):
    refused = diffmic_here(train_args(half_run, digits_shards, "train.lr=0.002", "eval.steps=4"))
    assert refused.returncode == 2 and "another configuration" in refused.stderr
    assert "train.lr: checkpoint 0.004, now 0.002" in " ".join(refused.stderr.split())
    assert "eval.steps" in refused.stderr and "--allow-changes" in refused.stderr
    accepted = diffmic_here(train_args(half_run, digits_shards, "train.lr=0.002", "eval.steps=4", "train.max_steps=1",
                                       options=("--allow-changes", "train.lr,eval.steps,train.max_steps")))
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    session = json.loads((half_run / "run.json").read_text())["sessions"][-1]
    assert session["mode"] == "resume" and session["from"]["step"] == 13
    assert session["changes"] == {"eval.steps": [5, 4], "train.lr": [0.004, 0.002], "train.max_steps": [0, 1]}
    assert "train.lr 0.004 -> 0.002" in " ".join(accepted.stderr.split())


# --- resume bookkeeping -----------------------------------------------------------------------------
def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_resume_logs_no_step_twice_and_averages_over_the_steps_it_summed(half_run, tiny_run, digits_shards,
                                                                          tmp_path):
    # The reference: step 14 alone, logged every step after the same resume from step 13.
    reference = linked_copy(half_run, tmp_path / "reference")
    result = diffmic_here(train_args(reference, digits_shards, "train.max_steps=1", "train.log_every=1",
                                     options=("--allow-changes", "train.max_steps,train.log_every")))
    assert result.returncode == 0, result.stderr[-3000:]
    step_14 = next(row["loss"] for row in rows(reference) if row["step"] == 14 and "loss" in row)
    # log_every=2: the first interval after resuming at step 13 holds one step, not two.
    result = diffmic_here(train_args(half_run, digits_shards, "train.max_steps=1",
                                     options=("--allow-changes", "train.max_steps")))
    assert result.returncode == 0, result.stderr[-3000:]
    logged = rows(half_run)
    keys = [(row["step"], "split" in row) for row in logged]
    assert len(keys) == len(set(keys)), "a step was logged twice"
    assert [row for row in logged if row["step"] <= 13] == [row for row in rows(tiny_run) if row["step"] <= 13]
    assert next(row["loss"] for row in logged if row["step"] == 14 and "loss" in row) == pytest.approx(step_14, rel=1e-6)
    # Finished (train.max_steps reached): running it again trains nothing and says so.
    before = sorted(path.name for path in (half_run / "checkpoints").iterdir())
    again = diffmic_here(train_args(half_run, digits_shards, "train.max_steps=1"))
    assert again.returncode == 0 and "already finished at step 14" in " ".join(again.stderr.split())
    assert sorted(path.name for path in (half_run / "checkpoints").iterdir()) == before
    assert rows(half_run) == logged


# --- one writer per run folder ----------------------------------------------------------------------
def test_a_second_train_on_a_run_folder_in_use_is_refused_naming_the_holder(half_run, digits_shards, tmp_path):
    holder = RunLock(half_run)
    holder.acquire()
    try:
        result = diffmic_here(train_args(half_run, digits_shards))
        # Reading a run that trains is fine: predict (like eval) takes no lock.
        predicted = diffmic_here(command("predict", half_run, digits_shards, tmp_path))
    finally:
        holder.release()
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is in use by another diffmic train (host" in result.stderr and f"pid {os.getpid()}" in result.stderr
    assert json.loads((half_run / "run.json").read_text())["sessions"][-1]["mode"] == "fresh"  # untouched
    assert predicted.returncode == 0, predicted.stderr[-3000:]


def test_the_lock_is_released_when_training_fails(tmp_path, digits_shards):
    result = diffmic_here(train_args(tmp_path / "r", digits_shards, "train.dcg_lr=1e12", "train.dcg_amsgrad=false"))
    assert result.returncode == 2 and "non-finite" in result.stderr
    assert not RunFolder(tmp_path / "r").lock_file.exists()


# --- disk full ----------------------------------------------------------------------------------------
def test_a_full_disk_stops_training_with_one_line_and_no_partial_folder(tmp_path, digits_shards, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10_000_000))
    result = diffmic_here(train_args(tmp_path / "r", digits_shards, "train.checkpoint_every=1 step",
                                     "train.val_every=0"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    message = " ".join(result.stderr.split())
    assert "disk full: saving step-1 needs about" in message and "0.01 GB free" in message
    assert not list((tmp_path / "r" / "checkpoints").glob(".*")) and not RunFolder(tmp_path / "r").lock_file.exists()


# --- checkpoint size and frequency -------------------------------------------------------------------
def test_each_tensor_is_stored_once_and_best_is_weights_only(tiny_run):
    last = ckpt.find_checkpoint(tiny_run, "last")
    assert sorted(last.record["files"]) == ["ema.safetensors", "model.safetensors", "training/optimizer.safetensors",
                                            "training/rng-0.safetensors", "training/state.json"]
    weights = model_weights(last.path)
    assert last.file("model.safetensors").stat().st_size < 1.001 * sum(v.numel() * 4 for v in weights.values())
    best = ckpt.find_checkpoint(tiny_run, "best")
    assert best.name.startswith("best-") and not best.has_training_state
    assert sorted(best.record["files"]) == ["ema.safetensors", "model.safetensors"]
    if best.step == last.step:  # the same weights: one copy on disk
        assert best.file("model.safetensors").stat().st_ino == last.file("model.safetensors").stat().st_ino


def test_checkpoint_every_counts_steps(tmp_path, digits_shards):
    result = diffmic_here(train_args(tmp_path / "r", digits_shards, "train.dcg_warmup_epochs=0", "train.max_steps=4",
                                     "train.checkpoint_every=2 steps", "train.val_every=0", "train.keep_last=5"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [c.name for c in ckpt.complete_checkpoints(tmp_path / "r")] == ["step-2", "step-4"]


# --- weights-only checkpoints start a fine-tuning ---------------------------------------------------
def test_a_run_folder_holding_only_weights_is_fine_tuned(tiny_run, digits_shards, tmp_path):
    source = ckpt.find_checkpoint(tiny_run, "last")
    run = tmp_path / "imported"
    written = ckpt.write_weights_checkpoint(run, ckpt.load_weights(source, use_ema=False), source.config,
                                            source.classes, ema_state=ckpt.record.load_ema(source), step=26,
                                            imported_from={"test": "tiny run"})
    assert not written.has_training_state and (run / "checkpoints" / "step-26" / "COMPLETE").is_file()
    evaluated = diffmic_here(["eval", "--run", str(run), "--checkpoint", "last", "--out", str(tmp_path / "e"),
                              "--no-progress", "--shards", str(digits_shards)])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = diffmic_here(train_args(run, digits_shards, "train.dcg_warmup_epochs=0", "train.max_steps=1",
                                     "train.val_every=0"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fine-tuning from the weights and EMA of" in " ".join(result.stderr.split())
    record = json.loads((run / "run.json").read_text())
    assert record["fine_tuned_from"]["step"] == 26 and record["sessions"][0]["mode"] == "fine-tune"
    tuned = ckpt.find_checkpoint(run, "last")
    assert tuned.step == 27 and tuned.has_training_state
    start, after = model_weights(source.path), model_weights(tuned.path)
    dcg = [name for name in start if name.startswith("dcg.") and "running_" not in name
           and "num_batches" not in name]
    # One Adam step (lr 2e-4) away from the source weights, far from a fresh initialisation.
    assert max((after[n] - start[n]).abs().max().item() for n in dcg) < 1e-2


# --- evaluation and prediction load no training code -----------------------------------------------
def imported_modules(args: list[str]) -> set[str]:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "diffmic", *args], cwd=REPO,
                            env=cpu_environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}


def test_eval_help_and_predict_import_no_training_code(tiny_run, tmp_path):
    training = ("diffmic.engine", "accelerate", "deepspeed", "webdataset")
    for args in (["eval", "--help"], ["predict", "--run", str(tiny_run), "--checkpoint", "last", "--out",
                                      str(tmp_path / "p.csv"), str(one_image(tmp_path))]):
        loaded = imported_modules(args)
        assert "diffmic.cli" in loaded
        assert not [name for name in loaded if name.startswith(training)], args


class _RunsCommand:
    """A pickle that runs a shell command when loaded the ordinary way."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_diffmic_status_reads_a_jobs_result_files_without_running_them(tmp_path):
    import pickle

    from diffmic.launch.slurm import job_outcome

    witness = tmp_path / "ran"
    planted = {"success.pkl": ("success", _RunsCommand(f"touch {witness}")),
               "error.pkl": ("error", "Traceback ..."), "bare.pkl": _RunsCommand(f"touch {witness}")}
    for name, value in planted.items():
        (tmp_path / name).write_bytes(pickle.dumps(value))
    (tmp_path / "cut.pkl").write_bytes(pickle.dumps(("success", 1))[:5])
    assert [job_outcome(tmp_path / name) for name in (*planted, "cut.pkl")] == ["success", "error", "error", "error"]
    assert not witness.exists()
