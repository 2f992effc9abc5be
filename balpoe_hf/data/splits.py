"""Long-tailed training splits, held-out splits, shifted test sets and shot groups on ``datasets.Dataset``.

Everything here reads only the label column, never the images, so building a split of a 50,000-image
dataset takes milliseconds.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import datasets
import numpy as np

from ..errors import short_list
from ..recipes.recipe import FEW_SHOT_THRESHOLD, MANY_SHOT_THRESHOLD

PROFILES = ("exponential", "step")
SELECTIONS = ("random", "reference")
SHIFT_KINDS = ("forward", "backward", "uniform")
# The shifted test sets of the evaluation protocol (LADE / SADE; the paper's Table 10).
ALL_SHIFTS = ("forward50", "forward25", "forward10", "forward5", "forward2", "uniform",
              "backward2", "backward5", "backward10", "backward25", "backward50")


def _require_one_split(ds: object, caller: str, split: str, why: str) -> None:
    """Refuse a streaming dataset and a dataset dict with a message saying what to pass instead.

    A ``DatasetDict`` is refused rather than handled split by split because each of these functions has one
    meaningful split (``why``): applying it to every split would, for instance, make the test set long-tailed.
    """
    if isinstance(ds, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise TypeError(
            f"{caller} needs a map-style datasets.Dataset (it reads the whole label column and selects "
            f"rows by index), got a streaming {type(ds).__name__}. Load it with "
            "load_dataset(..., streaming=False), or materialise a streaming split ids with "
            "datasets.Dataset.from_generator(ids.__iter__, features=ids.features)."
        )
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        example = f"{caller}(ds[{split!r}], ...)" if split in splits else f"one of {splits}"
        raise TypeError(
            f"{caller} takes one split, got a DatasetDict with splits {splits}; pass the {split} split, e.g. "
            f"{example} ({why})."
        )


def _num_classes_from_features(ds: datasets.Dataset, label_column: str) -> int | None:
    feature = ds.features.get(label_column)
    return feature.num_classes if isinstance(feature, datasets.ClassLabel) else None


def labels_array(ds: datasets.Dataset, label_column: str = "label",
                 num_classes: int | None = None) -> np.ndarray:
    """The label column as an ``int64`` array, checked for presence, integer type and range.

    ``num_classes`` defaults to the ``ClassLabel`` feature's size, else to ``max(label) + 1``.
    """
    _require_one_split(ds, "labels_array", "train", "it returns one label array")
    if label_column not in ds.column_names:
        raise ValueError(
            f"dataset has no label column {label_column!r}; its columns are {ds.column_names}. "
            "Pass the right name with label_column=..."
        )
    # Slicing the formatted column reads the Arrow buffer at once; iterating a Column would go row by row.
    labels = np.asarray(ds.select_columns([label_column]).with_format("numpy")[label_column][:])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"label column {label_column!r} must hold integer class indices, got dtype {labels.dtype}; "
            "encode string labels first (for example with Dataset.class_encode_column)."
        )
    labels = labels.astype(np.int64)
    if num_classes is None:
        num_classes = _num_classes_from_features(ds, label_column)
    if labels.size and labels.min() < 0:
        raise ValueError(f"label column {label_column!r} has negative labels (min {labels.min()}).")
    if num_classes is not None and labels.size and labels.max() >= num_classes:
        bad = np.unique(labels[labels >= num_classes]).tolist()
        raise ValueError(
            f"label column {label_column!r} has labels {short_list(bad)} outside the class range "
            f"[0, {num_classes - 1}]."
        )
    return labels


def class_counts(ds: datasets.Dataset, label_column: str = "label",
                 num_classes: int | None = None) -> list[int]:
    """Samples per class, in label-index order (classes with no sample count 0)."""
    _require_one_split(ds, "class_counts", "train", "it returns one list of counts")
    labels = labels_array(ds, label_column, num_classes)
    if num_classes is None:
        num_classes = _num_classes_from_features(ds, label_column) or int(labels.max(initial=-1)) + 1
    return np.bincount(labels, minlength=num_classes).tolist()


def _check_ratio(ratio: float, name: str = "imbalance_ratio") -> None:
    # NaN passes `ratio < 1` as False and then fails in int(); infinity would keep zero tail images.
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 1 <= ratio < math.inf:
        raise ValueError(f"{name} must be >= 1 and finite (head count / tail count), got {ratio!r}.")


def _check_profile(imbalance_ratio: float, profile: str) -> None:
    _check_ratio(imbalance_ratio)
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {PROFILES}.")


def long_tailed_counts(n_max: int, num_classes: int, imbalance_ratio: float,
                       profile: str = "exponential") -> list[int]:
    """Target sample count per class: class 0 is the head, class ``C - 1`` the tail.

    ``exponential``: class ``i`` keeps ``int(n_max * ratio ** (-i / (C - 1)))``.
    ``step``: the first ``C // 2`` classes keep ``n_max``, the others ``int(n_max / ratio)``.
    """
    _check_profile(imbalance_ratio, profile)
    if num_classes == 1:
        return [n_max]
    if profile == "exponential":
        return [int(n_max * imbalance_ratio ** (-i / (num_classes - 1))) for i in range(num_classes)]
    return [n_max if i < num_classes // 2 else int(n_max / imbalance_ratio) for i in range(num_classes)]


def _reference_counts(available: Sequence[int], imbalance_ratio: float, profile: str) -> list[int]:
    """Per-class counts computed float for float as LDAM-DRW's ``get_img_num_per_cls`` does.

    That code (used unchanged by BalPoE) takes ``img_max = rows / C`` and ``imb_factor = 1 / ratio``; it is
    defined only for a balanced set, and its step profile only for an even class count (with an odd one it
    silently drops the last class), so anything else is refused rather than approximated.
    """
    _check_profile(imbalance_ratio, profile)
    num_classes = len(available)
    if num_classes < 2 or min(available) != max(available):
        raise ValueError(
            "selection='reference' reproduces the CIFAR-LT split of a balanced training set with at least "
            f"two classes; this dataset has {num_classes} classes with {min(available)} to {max(available)} "
            "rows each. Use selection='random'."
        )
    if profile == "step" and num_classes % 2:
        raise ValueError(
            f"the reference step profile needs an even number of classes, got {num_classes}. "
            "Use selection='random'."
        )
    img_max = sum(available) / num_classes
    imb_factor = 1 / imbalance_ratio
    if profile == "exponential":
        return [int(img_max * imb_factor ** (i / (num_classes - 1.0))) for i in range(num_classes)]
    half = num_classes // 2
    return [int(img_max)] * half + [int(img_max * imb_factor)] * half


def _subsample(labels: np.ndarray, keep: Sequence[int],
               rng: np.random.Generator | np.random.RandomState) -> np.ndarray:
    """Sorted row indices keeping the first ``keep[c]`` rows of a ``rng`` permutation of each class ``c``.

    Classes are permuted in label order, so the draw for a class depends only on the sizes of the classes
    before it, not on how the classes are interleaved in the dataset.
    """
    chosen = []
    for cls, k in enumerate(keep):
        rows = np.flatnonzero(labels == cls)
        chosen.append(rng.permutation(rows)[:k])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def _check_no_empty_class(keep: Sequence[int], available: Sequence[int], what: str,
                          largest_ratio: float) -> None:
    empty = [cls for cls, k in enumerate(keep) if k == 0]
    if not empty:
        return
    missing = [cls for cls in empty if available[cls] == 0]
    if missing:
        raise ValueError(f"classes {short_list(missing)} have no samples in the dataset, so {what} "
                         "cannot include them.")
    raise ValueError(
        f"{what} would keep zero samples of classes {short_list(empty)}; the largest ratio that keeps at "
        f"least one sample of every class is {largest_ratio:g}."
    )


def make_long_tailed(ds: datasets.Dataset, imbalance_ratio: float, label_column: str = "label", seed: int = 0,
                     profile: str = "exponential", selection: str = "random") -> datasets.Dataset:
    """A long-tailed subset of a (balanced) dataset, the CIFAR-LT protocol of Cao et al. (2019).

    Class ``i`` in label-index order keeps ``int(n_max * imbalance_ratio ** (-i / (C - 1)))`` rows
    (``n_max`` is the largest class), drawn with ``seed`` so that every run sees the same split.
    A class with fewer rows than its target keeps all it has. The rows keep the dataset's order.

    ``selection="random"`` draws with ``numpy.random.default_rng(seed)``. ``selection="reference"``
    reproduces the image selection of the official BalPoE code (LDAM-DRW's ``IMBALANCECIFAR10/100``, taken
    over unchanged): numpy's legacy generator seeded with ``seed`` shuffles the rows of each class in label
    order and the first ones are kept. With ``seed=0`` (the official default) on CIFAR-10/100
    in its original row order, or any order that keeps each class's rows in original order, this is the
    published split. It needs a balanced dataset, as the official code does.
    """
    _require_one_split(ds, "make_long_tailed", "train",
                       "the protocols subsample the training split; validation and test stay balanced")
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; choose one of {SELECTIONS}.")
    labels = labels_array(ds, label_column)
    available = class_counts(ds, label_column)
    n_max = max(available)
    if selection == "reference":
        target = _reference_counts(available, imbalance_ratio, profile)
        rng = np.random.RandomState(seed)
    else:
        target = long_tailed_counts(n_max, len(available), imbalance_ratio, profile)
        rng = np.random.default_rng(seed)
    keep = [min(t, a) for t, a in zip(target, available, strict=True)]
    # int(n_max / r) >= 1 exactly when r <= n_max, for both profiles.
    _check_no_empty_class(keep, available, f"imbalance ratio {imbalance_ratio:g}", float(n_max))
    return ds.select(_subsample(labels, keep, rng))


def holdout_sizes(counts: Sequence[int], fraction: float) -> list[int]:
    """Images to hold out per class: ``fraction * n_c`` rounded half up, at least 1, leaving at least 1.

    Raises ``ValueError`` naming the classes too small to give one image to each side.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {fraction}.")
    sizes = [max(1, math.floor(fraction * n + 0.5)) for n in counts]
    small = [c for c, (k, n) in enumerate(zip(sizes, counts, strict=True)) if k >= n]
    if small:
        raise ValueError(
            f"holdout_fraction {fraction:g} leaves classes {short_list(small)} (with "
            f"{short_list([counts[c] for c in small], 'counts')} images) without a training image: every "
            "class needs one held-out image and one to train on. Lower holdout_fraction or the imbalance "
            "ratio, or set holdout_fraction 0.")
    return sizes


