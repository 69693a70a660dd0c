"""scikit-learn's digits as RGB images: real pictures that ship offline, for demos and learning tests."""

from __future__ import annotations

import numpy as np

from .layouts import Layout, register
from .sources import Record, SourceData

DIGIT_CLASSES = [str(d) for d in range(10)]


def digits_images(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as uint8 RGB (N, size, size, 3), upscaled from 8x8 with bilinear filtering,
    and their labels (N,)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = (digits.images / 16.0 * 255).round().astype(np.uint8)
    images = np.stack([
        np.asarray(Image.fromarray(img, mode="L").resize((size, size), Image.BILINEAR).convert("RGB"))
        for img in gray
    ])
    return images, digits.target.astype(np.int64)


def read_digits(size: int) -> SourceData:
    """scikit-learn's 1797 digits, upscaled to `size`: the offline demo dataset."""
    images, labels = digits_images(size)
    records = [Record(key=f"digit_{index:04d}", label=int(label), source=f"sklearn digits #{index}",
                      pixels=image) for index, (image, label) in enumerate(zip(images, labels))]
    return SourceData(classes=DIGIT_CLASSES, records=records, origin="sklearn.datasets.load_digits")


DIGITS = register(Layout(
    "digits", read_digits, "scikit-learn's 1797 handwritten digits, shipped with scikit-learn: the offline demo",
    test_fraction=0.3, classes=tuple(DIGIT_CLASSES), root=None, size=64))
