"""Models saved by earlier releases load and predict as they did.

Every model on the Hub is a ``config.json`` and a weights file written by some release of balpoe-hf; a
change to the config, the modeling code or the prior estimators must not change what such a folder predicts.
The fixtures in ``tests/fixtures/saved_models/`` were saved once, by the releases their names give, together
with what those releases computed (``expected.json``; ``make_saved_models.py`` says how). A change that has
to break one of them comes with a migration in ``BalPoEConfig`` and a fixture of its own, never with new
expectations.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageClassification

from balpoe_hf import BalPoEForImageClassification
from balpoe_hf.models.balpoe.label_shift import ShiftEstimator, estimate_prior

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = Path(__file__).parent / "fixtures" / "saved_models"
RESNET = FIXTURES / "resnet-3experts-calibrated"
VIT_V0 = FIXTURES / "vit-per-class-lambdas-v0"
CLOSE = {"rtol": 1e-6, "atol": 1e-6}


def _from_pretrained(folder: Path) -> BalPoEForImageClassification:
    model, info = BalPoEForImageClassification.from_pretrained(folder, output_loading_info=True)
    # A renamed module would leave its weights unread and the model randomly initialised.
    assert all(not keys for keys in info.values()), info
    return model.eval()


def _load(fixture: Path) -> tuple[BalPoEForImageClassification, dict]:
    return _from_pretrained(fixture / "model"), json.loads((fixture / "expected.json").read_text())


def _pixel_values(fixture: Path) -> torch.Tensor:
    """The fixture's images normalised by hand with the mean and std of its saved config.json."""
    images = load_file(fixture / "inputs.safetensors")["images"]  # uint8 (N, H, W, 3)
    config = json.loads((fixture / "model" / "config.json").read_text())
    mean, std = torch.tensor(config["image_mean"]), torch.tensor(config["image_std"])
    return ((images.float() / 255 - mean) / std).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("fixture", [RESNET, VIT_V0], ids=lambda path: path.name)
def test_saved_model_predicts_the_logits_of_the_release_that_saved_it(fixture):
    model, expected = _load(fixture)
    pixel_values = _pixel_values(fixture)
    processor = AutoImageProcessor.from_pretrained(fixture / "model")
    images = load_file(fixture / "inputs.safetensors")["images"]
    processed = processor(images=list(images.numpy()), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(processed, pixel_values, **CLOSE)
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits
    torch.testing.assert_close(logits, torch.tensor(expected["logits"]), **CLOSE)
    # The auto classes find the same model (import balpoe_hf registers them).
    auto = AutoModelForImageClassification.from_pretrained(fixture / "model").eval()
    with torch.no_grad():
        torch.testing.assert_close(auto(pixel_values=pixel_values).logits, logits, rtol=0, atol=0)


@pytest.mark.parametrize("fixture", [RESNET, VIT_V0], ids=lambda path: path.name)
def test_saved_model_saved_again_by_this_release_predicts_the_same(fixture, tmp_path):
    model, expected = _load(fixture)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        logits = _from_pretrained(tmp_path)(pixel_values=_pixel_values(fixture)).logits
    torch.testing.assert_close(logits, torch.tensor(expected["logits"]), **CLOSE)


def test_config_from_before_the_later_settings_gets_the_behaviour_it_was_saved_with():
    config = json.loads((VIT_V0 / "model" / "config.json").read_text())
    assert not {"loss", "remove_mean_lambda", "calibration", "method"} & set(config)  # an early release's
    model, expected = _load(VIT_V0)
    assert model.config.loss == "balpoe" and model.config.calibration is None and model.config.method is None
    # That release removed the ensemble's mean bias:
    # logits = mean_e z_e - mean_e(lambda_e) log pi + log(C pi_t), checked by hand on its expert logits.
    expert_logits = torch.tensor(expected["expert_logits"], dtype=torch.float64)  # (N, E, C)
    counts = torch.tensor(config["class_counts"], dtype=torch.float64)
    mean_lambda = torch.tensor(config["lambdas"], dtype=torch.float64).mean(0)
    target = torch.tensor(config["target_prior"], dtype=torch.float64)
    by_hand = (expert_logits.mean(1) - mean_lambda * (counts / counts.sum()).log()
               + (len(counts) * target).log())
    torch.testing.assert_close(by_hand.float(), torch.tensor(expected["logits"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["em", "bbse", "em-bcts"])
def test_saved_calibration_gives_the_prior_estimates_of_the_release_that_saved_it(method):
    """The literature's estimators, as published, estimate as they did."""
    model, expected = _load(RESNET)
    want = expected["prior_estimates"][method]
    estimate = model.adapt_to_unlabeled(_pixel_values(RESNET), method=method, set_prior=False)
    from_logits = estimate_prior(torch.tensor(expected["logits"], dtype=torch.float64),
                                 model.config.calibration, method)
    for got in (estimate, from_logits):
        torch.testing.assert_close(got.prior, torch.tensor(want["prior"], dtype=torch.float64), **CLOSE)
        torch.testing.assert_close(got.estimate, torch.tensor(want["estimate"], dtype=torch.float64), **CLOSE)
    assert math.isclose(sum(want["prior"]), 1.0, abs_tol=1e-9)


def test_a_saved_model_gets_todays_default_unknown_prior_estimate():
    """``auto`` is the package's default on every model: the fixture's release ran another estimator
    (its ``expected.json`` keeps that release's figures), today's runs ``ShiftEstimator()``."""
    model, expected = _load(RESNET)
    estimate = model.adapt_to_unlabeled(_pixel_values(RESNET), set_prior=False)
    default = estimate_prior(torch.tensor(expected["logits"], dtype=torch.float64), model.config.calibration,
                             ShiftEstimator())
    torch.testing.assert_close(estimate.prior, default.prior, **CLOSE)
    assert estimate.method == "auto"


EARLIER_PATHS = [("balpoe_hf.loading", "balpoe_hf.data.loading", "load_split"),
                 ("balpoe_hf.label_shift", "balpoe_hf.models.balpoe.label_shift", "ShiftEstimator"),
                 ("balpoe_hf.prepare_data", "balpoe_hf.data.prepare", "prepare_data")]


@pytest.mark.parametrize("old,new,name", EARLIER_PATHS)
def test_module_paths_the_docs_showed_before_the_subpackages_still_import(old, new, name, monkeypatch):
    """Code written against an earlier release's paths runs, with a FutureWarning naming the new one."""
    import importlib
    import sys

    monkeypatch.delitem(sys.modules, old, raising=False)  # imported before: import it afresh
    with pytest.warns(FutureWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new) and hasattr(module, name)
