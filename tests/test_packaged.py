"""Configs and launch files by name from any folder: a path, then ./configs/ (./launch/), then the packaged
copy; `diffmic configs list|show|copy|path`; `diffmic --version`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffmic.config import ConfigError, TrainConfig, load_config
from diffmic.packaged import NotFoundError, find_file, packaged_root
from engine_helpers import diffmic_here


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """A user's folder with no configs/ or launch/ of its own."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_name_is_a_path_then_a_local_file_then_the_packaged_one(elsewhere):
    packaged = packaged_root() / "configs" / "reference" / "ham10000.yaml"
    for text in ("reference/ham10000", "reference/ham10000.yaml", "configs/reference/ham10000.yaml"):
        assert find_file(text, "configs") == packaged
    (elsewhere / "configs" / "reference").mkdir(parents=True)
    (elsewhere / "configs" / "reference" / "ham10000.yaml").write_text("data: {dataset: mine}\n")
    assert find_file("reference/ham10000", "configs") == Path("configs/reference/ham10000.yaml")
    (elsewhere / "reference").mkdir()
    (elsewhere / "reference" / "ham10000").write_text("data: {dataset: a path}\n")
    assert find_file("reference/ham10000", "configs") == Path("reference/ham10000")
    with pytest.raises(NotFoundError, match=f"no config configs/nope.yaml in {elsewhere} or among diffmic's"):
        find_file("configs/nope.yaml", "configs", "config")
    with pytest.raises(NotFoundError, match="no config /nowhere/x.yaml: the file does not exist"):
        find_file("/nowhere/x.yaml", "configs", "config")


def test_launch_files_resolve_by_short_name(elsewhere):
    for name, relative in [("accelerate/multi_gpu", "launch/accelerate/multi_gpu.yaml"),
                           ("deepspeed/zero2", "launch/deepspeed/zero2.json"),
                           ("launch/deepspeed/zero2.json", "launch/deepspeed/zero2.json"),
                           ("slurm/train", "launch/slurm/train.sbatch")]:
        assert find_file(name, "launch") == packaged_root() / relative


def test_the_deepspeed_config_resolves_the_same_way(elsewhere):
    from diffmic.engine.distributed import deepspeed_config

    packaged = json.loads((packaged_root() / "launch" / "deepspeed" / "zero2.json").read_text())
    values = deepspeed_config(TrainConfig(), "bf16")  # the default, launch/deepspeed/zero2.json, is packaged
    assert values["zero_optimization"] == packaged["zero_optimization"]
    local = elsewhere / "launch" / "deepspeed" / "zero2.json"
    local.parent.mkdir(parents=True)
    local.write_text(json.dumps({**packaged, "zero_optimization": {"stage": 1}}))
    assert deepspeed_config(TrainConfig(deepspeed_config="deepspeed/zero2"), "no")["zero_optimization"] == {"stage": 1}
    with pytest.raises(ConfigError, match="config key 'train.deepspeed_config': no DeepSpeed config"):
        deepspeed_config(TrainConfig(deepspeed_config="deepspeed/zero9"), "no")


