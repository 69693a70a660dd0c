"""`diffmic shard` on every layout, built from tiny generated images: counts, labels, class order, splits,
bad input, reproducibility, and the safe pickle reader."""

from __future__ import annotations

import csv
import io
import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_fixtures import (
    HAM_CLASSES,
    aptos_layout,
    ham_metadata_layout,
    imagefolder_layout,
    isic_layout,
    label_colour,
    medmnist_npz,
    pkl_layout,
    write_csv,
    write_image,
)
from diffmic.data import ShardError, ShardOptions, read_manifest, shard_dataset
from diffmic.data.safepickle import UnsafePickleError, load_plain_pickle
from diffmic.data.shardio import iter_shard_samples


def shard(tmp_path: Path, dataset: str, root: Path | None, **options):
    options = {"out": tmp_path / "out", "size": 32, "workers": 1, **options}
    return shard_dataset(ShardOptions(dataset=dataset, root=root, **options))


def samples_of(manifest, split: str) -> list[dict]:
    return [sample for path in manifest.shard_paths(split) for sample in iter_shard_samples(path)]


def labels_by_key(manifest) -> dict[str, int]:
    return {sample["__key__"]: int(sample["cls"]) for split in manifest.splits
            for sample in samples_of(manifest, split)}


def check_manifest_consistent(manifest, total: int) -> None:
    assert sum(info.count for info in manifest.splits.values()) == total
    for info in manifest.splits.values():
        assert sum(info.class_counts.values()) == info.count == len(info.keys) == len(set(info.keys))
        assert sum(entry.count for entry in info.shards) == info.count
    all_keys = [key for info in manifest.splits.values() for key in info.keys]
    assert len(all_keys) == len(set(all_keys)), "a sample appears in two splits"


def test_ham10000_metadata_layout_is_grouped_by_lesion(tmp_path):
    truth = ham_metadata_layout(tmp_path / "ham")
    manifest = shard(tmp_path, "ham10000", tmp_path / "ham", shard_size=16)
    assert manifest.classes == HAM_CLASSES and manifest.source == "ham10000" and manifest.image_size == 32
    assert list(manifest.splits) == ["train", "val", "test"]
    check_manifest_consistent(manifest, len(truth))
    assert labels_by_key(manifest) == {key: label for key, (label, _) in truth.items()}
    assert manifest.split["grouped_by_lesion"] is True and manifest.split["test_fraction"] == 0.3
    lesion_split = {}
    for split in manifest.splits:
        for sample in samples_of(manifest, split):
            meta = json.loads(sample["json"])
            assert meta["lesion_id"] == truth[sample["__key__"]][1] and meta["original_size"] == [40, 30]
            assert lesion_split.setdefault(meta["lesion_id"], split) == split, "a lesion on two sides"
    # About 30 % of the lesions of each class are held out for test.
    test_lesions = Counter(truth[key][0] for key in manifest.splits["test"].keys if key in truth)
    assert all(count >= 1 for count in test_lesions.values()) and len(test_lesions) == 7


def test_no_group_gives_the_image_level_split_that_can_split_a_lesion(tmp_path):
    truth = ham_metadata_layout(tmp_path / "ham", lesions_per_class=12)
    manifest = shard(tmp_path, "ham10000", tmp_path / "ham", grouped=False)
    assert manifest.split["grouped_by_lesion"] is False
    sides = {}
    for split, info in manifest.splits.items():
        for key in info.keys:
            sides.setdefault(truth[key][1], set()).add(split)
    assert any(len(where) > 1 for where in sides.values())


def test_isic2018_one_hot_layout(tmp_path):
    truth = isic_layout(tmp_path / "isic")
    manifest = shard(tmp_path, "ham10000", tmp_path / "isic")
    assert manifest.classes == HAM_CLASSES
    check_manifest_consistent(manifest, len(truth))
    assert labels_by_key(manifest) == truth
    assert manifest.split["grouped_by_lesion"] is False
    assert manifest.splits["test"].class_counts == dict.fromkeys(HAM_CLASSES, 2)  # round(8 * 0.3)


