"""k-fold cross-validation: `diffmic shard --folds K` deals the train split into folds once; `data.fold = i`
makes the streams validate on fold i and train on the rest, from the same shards."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from data_fixtures import ham_metadata_layout
from diffmic.config import ConfigError, DataConfig
from diffmic.data import (
    ManifestError,
    ShardError,
    ShardOptions,
    eval_loader,
    read_manifest,
    shard_dataset,
    train_loader,
)
from engine_helpers import diffmic_here


@pytest.fixture(scope="module")
def folded_digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("folds") / "digits"
    shard_dataset(ShardOptions(dataset="digits", out=out, size=32, shard_size=100, folds=3, workers=1))
    return read_manifest(out)


def data_config(fold: int) -> DataConfig:
    return DataConfig(dataset="digits", num_classes=10, image_size=32, num_workers=0, fold=fold)


def test_three_folds_cover_the_training_part_exactly_once(folded_digits):
    manifest = folded_digits
    train = manifest.split_info("train")
    assert manifest.fold_count == 3 and "val" not in manifest.splits  # the folds replace the val split
    validations = [manifest.selection("val", fold).keys for fold in range(3)]
    assert sorted(key for keys in validations for key in keys) == sorted(train.keys)
    for fold, keys in enumerate(validations):
        assert set(manifest.selection("train", fold).keys) == set(train.keys) - set(keys)
    # Stratified: every class is spread over the folds within one image of each other.
    labels = {key: label for batch in eval_loader(manifest.folder, "train", data_config(-1), 256)
              for key, label in zip(batch["key"], batch["label"].tolist())}
    per_class = Counter((labels[key], fold) for key, fold in zip(train.keys, train.folds))
    for label in range(10):
        counts = [per_class[(label, fold)] for fold in range(3)]
        assert max(counts) - min(counts) <= 1, (label, counts)
    test_keys = set(manifest.split_info("test").keys)
    assert not test_keys & set(train.keys)  # the test split is untouched


def test_streams_validate_on_the_fold_and_train_on_the_rest(folded_digits):
    manifest = folded_digits
    folder = manifest.folder
    validation = [key for batch in eval_loader(folder, "val", data_config(1), 64) for key in batch["key"]]
    assert validation == manifest.selection("val", 1).keys
    held_out = set(validation)
    loader = train_loader(folder, data_config(1), batch_size=16, seed=0, epoch=0)
    seen = [key for batch in loader for key in batch["key"]]
    assert len(loader) == manifest.selection("train", 1).count // 16
    assert seen and not held_out & set(seen)
    # Without a fold the train stream may draw any training image, fold 1 included.
    everything = [key for batch in train_loader(folder, data_config(-1), 16, 0, 0) for key in batch["key"]]
    assert held_out & set(everything)


def test_folds_keep_each_lesion_together_and_are_stratified(tmp_path):
    truth = ham_metadata_layout(tmp_path / "ham", lesions_per_class=9)
    out = tmp_path / "shards"
    shard_dataset(ShardOptions(dataset="ham10000", root=tmp_path / "ham", out=out, size=16, folds=3, workers=1))
    train = read_manifest(out).split_info("train")
    fold_of_lesion = {}
    for key, fold in zip(train.keys, train.folds):
        assert fold_of_lesion.setdefault(truth[key][1], fold) == fold
    # Stratified by class over lesions (every lesion of this layout has one label).
    label_of_lesion = {lesion: label for label, lesion in truth.values()}
    lesions = Counter((label_of_lesion[lesion], fold) for lesion, fold in fold_of_lesion.items())
    for label in range(7):
        counts = [lesions[(label, fold)] for fold in range(3)]
        assert max(counts) - min(counts) <= 1, (label, counts)


def test_fold_mistakes_are_named(folded_digits, tmp_path):
    with pytest.raises(ShardError, match="leave out --val-fraction"):
        ShardOptions(dataset="digits", out=tmp_path / "x", folds=3, val_fraction=0.1)
    with pytest.raises(ShardError, match="--folds 1"):
        ShardOptions(dataset="digits", out=tmp_path / "x", folds=1)
    with pytest.raises(ManifestError, match="folds 0..2"):
        folded_digits.selection("val", 3)
    with pytest.raises(ConfigError, match="data.fold|fold"):
        DataConfig(fold=-2)
    unfolded = tmp_path / "plain"
    shard_dataset(ShardOptions(dataset="digits", out=unfolded, size=16, workers=1))
    manifest = read_manifest(unfolded)
    with pytest.raises(ManifestError, match="has no folds"):
        manifest.selection("train", 0)
    # A manifest without folds carries no folds field at all.
    assert all("folds" not in info for info in json.loads(manifest.path.read_text())["splits"].values())


def test_shard_cli_takes_folds_and_info_reports_them(tmp_path):
    out = tmp_path / "cv"
    result = diffmic_here(["shard", "--dataset", "digits", "--out", str(out), "--size", "16", "--folds", "4"])
    assert result.returncode == 0, result.stderr
    assert read_manifest(out).fold_count == 4
    assert "4 cross-validation folds" in diffmic_here(["info", str(out)]).stdout


def test_a_fold_run_validates_on_its_fold(folded_digits, tmp_path):
    from engine_helpers import finish, start_training

    run = tmp_path / "fold1"
    finish(start_training(run, folded_digits.folder, "data.fold=1", "train.max_steps=2", "train.checkpoint_every=100"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    validations = [row for row in rows if row.get("split") == "val"]
    assert validations, rows
    # The trainer checked the gathered keys against fold 1 of the train split (check_keys) and trained on
    # the rest: an epoch is the other folds' worth of batches.
    assert json.loads((run / "run.json").read_text())["steps_per_epoch"] == folded_digits.selection("train", 1).count // 32
