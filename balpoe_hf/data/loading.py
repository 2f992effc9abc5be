"""Where the images come from: the Hub, parquet files, imagefolder directories, split-list files (ImageNet-LT,
Places-LT, iNaturalist-2018), Fashion-MNIST's IDX files; the label checks; a run's data.

``load_training_data(recipe)`` gives a run its long-tailed training split, its optional held-out split
(``data.holdout_split``) and its balanced test set, with the class names and counts the model needs;
``load_split`` gives an evaluation its test set alone. Images are
not decoded here: the ``datasets.Image`` column decodes on access, in the transforms.

One rule for class labels everywhere (``align_labels``): when the test data and the model (or the training
split) both name their classes, test labels are matched by name; different names are refused.
"""

from __future__ import annotations

import glob
import gzip
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import numpy as np
from huggingface_hub import constants as hub_constants

from ..errors import DataError, short_list
from .split_lists import load_split_list
from .splits import class_counts, holdout_split, labels_array, make_long_tailed

if TYPE_CHECKING:
    from ..recipes import Recipe

FASHION_MNIST = "fashion-mnist"  # the recipe's dataset name for Fashion-MNIST's IDX files
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # where Debian's dataset-fashion-mnist has them
# The class names of Zalando's Fashion-MNIST README. The Hub's copy spells the first "T - shirt / top", as
# models saved by earlier releases of this package do: label matching ignores spaces (``align_labels``).
FASHION_MNIST_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


def offline_mode() -> bool:
    """Whether Hub access is switched off (``HF_HUB_OFFLINE=1`` or ``HF_DATASETS_OFFLINE=1``)."""
    return bool(hub_constants.HF_HUB_OFFLINE) or bool(datasets.config.HF_DATASETS_OFFLINE)


def expand_paths(patterns: Sequence[str], what: str) -> list[str]:
    """The files and directories matching glob ``patterns`` (``~`` expanded), pattern by pattern.

    A pattern that matches nothing raises ``FileNotFoundError`` naming ``what`` (e.g. the flag it came from).
    """
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise FileNotFoundError(f"{what} {pattern!r} matches no file or directory.")
        paths.extend(matches)
    return paths


# --------------------------------------------------------------------------- Fashion-MNIST


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format, gzip-compressed) as a uint8 array."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(root: str | Path = FASHION_MNIST_DIR, png: bool = False) -> datasets.DatasetDict:
    """Fashion-MNIST from its IDX files, with the Hub ``fashion_mnist`` columns ``image`` and ``label``.

    Debian and Ubuntu ship the files in the package ``dataset-fashion-mnist``. The images are stored as PGM
    files (``_as_pgm_files``); ``png=True`` stores PNG files, as the Hub's copy does (for files to share).
    """
    root = Path(root)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=FASHION_MNIST_LABELS)}
    )
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        image_file = root / f"{prefix}-images-idx3-ubyte.gz"
        label_file = root / f"{prefix}-labels-idx1-ubyte.gz"
        if not image_file.exists() or not label_file.exists():
            raise FileNotFoundError(
                f"Fashion-MNIST files not found under {root} (looked for {image_file.name} and "
                f"{label_file.name}). Install them with `apt-get install dataset-fashion-mnist` or pass "
                "root=."
            )
        images = _read_idx(image_file)
        labels = _read_idx(label_file).astype(np.int64)
        splits[split] = datasets.Dataset.from_dict(
            {"image": list(images) if png else _as_pgm_files(images), "label": labels}, features=features,
            split=split
        )
    return datasets.DatasetDict(splits)


def _as_pgm_files(images: np.ndarray) -> list[dict[str, bytes | None]]:
    """Grayscale images as the bytes of binary PGM files, for a ``datasets.Image`` column.

    A PGM file is a one-line header before the raw pixels: lossless, read by PIL, and written without
    compression. Loading the 70,000 images takes 0.9 s instead of 9.7 s with the PNG files that
    ``datasets`` writes for arrays (2-core CPU).
    """
    height, width = images.shape[1:]
    header = f"P5 {width} {height} 255\n".encode()
    return [{"bytes": header + image.tobytes(), "path": None} for image in images]


# --------------------------------------------------------------------------- sources


