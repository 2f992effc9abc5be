import os
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest

from balpoe_hf.data.splits import (
    class_counts,
    labels_array,
    make_long_tailed,
    make_shifted_test,
    shot_groups,
)


def _balanced(num_classes: int, per_class: int, column: str = "label") -> datasets.Dataset:
    labels = np.repeat(np.arange(num_classes), per_class)
    features = datasets.Features(
        {column: datasets.ClassLabel(num_classes=num_classes), "idx": datasets.Value("int64")}
    )
    return datasets.Dataset.from_dict({column: labels, "idx": np.arange(labels.size)}, features=features)


@pytest.fixture(scope="module")
def cifar100_train():
    return _balanced(100, 500, "fine_label")


@pytest.fixture(scope="module")
def cifar100_test():
    return _balanced(100, 100, "fine_label")


@pytest.mark.parametrize(("ratio", "rows"), [(100, 10_847), (50, 12_608), (10, 19_573)])
def test_published_cifar100_lt_sizes(cifar100_train, ratio, rows):
    lt = make_long_tailed(cifar100_train, ratio, label_column="fine_label")
    assert len(lt) == rows
    counts = class_counts(lt, "fine_label")
    assert counts[0] == 500 and counts[-1] == 500 // ratio


def test_split_is_seeded_and_reads_only_labels(cifar100_train):
    start = time.perf_counter()
    a = make_long_tailed(cifar100_train, 100, label_column="fine_label", seed=0)
    assert time.perf_counter() - start < 1.0
    b = make_long_tailed(cifar100_train, 100, label_column="fine_label", seed=0)
    c = make_long_tailed(cifar100_train, 100, label_column="fine_label", seed=1)
    assert a["idx"][:] == b["idx"][:]
    assert a["idx"][:] != c["idx"][:]


def test_fifty_thousand_rows_in_well_under_a_second():
    ds = _balanced(10, 5000)
    start = time.perf_counter()
    lt = make_long_tailed(ds, 100)
    assert time.perf_counter() - start < 0.5
    assert class_counts(lt) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_step_profile():
    lt = make_long_tailed(_balanced(4, 100), 10, profile="step")
    assert class_counts(lt) == [100, 100, 10, 10]


def test_shot_groups_cifar100_ir100(cifar100_train):
    counts = class_counts(make_long_tailed(cifar100_train, 100, label_column="fine_label"), "fine_label")
    groups = shot_groups(counts)
    assert [len(groups[g]) for g in ("many", "medium", "few")] == [35, 35, 30]


def test_shot_groups_boundaries_and_empty_groups():
    assert shot_groups([101, 100, 20, 19]) == {"many": [0], "medium": [1, 2], "few": [3]}
    assert shot_groups([500, 400]) == {"many": [0, 1], "medium": [], "few": []}


@pytest.mark.parametrize(("ratio", "rows"), [(50, 2486), (25, 2956), (10, 3876), (5, 4932), (2, 7166)])
def test_published_forward_shift_sizes(cifar100_train, cifar100_test, ratio, rows):
    counts = class_counts(make_long_tailed(cifar100_train, 100, label_column="fine_label"), "fine_label")
    assert len(make_shifted_test(cifar100_test, counts, "forward", ratio, label_column="fine_label")) == rows
    assert len(make_shifted_test(cifar100_test, counts, "backward", ratio, label_column="fine_label")) == rows


def test_shift_follows_training_rank_with_ties_by_index():
    test = _balanced(3, 100)
    # Training order by count: class 2 (50), then 0 and 1 tied at 10 (0 before 1).
    forward = class_counts(make_shifted_test(test, [10, 10, 50], "forward", 4))
    assert forward == [50, 25, 100]
    backward = class_counts(make_shifted_test(test, [10, 10, 50], "backward", 4))
    assert backward == [50, 100, 25]
    assert len(make_shifted_test(test, [10, 10, 50], "uniform")) == 300


def test_errors_name_the_problem():
    ds = _balanced(3, 10)
    with pytest.raises(ValueError, match="imbalance_ratio must be >= 1"):
        make_long_tailed(ds, 0.5)
    with pytest.raises(ValueError, match="no label column 'fine_label'"):
        make_long_tailed(ds, 2, label_column="fine_label")
    with pytest.raises(ValueError, match=r"zero samples of classes \[2\]; the largest ratio .* is 10"):
        make_long_tailed(ds, 11)
    strings = datasets.Dataset.from_dict({"label": ["a", "b"]})
    with pytest.raises(ValueError, match="integer class indices"):
        class_counts(strings)
    with pytest.raises(ValueError, match=r"labels \[3\] outside the class range \[0, 2\]"):
        make_shifted_test(datasets.Dataset.from_dict({"label": [0, 1, 3]}), [5, 3, 1], "forward", 2)
    with pytest.raises(ValueError, match="negative labels"):
        class_counts(datasets.Dataset.from_dict({"label": [0, -1]}))
    with pytest.raises(ValueError, match="unknown shift kind"):
        make_shifted_test(ds, [5, 3, 1], "sideways", 2)