def test_train_and_model_summary_find_packaged_configs_from_any_folder(elsewhere):
    from diffmic.cli.train import resolve_inputs

    assert resolve_inputs(None, "digits", None) == (packaged_root() / "configs" / "digits.yaml", Path("shards/digits"))
    result = diffmic_here(["model-summary", "--dataset", "digits"], cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert str(packaged_root() / "configs" / "digits.yaml") in " ".join(result.stdout.split())
    missing = diffmic_here(["model-summary", "--config", "nope"], cwd=elsewhere)
    assert missing.returncode == 2 and "no config nope" in missing.stderr and "diffmic configs list" in missing.stderr
    device = diffmic_here(["model-summary", "--config", "/dev/null"], cwd=elsewhere)
    assert device.returncode == 2 and "config file /dev/null is not a regular file" in device.stderr


def test_configs_list_shows_packaged_and_local_ones(elsewhere):
    result = diffmic_here(["configs", "list"], cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    rows = {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:-1]]
            for line in result.stdout.splitlines() if line.startswith("│")}
    assert rows["digits"] == ["digits", "10", "64", "full", "packaged"]
    assert rows["ablations/ham10000-c1"] == ["ham10000", "7", "224", "c1", "packaged"]
    assert len(rows) == len(list((packaged_root() / "configs").rglob("*.yaml")))
    (elsewhere / "configs").mkdir()
    (elsewhere / "configs" / "digits.yaml").write_text("data: {dataset: digits, num_classes: 10, image_size: 96}\n")
    (elsewhere / "configs" / "mine.yaml").write_text("data: {dataset: mine, num_classes: 3}\nmodel: {variant: c2}\n")
    (elsewhere / "configs" / "broken.yaml").write_text("data: {num_classes: 1}\n")
    result = diffmic_here(["configs", "list"], cwd=elsewhere)
    assert result.returncode == 0, result.stderr  # a broken config is a row, not a failure
    rows = {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:-1]]
            for line in result.stdout.splitlines() if line.startswith("│")}
    assert rows["mine"] == ["mine", "3", "224", "c2", "./configs"]
    assert rows["digits"] == ["digits", "10", "96", "full", "./configs*"]
    assert rows["broken"] == ["error", "", "", "", "./configs"]
    assert "unreadable: configs/broken.yaml: config key 'data.num_classes'" in result.stdout


def test_configs_show_resolves_the_base_chain(elsewhere):
    result = diffmic_here(["configs", "show", "reference/ham10000"], cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    packaged = packaged_root() / "configs" / "reference" / "ham10000.yaml"
    assert result.stdout.startswith(f"# reference/ham10000: {packaged}")
    assert f"<- {packaged_root() / 'configs' / 'ham10000.yaml'}" in result.stdout
    shown = elsewhere / "shown.yaml"
    shown.write_text(result.stdout)
    assert load_config(shown) == load_config(packaged_root() / "configs" / "reference" / "ham10000.yaml")


def test_configs_copy_writes_a_copy_that_stands_alone_and_keeps_what_exists(elsewhere):
    result = diffmic_here(["configs", "copy", "reference/ham10000", "configs/"], cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    copy = elsewhere / "configs" / "ham10000.yaml"
    assert "base:" not in copy.read_text() and copy.read_text().startswith("# The authors' protocol")
    assert load_config(copy) == load_config(packaged_root() / "configs" / "reference" / "ham10000.yaml")
    from diffmic.cli.train import resolve_inputs

    assert resolve_inputs(None, "ham10000", None)[0] == Path("configs/ham10000.yaml")  # the copy is used now
    again = diffmic_here(["configs", "copy", "ham10000", str(copy)], cwd=elsewhere)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert load_config(copy).train.select_split == "test"  # untouched
    sbatch = diffmic_here(["configs", "copy", "slurm/train", "train.sbatch"], cwd=elsewhere)
    assert sbatch.returncode == 0, sbatch.stderr
    assert (elsewhere / "train.sbatch").read_text() == (packaged_root() / "launch/slurm/train.sbatch").read_text()


def test_configs_path_prints_a_file_that_exists(elsewhere):
    for name in ("accelerate/multi_gpu", "deepspeed/zero2", "slurm/train", "ham10000"):
        result = diffmic_here(["configs", "path", name], cwd=elsewhere)
        assert result.returncode == 0, result.stderr
        assert Path(result.stdout.strip()).is_file() and Path(result.stdout.strip()).is_absolute()
    missing = diffmic_here(["configs", "path", "accelerate/nine_gpus"], cwd=elsewhere)
    assert missing.returncode == 2 and "nor a launch file" in missing.stderr


def test_version_names_torch_and_cuda():
    import torch

    from diffmic import __version__

    result = diffmic_here(["--version"])
    assert result.returncode == 0
    assert result.stdout.startswith(f"diffmic {__version__} (torch {torch.__version__}, ")
    assert ("CUDA " if torch.version.cuda else "no CUDA build") in result.stdout