def _check_parquet(path: str) -> None:
    """Read the footer of a parquet file (cheap), so that a CSV or a truncated file is named up front."""
    import pyarrow.parquet as pq

    try:
        rows = pq.read_metadata(path).num_rows
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path} is not a readable parquet file ({error}). The data files must be parquet "
                        "files (a CSV converts with datasets.load_dataset('csv', data_files=...)['train']"
                        ".to_parquet(...); a truncated file must be written again) or one imagefolder "
                        "directory per split.") from None
    if rows == 0:
        raise DataError(f"{path} is a parquet file without rows: give data files that hold images (was it "
                        "written from an empty selection?).")


def _load_files(files: dict[str, list[str]]) -> datasets.DatasetDict:
    """Parquet files or imagefolder directories, one entry per split (all of one kind)."""
    paths = [p for split_files in files.values() for p in split_files]
    if all(Path(p).is_dir() for p in paths):
        if any(len(split_files) != 1 for split_files in files.values()):
            raise DataError("an imagefolder dataset takes one directory per split.")
        try:
            # One call over every folder, so that the class labels inferred from the sub-folder names are the
            # same in all splits even if one of them lacks a class.
            return datasets.load_dataset("imagefolder", data_files={
                split: str(Path(split_files[0]) / "**") for split, split_files in files.items()})
        except ValueError as error:  # "Instruction 'train' corresponds to no data!"
            raise DataError(f"no images found in {paths} ({error}); an imagefolder directory holds one "
                            "sub-folder of image files per class.") from None
    if any(Path(p).is_dir() for p in paths):
        raise DataError("train_file and test_file must both be imagefolder directories or both parquet "
                        "files.")
    for path in paths:
        _check_parquet(path)
    # One call per split: a single call would read every split with the features of the first file, so a
    # test file whose ClassLabel lists the classes in another order would keep its numbers under the training
    # file's names, and align_labels could not see the difference.
    return datasets.DatasetDict({split: datasets.load_dataset("parquet", data_files={split: split_files},
                                                              split=split)
                                 for split, split_files in files.items()})


def _load_hub(dataset: str, config: str | None, splits: Sequence[str]) -> dict[str, datasets.Dataset]:
    how = ("Point the run at local copies instead: --train-file/--test-file with parquet files (e.g. saved "
           "by Dataset.to_parquet) or imagefolder directories (e.g. the recipe cifar10-lt-local), or "
           "--dataset fashion-mnist for the files of Debian's dataset-fashion-mnist.")
    try:
        return {split: datasets.load_dataset(dataset, config, split=split) for split in splits}
    except (ConnectionError, FileNotFoundError, OSError, ValueError) as error:
        if offline_mode():
            raise DataError(f"cannot load the Hub dataset {dataset!r}: offline mode is on "
                            f"(HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1) and it is not in the local cache. "
                            f"{how}") from None
        raise DataError(f"cannot load the Hub dataset {dataset!r}: {error}. {how}") from None


def _load_fashion_mnist(data_dir: str | Path | None) -> datasets.DatasetDict:
    try:
        return load_fashion_mnist(data_dir or FASHION_MNIST_DIR)
    except FileNotFoundError as error:
        raise DataError(str(error)) from None


def load_list(list_file: str | os.PathLike, data_root: str | os.PathLike | None,
              num_classes: int | None = None, image_column: str = "image", label_column: str = "label",
              what: str = "--test-list") -> datasets.Dataset:
    """The images a split-list file names (``split_lists.load_split_list``), with the given column names.

    ``what`` names the flag the file came from in the errors (a missing list file or data root, a bad line,
    a label out of ``num_classes``, missing images), which are ``DataError``.
    """
    if data_root is None:
        raise DataError(f"{what} {list_file} needs --data-root: the folder its image paths are relative to.")
    if not os.path.isfile(os.path.expanduser(list_file)):
        raise DataError(f"{what} {list_file} is not a file.")
    try:
        ds = load_split_list(os.path.expanduser(list_file), data_root, num_classes=num_classes)
    except (ValueError, FileNotFoundError) as error:
        raise DataError(f"{what}: {error}") from None
    names = {"image": image_column, "label": label_column}
    return ds.rename_columns({old: new for old, new in names.items() if old != new})


