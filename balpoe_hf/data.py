"""Long-tailed training splits, shifted test sets and shot groups on ``datasets.Dataset``.

Everything here reads only the label column, never the images, so building a split of a 50,000-image
dataset takes milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import datasets
import numpy as np

PROFILES = ("exponential", "step")
SHIFT_KINDS = ("forward", "backward", "uniform")


def _num_classes_from_features(ds: datasets.Dataset, label_column: str) -> int | None:
    feature = ds.features.get(label_column)
    return feature.num_classes if isinstance(feature, datasets.ClassLabel) else None


def labels_array(ds: datasets.Dataset, label_column: str = "label",
                 num_classes: int | None = None) -> np.ndarray:
    """The label column as an ``int64`` array, checked for presence, integer type and range.

    ``num_classes`` defaults to the ``ClassLabel`` feature's size, else to ``max(label) + 1``.
    """
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
            f"label column {label_column!r} has labels {bad[:10]} outside the class range "
            f"[0, {num_classes - 1}]."
        )
    return labels


def class_counts(ds: datasets.Dataset, label_column: str = "label",
                 num_classes: int | None = None) -> list[int]:
    """Samples per class, in label-index order (classes with no sample count 0)."""
    labels = labels_array(ds, label_column, num_classes)
    if num_classes is None:
        num_classes = _num_classes_from_features(ds, label_column) or int(labels.max(initial=-1)) + 1
    return np.bincount(labels, minlength=num_classes).tolist()


def long_tailed_counts(n_max: int, num_classes: int, imbalance_ratio: float,
                       profile: str = "exponential") -> list[int]:
    """Target sample count per class: class 0 is the head, class ``C - 1`` the tail.

    ``exponential``: class ``i`` keeps ``int(n_max * ratio ** (-i / (C - 1)))``.
    ``step``: the first ``C // 2`` classes keep ``n_max``, the others ``int(n_max / ratio)``.
    """
    if imbalance_ratio < 1:
        raise ValueError(f"imbalance_ratio must be >= 1 (head count / tail count), got {imbalance_ratio}.")
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {PROFILES}.")
    if num_classes == 1:
        return [n_max]
    if profile == "exponential":
        return [int(n_max * imbalance_ratio ** (-i / (num_classes - 1))) for i in range(num_classes)]
    return [n_max if i < num_classes // 2 else int(n_max / imbalance_ratio) for i in range(num_classes)]


def _subsample(labels: np.ndarray, keep: Sequence[int], seed: int) -> np.ndarray:
    """Sorted row indices keeping ``keep[c]`` random rows of each class ``c``."""
    rng = np.random.default_rng(seed)
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
        raise ValueError(f"classes {missing} have no samples in the dataset, so {what} cannot include them.")
    raise ValueError(
        f"{what} would keep zero samples of classes {empty}; the largest ratio that keeps at least one "
        f"sample of every class is {largest_ratio:g}."
    )


def make_long_tailed(ds: datasets.Dataset, imbalance_ratio: float, label_column: str = "label", seed: int = 0,
                     profile: str = "exponential") -> datasets.Dataset:
    """A long-tailed subset of a (balanced) dataset, the CIFAR-LT protocol of Cao et al. (2019).

    Class ``i`` in label-index order keeps ``int(n_max * imbalance_ratio ** (-i / (C - 1)))`` rows
    (``n_max`` is the largest class), drawn at random with ``seed`` so that every run sees the same split.
    A class with fewer rows than its target keeps all it has.
    """
    labels = labels_array(ds, label_column)
    available = class_counts(ds, label_column)
    n_max = max(available)
    target = long_tailed_counts(n_max, len(available), imbalance_ratio, profile)
    keep = [min(t, a) for t, a in zip(target, available, strict=True)]
    # int(n_max / r) >= 1 exactly when r <= n_max, for both profiles.
    _check_no_empty_class(keep, available, f"imbalance ratio {imbalance_ratio:g}", float(n_max))
    return ds.select(_subsample(labels, keep, seed))


def rank_by_count(train_counts: Sequence[int]) -> list[int]:
    """Class indices from the most to the least frequent; ties keep label-index order."""
    return sorted(range(len(train_counts)), key=lambda cls: (-train_counts[cls], cls))


def make_shifted_test(ds: datasets.Dataset, train_counts: Sequence[int], kind: str, ratio: float = 1.0,
                      label_column: str = "label", seed: int = 0) -> datasets.Dataset:
    """A label-shifted test set (the LADE / SADE protocol) from a balanced test set.

    Classes are ranked by training count (most frequent first). In a ``forward`` set the class of rank
    ``k`` keeps ``int(n_per_class * ratio ** (-k / (C - 1)))`` rows, so the test set is long-tailed like
    the training set; ``backward`` reverses the ranks; ``uniform`` (or ``ratio == 1``) returns the
    balanced set unchanged.
    """
    if kind not in SHIFT_KINDS:
        raise ValueError(f"unknown shift kind {kind!r}; choose one of {SHIFT_KINDS}.")
    if ratio < 1:
        raise ValueError(f"shift ratio must be >= 1, got {ratio}.")
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
    return ds.select(_subsample(labels, keep, seed))


def shot_groups(train_counts: Sequence[int], many: int = 100, few: int = 20) -> dict[str, list[int]]:
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
