"""The train and eval streams: exactly-once evaluation across ranks and workers, a deterministic train
stream that resumes mid-epoch, equal batch counts on every rank, and clear manifest errors."""

from __future__ import annotations

import io
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_fixtures import medmnist_npz
from diffmic.config import AugmentConfig, DataConfig
from diffmic.data import (
    ManifestError,
    ShardOptions,
    eval_loader,
    eval_transform,
    preprocess_image,
    read_manifest,
    shard_dataset,
    steps_per_epoch,
    train_loader,
    verify_shards,
)
from diffmic.data.manifest import CorruptShardError
from diffmic.data.shardio import SplitShardWriter, iter_shard_samples

CLASSES = 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """MedMNIST-style shards of 3 samples each: train 40 (14 shards, the last one short), test 17 (6)."""
    folder = tmp_path_factory.mktemp("streams")
    medmnist_npz(folder / "src" / "tiny.npz", counts=(40, 8, 17), classes=CLASSES)
    shard_dataset(ShardOptions(dataset="medmnist", root=folder / "src", out=folder / "shards", size=32,
                               shard_size=3, workers=1))
    return folder / "shards"


def data_config(**overrides) -> DataConfig:
    values = {"dataset": "tiny", "num_classes": CLASSES, "image_size": 32, "num_workers": 2, "shuffle_buffer": 8,
              "augment": AugmentConfig(hflip=True, vflip=True, rotation=30.0)}
    return DataConfig(**{**values, **overrides})


def keys_of(batches) -> list[str]:
    return [key for batch in batches for key in batch["key"]]


def test_eval_stream_yields_every_key_once_over_two_ranks_and_two_workers(shards):
    manifest = read_manifest(shards)
    assert [entry.count for entry in manifest.splits["test"].shards] == [3, 3, 3, 3, 3, 2]
    per_rank = []
    for rank in range(2):
        loader = eval_loader(shards, "test", data_config(), batch_size=2, rank=rank, world_size=2, num_workers=2)
        batches = list(loader)
        assert loader.num_workers == 2 and len(batches) == len(loader)
        for batch in batches:
            assert batch["image"].shape[1:] == (3, 32, 32) and batch["image"].dtype == torch.float32
            assert batch["label"].dtype == torch.int64 and len(batch["key"]) == len(batch["label"]) <= 2
        per_rank.append(keys_of(batches))
    everything = per_rank[0] + per_rank[1]
    assert sorted(everything) == sorted(manifest.splits["test"].keys) and len(set(everything)) == 17
    assert not set(per_rank[0]) & set(per_rank[1])


def test_eval_labels_and_pixels_match_the_source(shards):
    source = np.load(shards.parent / "src" / "tiny.npz")
    for batch in eval_loader(shards, "val", data_config(), batch_size=5, num_workers=0):
        for key, label, image in zip(batch["key"], batch["label"], batch["image"]):
            index = int(key.split("_")[1])
            assert label == source["val_labels"][index, 0]
            # undo the normalisation: the grey level encodes the label
            grey = (image[0] * 0.229 + 0.485) * 255
            assert abs(float(grey.mean()) - (30 + 50 * int(label))) < 2


def test_a_rank_without_shards_yields_nothing_and_warns(shards):
    seen = []
    for rank in range(8):  # 8 ranks, 6 test shards: ranks 6 and 7 get none
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loader = eval_loader(shards, "test", data_config(), batch_size=4, rank=rank, world_size=8, num_workers=2)
        batches = list(loader)
        if rank >= 6:
            assert batches == [] and len(loader) == 0
            assert any("has 0 of the test split's 6 shards" in str(w.message) for w in caught)
        else:
            assert loader.num_workers == 1 and any("using 1" in str(w.message) for w in caught)
        seen += keys_of(batches)
    assert sorted(seen) == sorted(read_manifest(shards).splits["test"].keys)