def test_aptos2019_layout_keeps_pixels_with_their_label(tmp_path):
    truth = aptos_layout(tmp_path / "aptos")
    manifest = shard(tmp_path, "aptos2019", tmp_path / "aptos", image_format="png")
    assert manifest.classes[0] == "no_dr" and len(manifest.classes) == 5
    check_manifest_consistent(manifest, len(truth))
    assert labels_by_key(manifest) == truth
    for sample in samples_of(manifest, "test"):
        with Image.open(io.BytesIO(sample["png"])) as image:
            assert image.size == (32, 32)
            centre = np.asarray(image.convert("RGB"))[16, 16].astype(int)
        assert np.abs(centre - label_colour(int(sample["cls"]))).max() <= 12


def test_imagefolder_sorted_classes_default_and_given_order(tmp_path):
    imagefolder_layout(tmp_path / "pmg")
    manifest = shard(tmp_path, "imagefolder", tmp_path / "pmg")
    assert manifest.classes == ["grade_a", "grade_b", "grade_c"]
    assert manifest.dataset == "out" and manifest.split["test_fraction"] == 0.2  # named after --out
    check_manifest_consistent(manifest, 30)
    assert manifest.splits["test"].count == 6
    labels = labels_by_key(manifest)
    assert labels["grade_a__img03"] == 0 and labels["grade_b__img03"] == 1
    given = shard(tmp_path, "imagefolder", tmp_path / "pmg", classes=["grade_c", "grade_b", "grade_a"],
                  out=tmp_path / "given")
    assert given.classes == ["grade_c", "grade_b", "grade_a"] and labels_by_key(given)["grade_a__img03"] == 2


def test_pkl_lists_give_the_split_and_resolve_foreign_paths(tmp_path):
    truth = pkl_layout(tmp_path / "lists")
    manifest = shard(tmp_path, "pkl", tmp_path / "lists", classes=["benign", "mid", "malignant"])
    assert manifest.classes == ["benign", "mid", "malignant"]
    check_manifest_consistent(manifest, len(truth))
    assert labels_by_key(manifest) == {key: label for key, (label, _) in truth.items()}
    assert set(manifest.splits["test"].keys) == {key for key, (_, split) in truth.items() if split == "test"}
    assert manifest.splits["val"].count > 0  # carved from the train list
    assert manifest.split["test_fraction"] is None and manifest.split["val_fraction"] == 0.1
    assert set(manifest.splits["train"].keys) | set(manifest.splits["val"].keys) == {
        key for key, (_, split) in truth.items() if split == "train"}


def test_medmnist_npz_keeps_its_splits(tmp_path):
    arrays = medmnist_npz(tmp_path / "m" / "organmnist.npz")
    manifest = shard(tmp_path, "medmnist", tmp_path / "m")
    assert manifest.classes == ["0", "1", "2", "3"]
    assert {name: info.count for name, info in manifest.splits.items()} == {"train": 40, "val": 8, "test": 17}
    assert manifest.split["test_fraction"] is None and manifest.split["given_by"] == ["medmnist"]
    for split in manifest.splits:
        for sample in samples_of(manifest, split):
            index = int(sample["__key__"].split("_")[1])
            assert int(sample["cls"]) == arrays[f"{split}_labels"][index, 0]


def test_digits_default_size_and_fraction(tmp_path):
    manifest = shard_dataset(ShardOptions(dataset="digits", out=tmp_path / "digits", workers=2))
    assert manifest.image_size == 64 and manifest.split["test_fraction"] == 0.3
    assert manifest.splits["test"].count == 539 and sum(i.count for i in manifest.splits.values()) == 1797


def test_default_paths_follow_the_dataset_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    aptos_layout(tmp_path / "data" / "aptos2019")
    options = ShardOptions(dataset="aptos2019", workers=1)
    assert (options.root, options.out, options.size) == (Path("data/aptos2019"), Path("shards/aptos2019"), 224)
    with pytest.raises(ShardError, match="data/ham10000 does not exist"):
        ShardOptions(dataset="ham10000")


