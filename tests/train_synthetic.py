"""A tiny long-tailed image dataset for the training tests (not collected by pytest: no test_ prefix).

Four classes, each a distinct colour with pixel noise, so a small network separates them in a few steps.
The first image of every class is stored in grayscale ("L") to exercise the RGB conversion.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
from PIL import Image

CLASS_NAMES = ["red", "green", "blue", "yellow"]
COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40)]
TRAIN_COUNTS = [32, 16, 8, 4]
TEST_PER_CLASS = 8
SIZE = 16


def _images(counts: list[int], rng: np.random.Generator) -> tuple[list[Image.Image], list[int]]:
    images, labels = [], []
    for label, count in enumerate(counts):
        for i in range(count):
            noise = rng.normal(0, 10, (SIZE, SIZE, 3))
            pixels = np.asarray(COLOURS[label], dtype=float)[None, None, :] + noise
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            images.append(image.convert("L") if i == 0 else image)
            labels.append(label)
    return images, labels


def write_parquet(root: Path, image_column: str = "picture",
                  label_column: str = "target") -> tuple[Path, Path]:
    """``root/train.parquet`` (32/16/8/4 images) and ``root/test.parquet`` (8 per class)."""
    rng = np.random.default_rng(0)
    features = datasets.Features({image_column: datasets.Image(),
                                  label_column: datasets.ClassLabel(names=CLASS_NAMES)})
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, counts in (("train", TRAIN_COUNTS), ("test", [TEST_PER_CLASS] * len(CLASS_NAMES))):
        images, labels = _images(counts, rng)
        path = root / f"{split}.parquet"
        columns = {image_column: images, label_column: labels}
        datasets.Dataset.from_dict(columns, features=features).to_parquet(path)
        paths.append(path)
    return paths[0], paths[1]


def write_imagefolder(root: Path) -> tuple[Path, Path]:
    """``root/train/<class>/*.png`` and ``root/test/<class>/*.png`` with the same images as the parquet."""
    rng = np.random.default_rng(0)
    dirs = []
    for split, counts in (("train", TRAIN_COUNTS), ("test", [TEST_PER_CLASS] * len(CLASS_NAMES))):
        images, labels = _images(counts, rng)
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / CLASS_NAMES[label]
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{index:03d}.png")
        dirs.append(root / split)
    return dirs[0], dirs[1]
