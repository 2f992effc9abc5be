"""The held-out split, the held-out calibration saved with the model, the unknown-prior estimate (``auto``
and the named modes) on synthetic data with a known truth, streams of batches, and older model folders."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from helpers import gaussian_logits, tiny_recipe
from train_synthetic import TRAIN_COUNTS

from balpoe_hf import BalPoEConfig, BalPoEForImageClassification, cli, recipes
from balpoe_hf.data import loading
from balpoe_hf.data.splits import holdout_sizes, holdout_split
from balpoe_hf.errors import DataError, EvaluationError, TrainingError
from balpoe_hf.evaluation import evaluate as evaluation
from balpoe_hf.evaluation import upgrade
from balpoe_hf.models.balpoe.holdout_statistics import holdout_calibration
from balpoe_hf.models.balpoe.label_shift import (
    PRIOR_ESTIMATORS,
    PriorStream,
    ShiftEstimator,
    estimate_prior,
    resolve_estimator,
)
from balpoe_hf.run_folder import written_by_package
from balpoe_hf.training import loop as training

SOURCE_PRIOR = np.array([0.55, 0.25, 0.13, 0.07])


def _gaussian_logits(prior, num_samples, rng, scale=1.0, class_bias=(0.0, 0.0, 0.0, 0.0)):
    """Labels from ``prior``, x ~ N(2 y, 1) and uniform-prior logits ``scale * log p(x|y) + class_bias``.

    ``scale = 1`` without bias: exactly calibrated; otherwise ``(T, b) = (scale, -class_bias / scale)`` fixes
    them (the same model as in test_prior_estimators.py: tests/helpers.py ``gaussian_logits``).
    """
    return gaussian_logits(prior, num_samples, rng, 2.0 * np.arange(4), scale, class_bias)


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


def test_training_data_holds_out_images_that_are_not_trained_on(tiny_data):
    recipe = tiny_recipe(tiny_data, holdout_fraction=0.25)
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


def test_holdout_errors_reach_the_user(tiny_data):
    train_file, test_file = tiny_data
    values = {"train_file": [str(train_file)], "test_file": [str(test_file)], "image_column": "picture",
              "label_column": "target"}
    with pytest.raises(DataError, match=r"classes \[3\] \(with \[4\] images\) without a training image"):
        loading.load_training_data(recipes.make_recipe({**values, "holdout_fraction": 0.9}))
    for fraction in (1.0, -0.1):
        with pytest.raises(TrainingError, match="holdout_fraction must be in"):
            recipes.make_recipe({**values, "holdout_fraction": fraction})


def test_training_with_a_holdout_saves_its_calibration_and_report(tiny_data, tmp_path, capsys):
    recipe = tiny_recipe(tiny_data, holdout_fraction=0.5, epochs=1, lr=0.02, many_threshold=10,
                         few_threshold=3)
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
    assert model.config.shift_estimator is None  # auto runs the package's default
    assert recipes.load_recipe(config=run / "recipe.yaml").holdout_fraction == 0.5
    assert "'auto' adapts from" in capsys.readouterr().out

    # The run as an earlier release saved it: its own per-model choice in the config, a calibration
    # without the biases' covariance, no manifest. --upgrade calibrates it again on the rebuilt held-out
    # split (the same calibration training fitted), drops the old choice and adopts the folder.
    legacy = json.loads((run / "config.json").read_text())
    legacy["shift_estimator"] = LEGACY_CHOICE
    for key in ("bias_se", "bias_cov_factor"):
        legacy["calibration"].pop(key)
    (run / "config.json").write_text(json.dumps(legacy))
    (run / "balpoe_outputs.json").unlink()
    assert cli.evaluate_main(["--model", str(run), "--upgrade", "--shifts", "backward4",
                              "--prior", "none,auto", "--deployment-sizes", "16", "--deployment-draws",
                              "1"]) == 0
    printed = capsys.readouterr().out
    assert "calibrated again on its held-out split" in printed and "'rlls-gain' dropped" in printed
    assert "batches of 16:" in printed
    upgraded = BalPoEForImageClassification.from_pretrained(run).config
    assert upgraded.shift_estimator is None
    assert upgraded.calibration.keys() == holdout["calibration"].keys()
    for key, value in holdout["calibration"].items():  # the held-out logits again, through the evaluation
        assert np.allclose(np.asarray(upgraded.calibration[key], dtype=float), np.asarray(value, dtype=float),
                           rtol=1e-4, atol=1e-6), key
    assert written_by_package(run, "config.json") and written_by_package(run, "label_shift.py")


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


# --------------------------------------------------------------------------- the estimate, by name

TARGET_PRIOR = np.array([0.1, 0.2, 0.3, 0.4])
MISCALIBRATION = {"scale": 2.0, "class_bias": (2.25, 0.0, -1.5, -0.75)}
UNIFORM = [0.25] * 4
# config.shift_estimator as the previous release wrote it: its per-model choice on a Fashion-MNIST-LT model.
LEGACY_CHOICE = {
    "holdout_samples": 1489, "name": "rlls-gain",
    "rule": ("harm within the simulation's error of the least; then the first to recover >= 0.1 of the "
             "oracle's simulated gain in the order em-bcts-gain, rlls-gain, bbse-gain, em-gain; else the "
             "safest"),
    "settings": {"alpha": 0.05, "calibration": "confusion", "gain_quantile": 0.75, "guard": "gain",
                 "method": "rlls", "shrinkage": 0.1},
    "simulation": {
        "bbse-gain": {"harm": -0.07, "mean": -0.03482, "recovered": -0.96262, "worst": -0.07},
        "em-bcts-gain": {"harm": -0.023, "mean": 0.00033, "recovered": -0.03011, "worst": -0.023},
        "em-gain": {"harm": -0.03167, "mean": -0.00245, "recovered": 0.21184, "worst": -0.0325},
        "oracle": {"harm": 0.0, "mean": 0.01343, "recovered": 1.0, "worst": -0.00175},
        "rlls-gain": {"harm": -0.02, "mean": 0.00163, "recovered": -0.00519, "worst": -0.02}}}


def _total_variation(a, b) -> float:
    return 0.5 * float(np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).sum())


def test_named_estimators_with_the_saved_calibration_recover_a_shift_that_plain_em_misses():
    # A model off by a temperature 2 and class-wise biases; its calibration fitted by holdout_calibration
    # (offset: the held-out label frequencies) on 20000 held-out images.
    rng = np.random.default_rng(0)
    calibration = holdout_calibration(*_gaussian_logits(SOURCE_PRIOR, 20000, rng, **MISCALIBRATION))
    target_logits, _ = _gaussian_logits(TARGET_PRIOR, 5000, rng, **MISCALIBRATION)
    errors = {method: np.abs(estimate_prior(target_logits, calibration, method).estimate.numpy()
                             - TARGET_PRIOR).max() for method in PRIOR_ESTIMATORS}
    # Plain EM misses by > 0.1; EM after BCTS lands within ~4.5 EM standard errors (0.011 a class at 5000
    # images). BBSE and RLLS only need P(prediction | label) to carry over; their error is larger (hard
    # predictions). auto uses the BCTS calibration too.
    assert errors["em"] > 0.1
    assert errors["em-bcts"] < 0.05 and errors["auto"] < 0.05
    assert errors["bbse"] < 0.06 and errors["rlls"] < 0.06
    # auto predicts with the shrunk estimate tempered by T (argmax(z / T + log pi) = argmax(z + T log pi)):
    # its prior lies between uniform and TARGET_PRIOR ** T (normalised), in the same order, and nearer to
    # the latter (the shift's log-spread, 0.5, is large against the errors, about 0.3 a class).
    auto = estimate_prior(target_logits, calibration)
    tempered = TARGET_PRIOR ** calibration["temperature"] / (TARGET_PRIOR ** calibration["temperature"]).sum()
    assert not auto.kept_uniform and np.argsort(auto.prior.numpy()).tolist() == [0, 1, 2, 3]
    assert np.abs(auto.prior.numpy() - tempered).sum() < np.abs(0.25 - tempered).sum() / 2


def test_estimators_that_need_the_calibration_say_so_and_auto_does_not():
    logits, _ = _gaussian_logits(TARGET_PRIOR, 400, np.random.default_rng(0))
    for method in ("em-bcts", "bbse", "rlls"):
        with pytest.raises(ValueError, match="holdout_fraction"):
            estimate_prior(logits, None, method)
    with pytest.raises(ValueError, match="unknown prior-estimation method 'mle'"):
        estimate_prior(logits, _calibration(), "mle")
    # Without a calibration auto adapts from the raw posteriors, with the assumed calibration error.
    estimate = estimate_prior(logits, None)
    assert estimate.details["calibration"] == "none" and not estimate.kept_uniform
    assert estimate.log_prior_se.min().item() >= PRIOR_ESTIMATORS["auto"].calibration_error


@pytest.mark.parametrize("num_images", [100, 300, 1000])
@pytest.mark.parametrize("calibrated", [False, True], ids=["no calibration", "held-out calibration"])
def test_unshifted_images_leave_the_prior_within_noise_of_uniform(num_images, calibrated):
    # Exactly calibrated logits on balanced images: the true prior is uniform. The label frequencies of a
    # batch differ from uniform by sampling noise alone; auto must stay well inside that noise, where plain
    # EM follows it (30 seeded batches; measured: auto's mean distance is at most a quarter of the noise).
    calibration = holdout_calibration(*_gaussian_logits(SOURCE_PRIOR, 2000, np.random.default_rng(0))) if (
        calibrated) else None
    auto, em, noise = [], [], []
    for seed in range(30):
        logits, labels = _gaussian_logits(UNIFORM, num_images, np.random.default_rng(100 + seed))
        auto.append(_total_variation(estimate_prior(logits, calibration).prior, UNIFORM))
        em.append(_total_variation(estimate_prior(logits, calibration, "em").prior, UNIFORM))
        noise.append(_total_variation(np.bincount(labels.numpy(), minlength=4) / num_images, UNIFORM))
    assert np.mean(auto) < np.mean(noise) / 2 < np.mean(em)


def test_a_stream_of_batches_converges_and_a_drifting_one_is_followed():
    calibration = holdout_calibration(*_gaussian_logits(SOURCE_PRIOR, 2000, np.random.default_rng(0)))
    # Stationary: the estimate's sampling error falls like 1 / sqrt(images): after ten batches of 300 it is
    # about a third of what one batch gives (20 streams; measured 0.073 -> 0.015 in total variation). The
    # prior predicted with is the estimate shrunk by its errors, calibration's included, which do not
    # vanish with the images: it ends well inside the distance from uniform to the truth (0.2; measured
    # 0.058), and nearer than after one batch.
    first, tenth, prior = [], [], []
    for seed in range(20):
        stream, rng = PriorStream(), np.random.default_rng(200 + seed)
        for batch in range(10):
            stream.add(_gaussian_logits(TARGET_PRIOR, 300, rng)[0])
            estimate = estimate_prior(stream.logits, calibration, weights=stream.weights)
            if batch == 0:
                first.append(_total_variation(estimate.estimate, TARGET_PRIOR))
        tenth.append(_total_variation(estimate.estimate, TARGET_PRIOR))
        prior.append(_total_variation(estimate.prior, TARGET_PRIOR))
    assert np.mean(tenth) < np.mean(first) / 2.5
    assert np.mean(prior) < _total_variation(UNIFORM, TARGET_PRIOR) / 3
    # Drift: five batches from one prior, then five from its reverse, forgetting 0.5 a batch. Right after the
    # switch the prior is still near the old one (0.3 from the new); five batches later it is within a third
    # of uniform's distance to the new one (0.3; measured 0.069).
    old, new = SOURCE_PRIOR, SOURCE_PRIOR[::-1]
    after_switch, five_later = [], []
    for seed in range(20):
        stream, rng = PriorStream(0.5), np.random.default_rng(300 + seed)
        for batch in range(10):
            stream.add(_gaussian_logits(old if batch < 5 else new, 300, rng)[0])
            error = _total_variation(estimate_prior(stream.logits, calibration, weights=stream.weights).prior,
                                     new)
            if batch == 5:
                after_switch.append(error)
        five_later.append(error)
    assert np.mean(after_switch) > 0.2 and np.mean(five_later) < _total_variation(UNIFORM, new) / 3


def test_prior_stream_weights_by_hand():
    stream = PriorStream(0.5, max_images=5)
    for size in (2, 2, 2):
        stream.add(torch.zeros(size, 3))
    # Weights 0.25, 0.25 | 0.5, 0.5 | 1, 1; the oldest image beyond max_images=5 is dropped.
    assert stream.weights.tolist() == [0.25, 0.5, 0.5, 1.0, 1.0] and stream.batches == 3
    stream = PriorStream(0.1, min_weight=0.05)
    stream.add(torch.zeros(1, 3))
    stream.add(torch.zeros(1, 3))
    stream.add(torch.zeros(1, 3))  # the first image now weighs 0.01 < 0.05: dropped
    assert stream.weights.tolist() == pytest.approx([0.1, 1.0])
    both = PriorStream(0.1, max_images=4, min_weight=0.05)
    for _ in range(4):
        both.add(torch.zeros(3, 3))
    # Weights 0.01 x3 (below min_weight) | 0.1 x3 | 1 x3 (the first batch went earlier): the four newest.
    assert both.weights.tolist() == pytest.approx([0.1, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="3 classes, got a batch over 4"):
        stream.add(torch.zeros(1, 4))
    stream.reset()
    assert stream.logits is None and stream.batches == 0
    for bad in (0.0, 1.5, True):
        with pytest.raises(ValueError, match="forgetting must lie in"):
            PriorStream(bad)


def test_too_few_images_keep_the_uniform_prior_with_a_warning():
    with pytest.warns(UserWarning, match="3 unlabelled images for 4 classes"):
        estimate = estimate_prior(torch.randn(3, 4, dtype=torch.float64), None)
    assert estimate.kept_uniform and estimate.prior.tolist() == UNIFORM


@pytest.mark.parametrize(("values", "message"), [
    ({"method": "mle"}, "method must be one of"),
    ({"method": "bbse"}, "bbse and rlls read the confusion matrix"),
    ({"method": "bbse", "calibration": "confusion"}, "shrinkage needs EM's covariance"),
    ({"pseudo_count": -1.0}, "pseudo_count must be a finite number >= 0"),
    ({"calibration_error": float("nan")}, "calibration_error"),
    ({"scale_by_temperature": "yes"}, "scale_by_temperature must be true or false"),
])
def test_bad_estimator_settings_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        ShiftEstimator(**values)


def test_temperature_scaling_applies_without_shrinkage_too():
    # argmax(z / T + log pi) = argmax(z + T log pi): with T = 1.5 the prior added is pi^1.5, renormalised.
    logits = torch.randn(400, 4, generator=torch.Generator().manual_seed(0)) * 3
    plain, scaled = (estimate_prior(logits, _calibration(), ShiftEstimator(
        calibration="bcts", shrinkage="none", scale_by_temperature=scale)) for scale in (False, True))
    assert torch.equal(plain.estimate, scaled.estimate)
    expected = plain.estimate ** 1.5
    torch.testing.assert_close(scaled.prior, expected / expected.sum())


def test_custom_settings_in_the_config_run_as_auto_and_a_legacy_choice_is_ignored():
    calibration = holdout_calibration(*_gaussian_logits(SOURCE_PRIOR, 2000, np.random.default_rng(0)))
    logits, _ = _gaussian_logits(TARGET_PRIOR, 1000, np.random.default_rng(1))
    custom = ShiftEstimator(shrinkage="none")
    assert resolve_estimator("auto", {"settings": custom.to_dict()}) == ("auto (custom)", custom)
    assert resolve_estimator("auto", LEGACY_CHOICE) == ("auto", PRIOR_ESTIMATORS["auto"])
    legacy = estimate_prior(logits, calibration, shift_estimator=LEGACY_CHOICE)
    default = estimate_prior(logits, calibration, ShiftEstimator())
    assert torch.equal(legacy.prior, default.prior)
    # A config of the previous release (its choice recorded) loads; a malformed record does not.
    assert BalPoEConfig(class_counts=[5, 3, 2, 1], calibration=_calibration(),
                        shift_estimator=LEGACY_CHOICE).shift_estimator == LEGACY_CHOICE
    with pytest.raises(ValueError, match="shift_estimator must be None or"):
        BalPoEConfig(class_counts=[5, 3, 2, 1], shift_estimator={"settings": {}, "extra": 1})


def test_prior_estimate_to_dict_is_plain():
    logits, _ = _gaussian_logits(TARGET_PRIOR, 400, np.random.default_rng(0))
    data = estimate_prior(logits, None).to_dict()
    assert json.loads(json.dumps(data)) == data
    assert set(data) == {"prior", "estimate", "log_prior_se", "shift_spread", "kept_uniform", "images",
                         "method", "converged", "details"}


# --------------------------------------------------------------------------- the model's entry point


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
    assert estimate.prior.sum().item() == pytest.approx(1.0)
    assert model.config.target_prior == pytest.approx(estimate.prior.tolist())
    # After adaptation the model predicts with logits + log(C * prior), as the evaluation's prior modes do.
    with torch.no_grad():
        adapted = model(pixels).logits
    expected = uniform + torch.log(4 * estimate.prior).float()
    torch.testing.assert_close(adapted, expected, atol=1e-5, rtol=1e-5)
    # Batches from an iterable (a DataLoader of dicts) give the same estimate; set_prior=False leaves it;
    # the same estimate comes from the logits through estimate_prior.
    batches = [{"pixel_values": pixels[:12]}, {"pixel_values": pixels[12:]}]
    again = model.adapt_to_unlabeled(batches, method="em-bcts", set_prior=False)
    torch.testing.assert_close(again.prior, estimate.prior, atol=1e-6, rtol=0)
    from_logits = estimate_prior(uniform.double(), model.config.calibration, "em-bcts")
    torch.testing.assert_close(from_logits.prior, estimate.prior, atol=1e-6, rtol=0)
    assert model.config.target_prior == pytest.approx(estimate.prior.tolist())


def test_adapt_to_unlabeled_with_a_stream_rests_on_every_batch(saved_model):
    model = BalPoEForImageClassification.from_pretrained(saved_model)
    pixels = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    stream = PriorStream()
    model.adapt_to_unlabeled(pixels[:20], stream=stream, method="em")
    streamed = model.adapt_to_unlabeled(pixels[20:], stream=stream, method="em")
    at_once = model.adapt_to_unlabeled(pixels, method="em", set_prior=False)
    assert stream.batches == 2 and len(stream.logits) == 40 and streamed.images == pytest.approx(40)
    torch.testing.assert_close(streamed.prior, at_once.prior, atol=1e-6, rtol=0)


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


def test_adapt_to_unlabeled_without_calibration_runs_auto_and_names_holdout_for_the_others():
    model = _tiny_model()
    with pytest.warns(UserWarning, match="uncalibrated evidence") as caught:
        estimate = model.adapt_to_unlabeled(torch.randn(8, 3, 8, 8,
                                                        generator=torch.Generator().manual_seed(2)))
    assert caught[0].filename == __file__  # the caller's line, not torch's wrapper
    assert estimate.details["calibration"] == "none"
    with pytest.raises(ValueError, match="holdout_fraction > 0"):
        model.adapt_to_unlabeled(torch.zeros(8, 3, 8, 8), method="em-bcts")


def _model_predicting(bias: list[float], **overrides) -> BalPoEForImageClassification:
    """A tiny model whose experts all give the logits ``bias`` on any image (linear classifiers, zero
    weights); lambdas 1 / 0 / -1 average to 0, so ``bias`` is also its uniform-prior logits."""
    model = _tiny_model(classifier="linear", **overrides)
    with torch.no_grad():
        for expert in model.balpoe.experts:
            expert.classifier.weight.zero_()
            expert.classifier.bias.copy_(torch.tensor(bias))
    return model


def test_auto_warns_when_it_moves_the_prior_of_a_model_without_calibration():
    images = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    confident = _model_predicting([4.0, 0.0, 0.0, 0.0])  # every image 95 % class 0: EM moves the prior
    with pytest.warns(UserWarning, match=r"moved on uncalibrated evidence.*--holdout-fraction 0\.1"):
        estimate = confident.adapt_to_unlabeled(images)
    assert estimate.prior[0] > 0.5 and estimate.details["calibration"] == "none"
    assert estimate.details["no_holdout"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        confident.adapt_to_unlabeled(images, method="em")  # raw posteriors asked for by name
        # Uniform posteriors: the prior stays uniform and nothing is said.
        assert _model_predicting([0.0, 0.0, 0.0, 0.0]).adapt_to_unlabeled(images).kept_uniform
        # With a held-out calibration the estimate rests on it.
        calibrated = _model_predicting([4.0, 0.0, 0.0, 0.0], calibration=_calibration())
        assert calibrated.adapt_to_unlabeled(images).details["calibration"] == "bcts"
        assert "no_holdout" not in calibrated.adapt_to_unlabeled(images).details
        assert "no_holdout" not in confident.adapt_to_unlabeled(images, method="em").details


# --------------------------------------------------------------------------- evaluation modes


def test_evaluation_modes_are_the_estimators_and_say_which_need_the_calibration():
    every = ["none", "oracle", "auto", "em", "em-bcts", "bbse", "rlls"]
    assert evaluation.parse_priors("all", _calibration()) == every
    # A model without a held-out calibration: "all" is every mode it can run.
    assert evaluation.parse_priors("all") == ["none", "oracle", "auto", "em"]
    assert evaluation.default_priors() == ["none", "oracle", "auto"]
    with pytest.raises(EvaluationError, match=r"modes \['em-bcts', 'bbse'\] need the held-out"):
        evaluation.check_calibration_for(["none", "auto", "em", "em-bcts", "bbse"], None, "runs/x")
    evaluation.check_calibration_for(["none", "oracle", "auto", "em"], None, "runs/x")


# --------------------------------------------------------------------------- older model folders


def _legacy_folder(root: Path, extra: str | None = None) -> Path:
    """A model folder as the previous release saved it: its choice in the config, no manifest."""
    folder = root / "legacy"
    _tiny_model(calibration=_calibration()).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "shift_estimator": LEGACY_CHOICE}))
    if extra:
        (folder / extra).write_text("the user's notes")
    return folder


def test_upgrade_in_place_drops_the_legacy_choice_and_adopts_the_folder(tmp_path):
    folder = _legacy_folder(tmp_path)
    done = upgrade.upgrade_model(folder)
    assert done == {"folder": str(folder), "recalibrated": False, "dropped_choice": "rlls-gain",
                    "auto": done["auto"]} and done["auto"].startswith("'auto' adapts from")
    config = json.loads((folder / "config.json").read_text())
    assert "shift_estimator" not in config or config["shift_estimator"] is None
    assert config["calibration"] == _calibration()  # no recipe.yaml: nothing to calibrate again on
    assert written_by_package(folder, "config.json") and written_by_package(folder, "shrinkage.py")


def test_upgrade_of_a_folder_with_other_files_goes_into_a_new_folder(tmp_path):
    folder = _legacy_folder(tmp_path, extra="notes.txt")
    with pytest.raises(EvaluationError, match=r"holds \['notes\.txt'\], which balpoe-hf did not"):
        upgrade.upgrade_model(folder)
    assert json.loads((folder / "config.json").read_text())["shift_estimator"] == LEGACY_CHOICE
    done = upgrade.upgrade_model(folder, tmp_path / "upgraded")
    upgraded = tmp_path / "upgraded"
    assert done["folder"] == str(upgraded) and not (upgraded / "notes.txt").exists()
    model = BalPoEForImageClassification.from_pretrained(upgraded)
    assert model.config.shift_estimator is None and model.config.calibration == _calibration()
    assert (upgraded / "preprocessor_config.json").is_file() and written_by_package(upgraded, "config.json")
    # The weights are the legacy folder's.
    original = BalPoEForImageClassification.from_pretrained(folder)
    for (name, value), (_, other) in zip(original.state_dict().items(), model.state_dict().items(),
                                         strict=True):
        assert torch.equal(value, other), name
    with pytest.raises(EvaluationError, match="not an empty folder"):
        upgrade.upgrade_model(folder, upgraded)
