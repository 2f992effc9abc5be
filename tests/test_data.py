import time

import datasets
import numpy as np
import pytest

from balpoe_hf.data import (
    class_counts,
    make_long_tailed,
    make_shifted_test,
    shot_groups,
)
from balpoe_hf.loading import load_fashion_mnist


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


def test_fashion_mnist_from_debian_package():
    try:
        fm = load_fashion_mnist()
    except FileNotFoundError:
        pytest.skip("dataset-fashion-mnist is not installed")
    # Published sizes: 60,000 training and 10,000 test images of 28x28, 6,000 / 1,000 per class.
    assert (len(fm["train"]), len(fm["test"])) == (60_000, 10_000)
    assert class_counts(fm["train"]) == [6000] * 10
    assert fm["train"].features["label"].names[9] == "Ankle boot"
    assert fm["test"][0]["image"].size == (28, 28)