def _ldam_drw_selection(labels: np.ndarray, imb_factor: float, seed: int = 0) -> list[int]:
    """The official CIFAR-LT selection, written the way LDAM-DRW's IMBALANCECIFAR10 does it: the global
    legacy generator seeded once, then per class (np.unique order) shuffle its indices, keep the first n."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        classes = np.unique(labels)
        img_max = len(labels) / len(classes)
        chosen = []
        for cls_idx, cls in enumerate(classes):
            num = int(img_max * (imb_factor ** (cls_idx / (len(classes) - 1.0))))
            idx = np.where(labels == cls)[0]
            np.random.shuffle(idx)
            chosen.extend(idx[:num].tolist())
    finally:
        np.random.set_state(state)
    return sorted(chosen)


def _interleaved(num_classes: int, per_class: int) -> datasets.Dataset:
    labels = np.random.default_rng(7).permutation(np.repeat(np.arange(num_classes), per_class))
    return datasets.Dataset.from_dict({"label": labels, "idx": np.arange(labels.size)})


def test_reference_selection_is_ldam_drw_global_generator():
    ds = _interleaved(4, 30)
    lt = make_long_tailed(ds, 10, selection="reference")
    # 30 * 0.1 ** (i / 3): 30, 13.9, 6.46, 3.0
    assert class_counts(lt) == [30, 13, 6, 3]
    assert lt["idx"][:] == _ldam_drw_selection(np.asarray(ds["label"][:]), 0.1)
    assert lt["idx"][:] != make_long_tailed(ds, 10)["idx"][:]
    assert lt["idx"][:] != make_long_tailed(ds, 10, selection="reference", seed=1)["idx"][:]


def test_reference_selection_ignores_how_classes_are_interleaved():
    # The official code shuffles each class's own index list, so which of a class's images are kept (the
    # k-th, the j-th, ...) does not depend on where the other classes' rows sit: a copy sorted by class
    # (like the CIFAR-10 parquet beside the repository) keeps the same images as the original order.
    mixed = _interleaved(3, 20)
    by_class = mixed.select(np.argsort(mixed["label"][:], kind="stable"))

    def kept_ranks(ds: datasets.Dataset) -> list[list[int]]:
        """Per class, the positions (among that class's rows, in order) of the rows kept."""
        kept = set(make_long_tailed(ds, 5, selection="reference")["idx"][:])
        labels, ids = np.asarray(ds["label"][:]), np.asarray(ds["idx"][:])
        return [[rank for rank, idx in enumerate(ids[labels == cls]) if idx in kept] for cls in range(3)]

    assert kept_ranks(mixed) == kept_ranks(by_class)


def test_reference_selection_refuses_what_the_official_code_does_not_define():
    with pytest.raises(ValueError, match=r"balanced training set .* 3 classes with 1 to 2 rows"):
        make_long_tailed(datasets.Dataset.from_dict({"label": [0, 0, 1, 1, 2]}), 2, selection="reference")
    with pytest.raises(ValueError, match="even number of classes, got 3"):
        make_long_tailed(_balanced(3, 10), 2, profile="step", selection="reference")
    with pytest.raises(ValueError, match="unknown selection 'official'"):
        make_long_tailed(_balanced(3, 10), 2, selection="official")
    assert class_counts(make_long_tailed(_balanced(4, 100), 10, profile="step", selection="reference")) == [
        100, 100, 10, 10]


@pytest.mark.parametrize(("call", "split"), [
    (lambda ds: make_long_tailed(ds, 2), "train"),
    (lambda ds: make_shifted_test(ds, [2, 1], "forward", 2), "test"),
    (labels_array, "train"),
    (class_counts, "train"),
])
def test_dataset_dict_is_refused_naming_the_split_to_pass(call, split):
    ds = _balanced(2, 4)
    with pytest.raises(TypeError, match=rf"one split, got a DatasetDict with splits \['train', 'test'\]; "
                                        rf"pass the {split} split, e\.g\. \w+\(ds\['{split}'\], \.\.\.\)"):
        call(datasets.DatasetDict(train=ds, test=ds))
    with pytest.raises(TypeError, match=rf"pass the {split} split, e\.g\. one of \['a', 'b'\]"):
        call(datasets.DatasetDict(a=ds, b=ds))


@pytest.mark.parametrize("call", [
    lambda ds: make_long_tailed(ds, 2),
    lambda ds: make_shifted_test(ds, [2, 1], "forward", 2),
    labels_array,
    class_counts,
])
def test_streaming_dataset_is_refused_with_the_way_to_a_map_style_one(call):
    ids = _balanced(2, 4).to_iterable_dataset()
    hint = r"map-style datasets\.Dataset .* streaming=False\), or materialise .*from_generator\(ids\.__iter__"
    for streaming in (ids, datasets.IterableDatasetDict(train=ids)):
        with pytest.raises(TypeError, match=hint):
            call(streaming)
    # The suggested fix works and keeps the ClassLabel feature.
    fixed = datasets.Dataset.from_generator(ids.__iter__, features=ids.features)
    assert class_counts(fixed) == [4, 4]
    assert fixed.features["label"] == datasets.ClassLabel(num_classes=2)


CIFAR10_TRAIN = Path(os.environ.get("BALPOE_CIFAR10_DIR",
                                    Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"),
                     "train.parquet")


@pytest.mark.skipif(not CIFAR10_TRAIN.is_file(), reason=f"no CIFAR-10 copy at {CIFAR10_TRAIN}")
def test_reference_split_of_real_cifar10_train():
    labels = pq.read_table(CIFAR10_TRAIN, columns=["label"])["label"].to_numpy()
    ds = datasets.Dataset.from_dict({"label": labels, "idx": np.arange(labels.size)})
    lt = make_long_tailed(ds, 100, selection="reference")
    # CIFAR-10-LT, imbalance 100 (Cao et al. 2019): 12,406 images, 5000 down to 50 per class.
    assert len(lt) == 12_406
    assert class_counts(lt) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert lt["idx"][:] == _ldam_drw_selection(labels, 0.01)
