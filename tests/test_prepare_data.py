"""balpoe-prepare-data: CIFAR-10's python batches and Fashion-MNIST's IDX files into Hub-layout parquet."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import datasets
import numpy as np
import pytest

from balpoe_hf import cli
from balpoe_hf.data.loading import FASHION_MNIST_LABELS, load_split
from balpoe_hf.data.prepare import prepare_data
from balpoe_hf.errors import DataError

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _write_cifar10_batches(root: Path, rows_per_batch: int = 3) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A miniature ``cifar-10-batches-py`` in the archive's format: rows of 3072 bytes (R, G, B planes)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with (folder / "batches.meta").open("wb") as handle:
        pickle.dump({b"label_names": [name.encode() for name in CIFAR10_NAMES]}, handle)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (rows_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, rows_per_batch).tolist()
        with (folder / name).open("wb") as handle:
            pickle.dump({b"data": data, b"labels": labels}, handle)
        written[name] = (data, labels)
    return written


def test_cifar10_batches_become_hub_layout_parquet_in_the_archive_order(tmp_path):
    batches = _write_cifar10_batches(tmp_path / "src")
    files = prepare_data("cifar10", tmp_path / "out", source=tmp_path / "src")
    assert files == {"train": tmp_path / "out" / "train.parquet", "test": tmp_path / "out" / "test.parquet"}
    train, _ = load_split(files=[str(files["train"])])
    assert train.features["label"].names == CIFAR10_NAMES
    assert isinstance(train.features["img"], datasets.Image)
    rows = [(name, r) for name in [f"data_batch_{i}" for i in range(1, 6)] for r in range(3)]
    assert len(train) == len(rows)
    for index, (name, r) in enumerate(rows):
        data, labels = batches[name]
        image = np.asarray(train[index]["img"])
        assert image.shape == (32, 32, 3) and train[index]["label"] == labels[r]
        # Pixel (y, x) of channel c is byte c * 1024 + y * 32 + x of the row (the archive's documentation).
        for y, x, c in ((0, 0, 0), (5, 17, 1), (31, 30, 2)):
            assert image[y, x, c] == data[r][c * 1024 + y * 32 + x]
    test = datasets.Dataset.from_parquet(str(files["test"]))
    assert test["label"] == batches["test_batch"][1]


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files_become_hub_layout_parquet(tmp_path):
    rng = np.random.default_rng(1)
    images = {"train": rng.integers(0, 256, (5, 28, 28)), "t10k": rng.integers(0, 256, (2, 28, 28))}
    labels = {"train": np.array([9, 0, 3, 3, 1]), "t10k": np.array([2, 7])}
    for prefix in images:
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images[prefix])
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels[prefix])
    assert cli.prepare_data_main(["fashion-mnist", "--source", str(tmp_path), "--output-dir",
                                  str(tmp_path / "out")]) == 0
    test = datasets.Dataset.from_parquet(str(tmp_path / "out" / "test.parquet"))
    assert test.features["label"].names == FASHION_MNIST_LABELS
    assert test["label"] == [2, 7]
    assert (np.asarray(test[1]["image"]) == images["t10k"][1]).all()
    assert test[1]["image"].format == "PNG"  # as in the Hub's copy


def test_bad_sources_and_existing_files_are_refused_with_the_fix(tmp_path, capsys):
    with pytest.raises(DataError, match=r"no CIFAR-10 batches .* --source hub"):
        prepare_data("cifar10", tmp_path / "out", source=tmp_path)
    assert cli.prepare_data_main(["fashion-mnist", "--source", str(tmp_path), "--output-dir",
                                  str(tmp_path / "out")]) == 2
    assert "no Fashion-MNIST IDX files" in capsys.readouterr().err
    _write_cifar10_batches(tmp_path / "src", rows_per_batch=1)
    prepare_data("cifar10", tmp_path / "out", source=tmp_path / "src")
    with pytest.raises(DataError, match=r"exist already.*--overwrite"):
        prepare_data("cifar10", tmp_path / "out", source=tmp_path / "src")
    prepare_data("cifar10", tmp_path / "out", source=tmp_path / "src", overwrite=True)