def holdout_split(ds: datasets.Dataset, fraction: float, label_column: str = "label", seed: int = 0,
                  num_classes: int | None = None) -> tuple[datasets.Dataset, datasets.Dataset]:
    """``(train, holdout)``: a stratified split holding out ``holdout_sizes(counts, fraction)`` per class.

    Each class's held-out rows are the first of a permutation drawn by ``numpy.random.default_rng((seed,
    1))``, a stream apart from the long-tailed subsampling's ``default_rng(seed)``, so that the split is a
    function of ``seed`` alone. Both parts keep the dataset's row order and share no row.
    """
    labels = labels_array(ds, label_column, num_classes)
    counts = np.bincount(labels, minlength=num_classes or 0).tolist()
    held_out = _subsample(labels, holdout_sizes(counts, fraction), np.random.default_rng((seed, 1)))
    kept = np.setdiff1d(np.arange(len(labels)), held_out, assume_unique=True)
    return ds.select(kept), ds.select(held_out)


def rank_by_count(train_counts: Sequence[int]) -> list[int]:
    """Class indices from the most to the least frequent; ties keep label-index order."""
    return sorted(range(len(train_counts)), key=lambda cls: (-train_counts[cls], cls))


def _check_train_counts(train_counts: Sequence[int]) -> None:
    """Training images per class: a non-empty sequence of integers >= 0 (they only rank the classes)."""
    counts = np.asarray(train_counts) if isinstance(train_counts, Sequence | np.ndarray) else None
    if counts is None or counts.ndim != 1 or counts.size == 0 or not (
            np.issubdtype(counts.dtype, np.integer) or np.issubdtype(counts.dtype, np.floating)):
        raise ValueError(f"train_counts must be the training images per class (a list of integers >= 0), "
                         f"got {train_counts!r}.")
    bad = np.flatnonzero(~np.isfinite(counts) | (counts < 0) | (counts != np.round(counts)))
    if bad.size:
        raise ValueError(f"train_counts must be integers >= 0 (images per class), but classes "
                         f"{short_list(bad)} have {short_list(counts[bad])}.")