def broken_ham(tmp_path: Path) -> Path:
    root = tmp_path / "ham"
    ham_metadata_layout(root)
    (root / "HAM10000_images_part_2" / "ISIC_0000004.jpg").unlink()
    corrupt = root / "HAM10000_images_part_1" / "ISIC_0000007.jpg"
    corrupt.write_bytes(corrupt.read_bytes()[:200])  # truncated JPEG: the header reads, the pixels do not
    return root


def test_bad_inputs_stop_the_run_naming_each_and_write_nothing(tmp_path):
    root = broken_ham(tmp_path)
    with pytest.raises(ShardError) as error:
        shard(tmp_path, "ham10000", root)
    message = str(error.value)
    assert "2 problem(s)" in message and "--skip-bad" in message
    assert "ISIC_0000004.jpg: image file is missing" in message
    assert "ISIC_0000007.jpg: cannot read the image" in message
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_skip_bad_lists_every_rejected_input(tmp_path):
    root = broken_ham(tmp_path)
    manifest = shard(tmp_path, "ham10000", root, skip_bad=True)
    with open(tmp_path / "out" / "rejected.csv") as handle:
        rejected = {row["key"]: row["reason"] for row in csv.DictReader(handle)}
    assert set(rejected) == {"ISIC_0000004", "ISIC_0000007"}
    assert "missing" in rejected["ISIC_0000004"] and "cannot read" in rejected["ISIC_0000007"]
    assert manifest.rejected == 2
    kept = {key for info in manifest.splits.values() for key in info.keys}
    assert len(kept) == 7 * 14 - 2 and not kept & set(rejected)


def test_unknown_label_duplicate_id_and_wrong_columns(tmp_path):
    root = tmp_path / "aptos"
    aptos_layout(root)
    with open(root / "train.csv", "a") as handle:
        handle.write("0000c0ffee,7\n1001c0ffee,1\n")  # a grade that does not exist, an id listed twice
    with pytest.raises(ShardError) as error:
        shard(tmp_path, "aptos2019", root)
    assert "train.csv:42: unknown label diagnosis='7'" in str(error.value)
    assert str(error.value).count("duplicate id 1001c0ffee") == 2
    write_csv(root / "train.csv", ["id", "grade"], [["0000c0ffee", 0]])
    with pytest.raises(ShardError, match=r"train.csv lacks the column\(s\) id_code, diagnosis"):
        shard(tmp_path, "aptos2019", root)
    write_csv(root / "train.csv", ["id_code", "diagnosis"], [])
    with pytest.raises(ShardError, match="train.csv has a header but no rows"):
        shard(tmp_path, "aptos2019", root)


def test_a_val_share_that_rounds_to_nothing_is_said_at_shard_time(tmp_path):
    imagefolder_layout(tmp_path / "pmg", per_class=4)  # 3 training images per class: 10% of 3 rounds to 0
    with pytest.warns(UserWarning, match=r"no val split: --val-fraction 0.1 of 9 training images rounds to none"):
        manifest = shard(tmp_path, "imagefolder", tmp_path / "pmg")
    assert set(manifest.splits) == {"train", "test"}


def test_a_class_without_images_is_refused(tmp_path):
    imagefolder_layout(tmp_path / "pmg")
    with pytest.raises(ShardError, match="class\\(es\\) grade_d have no images"):
        shard(tmp_path, "imagefolder", tmp_path / "pmg", classes=["grade_a", "grade_b", "grade_c", "grade_d"])


def test_same_seed_same_bytes_whatever_the_worker_count(tmp_path):
    truth = isic_layout(tmp_path / "isic")
    one = shard(tmp_path, "ham10000", tmp_path / "isic", out=tmp_path / "one", shard_size=10)
    two = shard(tmp_path, "ham10000", tmp_path / "isic", out=tmp_path / "two", shard_size=10, workers=2)
    other = shard(tmp_path, "ham10000", tmp_path / "isic", out=tmp_path / "other", shard_size=10, seed=1)
    assert one.splits == two.splits  # every shard's sha256 included
    for path in one.folder.glob("*.tar"):
        assert path.read_bytes() == (two.folder / path.name).read_bytes()
    assert one.splits["test"].keys != other.splits["test"].keys
    assert sum(info.count for info in one.splits.values()) == len(truth)