def test_more_workers_than_cpus_are_capped_and_said_once(shards, monkeypatch):
    import diffmic.data.loaders as loaders

    monkeypatch.setattr(loaders, "_told_about_cap", False, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # a 2-core machine
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(2):
            training = train_loader(shards, data_config(num_workers=8), batch_size=4, seed=0, epoch=epoch)
            assert len(list(training)) == 10
        evaluation = eval_loader(shards, "test", data_config(num_workers=8), batch_size=2)
        assert len(keys_of(evaluation)) == 17
    messages = [str(warning.message) for warning in caught]
    assert training.num_workers == evaluation.num_workers == 2
    assert sum("data.num_workers=8 but this process may use 2 CPU(s)" in message for message in messages) == 1
    assert not any("worker processes in total" in message for message in messages), messages


def test_train_epoch_is_deterministic_and_resumes_exactly(shards):
    config = data_config()
    full = list(train_loader(shards, config, batch_size=4, seed=7, epoch=2, rank=1, world_size=2))
    again = list(train_loader(shards, config, batch_size=4, seed=7, epoch=2, rank=1, world_size=2))
    assert len(full) == steps_per_epoch(read_manifest(shards), 4, 2) == 40 // 8
    for start in (3, 4):  # resuming on either worker's turn
        resumed = list(train_loader(shards, config, batch_size=4, seed=7, epoch=2, rank=1, world_size=2,
                                    start_batch=start))
        assert len(resumed) == len(full) - start
        for expected, got in zip(full[start:], resumed):
            assert got["key"] == expected["key"]
            assert torch.equal(got["image"], expected["image"]) and torch.equal(got["label"], expected["label"])
    for expected, got in zip(full, again):
        assert got["key"] == expected["key"] and torch.equal(got["image"], expected["image"])


def test_train_stream_in_the_main_process_resumes_too(shards):
    config = data_config(num_workers=0)
    full = list(train_loader(shards, config, batch_size=3, seed=1, epoch=0))
    resumed = list(train_loader(shards, config, batch_size=3, seed=1, epoch=0, start_batch=5))
    assert len(full) == 13 and [b["key"] for b in resumed] == [b["key"] for b in full[5:]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(full[5:], resumed))


def test_skipped_batches_are_not_decoded(shards, monkeypatch):
    import diffmic.data.loaders as loaders

    decoded = []
    real = loaders.decode_image
    monkeypatch.setattr(loaders, "decode_image", lambda data: decoded.append(1) or real(data))
    batches = list(train_loader(shards, data_config(num_workers=0), batch_size=4, seed=0, epoch=0, start_batch=8))
    assert len(batches) == 2 and len(decoded) == 2 * 4


def test_every_rank_runs_the_same_number_of_full_batches_in_its_own_order(shards):
    config = data_config()
    ranks = [list(train_loader(shards, config, batch_size=4, seed=3, epoch=0, rank=rank, world_size=3))
             for rank in range(3)]
    assert [len(batches) for batches in ranks] == [40 // 12] * 3
    assert all(len(batch["key"]) == 4 and batch["image"].shape == (4, 3, 32, 32) for b in ranks for batch in b)
    assert len({tuple(keys_of(batches)) for batches in ranks}) == 3
    next_epoch = list(train_loader(shards, config, batch_size=4, seed=3, epoch=1, rank=0, world_size=3))
    assert keys_of(next_epoch) != keys_of(ranks[0])
    assert set(keys_of(ranks[0])) <= set(read_manifest(shards).splits["train"].keys)


def test_augmentation_follows_the_config(shards):
    def first_batch(augment):
        config = data_config(num_workers=0, augment=augment)
        return next(iter(train_loader(shards, config, batch_size=8, seed=0, epoch=0)))

    plain = first_batch(AugmentConfig(hflip=False, vflip=False, rotation=0.0))
    turned = first_batch(AugmentConfig(hflip=False, vflip=False, rotation=30.0))
    assert plain["key"] == turned["key"]
    # uniform grey images: only rotation changes them, by filling the corners with black
    assert not torch.equal(plain["image"], turned["image"])
    corner = turned["image"][:, :, 0, 0]
    assert (corner < plain["image"][:, :, 0, 0] - 0.5).any()


def test_eval_transform_matches_the_eval_stream(shards):
    manifest = read_manifest(shards)
    sample = next(iter_shard_samples(manifest.shard_paths("test")[0]))
    with Image.open(io.BytesIO(sample["jpg"])) as image:
        from_transform = eval_transform(data_config())(image)
    batch = next(iter(eval_loader(shards, "test", data_config(), batch_size=1, num_workers=0)))
    assert batch["key"][0] == sample["__key__"] and torch.equal(batch["image"][0], from_transform)


def test_preprocess_crops_the_centre_square_and_is_idempotent():
    pixels = np.zeros((40, 100, 3), dtype=np.uint8)
    pixels[:, 30:70] = 200  # the central 40 columns are bright, the sides dark
    once = preprocess_image(Image.fromarray(pixels), 40)
    assert once.size == (40, 40) and np.asarray(once).min() == 200
    assert np.array_equal(np.asarray(preprocess_image(once, 40)), np.asarray(once))
    grey = preprocess_image(Image.fromarray(pixels[:, :, 0], mode="L"), 20)
    assert grey.mode == "RGB" and grey.size == (20, 20)


def test_webdataset_reads_the_shards(shards):
    import webdataset

    manifest = read_manifest(shards)
    urls = [str(path) for path in manifest.shard_paths("test")]
    samples = list(webdataset.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [sample["__key__"] for sample in samples] == manifest.splits["test"].keys
    assert all(json.loads(sample["json"])["class"] == manifest.classes[int(sample["cls"])] for sample in samples)


def test_manifest_errors_name_the_file_and_the_fix(shards, tmp_path):
    with pytest.raises(ManifestError, match="does not exist: run `diffmic shard"):
        read_manifest(tmp_path / "nowhere")
    with pytest.raises(ManifestError, match="manifest.json is missing.*diffmic shard"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": 1, "classes": ')
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path)
    values = json.loads((shards / "manifest.json").read_text())
    values["splits"]["test"]["count"] += 1
    (tmp_path / "manifest.json").write_text(json.dumps(values))
    with pytest.raises(ManifestError, match="damaged .*split 'test': shard counts add up to 17, not its count 18"):
        read_manifest(tmp_path)
    with pytest.raises(ManifestError, match="no 'holdout' split; available: train, val, test"):
        eval_loader(shards, "holdout", data_config(), batch_size=4)
    with pytest.raises(ManifestError, match="hold 32px images but data.image_size is 64"):
        train_loader(shards, data_config(image_size=64), batch_size=4, seed=0, epoch=0)
    with pytest.raises(ManifestError, match="4 classes but data.num_classes is 7"):
        eval_loader(shards, "test", data_config(num_classes=7), batch_size=4)


def test_manifest_records_what_the_evaluator_checks(shards):
    manifest = read_manifest(shards)
    assert len(manifest.digest) == 64 and manifest.path == shards / "manifest.json"
    assert manifest.dataset == "shards" and manifest.classes == ["0", "1", "2", "3"]
    test = manifest.splits["test"]
    assert test.count == 17 and len(test.keys) == 17 and test.class_counts == {"0": 5, "1": 4, "2": 4, "3": 4}
    assert {"file", "count", "sha256", "bytes"} <= set(vars(test.shards[0]))


def test_verify_finds_a_damaged_tar_header_and_readers_refuse_it(shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    assert verify_shards(copy) == []
    shard = copy / "val-000000.tar"
    data = bytearray(shard.read_bytes())
    data[3] ^= 0x20  # inside the first member's name
    shard.write_bytes(bytes(data))
    problems = verify_shards(copy)
    assert any("val-000000.tar: sha256 differs" in problem for problem in problems)
    assert any("val-000000.tar: unreadable after 0 samples" in problem and "checksum" in problem
               for problem in problems)
    with pytest.raises(ValueError, match="val-000000.tar: a tar header fails its checksum"):
        list(iter_shard_samples(shard))


def flip_one_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def assert_one_line_naming(error, shard, folder) -> None:
    message = str(error.value)
    assert "\n" not in message and shard.name in message and f"diffmic verify {folder}" in message, message


def test_a_changed_or_cut_shard_stops_both_streams_before_it_is_read(shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    changed, cut = copy / "train-000004.tar", copy / "test-000002.tar"
    flip_one_byte(changed)
    with pytest.raises(CorruptShardError, match="train-000004.tar: sha256 differs from the manifest") as error:
        train_loader(copy, data_config(num_workers=0), batch_size=4, seed=0, epoch=0)
    assert_one_line_naming(error, changed, copy)
    cut.write_bytes(cut.read_bytes()[:1536])
    # Rank 1 reads other shards than test-000002, and refuses all the same: no rank is left waiting.
    for rank in (0, 1):
        with pytest.raises(CorruptShardError, match=r"test-000002.tar: 1536 bytes, the manifest says") as error:
            eval_loader(copy, "test", data_config(), batch_size=2, rank=rank, world_size=2)
        assert_one_line_naming(error, cut, copy)


@pytest.mark.parametrize("stream", ["train", "eval"])
def test_a_shard_damaged_while_a_worker_reads_it_is_one_line_too(shards, tmp_path, stream):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    if stream == "train":
        loader = train_loader(copy, data_config(num_workers=2), batch_size=4, seed=0, epoch=0)
    else:
        loader = eval_loader(copy, "test", data_config(), batch_size=2, num_workers=2)
    assert loader.num_workers == 2
    for path in copy.glob(f"{'train' if stream == 'train' else 'test'}-*.tar"):  # cut after the check
        path.write_bytes(path.read_bytes()[:2048])
    with pytest.raises(CorruptShardError, match=r"-0000\d\d\.tar: the file ends (inside|before)") as error:
        list(loader)
    message = str(error.value)
    assert "\n" not in message and f"diffmic verify {copy}" in message and "Traceback" not in message


def test_long_keys_survive_the_round_trip(tmp_path):
    import webdataset

    key = "very_deep_folder__" * 12 + "image"
    writer = SplitShardWriter(tmp_path, "test", shard_size=10)
    writer.add(key, {"cls": b"1", "jpg": b"\xff\xd8 not really a jpeg"})
    writer.add("short", {"cls": b"0", "jpg": b"x"})
    (entry,) = writer.finish()
    assert len(key) > 100 and entry.count == 2
    ours = list(iter_shard_samples(tmp_path / entry.file))
    theirs = list(webdataset.WebDataset([str(tmp_path / entry.file)], shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in ours] == [s["__key__"] for s in theirs] == [key, "short"]
    assert ours[0]["jpg"] == theirs[0]["jpg"] == b"\xff\xd8 not really a jpeg"


def test_the_train_stream_fetches_ahead_exactly_the_shards_it_draws_next_and_none_it_will_not_read(shards, monkeypatch):
    """In a loader worker the stream fetches remote shards while it reads the current one: the next one, and all
    that start while its shuffle buffer fills (8 samples here), since it reads those back to back; none that the
    epoch ends before reading. It knows which by drawing on a copy of its generator. Recorded here on local shards,
    through the buffer's filling and after it, to the end of the epoch."""
    from diffmic.data import loaders
    from diffmic.data.shardio import ShardReader, read_shard

    guessed, drawn = [], []

    class Recording(ShardReader):
        def fetches_ahead(self, shard):
            return True

        def prefetch(self, upcoming):
            guessed.append([shard.location for shard in upcoming])

        def read(self, shard):
            drawn.append(shard.location)
            return read_shard(shard, self.fetching)

    monkeypatch.setattr(loaders, "ShardReader", Recording)
    monkeypatch.setattr(loaders, "get_worker_info", lambda: object())  # as inside a loader worker
    keys = keys_of(train_loader(shards, data_config(num_workers=0), batch_size=4, seed=3, epoch=1))
    counts = {str(Path(shards) / entry.file): entry.count for entry in read_manifest(shards).splits["train"].shards}
    starts = [sum(counts[location] for location in drawn[:read]) for read in range(len(drawn))]
    assert len(drawn) > 10 and len(guessed) == len(drawn) and starts[2] < 8 <= starts[-1]
    for read, upcoming in enumerate(guessed):
        end = read + 2  # the next shard, then those that start before the buffer is full
        while end < len(drawn) and starts[end] < 8:
            end += 1
        assert upcoming == drawn[read + 1:end]  # fewer only where the epoch's reading ends
    assert keys == keys_of(train_loader(shards, data_config(num_workers=0), batch_size=4, seed=3, epoch=1))
