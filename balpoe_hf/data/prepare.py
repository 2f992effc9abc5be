"""Local parquet copies of CIFAR-10 and Fashion-MNIST in the Hub's layout, for ``--train-file/--test-file``.

``prepare_data("cifar10", "data/cifar10")`` writes ``train.parquet`` and ``test.parquet`` with the columns of
the Hub dataset ``uoft-cs/cifar10`` (``img``, ``label`` with the class names); ``"fashion-mnist"`` those of
``zalando-datasets/fashion_mnist`` (``image``, ``label``). The images come from local files, offline:

- CIFAR-10: the python version of the original archive (``cifar-10-batches-py``: ``data_batch_1`` ...
  ``data_batch_5``, ``test_batch``, ``batches.meta``), as torchvision downloads it. They are read in the
  archive's order, which keeps each class's images in CIFAR-10's original order: the order in which the
  ``reference`` selection of the ``cifar10-lt-local`` recipe picks the published CIFAR-10-LT split;
- Fashion-MNIST: its four IDX files (``*-idx3-ubyte.gz`` / ``*-idx1-ubyte.gz``), e.g. those of Debian's
  ``dataset-fashion-mnist``;

or, with ``source="hub"``, from the Hub through ``datasets.load_dataset`` (online, or from its cache). The
pickle reader is written here because torchvision's ``CIFAR10`` insists on the archive's checksums and a
fixed folder name, and ``datasets`` has no loader for the pickles.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Literal

import datasets
import numpy as np

from ..errors import DataError
from .loading import FASHION_MNIST_DIR, load_fashion_mnist, offline_mode

DATASETS = ("cifar10", "fashion-mnist")
HUB_IDS = {"cifar10": "uoft-cs/cifar10", "fashion-mnist": "zalando-datasets/fashion_mnist"}
CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
SPLITS = ("train", "test")


def _unpickle(path: Path) -> dict:
    with path.open("rb") as handle:
        return pickle.load(handle, encoding="bytes")


def _cifar10_folder(source: Path) -> Path:
    """The folder holding the batches: ``source`` itself or its ``cifar-10-batches-py``."""
    for folder in (source, source / "cifar-10-batches-py"):
        if (folder / "batches.meta").is_file():
            return folder
    raise DataError(f"no CIFAR-10 batches in {source} (looked for batches.meta there and in "
                    f"{source / 'cifar-10-batches-py'}): give the folder of the python version of the "
                    "archive (cifar-10-python.tar.gz, unpacked), or --source hub.")


def load_cifar10_batches(source: str | Path) -> datasets.DatasetDict:
    """CIFAR-10 from the python version of its archive, in the Hub layout (``img``, ``label``)."""
    folder = _cifar10_folder(Path(source))
    names = [name.decode() for name in _unpickle(folder / "batches.meta")[b"label_names"]]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    splits = {}
    for split, batches in CIFAR10_BATCHES.items():
        missing = [name for name in batches if not (folder / name).is_file()]
        if missing:
            raise DataError(f"{folder} lacks the CIFAR-10 batches {missing}: unpack the whole archive there.")
        images, labels = [], []
        for name in batches:
            batch = _unpickle(folder / name)
            # Each row is 3072 bytes: the red, green and blue 32x32 planes in turn.
            pixels = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            images.append(pixels.transpose(0, 2, 3, 1))
            labels.extend(int(label) for label in batch[b"labels"])
        splits[split] = datasets.Dataset.from_dict({"img": list(np.concatenate(images)), "label": labels},
                                                   features=features, split=split)
    return datasets.DatasetDict(splits)


def _from_hub(name: str) -> datasets.DatasetDict:
    try:
        return datasets.load_dataset(HUB_IDS[name])
    except (ConnectionError, FileNotFoundError, OSError, ValueError) as error:
        reason = ("it is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and the dataset is not in the cache"
                  if offline_mode() else str(error))
        raise DataError(f"cannot read {HUB_IDS[name]} from the Hub: {reason}. Give --source DIR with the "
                        "original files instead.") from None


def prepare_data(name: Literal["cifar10", "fashion-mnist"], output_dir: str | Path,
                 source: str | Path | None = None, overwrite: bool = False) -> dict[str, Path]:
    """Write ``output_dir/train.parquet`` and ``output_dir/test.parquet`` of dataset ``name``; returns them.

    ``source``: a folder of the original files (see the module docstring), ``"hub"`` for the Hub dataset, or
    ``None``: Debian's Fashion-MNIST folder for ``fashion-mnist``, the Hub for ``cifar10``. Existing files
    are kept unless ``overwrite``.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    output = Path(output_dir)
    targets = {split: output / f"{split}.parquet" for split in SPLITS}
    existing = [str(path) for path in targets.values() if path.exists()]
    if existing and not overwrite:
        raise DataError(f"{', '.join(existing)} exist already: choose another --output-dir, or pass "
                        "--overwrite to replace them.")
    if source is None:
        source = FASHION_MNIST_DIR if name == "fashion-mnist" else "hub"
    if str(source) == "hub":
        splits = _from_hub(name)
    elif name == "cifar10":
        splits = load_cifar10_batches(source)
    else:
        try:
            splits = load_fashion_mnist(source, png=True)
        except FileNotFoundError:
            raise DataError(f"no Fashion-MNIST IDX files in {source} (train-images-idx3-ubyte.gz, "
                            "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
                            "t10k-labels-idx1-ubyte.gz): give --source DIR with the four files, install "
                            "Debian's dataset-fashion-mnist, or use --source hub when online.") from None
    output.mkdir(parents=True, exist_ok=True)
    for split, path in targets.items():
        splits[split].to_parquet(str(path))
    return targets
