"""`diffmic shard`, `diffmic verify` and `diffmic info` as a user runs them: exit codes and messages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_fixtures import imagefolder_layout

REPO = Path(__file__).resolve().parents[1]


def diffmic(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "diffmic", *map(str, args)], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory) -> Path:
    """The short form a user types, run in a fresh folder: writes shards/digits."""
    folder = tmp_path_factory.mktemp("cli")
    result = diffmic("shard", "--dataset", "digits", "--size", "32", "--workers", "2", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert "wrote shards/digits" in result.stdout and "1797" in result.stdout
    return folder / "shards" / "digits"


def test_info_prints_classes_and_counts(digits_shards):
    result = diffmic("info", digits_shards, cwd=digits_shards)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "digits (digits layout" in lines[0] and "32px jpg" in lines[0]
    header = next(line for line in lines if "label" in line)
    totals = next(line for line in lines if " all " in line)
    assert [cell.strip() for cell in header.split("┃") if cell.strip()] == [
        "label", "class", "train", "val", "test", "total"]
    assert [cell.strip() for cell in totals.split("│") if cell.strip()] == ["all", "1130", "128", "539", "1797"]


def test_verify_passes_then_finds_one_flipped_byte(digits_shards, tmp_path):
    assert diffmic("verify", digits_shards, cwd=tmp_path).returncode == 0
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in digits_shards.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    shard = copy / "train-000002.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    result = diffmic("verify", copy, cwd=tmp_path)
    assert result.returncode == 2
    assert "train-000002.tar: sha256 differs from the manifest" in result.stderr
    assert "train-000001.tar" not in result.stderr and "--overwrite" in result.stderr


def test_verify_reports_a_missing_shard_and_a_stray_one(digits_shards, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in digits_shards.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    (copy / "test-000001.tar").rename(copy / "test-000099.tar")
    result = diffmic("verify", copy, cwd=tmp_path)
    assert result.returncode == 2
    assert "test-000001.tar: missing" in result.stderr and "test-000099.tar: a shard the manifest does not list" \
        in result.stderr and "split test: the shards' keys differ" in result.stderr


def test_user_mistakes_exit_2_with_one_message(digits_shards, tmp_path):
    again = diffmic("shard", "--dataset", "digits", "--out", digits_shards, cwd=tmp_path)
    assert again.returncode == 2 and "already exists: pass --overwrite" in again.stderr
    assert "Traceback" not in again.stderr
    missing = diffmic("shard", "--dataset", "ham10000", cwd=tmp_path)
    assert missing.returncode == 2 and "data/ham10000 does not exist" in missing.stderr
    unfinished = diffmic("info", tmp_path, cwd=tmp_path)
    assert unfinished.returncode == 2 and "manifest.json is missing" in unfinished.stderr
    layout = diffmic("shard", "--dataset", "kaggle", cwd=tmp_path)
    assert layout.returncode == 2 and "choose one of ham10000, aptos2019" in layout.stderr


def test_train_on_a_changed_shard_stops_with_one_line_naming_it(digits_shards, tmp_path):
    from engine_helpers import TINY, diffmic_here

    copy = tmp_path / "copy"
    shutil.copytree(digits_shards, copy)
    shard = copy / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # a pixel of one JPEG: every image still decodes
    shard.write_bytes(bytes(data))
    result = diffmic_here(["train", "--config", str(REPO / "configs" / "digits.yaml"), "--shards", str(copy),
                           "--run-dir", str(tmp_path / "run"), "--no-progress",
                           *[item for override in TINY for item in ("--set", override)]])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "train-000001.tar: sha256 differs" in error[0] and f"diffmic verify {copy}" in error[0]
    assert not list((tmp_path / "run").glob("checkpoints/step-*"))


def test_shard_help_lists_every_layout_from_the_registry():
    from diffmic.data.layouts import LAYOUTS

    result = diffmic("shard", "--help", cwd=REPO)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert f"Source layout: {', '.join(LAYOUTS)}" in text
    for name, layout in LAYOUTS.items():
        assert f"{name}: {' '.join(layout.summary.split()[:4])}" in text
    assert "Default 0.3 (ham10000, aptos2019, digits), 0.2 (imagefolder, pkl, medmnist)" in text


def test_shard_imagefolder_with_classes_and_name(tmp_path):
    imagefolder_layout(tmp_path / "data" / "pmg2000")
    result = diffmic("shard", "--dataset", "imagefolder", "--name", "pmg2000", "--size", "32", "--workers", "1",
                     "--classes", "grade_a,grade_b,grade_c", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "shards" / "pmg2000" / "manifest.json").is_file()
    assert "grade_c" in result.stdout
    assert "warning" not in result.stderr


def test_shard_warns_when_the_val_split_rounds_to_nothing(tmp_path):
    imagefolder_layout(tmp_path / "data" / "small", per_class=4)
    result = diffmic("shard", "--dataset", "imagefolder", "--name", "small", "--size", "32", "--workers", "1",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning: no val split" in result.stderr and "--val-fraction" in result.stderr
