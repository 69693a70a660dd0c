"""Pixel work shared by `diffmic shard`, the loaders and `diffmic predict`: one definition of the
preprocessing, so a loose file is treated exactly like a sharded one.

Torch-free on purpose: the sharding worker processes import this module and nothing heavier.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
RESIZE_FILTER = Image.Resampling.BICUBIC
ROTATE_FILTER = Image.Resampling.BILINEAR
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB without clipping 16-bit greyscale (common in medical imaging): PIL's own conversion
    would saturate every value above 255, so those are scaled down first."""
    if image.mode in SIXTEEN_BIT_MODES:
        scaled = np.clip(np.asarray(image, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8)
        image = Image.fromarray(scaled, mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).round().astype(np.uint8), mode="L")
    return image if image.mode == "RGB" else image.convert("RGB")


def centre_square(image: Image.Image) -> Image.Image:
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def preprocess_image(image: Image.Image, size: int) -> Image.Image:
    """The sharding preprocessing: camera orientation applied, RGB, centre square crop, bicubic
    resize to size x size. Idempotent on its own output, so applying it to a shard image is safe."""
    image = to_rgb(ImageOps.exif_transpose(image))
    image = centre_square(image)
    return image if image.size == (size, size) else image.resize((size, size), RESIZE_FILTER)


def encode_image(image: Image.Image, image_format: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if image_format == "jpg":
        # 4:4:4 chroma: colour detail matters in dermoscopy and fundus images.
        image.save(buffer, format="JPEG", quality=quality, subsampling=0)
    elif image_format == "png":
        image.save(buffer, format="PNG")
    else:
        raise ValueError(f"unknown image format {image_format!r}; expected 'jpg' or 'png'")
    return buffer.getvalue()


def decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decode before the buffer closes; PIL opens lazily
        return to_rgb(image)


def augment_image(image: Image.Image, hflip: bool, vflip: bool, angle: float) -> Image.Image:
    """One draw of the training augmentation; the caller draws the parameters from its own
    generator so that the whole stream is reproducible."""
    if hflip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if vflip:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if angle:
        image = image.rotate(angle, resample=ROTATE_FILTER, fillcolor=(0, 0, 0))
    return image
