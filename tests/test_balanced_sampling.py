"""data.balanced_sampling: on an imbalanced train split the stream draws every class at the same rate, an
epoch keeps its number of batches, the stream stays deterministic and resumable, and false leaves it
exactly as it was."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from diffmic.config import ConfigError, DataConfig, load_config
from diffmic.data import ShardOptions, read_manifest, shard_dataset, steps_per_epoch, train_loader
from diffmic.data.loaders import SAMPLE_STREAM, _generator, class_weights
from diffmic.data.shardio import read_shard

TRAIN_COUNTS = (60, 24, 10, 6)  # 100 training images; the rarest class is 6 %


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """MedMNIST-style shards of 5 samples each, train split imbalanced as TRAIN_COUNTS (in a seeded order)."""
    folder = tmp_path_factory.mktemp("balanced")
    arrays = {}
    for split, counts in (("train", TRAIN_COUNTS), ("val", (2, 2, 2, 2)), ("test", (2, 2, 2, 2))):
        labels = np.random.default_rng(1).permutation(np.repeat(np.arange(len(counts)), counts))
        arrays[f"{split}_images"] = np.stack([np.full((28, 28), 30 + 50 * label, dtype=np.uint8) for label in labels])
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    (folder / "src").mkdir()
    np.savez_compressed(folder / "src" / "tiny.npz", **arrays)
    shard_dataset(ShardOptions(dataset="medmnist", root=folder / "src", out=folder / "shards", size=32,
                               shard_size=5, workers=1))
    return folder / "shards"


def config(**overrides) -> DataConfig:
    values = {"dataset": "tiny", "num_classes": 4, "image_size": 32, "num_workers": 0, "shuffle_buffer": 16}
    return DataConfig(**{**values, **overrides})


def drawn_labels(shards, data: DataConfig, epochs: int, **kwargs) -> list[int]:
    return [int(label) for epoch in range(epochs)
            for batch in train_loader(shards, data, batch_size=4, seed=5, epoch=epoch, **kwargs)
            for label in batch["label"]]


def test_the_weights_equalise_the_classes_and_average_one_per_sample():
    weights = class_weights([60, 24, 10, 6])
    assert np.allclose([count * weight for count, weight in zip((60, 24, 10, 6), weights)], 25.0)
    assert sum(count * weight for count, weight in zip((60, 24, 10, 6), weights)) == pytest.approx(100)
    assert class_weights([30, 0, 10]) == (20 / 30, 0.0, 2.0)  # an absent class is not counted as a class


def test_the_manifest_holds_the_imbalance(shards):
    assert list(read_manifest(shards).splits["train"].class_counts.values()) == list(TRAIN_COUNTS)


def test_balanced_sampling_draws_every_class_at_the_same_rate(shards):
    """Over 20 epochs (2,000 draws) each class's share is 1/4 within 0.05; without balancing the shares are
    the natural ones. The stream is a function of its seed, so this is not flaky; over seeds 0-29 the largest
    deviation was 0.044 (a rare image's copies come in groups, so it is above the binomial 0.01)."""
    epochs = 20
    balanced = Counter(drawn_labels(shards, config(balanced_sampling=True), epochs))
    natural = Counter(drawn_labels(shards, config(), epochs))
    draws = epochs * steps_per_epoch(read_manifest(shards), 4, 1) * 4
    assert sum(balanced.values()) == sum(natural.values()) == draws == 2000
    for label in range(4):
        assert abs(balanced[label] / draws - 0.25) < 0.05, balanced
        assert abs(natural[label] / draws - TRAIN_COUNTS[label] / 100) < 0.05, natural
    assert balanced[3] / draws > 3 * TRAIN_COUNTS[3] / 100  # the rarest class, 6 % naturally


def test_an_epoch_keeps_its_length(shards):
    for world_size in (1, 3):
        plain = train_loader(shards, config(), batch_size=4, seed=0, epoch=0, world_size=world_size)
        balanced = train_loader(shards, config(balanced_sampling=True), batch_size=4, seed=0, epoch=0,
                                world_size=world_size)
        batches = list(balanced)
        assert len(plain) == len(balanced) == len(batches) == 100 // (4 * world_size)
        assert {len(batch["key"]) for batch in batches} == {4}


def test_balanced_stream_is_deterministic_resumes_and_differs_by_rank(shards):
    data = config(balanced_sampling=True, num_workers=2)
    full = list(train_loader(shards, data, batch_size=4, seed=7, epoch=1, rank=1, world_size=2))
    again = list(train_loader(shards, data, batch_size=4, seed=7, epoch=1, rank=1, world_size=2))
    resumed = list(train_loader(shards, data, batch_size=4, seed=7, epoch=1, rank=1, world_size=2, start_batch=5))
    other_rank = list(train_loader(shards, data, batch_size=4, seed=7, epoch=1, rank=0, world_size=2))
    assert len(full) == len(other_rank) == 100 // 8
    assert [b["key"] for b in full] == [b["key"] for b in again]
    assert [b["key"] for b in full[5:]] == [b["key"] for b in resumed]
    assert [b["key"] for b in full] != [b["key"] for b in other_rank]


def reference_keys(shards, data: DataConfig, batch_size: int, seed: int, epoch: int) -> list[str]:
    """The train stream as written before data.balanced_sampling existed (one rank, in the main process):
    shards drawn with replacement by count, one seeded generator for the draws and the shuffle buffer."""
    manifest = read_manifest(shards)
    entries = manifest.splits["train"].shards
    rng = _generator(seed, epoch, 0, 0, SAMPLE_STREAM)
    weights = np.asarray([entry.count for entry in entries], dtype=np.float64) / manifest.splits["train"].count
    wanted = steps_per_epoch(manifest, batch_size, 1) * batch_size
    buffer, keys = [], []
    while len(keys) < wanted:
        for sample in read_shard(manifest.shard_file(entries[rng.choice(len(entries), p=weights)])):
            if len(buffer) < data.shuffle_buffer:
                buffer.append(sample)
                continue
            position = int(rng.integers(len(buffer)))
            keys.append(buffer[position]["__key__"])
            buffer[position] = sample
    return keys[:wanted]


def test_false_leaves_the_stream_exactly_as_before(shards):
    assert DataConfig().balanced_sampling is False
    for seed, epoch in ((0, 0), (3, 2)):
        plain = [key for batch in train_loader(shards, config(), batch_size=4, seed=seed, epoch=epoch)
                 for key in batch["key"]]
        assert plain == reference_keys(shards, config(), 4, seed, epoch)


def test_the_key_is_validated():
    assert load_config(overrides=["data.balanced_sampling=true"]).data.balanced_sampling is True
    with pytest.raises(ConfigError, match="data.balanced_sampling"):
        load_config(overrides=["data.balanced_sampling=3"])