def test_existing_output_needs_overwrite_and_must_be_a_shard_folder(tmp_path):
    imagefolder_layout(tmp_path / "pmg")
    first = shard(tmp_path, "imagefolder", tmp_path / "pmg")
    with pytest.raises(ShardError, match="already exists: pass --overwrite"):
        shard(tmp_path, "imagefolder", tmp_path / "pmg")
    second = shard(tmp_path, "imagefolder", tmp_path / "pmg", overwrite=True, seed=3)
    assert second.digest != first.digest and read_manifest(tmp_path / "out").digest == second.digest
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("years of work")
    with pytest.raises(ShardError, match="not a diffmic shard folder"):
        shard(tmp_path, "imagefolder", tmp_path / "pmg", out=tmp_path / "precious", overwrite=True)
    assert (tmp_path / "precious" / "thesis.tex").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "pmg", "precious"]


def test_split_from_csv_is_obeyed_and_unlisted_images_are_reported(tmp_path):
    truth = aptos_layout(tmp_path / "aptos")
    keys = sorted(truth)
    given = {key: ("test" if index % 4 == 0 else "val" if index % 4 == 1 else "train")
             for index, key in enumerate(keys)}
    split_file = write_csv(tmp_path / "split.csv", ["key", "split"], [[k, s] for k, s in given.items()])
    manifest = shard(tmp_path, "aptos2019", tmp_path / "aptos", split_from=[split_file])
    for name, info in manifest.splits.items():
        assert set(info.keys) == {key for key, split in given.items() if split == name}
    write_csv(split_file, ["key", "split"], [[k, s] for k, s in list(given.items())[1:]] + [["ghost", "test"]])
    with pytest.raises(ShardError) as error:
        shard(tmp_path, "aptos2019", tmp_path / "aptos", split_from=[split_file], out=tmp_path / "b")
    assert f"{keys[0]}.png: not listed in {split_file}" in str(error.value)
    assert "lists ghost, which the source does not have" in str(error.value)


