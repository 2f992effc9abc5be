"""Issue 12: the held-out split, the held-out calibration saved with the model, and the prior modes."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from train_synthetic import TRAIN_COUNTS, write_parquet

from balpoe_hf import BalPoEConfig, BalPoEForImageClassification, loading, recipes
from balpoe_hf.loading import DataError, holdout_sizes, holdout_split
from balpoe_hf.priors import holdout_calibration
from balpoe_hf.recipes import TrainingError

SOURCE_PRIOR = np.array([0.55, 0.25, 0.13, 0.07])


@pytest.fixture(scope="module")
def parquet(tmp_path_factory) -> tuple[Path, Path]:
    return write_parquet(tmp_path_factory.mktemp("holdout_parquet"))


def _gaussian_logits(prior, num_samples, rng, scale=1.0, class_bias=(0.0, 0.0, 0.0, 0.0)):
    """Labels from ``prior``, x ~ N(2 y, 1) and uniform-prior logits ``scale * log p(x|y) + class_bias``.

    ``scale = 1`` without bias: exactly calibrated; otherwise ``(T, b) = (scale, -class_bias / scale)`` fixes
    them (the same model as in test_prior_estimation.py).
    """
    means = 2.0 * np.arange(4)
    labels = rng.choice(4, size=num_samples, p=prior)
    x = rng.normal(means[labels], 1.0)
    log_likelihood = -0.5 * (x[:, None] - means[None, :]) ** 2
    return torch.from_numpy(scale * log_likelihood + np.asarray(class_bias)), torch.from_numpy(labels)


# --------------------------------------------------------------------------- the held-out split


def test_holdout_sizes_by_hand():
    # 0.25 * [10, 5, 2, 7] = [2.5, 1.25, 0.5, 1.75]: rounded half up [3, 1, 1, 2], at least one per class.
    assert holdout_sizes([10, 5, 2, 7], 0.25) == [3, 1, 1, 2]
    assert holdout_sizes([6000, 60], 0.1) == [600, 6]


@pytest.mark.parametrize(("counts", "fraction", "classes"), [
    ([10, 1], 0.1, r"\[1\] \(with \[1\] images\)"),  # one image cannot go to both sides
    ([10, 2], 0.75, r"\[1\] \(with \[2\] images\)"),  # 0.75 * 2 = 1.5 rounds to 2: none left to train on
])
def test_holdout_that_leaves_a_class_without_training_images_is_refused(counts, fraction, classes):
    with pytest.raises(ValueError, match=f"leaves classes {classes} without a training image"):
        holdout_sizes(counts, fraction)


def test_holdout_split_is_stratified_disjoint_and_seeded():
    labels = np.repeat([0, 1, 2], [10, 5, 2])
    ds = datasets.Dataset.from_dict({"row": np.arange(len(labels)), "label": labels})
    train, holdout = (part.to_dict() for part in holdout_split(ds, 0.25, seed=3))
    assert np.bincount(holdout["label"]).tolist() == [3, 1, 1]
    assert np.bincount(train["label"]).tolist() == [7, 4, 1]
    assert set(train["row"]).isdisjoint(holdout["row"])
    assert sorted(train["row"] + holdout["row"]) == list(range(len(labels)))
    assert holdout_split(ds, 0.25, seed=3)[1]["row"][:] == holdout["row"]
    assert any(holdout_split(ds, 0.25, seed=s)[1]["row"][:] != holdout["row"] for s in range(4, 10))


def _image_bytes(ds: datasets.Dataset, column: str) -> list[bytes]:
    return [image["bytes"] for image in ds.cast_column(column, datasets.Image(decode=False))[column]]


def test_training_data_holds_out_images_that_are_not_trained_on(parquet):
    train_file, test_file = parquet
    recipe = recipes.make_recipe({"train_file": [str(train_file)], "test_file": [str(test_file)],
                                  "image_column": "picture", "label_column": "target", "image_size": 16,
                                  "holdout_fraction": 0.25})
    data = loading.load_training_data(recipe)
    # TRAIN_COUNTS [32, 16, 8, 4] * 0.25 = [8, 4, 2, 1] held out; the model's prior is what is trained on.
    assert TRAIN_COUNTS == [32, 16, 8, 4]
    assert data.holdout_counts == [8, 4, 2, 1]
    assert data.class_counts == [24, 12, 6, 3]
    assert len(data.train) == 45 and len(data.holdout) == 15
    # Every synthetic image has its own noise: no held-out image is among the training images.
    train_images, holdout_images = _image_bytes(data.train, "picture"), _image_bytes(data.holdout, "picture")
    assert len(set(holdout_images)) == 15 and set(holdout_images).isdisjoint(train_images)
    assert set(holdout_images).isdisjoint(_image_bytes(data.test, "picture"))
    without = loading.load_training_data(recipes.make_recipe({**recipe.to_dict(), "holdout_fraction": 0.0}))
    assert without.holdout is None and without.class_counts == TRAIN_COUNTS
    assert set(_image_bytes(without.train, "picture")) == set(train_images) | set(holdout_images)


def test_holdout_errors_reach_the_user(parquet):
    train_file, test_file = parquet
    values = {"train_file": [str(train_file)], "test_file": [str(test_file)], "image_column": "picture",
              "label_column": "target"}
    with pytest.raises(DataError, match=r"classes \[3\] \(with \[4\] images\) without a training image"):
        loading.load_training_data(recipes.make_recipe({**values, "holdout_fraction": 0.9}))
    for fraction in (1.0, -0.1):
        with pytest.raises(TrainingError, match="holdout_fraction must be in"):
            recipes.make_recipe({**values, "holdout_fraction": fraction})


# --------------------------------------------------------------------------- calibration in the config


def test_holdout_calibration_recovers_a_known_miscalibration():
    # Uniform-prior logits off by a temperature 2 and a class-wise bias, on held-out data drawn from the
    # long-tailed SOURCE_PRIOR: the fit must undo the miscalibration, not the training prior.
    class_bias = np.array([2.25, 0.0, -1.5, -0.75])
    logits, labels = _gaussian_logits(SOURCE_PRIOR, 20000, np.random.default_rng(0), 2.0, class_bias)
    calibration = holdout_calibration(logits, labels)
    expected_bias = -(class_bias - class_bias.mean()) / 2.0
    # Fisher standard errors at 20000 samples are ~0.02 (T) and <= 0.04 (b); 0.1 is > 2.5 of them.
    assert calibration["temperature"] == pytest.approx(2.0, abs=0.1)
    assert calibration["bias"] == pytest.approx(expected_bias.tolist(), abs=0.1)
    counts = np.bincount(labels.numpy(), minlength=4)
    assert calibration["holdout_counts"] == counts.tolist()
    predictions = logits.argmax(1).numpy()
    assert calibration["confusion"][2][1] == int(((labels.numpy() == 2) & (predictions == 1)).sum())
    assert np.sum(calibration["confusion"], axis=1).tolist() == counts.tolist()


def test_holdout_calibration_needs_every_class():
    logits, labels = _gaussian_logits([0.5, 0.3, 0.2, 0.0], 200, np.random.default_rng(1))
    with pytest.raises(ValueError, match=r"classes \[3\] have no held-out sample"):
        holdout_calibration(logits, labels)


def _calibration() -> dict:
    return {"temperature": 1.5, "bias": [0.1, -0.2, 0.3, -0.2], "ts_temperature": 1.4,
            "holdout_counts": [5, 3, 2, 1],
            "confusion": [[4, 1, 0, 0], [0, 3, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0]]}


def _tiny_model(**overrides) -> BalPoEForImageClassification:
    torch.manual_seed(0)
    config = BalPoEConfig(backbone="resnet20_cifar", num_experts=3, class_counts=[50, 30, 20, 10],
                          image_size=8, **overrides)
    return BalPoEForImageClassification(config).eval()


def test_calibration_is_saved_and_reloaded(tmp_path):
    model = _tiny_model(calibration=_calibration())
    model.save_pretrained(tmp_path)
    loaded = BalPoEForImageClassification.from_pretrained(tmp_path)
    assert loaded.config.calibration == _calibration()
    # It is a description of the model, not a change of its logits.
    pixels = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, _tiny_model()(pixels).logits)


@pytest.mark.parametrize(("change", "message"), [
    ({"temperature": 0.0}, "calibration\\['temperature'\\] must be a positive finite number"),
    ({"bias": [0.0, 0.0]}, "calibration\\['bias'\\] must be 4 finite numbers"),
    ({"holdout_counts": [5, 3, 3, 0], "confusion": [[4, 1, 0, 0], [0, 3, 0, 0], [0, 1, 2, 0], [0, 0, 0, 0]]},
     "every class needs a held-out sample"),
    ({"confusion": [[5, 0, 0, 0], [0, 3, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]]}, "rows sum to"),
    ({"dirichlet": 3.0}, "unknown \\['dirichlet'\\]"),
])
def test_bad_calibration_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        BalPoEConfig(class_counts=[50, 30, 20, 10], calibration={**_calibration(), **change})
