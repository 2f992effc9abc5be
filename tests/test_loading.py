"""balpoe_hf.data.loading: where the images come from, the label and class checks, the overlap of training
and test data, and the errors that name a file that cannot be read. In-process on the tiny data set of
train_synthetic.py (tests/conftest.py ``tiny_data``).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from helpers import tiny_recipe, tiny_run_recipe
from train_synthetic import CLASS_NAMES, TEST_PER_CLASS, TRAIN_COUNTS, write_imagefolder

from balpoe_hf import (
    cli,
    recipes,
)
from balpoe_hf.data import loading
from balpoe_hf.data.splits import class_counts
from balpoe_hf.errors import TrainingError
from balpoe_hf.training import loop as training

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- labels, classes, files


def _write(path: Path, images: list, labels: list, feature: datasets.features.FeatureType) -> Path:
    features = datasets.Features({"picture": datasets.Image(), "target": feature})
    datasets.Dataset.from_dict({"picture": images, "target": labels}, features=features).to_parquet(path)
    return path


def _plain_parquet(source: Path, target: Path, relabel=lambda labels: labels) -> Path:
    """``source`` with its labels as plain integers (no ClassLabel), transformed by ``relabel``."""
    ds = datasets.load_dataset("parquet", data_files=str(source), split="train")
    labels = relabel(np.asarray(ds["target"])).tolist()
    return _write(target, list(ds["picture"]), labels, datasets.Value("int64"))


def _reordered(test_file: Path, target: Path, names: list[str]) -> Path:
    """The test set with its ClassLabel listing ``names`` (the same classes in another order)."""
    ds = datasets.load_dataset("parquet", data_files=str(test_file), split="train")
    old = ds.features["target"].names
    labels = [names.index(old[label]) for label in ds["target"]]
    return _write(target, list(ds["picture"]), labels, datasets.ClassLabel(names=names))


def test_test_set_with_classes_in_another_order_gives_the_same_metrics_everywhere(tiny_run, tiny_data,
                                                                                  tmp_path, capsys):
    order = ["blue", "yellow", "red", "green"]
    reordered = _reordered(tiny_data[1], tmp_path / "test.parquet", order)
    raw = np.asarray(datasets.load_dataset("parquet", data_files=str(reordered), split="train")["target"])
    assert (raw != np.repeat(np.arange(4), TEST_PER_CLASS)).mean() == 1.0  # every raw index differs

    # Training-time evaluation (eval_results.json), the same weights: the same numbers (the shared run's
    # recipe; its step checkpoints change nothing of what it learns).
    other = training.train(tiny_run_recipe(tiny_data, test_file=[str(reordered)], checkpoint_every_steps=0),
                           tmp_path / "run")
    expected = json.loads((tiny_run / "eval_results.json").read_text())
    assert expected["eval_balanced_accuracy"] > 0.5  # trained: a wrong label order would show
    assert json.loads((tmp_path / "run" / "eval_results.json").read_text()) == expected
    assert other.eval_report["balanced_accuracy"] == expected["eval_balanced_accuracy"]

    # balpoe-evaluate on the reordered file agrees with both.
    argv = ["--model", str(tiny_run), "--test-file", str(reordered), "--shifts", "uniform", "--prior", "none",
            "--output", str(tmp_path / "report.json"), "--device", "cpu"]
    assert cli.evaluate_main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())["balanced"]
    for key in ("accuracy", "balanced_accuracy", "nll"):
        assert report[key] == pytest.approx(expected[f"eval_{key}"], abs=1e-6), key
    capsys.readouterr()


def test_test_set_naming_a_class_the_training_data_lacks_is_refused(tiny_data, tmp_path):
    reordered = _reordered(tiny_data[1], tmp_path / "test.parquet", ["red", "green", "blue", "yellow"])
    ds = datasets.load_dataset("parquet", data_files=str(reordered), split="train")
    renamed = _write(tmp_path / "renamed.parquet", list(ds["picture"]), ds["target"],
                     datasets.ClassLabel(names=["red", "green", "blue", "purple"]))
    with pytest.raises(loading.DataError, match=r"test classes \['purple'\] are not classes of the model"):
        loading.load_training_data(tiny_recipe(tiny_data, test_file=[str(renamed)]))


def test_out_of_range_integer_labels_do_not_become_extra_classes(tiny_data, tmp_path):
    # Plain integer labels, 10 added to a few training labels (a typo, an offset): not a 14-class model.
    train = _plain_parquet(tiny_data[0], tmp_path / "train.parquet",
                           lambda labels: np.where(np.arange(len(labels)) % 7 == 0, labels + 10, labels))
    test = _plain_parquet(tiny_data[1], tmp_path / "test.parquet")
    recipe = tiny_recipe((train, test))
    with pytest.raises(loading.DataError, match=r"class count comes from the largest label, but the training "
                                                r"labels go up to 13 and the test labels up to 3"):
        loading.load_training_data(recipe)
    # With --num-classes the out-of-range labels are named.
    with pytest.raises(loading.DataError, match=r"train split has labels \[10, 11, 12, 13\] outside the "
                                                r"class range \[0, 3\]"):
        loading.load_training_data(tiny_recipe((train, test), num_classes=4))


def test_a_class_without_training_images_is_refused_saying_where_the_count_comes_from(tiny_data, tmp_path):
    # Class 2 relabelled as class 1: labels 0, 1, 3 and a gap at 2.
    train = _plain_parquet(tiny_data[0], tmp_path / "train.parquet",
                           lambda labels: np.where(labels == 2, 1, labels))
    test = _plain_parquet(tiny_data[1], tmp_path / "test.parquet")
    with pytest.raises(loading.DataError, match=r"classes \[2\] have no training image, but the model "
                                                r"would have 4 classes \(inferred from the largest label"):
        loading.load_training_data(tiny_recipe((train, test)))
    good = _plain_parquet(tiny_data[0], tmp_path / "good.parquet")
    loaded = loading.load_training_data(tiny_recipe((good, test)))
    assert loaded.class_counts == TRAIN_COUNTS
    assert loaded.class_count_source.startswith("inferred from the largest label")


def test_class_count_mismatch_is_one_line_naming_the_count_and_the_flag(tiny_data):
    # Four classes in the files, a 1,000-class recipe: 996 empty classes, listed as first few, last, count.
    with pytest.raises(loading.DataError) as error:
        loading.load_training_data(tiny_recipe(tiny_data, num_classes=1000, imbalance_ratio=10.0))
    assert str(error.value) == (
        "classes [4, 5, 6, 7, 8, ..., 999] (996 classes) have no training image, but the model would have "
        "1000 classes (set by num_classes: the recipe's or --num-classes); BalPoE needs every class in the "
        "training prior. The data hold classes 0 to 3: set --num-classes 4.")
    from balpoe_hf.errors import short_list

    assert short_list([3, 1, 2]) == "[3, 1, 2]"
    assert short_list(range(10, 20), "files") == "[10, 11, 12, 13, 14, ..., 19] (10 files)"


def test_overlapping_training_and_test_data_are_refused(tiny_data, tmp_path):
    train_file = tiny_data[0]
    message = "overlap: the model would be evaluated on images it was trained on"
    with pytest.raises(loading.DataError, match=message):
        loading.load_training_data(tiny_recipe(tiny_data, test_file=[str(train_file)]))
    with pytest.raises(loading.DataError, match=message):  # a glob that takes the test file too
        loading.load_training_data(tiny_recipe(tiny_data, train_file=[str(train_file.parent / "*.parquet")]))
    train_dir, _ = write_imagefolder(tmp_path)
    with pytest.raises(loading.DataError, match=message):  # a test folder inside the training folder
        loading.load_training_data(tiny_recipe(tiny_data, train_file=[str(train_dir)],
                                           test_file=[str(train_dir / "red")]))
    hub_recipe = recipes.make_recipe({"dataset": "me/data", "train_split": "train", "test_split": "train"})
    with pytest.raises(loading.DataError, match="train_split and test_split are both 'train'"):
        loading.load_training_data(hub_recipe)


def test_data_files_that_cannot_be_read_are_named(tiny_data, tmp_path):
    (tmp_path / "empty" / "red").mkdir(parents=True)
    (tmp_path / "other" / "red").mkdir(parents=True)
    with pytest.raises(loading.DataError, match=r"no images found in .*an imagefolder directory holds one"):
        loading.load_training_data(tiny_recipe(tiny_data, train_file=[str(tmp_path / "empty")],
                                           test_file=[str(tmp_path / "other")]))
    csv = tmp_path / "train.csv"
    csv.write_text("picture,target\nimg.png,1\n")
    with pytest.raises(loading.DataError, match=r"train\.csv is not a readable parquet file .*a CSV"):
        loading.load_training_data(tiny_recipe(tiny_data, train_file=[str(csv)]))
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(tiny_data[0].read_bytes()[:5000])
    with pytest.raises(loading.DataError, match=r"truncated\.parquet is not a readable parquet file"):
        loading.load_training_data(tiny_recipe(tiny_data, train_file=[str(truncated)]))
    with pytest.raises(TrainingError, match="image_column and label_column are both 'target'"):
        tiny_recipe(tiny_data, image_column="target")


def test_empty_parquet_file_is_named(tiny_data, tmp_path):
    empty = tmp_path / "empty.parquet"
    datasets.load_dataset("parquet", data_files=str(tiny_data[0]), split="train").select([]).to_parquet(empty)
    with pytest.raises(loading.DataError, match=r"empty\.parquet is a parquet file without rows"):
        loading.load_training_data(tiny_recipe(tiny_data, train_file=[str(empty)]))


# --------------------------------------------------------------------------- sources


def test_parquet_data_keeps_counts_and_class_names(tiny_data):
    data = loading.load_training_data(tiny_recipe(tiny_data))
    assert data.class_counts == TRAIN_COUNTS and data.class_names == CLASS_NAMES
    assert len(data.test) == TEST_PER_CLASS * len(CLASS_NAMES)


def test_long_tailed_split_of_a_balanced_set(tiny_data, tmp_path):
    # A copy of the balanced test file as training data (the file itself would overlap the test data),
    # ratio 4: class i keeps int(8 * 4 ** (-i / 3)) images.
    balanced = tmp_path / "balanced.parquet"
    balanced.write_bytes(tiny_data[1].read_bytes())
    recipe = tiny_recipe(tiny_data, train_file=[str(balanced)], imbalance_ratio=4.0)
    assert loading.load_training_data(recipe).class_counts == [8, 5, 3, 2]


def test_imagefolder_data(tmp_path):
    train, test = write_imagefolder(tmp_path)
    recipe = recipes.make_recipe({"train_file": [str(train)], "test_file": [str(test)]})
    data = loading.load_training_data(recipe)
    # imagefolder labels the sub-folders in sorted order: blue, green, red, yellow.
    assert data.class_names == sorted(CLASS_NAMES)
    assert data.class_counts == [8, 16, 32, 4]


def test_fashion_mnist_lt_from_the_debian_files():
    recipe = recipes.make_recipe(recipes.recipe_values("fashion-mnist-lt-quick"))
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        pytest.skip("dataset-fashion-mnist is not installed")
    data = loading.load_training_data(recipe)
    # Published sizes: 60,000 training images, 6,000 per class (the head class keeps them all at IR100) and
    # 10,000 test images of 28x28, 1,000 per class.
    assert len(data.test) == 10_000 and data.test[0]["image"].size == (28, 28)
    # Pixels as stored: the last test image is the IDX file's last 784 bytes (a header, then the rows).
    with gzip.open("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz") as handle:
        last = np.frombuffer(handle.read()[-28 * 28:], dtype=np.uint8).reshape(28, 28)
    np.testing.assert_array_equal(np.asarray(data.test[9_999]["image"]), last)
    assert class_counts(data.test) == [1000] * 10
    # The long-tailed split's 14,886 images, a tenth of every class held out (recipe holdout_fraction 0.1,
    # rounded: 600, 360, 216, 129, 77, 46, 28, 17, 10, 6).
    assert len(data.train) + len(data.holdout) == 14_886
    assert data.holdout_counts == [600, 360, 216, 129, 77, 46, 28, 17, 10, 6]
    assert data.class_counts == [5400, 3236, 1940, 1163, 697, 418, 250, 149, 90, 54]
    # Zalando's names (its README), not the Hub copy's "T - shirt / top".
    assert data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot"


def test_missing_columns_and_labels_out_of_range_are_explained(tiny_data, tmp_path):
    with pytest.raises(TrainingError, match=r"no image column 'img'.*--image-column"):
        loading.load_training_data(tiny_recipe(tiny_data, image_column="img"))
    with pytest.raises(TrainingError, match=r"labels \[3\] outside the class range \[0, 2\]"):
        loading.load_training_data(tiny_recipe(tiny_data, num_classes=3))
    recipe = tiny_recipe((tiny_data[0], tmp_path / "missing.parquet"))
    with pytest.raises(TrainingError, match=r"missing\.parquet' matches no file"):
        loading.load_training_data(recipe)


def test_hub_dataset_while_offline_points_at_local_files(monkeypatch):
    import huggingface_hub.constants

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'uoft-cs/cifar100' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    recipe = recipes.make_recipe(recipes.recipe_values("cifar100-lt-ir100"))
    with pytest.raises(TrainingError, match=r"offline mode is on.*--train-file/--test-file"):
        loading.load_training_data(recipe)


def test_recipe_without_data_asks_for_files():
    recipe = recipes.make_recipe(recipes.recipe_values("cifar10-lt-local"))
    with pytest.raises(TrainingError, match="names no data: pass --train-file and --test-file"):
        loading.load_training_data(recipe)