class Payload:
    """Unpickling this would create the marker file: the side effect a malicious pickle would have."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path):
    root = tmp_path / "lists"
    pkl_layout(root)
    marker = tmp_path / "marker.txt"
    evil = pickle.dumps([{"img_root": "images/case_0_0.jpg", "label": 0}, Payload(marker)])
    pickle.loads(evil)  # proves the payload works when unpickled naively ...
    assert marker.read_text() == "pwned"
    marker.unlink()
    (root / "mydata_train.pkl").write_bytes(evil)
    with pytest.raises(ShardError, match="refusing .*mydata_train.pkl: it refers to builtins.exec"):
        shard(tmp_path, "pkl", root)
    imagefolder_layout(tmp_path / "pmg")
    with pytest.raises(ShardError, match="refusing"):
        shard(tmp_path, "imagefolder", tmp_path / "pmg", split_from=[root / "mydata_train.pkl"])
    assert not marker.exists()  # ... and that diffmic never ran it


@pytest.mark.parametrize("value, accepted", [
    ([{"img_root": "a.png", "label": 3}], True),
    ({"a": [1, "b", {"c": 2}]}, True),
    ([1.5], False), ((1, 2), False), ([None], False), ([b"raw"], False), ({1, 2}, False),
    (np.int64(3), False), (print, False),
])
def test_only_plain_lists_dicts_strings_and_integers_load(tmp_path, value, accepted):
    path = tmp_path / "value.pkl"
    path.write_bytes(pickle.dumps(value))
    if accepted:
        assert load_plain_pickle(path) == value
    else:
        with pytest.raises(UnsafePickleError, match="refusing"):
            load_plain_pickle(path)


def test_interrupted_run_leaves_no_finished_looking_output(tmp_path, monkeypatch):
    imagefolder_layout(tmp_path / "pmg")
    import diffmic.data.sharding as sharding

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sharding, "write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        shard(tmp_path, "imagefolder", tmp_path / "pmg")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pmg"]


def test_sixteen_bit_and_palette_images_become_rgb(tmp_path):
    root = tmp_path / "mixed"
    write_image(root / "a" / "rgb.png", 0)
    Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)).save(root / "a" / "deep.png")
    write_image(root / "b" / "other.png", 1)
    Image.new("P", (40, 30), 3).save(root / "b" / "palette.png")
    manifest = shard(tmp_path, "imagefolder", root, test_fraction=0.5, val_fraction=0.0)
    assert list(manifest.splits) == ["train", "test"]
    samples = {s["__key__"]: s for split in manifest.splits for s in samples_of(manifest, split)}
    with Image.open(io.BytesIO(samples["a__deep"]["jpg"])) as image:
        # 40000 of 65535 is about 156 of 255; a plain conversion would clip it to 255
        assert image.mode == "RGB" and abs(int(np.asarray(image)[5, 5, 0]) - round(40000 / 257)) <= 2
    assert set(samples) == {"a__rgb", "a__deep", "b__other", "b__palette"}


def test_authors_pkl_lists_split_the_isic_layout(tmp_path):
    truth = isic_layout(tmp_path / "isic")
    keys = sorted(truth)
    lists = {"train": [], "test": []}
    for index, key in enumerate(keys):
        # paths from the authors' machine: found again by file name
        lists["test" if index % 3 == 0 else "train"].append(
            {"img_root": f"/data/isic/ISIC2018_Task3_Training_Input/{key}.jpg", "label": truth[key]})
    for split, entries in lists.items():
        (tmp_path / f"isic2018_{split}.pkl").write_bytes(pickle.dumps(entries))
    manifest = shard(tmp_path, "ham10000", tmp_path / "isic",
                     split_from=[tmp_path / "isic2018_train.pkl", tmp_path / "isic2018_test.pkl"])
    assert manifest.split["given_by"] == [str(tmp_path / "isic2018_train.pkl"), str(tmp_path / "isic2018_test.pkl")]
    assert set(manifest.splits["test"].keys) == {key for key in keys[::3]}
    assert manifest.splits["val"].count > 0 and labels_by_key(manifest) == truth


def test_a_new_layout_is_one_reader_and_one_entry(tmp_path, monkeypatch):
    """A reader that takes only the root, registered with its defaults: ShardOptions and shard_dataset
    need nothing else."""
    from diffmic.data.layouts import LAYOUTS, Layout
    from diffmic.data.sources import RecordBuilder

    def read_colours(root: Path):
        builder = RecordBuilder(root)
        for path in sorted(root.glob("*.png")):
            builder.add_file(path, path.stem, ["red", "green"].index(path.stem.split("_")[0]))
        return builder.result(["red", "green"])

    for index in range(20):
        write_image(tmp_path / "data" / "colours" / f"{['red', 'green'][index % 2]}_{index}.png", index % 2)
    monkeypatch.setitem(LAYOUTS, "colours", Layout("colours", read_colours, "red_N.png and green_N.png files",
                                                   test_fraction=0.4, classes=("red", "green"),
                                                   root="data/colours", size=40))
    monkeypatch.chdir(tmp_path)
    options = ShardOptions(dataset="colours", workers=1)
    assert (options.root, options.size, options.test_fraction) == (Path("data/colours"), 40, 0.4)
    with pytest.raises(ShardError, match="--classes does not apply to colours"):
        ShardOptions(dataset="colours", classes=["red", "green"])
    manifest = shard_dataset(options)
    assert manifest.classes == ["red", "green"] and manifest.image_size == 40 and manifest.source == "colours"
    assert {name: info.count for name, info in manifest.splits.items()} == {"train": 10, "val": 2, "test": 8}


def test_digits_take_no_root():
    with pytest.raises(ShardError, match="--root does not apply to digits"):
        ShardOptions(dataset="digits", root=Path("data/digits"))