def split_shift(name: str) -> tuple[str, float]:
    """``"forward50"`` -> ``("forward", 50.0)``; ``"uniform"`` -> ``("uniform", 1.0)``."""
    if name == "uniform":
        return "uniform", 1.0
    for kind in ("forward", "backward"):
        if name.startswith(kind):
            try:
                ratio = float(name[len(kind):])
            except ValueError:
                break
            if ratio >= 1:
                return kind, ratio
    raise ValueError(f"unknown shift {name!r}: use 'uniform', 'forwardR' or 'backwardR' with a ratio R >= 1 "
                     "(e.g. forward50).")


def make_shifted_test(ds: datasets.Dataset, train_counts: Sequence[int], kind: str, ratio: float = 1.0,
                      label_column: str = "label", seed: int = 0) -> datasets.Dataset:
    """A label-shifted test set (the LADE / SADE protocol) from a balanced test set.

    Classes are ranked by training count (most frequent first). In a ``forward`` set the class of rank
    ``k`` keeps ``int(n_per_class * ratio ** (-k / (C - 1)))`` rows, so the test set is long-tailed like
    the training set; ``backward`` reverses the ranks; ``uniform`` (or ``ratio == 1``) returns the
    balanced set unchanged.
    """
    _require_one_split(ds, "make_shifted_test", "test", "the shift is applied to a balanced test split")
    if kind not in SHIFT_KINDS:
        raise ValueError(f"unknown shift kind {kind!r}; choose one of {SHIFT_KINDS}.")
    _check_ratio(ratio, "shift ratio")
    _check_train_counts(train_counts)
    labels = labels_array(ds, label_column, num_classes=len(train_counts))
    available = np.bincount(labels, minlength=len(train_counts)).tolist()
    if kind == "uniform" or ratio == 1:
        return ds
    num_classes = len(train_counts)
    n_per_class = max(available)
    per_rank = long_tailed_counts(n_per_class, num_classes, ratio)
    if kind == "backward":
        per_rank = per_rank[::-1]
    keep = [0] * num_classes
    for rank, cls in enumerate(rank_by_count(train_counts)):
        keep[cls] = min(per_rank[rank], available[cls])
    _check_no_empty_class(keep, available, f"{kind}{ratio:g}", float(n_per_class))
    return ds.select(_subsample(labels, keep, np.random.default_rng(seed)))


def shot_groups(train_counts: Sequence[int], many: int = MANY_SHOT_THRESHOLD,
                few: int = FEW_SHOT_THRESHOLD) -> dict[str, list[int]]:
    """Class indices per shot group: many-shot ``> many``, few-shot ``< few``, medium in between.

    A group with no class is an empty list.
    """
    groups: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for cls, count in enumerate(train_counts):
        group = "many" if count > many else "few" if count < few else "medium"
        groups[group].append(cls)
    return groups


def imbalance_ratio(train_counts: Sequence[int]) -> float:
    """Largest class count over smallest (``inf`` if a class is empty)."""
    smallest = min(train_counts)
    return math.inf if smallest == 0 else max(train_counts) / smallest