def load_split(*, files: Sequence[str] | None = None, dataset: str | None = None,
               dataset_config: str | None = None, split: str = "test",
               data_dir: str | Path | None = None) -> tuple[datasets.Dataset, str]:
    """One split (a test set, say) and a short description of where it came from that names no local path
    (it goes into reports that are published): the file names, ``fashion-mnist (test)`` or the Hub id.

    ``files``: parquet file(s) (glob patterns allowed) or one imagefolder directory; else ``dataset``:
    ``"fashion-mnist"`` (Debian's IDX files in ``data_dir``) or a Hub id with ``dataset_config`` and
    ``split``.
    """
    if files:
        try:
            paths = expand_paths(files, "the data files")
        except FileNotFoundError as error:
            raise DataError(str(error)) from None
        return _load_files({split: paths})[split], ",".join(local_name(path) for path in paths)
    if dataset is None:
        raise DataError("no test data: pass --dataset fashion-mnist, --test-file FILE.parquet (or an "
                        "imagefolder directory) or --dataset HUB_ID.")
    if dataset == FASHION_MNIST:
        return _load_fashion_mnist(data_dir)[split], f"{FASHION_MNIST} ({split})"
    return _load_hub(dataset, dataset_config, [split])[split], f"{dataset} ({split})"


def local_name(path: str | Path) -> str:
    """A local file or folder as published reports and cards name it: its last part only, never where it
    lies on the machine (``/data/cifar10/train.parquet`` -> ``train.parquet``, a folder -> ``train/``)."""
    name = Path(path).name or str(path)
    return f"{name}/" if Path(path).is_dir() else name


# --------------------------------------------------------------------------- labels


def _is_default_name(name: str, index: int) -> bool:
    return name == f"LABEL_{index}" or name == str(index)


def _name_key(name: object) -> str:
    """A class name as labels are matched: without spaces ("T - shirt / top" is "T-shirt/top")."""
    return "".join(str(name).split())


def align_labels(ds: datasets.Dataset, label_column: str, class_names: Sequence[str]) -> np.ndarray:
    """The labels of ``ds`` as indices into ``class_names``, matched by name when both sides have names.

    ``class_names`` are the model's (or the training split's) classes. A ``ClassLabel`` column that orders the
    same classes differently (an imagefolder, another export) is mapped name by name; a test class the model
    does not know is refused. Without names on either side, labels must lie in the model's class range.
    """
    num_classes = len(class_names)
    feature = ds.features.get(label_column)
    try:
        labels = labels_array(ds, label_column)
    except ValueError as error:  # no such column, or not integer labels
        raise DataError(f"{error} (on the command line: --label-column)") from None
    model_names = [_name_key(name) for name in class_names]
    if not isinstance(feature, datasets.ClassLabel) or all(
            _is_default_name(n, i) for i, n in enumerate(model_names)):
        bad = labels[labels >= num_classes]
        if bad.size:
            raise DataError(f"test labels {short_list(np.unique(bad))} are outside the model's "
                            f"{num_classes} classes; check --label-column (and --num-classes).")
        return labels
    names = [_name_key(n) for n in feature.names]
    if names == model_names[:len(names)]:
        return labels
    unknown = [str(n) for n, key in zip(feature.names, names, strict=True) if key not in model_names]
    if unknown:
        raise DataError(f"test classes {short_list(unknown)} are not classes of the model "
                        f"({short_list([str(name) for name in class_names])}); is this the right "
                        "dataset and --label-column?")
    to_model = np.asarray([model_names.index(n) for n in names], dtype=np.int64)
    return to_model[labels]


def relabel(ds: datasets.Dataset, label_column: str, class_names: Sequence[str]) -> datasets.Dataset:
    """``ds`` with its labels aligned to ``class_names`` (``align_labels``) and that ``ClassLabel`` feature.

    Only the label column is rewritten (the images are not copied).
    """
    labels = align_labels(ds, label_column, class_names)
    if np.array_equal(labels, labels_array(ds, label_column)) \
            and isinstance(ds.features[label_column], datasets.ClassLabel):
        return ds
    feature = datasets.ClassLabel(names=[str(name) for name in class_names])
    return ds.remove_columns(label_column).add_column(label_column, labels.tolist(), feature=feature)


# --------------------------------------------------------------------------- a training run's data


@dataclass
class TrainingData:
    """The long-tailed training split, the balanced test set and what the model needs to know about them.

    ``holdout`` (``None`` without ``recipe.holdout_fraction``) is a stratified part of the long-tailed split,
    removed from ``train`` before training: labelled data from the training distribution, for calibration.
    """

    train: datasets.Dataset
    test: datasets.Dataset
    class_names: list[str]
    class_counts: list[int]  # images per class actually trained on (after the held-out split), label order
    class_count_source: str = "named by the label column's ClassLabel"  # where the class count comes from
    holdout: datasets.Dataset | None = None
    holdout_counts: list[int] | None = None


