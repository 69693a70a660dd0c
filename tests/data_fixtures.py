"""Tiny generated versions of each dataset layout `diffmic shard` reads (imported by tests/test_data_*.py).

Every image is a few dozen pixels with a colour that encodes its label, so tests can also check that
the pixels travelled with the right label.
"""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

HAM_DX = ["mel", "nv", "bcc", "akiec", "bkl", "df", "vasc"]
HAM_CLASSES = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]


def label_colour(label: int) -> tuple[int, int, int]:
    return (40 * label % 256, 255 - 30 * label % 256, 90)


def write_image(path: Path, label: int, size=(40, 30), seed: int = 0) -> Path:
    """A small picture: the label's colour plus a little seeded noise (so files differ)."""
    rng = np.random.default_rng(seed)
    pixels = np.empty((size[1], size[0], 3), dtype=np.uint8)
    pixels[:] = label_colour(label)
    pixels = np.clip(pixels.astype(int) + rng.integers(-10, 11, pixels.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def ham_metadata_layout(root: Path, lesions_per_class: int = 8) -> dict[str, tuple[int, str]]:
    """HAM10000_metadata.csv + images in two part folders; every third lesion has three images.
    Returns image_id -> (label, lesion_id)."""
    truth, rows = {}, []
    number = 0
    for label, dx in enumerate(HAM_DX):
        for lesion in range(lesions_per_class):
            lesion_id = f"HAM_{label:02d}{lesion:04d}"
            for _ in range(3 if lesion % 3 == 0 else 1):
                image_id = f"ISIC_{number:07d}"
                part = "HAM10000_images_part_1" if number % 2 else "HAM10000_images_part_2"
                write_image(root / part / f"{image_id}.jpg", label, seed=number)
                rows.append([lesion_id, image_id, dx, "histo", 50, "male", "back"])
                truth[image_id] = (label, lesion_id)
                number += 1
    write_csv(root / "HAM10000_metadata.csv",
              ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"], rows)
    return truth


def isic_layout(root: Path, per_class: int = 8) -> dict[str, int]:
    """ISIC2018_Task3_Training_GroundTruth.csv (one-hot floats) + ISIC2018_Task3_Training_Input/."""
    truth, rows = {}, []
    for label in range(len(HAM_CLASSES)):
        for index in range(per_class):
            image_id = f"ISIC_{label * 100 + index:07d}"
            write_image(root / "ISIC2018_Task3_Training_Input" / f"{image_id}.jpg", label, seed=label * 100 + index)
            rows.append([image_id, *("1.0" if column == label else "0.0" for column in range(7))])
            truth[image_id] = label
    (root / "ISIC2018_Task3_Training_Input" / "LICENSE.txt").write_text("not an image\n")
    write_csv(root / "ISIC2018_Task3_Training_GroundTruth.csv", ["image", *HAM_CLASSES], rows)
    return truth


def aptos_layout(root: Path, per_class: int = 8) -> dict[str, int]:
    truth, rows = {}, []
    for grade in range(5):
        for index in range(per_class):
            id_code = f"{grade:x}{index:03x}c0ffee"
            write_image(root / "train_images" / f"{id_code}.png", grade, size=(48, 36), seed=grade * 10 + index)
            rows.append([id_code, grade])
            truth[id_code] = grade
    write_csv(root / "train.csv", ["id_code", "diagnosis"], rows)
    return truth


def imagefolder_layout(root: Path, classes=("grade_b", "grade_a", "grade_c"), per_class: int = 10) -> None:
    """Folder per class; names deliberately unsorted so the default order is visible."""
    for label, name in enumerate(classes):
        for index in range(per_class):
            write_image(root / name / f"img{index:02d}.png", label, seed=label * 50 + index)


def pkl_layout(root: Path, per_class: int = 9, classes: int = 3) -> dict[str, tuple[int, str]]:
    """The authors' lists: train.pkl / test.pkl of {'img_root', 'label'} with paths from another
    machine (found again by file name) and some relative to the root. Returns key -> (label, split)."""
    lists: dict[str, list] = {"train": [], "test": []}
    truth = {}
    for label in range(classes):
        for index in range(per_class):
            split = "test" if index % 3 == 0 else "train"
            name = f"case_{label}_{index}.jpg"
            write_image(root / "images" / name, label, seed=label * 20 + index)
            img_root = f"/home/author/dataset/{name}" if index % 2 else f"images/{name}"
            lists[split].append({"img_root": img_root, "label": label})
            truth[Path(name).stem] = (label, split)
    for split, entries in lists.items():
        (root / f"mydata_{split}.pkl").write_bytes(pickle.dumps(entries))
    return truth


def medmnist_npz(path: Path, counts=(40, 8, 17), classes: int = 4, side: int = 28) -> dict[str, np.ndarray]:
    """A MedMNIST-style npz: grey images whose brightness encodes the label, labels shaped (N, 1)."""
    arrays = {}
    for split, count in zip(("train", "val", "test"), counts):
        labels = np.arange(count) % classes
        images = np.stack([np.full((side, side), 30 + 50 * label, dtype=np.uint8) for label in labels])
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels.reshape(-1, 1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return arrays
