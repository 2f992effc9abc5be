"""Issue 12: the held-out split, the held-out calibration saved with the model, and the prior modes."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from train_synthetic import TRAIN_COUNTS, write_parquet

from balpoe_hf import BalPoEConfig, BalPoEForImageClassification, cli, evaluation, loading, recipes, training
from balpoe_hf.checkpoints import record_outputs, written_by_package
from balpoe_hf.data import holdout_sizes, holdout_split
from balpoe_hf.errors import DataError, TrainingError
from balpoe_hf.label_shift import (
    UNKNOWN_PRIOR_METHODS,
    UNKNOWN_PRIOR_MODES,
    estimate_unknown_prior,
    holdout_calibration,
)
from balpoe_hf.shift_selection import CANDIDATES

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


def test_training_with_a_holdout_saves_its_calibration_estimator_choice_and_report(parquet, tmp_path, capsys):
    train_file, test_file = parquet
    recipe = recipes.make_recipe({"train_file": [str(train_file)], "test_file": [str(test_file)],
                                  "image_column": "picture", "label_column": "target", "image_size": 16,
                                  "holdout_fraction": 0.5, "epochs": 1, "batch_size": 8, "num_workers": 0,
                                  "eval_every": 0, "warmup_epochs": 0, "lr": 0.02, "many_threshold": 10,
                                  "few_threshold": 3})
    run = tmp_path / "run"
    training.train(recipe, run)
    holdout = json.loads((run / "holdout_results.json").read_text())
    assert holdout["holdout_samples"] == 30
    assert holdout["calibration"]["holdout_counts"] == [16, 8, 4, 2]
    # The held-out balanced accuracy is the mean recall of the confusion matrix saved with the calibration.
    confusion = np.asarray(holdout["calibration"]["confusion"], dtype=float)
    recall = np.diag(confusion) / confusion.sum(axis=1)
    assert holdout["holdout_balanced_accuracy"] == pytest.approx(recall.mean())
    evaluation_results = json.loads((run / "eval_results.json").read_text())
    assert {"eval_ece_temperature_scaling", "eval_ece_bcts"} <= set(evaluation_results)
    model = BalPoEForImageClassification.from_pretrained(run)
    assert model.config.class_counts == [16, 8, 4, 2]  # the images trained on
    assert model.config.calibration == holdout["calibration"]
    assert recipes.load_recipe(config=run / "recipe.yaml").holdout_fraction == 0.5
    choice = model.config.shift_estimator
    assert choice["name"] in CANDIDATES and choice["holdout_samples"] == 30
    assert f"label-shift estimator for 'auto': {choice['name']}" in capsys.readouterr().out

    # A run saved before the choice existed gets it from the command line, the same (seeded) one; the
    # saved files stay the run's own (the manifest follows them).
    model.config.shift_estimator = None
    model.save_pretrained(run)
    record_outputs(run, [run / "config.json"])
    assert cli.evaluate_main(["--model", str(run), "--fit-shift-estimator", "--shifts", "backward4",
                              "--prior", "none,auto", "--deployment-sizes", "16", "--deployment-draws",
                              "1"]) == 0
    printed = capsys.readouterr().out
    assert f"label-shift estimator for 'auto': {choice['name']}" in printed and "batches of 16:" in printed
    assert BalPoEForImageClassification.from_pretrained(run).config.shift_estimator == choice
    assert written_by_package(run, "config.json")


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
    return {"temperature": 1.5, "bias": [0.1, -0.2, 0.3, -0.2], "bias_std": 0.5, "ts_temperature": 1.4,
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


# --------------------------------------------------------------------------- prior estimators by name

TARGET_PRIOR = np.array([0.1, 0.2, 0.3, 0.4])
MISCALIBRATION = {"scale": 2.0, "class_bias": (2.25, 0.0, -1.5, -0.75)}


def test_named_estimators_with_the_saved_calibration_recover_a_shift_that_plain_em_misses():
    # The miscalibrated model of test_prior_estimation.py, its calibration now fitted by
    # holdout_calibration (offset: the held-out label frequencies) and used through the method names.
    rng = np.random.default_rng(0)
    calibration = holdout_calibration(*_gaussian_logits(SOURCE_PRIOR, 20000, rng, **MISCALIBRATION))
    target_logits, _ = _gaussian_logits(TARGET_PRIOR, 5000, rng, **MISCALIBRATION)
    errors = {method: np.abs(estimate_unknown_prior(target_logits, calibration, method).prior.numpy()
                             - TARGET_PRIOR).max() for method in UNKNOWN_PRIOR_METHODS}
    # Plain EM misses by > 0.1; BCTS-EM, with or without its guard, lands within ~4.5 standard errors (see
    # test_prior_estimation.py). Temperature scaling alone cannot undo a class-wise bias. BBSE only needs
    # P(prediction | label) to carry over; its sampling error is larger (hard predictions).
    assert errors["em"] > 0.1 and errors["em-ts"] > 0.1
    assert errors["em-bcts"] < 0.05 and errors["em-bcts-lrt"] < 0.05
    assert errors["bbse"] < 0.06 and errors["rlls"] < 0.06
    # Shrinkage 0.25 adds N / 4 uniform pseudo-counts: (N pi + N / 4 * u) / (5 N / 4) = 0.8 pi + 0.2 u,
    # exactly so for one-hot posteriors and close to it here.
    shrunk = 0.8 * TARGET_PRIOR + 0.2 * 0.25
    for method in ("em-bcts-map", "auto"):
        prior = estimate_unknown_prior(target_logits, calibration, method).prior.numpy()
        assert np.abs(prior - shrunk).max() < 0.05


def test_estimators_that_need_the_calibration_say_so():
    logits, _ = _gaussian_logits(TARGET_PRIOR, 100, np.random.default_rng(0))
    with pytest.raises(ValueError, match="holdout_fraction"):
        estimate_unknown_prior(logits, None, "auto")
    with pytest.raises(ValueError, match="unknown prior-estimation method 'mle'"):
        estimate_unknown_prior(logits, _calibration(), "mle")
    assert estimate_unknown_prior(logits, None, "em").prior.shape == (4,)


# --------------------------------------------------------------------------- the entry point


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calibrated_model")
    _tiny_model(calibration=_calibration()).save_pretrained(path)
    return path


def test_adapt_to_unlabeled_on_a_loaded_model_sets_the_estimated_prior(saved_model):
    model = BalPoEForImageClassification.from_pretrained(saved_model)  # the folder alone: no training data
    pixels = torch.randn(20, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        uniform = model(pixels).logits
    estimate = model.adapt_to_unlabeled(pixels, method="em-bcts", batch_size=7)
    assert estimate.prior.sum().item() == pytest.approx(1.0) and estimate.std_error.shape == (4,)
    assert model.config.target_prior == pytest.approx(estimate.prior.tolist())
    # After adaptation the model predicts with logits + log(C * prior), as the evaluation's prior modes do.
    with torch.no_grad():
        adapted = model(pixels).logits
    expected = uniform + torch.log(4 * estimate.prior).float()
    torch.testing.assert_close(adapted, expected, atol=1e-5, rtol=1e-5)
    # Batches from an iterable (a DataLoader of dicts) give the same estimate; set_prior=False leaves it.
    batches = [{"pixel_values": pixels[:12]}, {"pixel_values": pixels[12:]}]
    again = model.adapt_to_unlabeled(batches, method="em-bcts", set_prior=False)
    torch.testing.assert_close(again.prior, estimate.prior, atol=1e-6, rtol=0)
    assert model.config.target_prior == pytest.approx(estimate.prior.tolist())


@pytest.mark.parametrize(("images", "error", "message"), [
    (torch.zeros(4, 1, 8, 8), ValueError, r"shape \(batch > 0, 3, height, width\), got \(4, 1, 8, 8\)"),
    (torch.zeros(3, 8, 8), ValueError, r"got \(3, 8, 8\)"),
    (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), TypeError, "got a torch.uint8 tensor"),
    ([], ValueError, "no unlabelled images"),
    ([np.zeros((2, 3, 8, 8))], TypeError, "got ndarray"),
    ("images/*.png", TypeError, "pixel_values tensor or an iterable of batches"),
])
def test_adapt_to_unlabeled_bad_input(saved_model, images, error, message):
    model = BalPoEForImageClassification.from_pretrained(saved_model)
    with pytest.raises(error, match=message):
        model.adapt_to_unlabeled(images)
    assert model.config.target_prior is None


def test_adapt_to_unlabeled_without_calibration_points_at_holdout_fraction():
    with pytest.raises(ValueError, match="holdout_fraction > 0"):
        _tiny_model().adapt_to_unlabeled(torch.zeros(2, 3, 8, 8))


# --------------------------------------------------------------------------- evaluation modes


def test_evaluation_modes_need_the_calibration_they_use():
    assert evaluation.parse_priors("all") == ["none", "oracle", *UNKNOWN_PRIOR_MODES]
    assert evaluation.default_priors(None) == ["none", "oracle", "em"]
    assert evaluation.default_priors(_calibration()) == ["none", "oracle", "auto"]
    with pytest.raises(evaluation.EvaluationError, match=r"modes \['em-bcts', 'auto'\] need the held-out"):
        evaluation.check_calibration_for(["none", "em", "em-bcts", "auto"], None, "runs/x")
    evaluation.check_calibration_for(["none", "oracle", "em"], None, "runs/x")