def _check_columns(ds: datasets.Dataset, recipe: Recipe, split: str) -> None:
    for kind in ("image", "label"):
        column = getattr(recipe, f"{kind}_column")
        if column not in ds.column_names:
            raise DataError(f"the {split} split has no {kind} column {column!r}; its columns are "
                            f"{ds.column_names}. Name the right one with --{kind}-column.")


def _as_image_column(ds: datasets.Dataset, column: str, split: str) -> datasets.Dataset:
    if isinstance(ds.features[column], datasets.Image):
        return ds
    try:
        return ds.cast_column(column, datasets.Image())
    except (TypeError, ValueError) as error:
        raise DataError(f"the column {column!r} of the {split} split does not hold images "
                        f"({ds.features[column]}): {error}") from None


def _check_label_range(ds: datasets.Dataset, column: str, num_classes: int, split: str) -> None:
    labels = labels_array(ds, column)
    bad = np.unique(labels[(labels < 0) | (labels >= num_classes)])
    if bad.size:
        raise DataError(f"the {split} split has labels {short_list(bad)} outside the class range "
                        f"[0, {num_classes - 1}]; fix the labels or set --num-classes.")


def _check_no_overlap(train: Sequence[str], test: Sequence[str]) -> None:
    """Refuse test data that is (or lies inside, or holds) training data: the metrics would be inflated."""
    for test_path in test:
        for train_path in train:
            a, b = Path(train_path).resolve(), Path(test_path).resolve()
            if a == b or a in b.parents or b in a.parents:
                raise DataError(f"the training data {train_path} and the test data {test_path} overlap: the "
                                "model would be evaluated on images it was trained on. Give disjoint "
                                "training and test data (check the glob patterns).")


def input_paths(recipe: Recipe) -> list[Path]:
    """The local files and directories a run reads (glob patterns expanded; those that match nothing are
    left out, the data loading reports them)."""
    patterns = [*(recipe.train_file or []), *(recipe.test_file or [])]
    paths = [Path(p) for pattern in patterns for p in glob.glob(os.path.expanduser(pattern))]
    for folder_or_file in (recipe.data_dir, recipe.data_root, recipe.train_list, recipe.test_list):
        if folder_or_file:
            paths.append(Path(folder_or_file).expanduser())
    return paths


def _classes_from_labels(train: datasets.Dataset, test: datasets.Dataset, column: str) -> int:
    """The class count of plain integer labels: the largest label + 1, which both splits must agree on.

    An out-of-range label (a typo, an offset) would otherwise silently add classes to the model.
    """
    train_max = int(labels_array(train, column).max(initial=-1))
    test_max = int(labels_array(test, column).max(initial=-1))
    if train_max != test_max:
        raise DataError(f"the label column {column!r} has no ClassLabel and --num-classes is not set, so the "
                        f"class count comes from the largest label, but the training labels go up to "
                        f"{train_max} and the test labels up to {test_max}. Fix the labels, or set "
                        "--num-classes.")
    return train_max + 1


def _load_lists(recipe: Recipe) -> tuple[datasets.Dataset, datasets.Dataset]:
    if recipe.test_list is None:
        raise DataError("--train-list needs --test-list (the balanced test set, e.g. ImageNet_LT_test.txt).")
    _check_no_overlap([os.path.expanduser(recipe.train_list)], [os.path.expanduser(recipe.test_list)])
    columns = {"image_column": recipe.image_column, "label_column": recipe.label_column}
    train = load_list(recipe.train_list, recipe.data_root, recipe.num_classes, what="--train-list", **columns)
    test = load_list(recipe.test_list, recipe.data_root, recipe.num_classes, what="--test-list", **columns)
    return train, test


def _load_splits(recipe: Recipe) -> tuple[datasets.Dataset, datasets.Dataset]:
    if recipe.train_list is not None:
        return _load_lists(recipe)
    if recipe.test_list is not None:
        raise DataError("--test-list goes with --train-list (and --data-root); for other training data give "
                        "the test set with --test-file or --dataset.")
    if recipe.train_file is None and recipe.dataset is None:
        raise DataError(f"the recipe {recipe.name!r} names no data: pass --train-file and --test-file "
                        "(parquet files or imagefolder directories), --train-list and --test-list with "
                        f"--data-root (split-list files), or --dataset (a Hub id or '{FASHION_MNIST}').")
    if (recipe.train_file is None) != (recipe.test_file is None):
        raise DataError("give both --train-file and --test-file (the balanced test set), in the same format.")
    if recipe.train_file is not None:
        try:
            files = {"train": expand_paths(recipe.train_file, "train_file"),
                     "test": expand_paths(recipe.test_file or [], "test_file")}
        except FileNotFoundError as error:
            raise DataError(str(error)) from None
        _check_no_overlap(files["train"], files["test"])
        splits = _load_files(files)
        return splits["train"], splits["test"]
    if recipe.dataset == FASHION_MNIST:
        splits = _load_fashion_mnist(recipe.data_dir)
        return splits["train"], splits["test"]
    if recipe.train_split == recipe.test_split:
        raise DataError(f"train_split and test_split are both {recipe.train_split!r}: the model would be "
                        "evaluated on its training images. Name the balanced test split with --test-split.")
    splits = _load_hub(recipe.dataset, recipe.dataset_config, [recipe.train_split, recipe.test_split])
    return splits[recipe.train_split], splits[recipe.test_split]


def _check_every_class_present(counts: list[int], source: str) -> None:
    """Refuse a training split without images of some of the model's classes, saying where the class count
    comes from and, when the classes present are 0 ... k - 1, that ``--num-classes k`` fits the data."""
    empty = [c for c, n in enumerate(counts) if n == 0]
    if not empty:
        return
    present = len(counts) - len(empty)
    fix = (f"The data hold classes 0 to {present - 1}: set --num-classes {present}." if empty[0] == present
           else "Fix the labels, or set --num-classes to the number of classes the data hold.")
    raise DataError(f"classes {short_list(empty)} have no training image, but the model would have "
                    f"{len(counts)} classes ({source}); BalPoE needs every class in the training prior. "
                    + fix)


def load_training_data(recipe: Recipe) -> TrainingData:
    """Load the recipe's data, make the training split long-tailed, and check columns and labels.

    The test labels are aligned to the training split's class names (``relabel``), so that every evaluation
    of the run compares the same classes.
    """
    train, test = _load_splits(recipe)
    for ds, split in ((train, "train"), (test, "test")):
        _check_columns(ds, recipe, split)
    train = _as_image_column(train, recipe.image_column, "train")
    test = _as_image_column(test, recipe.image_column, "test")

    feature = train.features[recipe.label_column]
    names = feature.names if isinstance(feature, datasets.ClassLabel) else None
    if recipe.num_classes is not None:
        num_classes, source = recipe.num_classes, "set by num_classes: the recipe's or --num-classes"
    elif names:
        num_classes, source = len(names), f"named by the ClassLabel of {recipe.label_column!r}"
    else:
        num_classes, source = None, "inferred from the largest label (no ClassLabel, no --num-classes)"
    try:
        if num_classes is None:
            num_classes = _classes_from_labels(train, test, recipe.label_column)
        for ds, split in ((train, "train"), (test, "test")):
            _check_label_range(ds, recipe.label_column, num_classes, split)
        _check_every_class_present(class_counts(train, recipe.label_column, num_classes), source)
        if recipe.imbalance_ratio is not None:
            train = make_long_tailed(train, recipe.imbalance_ratio, recipe.label_column, recipe.split_seed,
                                     recipe.imbalance_profile, recipe.selection)
        counts = class_counts(train, recipe.label_column, num_classes)
    except ValueError as error:
        raise DataError(str(error)) from None
    _check_every_class_present(counts, source)
    holdout = holdout_counts = None
    if recipe.holdout_fraction > 0:
        try:
            train, holdout = holdout_split(train, recipe.holdout_fraction, recipe.label_column,
                                           recipe.split_seed, num_classes)
        except ValueError as error:
            raise DataError(str(error)) from None
        counts = class_counts(train, recipe.label_column, num_classes)
        holdout_counts = class_counts(holdout, recipe.label_column, num_classes)
    if names is None or len(names) != num_classes:
        names = [str(c) for c in range(num_classes)]
    test = relabel(test, recipe.label_column, names)
    return TrainingData(train=train, test=test, class_names=list(names), class_counts=counts,
                        class_count_source=source, holdout=holdout, holdout_counts=holdout_counts)
