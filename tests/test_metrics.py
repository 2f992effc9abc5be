"""Metrics, test-prior EM and the local evaluate modules, against hand computations and closed forms."""

import json
import math

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from balpoe_hf.metrics import (
    accuracy_report,
    calibration_bins,
    calibration_report,
    long_tail_compute_metrics,
    long_tail_report,
    module_path,
)

# Four two-class samples, 4 bins with edges 0, .25, .5, .75, 1. Two confidences sit exactly on an edge.
EDGE_PROBS = [[0.5, 0.5],    # tie -> class 0, confidence 0.5 -> bin (0.25, 0.5]; label 0: correct
              [0.75, 0.25],  # class 0, confidence 0.75 -> bin (0.5, 0.75]; label 1: wrong
              [0.2, 0.8],    # class 1, confidence 0.8 -> bin (0.75, 1]; label 1: correct
              [1.0, 0.0]]    # class 0, confidence 1.0 -> bin (0.75, 1]; label 0: correct
EDGE_LABELS = [0, 1, 1, 0]


def test_bins_put_a_confidence_on_an_edge_in_the_lower_bin():
    bins = calibration_bins([0.5, 0.75, 0.8, 1.0, 0.25, 0.0], [1, 0, 1, 1, 0, 0], n_bins=4)
    assert bins["lower"] == [0.0, 0.25, 0.5, 0.75]
    assert bins["upper"] == [0.25, 0.5, 0.75, 1.0]
    # 0.25 and 0.0 -> bin 0; 0.5 -> bin 1; 0.75 -> bin 2; 0.8 and 1.0 -> bin 3.
    assert bins["count"] == [2, 1, 1, 2]
    assert bins["accuracy"] == [0.0, 1.0, 0.0, 1.0]
    assert bins["confidence"] == pytest.approx([0.125, 0.5, 0.75, 0.9])


def test_bin_edges_at_fifteen_bins_match_the_decimal_edge():
    # 6 / 15 = 0.4 as a float: the sample belongs to bin (5/15, 6/15], the sixth bin.
    bins = calibration_bins([0.4], [1], n_bins=15)
    assert bins["count"].index(1) == 5


def test_empty_bins_are_none_not_nan():
    bins = calibration_bins([0.95], [1], n_bins=10)
    assert bins["accuracy"][:9] == [None] * 9
    assert bins["confidence"][-1] == pytest.approx(0.95)


def test_calibration_report_on_the_edge_example():
    report = calibration_report(EDGE_PROBS, EDGE_LABELS, n_bins=4, from_probs=True)
    # Bins: (0.25, .5]: acc 1, conf .5; (.5, .75]: acc 0, conf .75; (.75, 1]: acc 1, conf .9 (2 samples).
    assert report["ece"] == pytest.approx((0.5 + 0.75 + 2 * 0.1) / 4)
    assert report["mce"] == pytest.approx(0.75)
    assert report["nll"] == pytest.approx(-(math.log(0.5) + math.log(0.25) + math.log(0.8) + 0.0) / 4)
    # Brier: (.5^2 + .5^2) + (.75^2 + .75^2) + (.2^2 + .2^2) + 0.
    assert report["brier"] == pytest.approx((0.5 + 1.125 + 0.08 + 0.0) / 4)


def test_logits_give_the_same_report_as_their_softmax():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [-3.0, 4.0, 1.0]], dtype=torch.float64)
    labels = [0, 1, 2]
    from_logits = calibration_report(logits, labels)
    from_probs = calibration_report(torch.softmax(logits, 1), labels, from_probs=True)
    assert from_logits == pytest.approx(from_probs)
    expected_nll = torch.nn.functional.cross_entropy(logits, torch.tensor(labels))
    assert from_logits["nll"] == pytest.approx(float(expected_nll))


def test_perfectly_calibrated_toy_case_has_zero_ece():
    # Ten samples at confidence 0.8 with 8 right, five at 0.6 (three right): accuracy equals confidence.
    probs = [[0.8, 0.2]] * 10 + [[0.4, 0.6]] * 5
    labels = [0] * 8 + [1] * 2 + [1] * 3 + [0] * 2
    logits = np.log(np.asarray(probs))
    for scores, from_probs in ((probs, True), (logits, False)):
        report = calibration_report(scores, labels, from_probs=from_probs)
        assert report["ece"] == pytest.approx(0.0, abs=1e-12)
        assert report["mce"] == pytest.approx(0.0, abs=1e-12)


# Six classes: many-shot > 100 (0, 1), medium 20..100 (2, 3), few < 20 (4, 5). Class 5 has no test sample.
TRAIN_COUNTS = [200, 150, 50, 30, 10, 5]
LABELS = [0, 0, 1, 1, 2, 2, 3, 4, 4, 4]
PREDS = [0, 1, 1, 1, 2, 0, 0, 4, 5, 4]


def test_accuracy_balanced_accuracy_and_shot_groups_by_hand():
    report = accuracy_report(PREDS, LABELS, TRAIN_COUNTS)
    assert report["accuracy"] == pytest.approx(6 / 10)
    assert report["per_class_accuracy"] == pytest.approx([1 / 2, 1.0, 1 / 2, 0.0, 2 / 3, None])
    assert report["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5 + 0 + 2 / 3) / 5)
    assert report["many"] == pytest.approx((0.5 + 1.0) / 2)
    assert report["medium"] == pytest.approx((0.5 + 0.0) / 2)
    assert report["few"] == pytest.approx(2 / 3)  # class 5 has no test sample and is left out


def test_long_tail_report_keys_and_json_without_nan():
    one_hot_logits = 10.0 * np.eye(6)[PREDS]
    report = long_tail_report(one_hot_logits, LABELS, TRAIN_COUNTS, n_bins=15)
    assert set(report) == {"accuracy", "balanced_accuracy", "per_class_accuracy", "many", "medium", "few",
                           "ece", "mce", "nll", "brier"}
    assert report["accuracy"] == pytest.approx(0.6)
    assert report["many"] == pytest.approx(0.75)
    json.dumps(report, allow_nan=False)


def test_trainer_compute_metrics_by_hand():
    compute_metrics = long_tail_compute_metrics(TRAIN_COUNTS, n_bins=15)
    logits = 10.0 * np.eye(6)[PREDS]
    metrics = compute_metrics(EvalPrediction(predictions=logits, label_ids=np.array(LABELS)))
    # Every row: the predicted class has p = e^10 / (e^10 + 5), each other class r = 1 / (e^10 + 5).
    p, r = math.exp(10) / (math.exp(10) + 5), 1 / (math.exp(10) + 5)
    assert set(metrics) == {"accuracy", "balanced_accuracy", "many", "medium", "few", "ece", "mce", "nll",
                            "brier"}
    assert metrics["accuracy"] == pytest.approx(0.6)
    assert metrics["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5 + 0 + 2 / 3) / 5)
    assert (metrics["many"], metrics["medium"], metrics["few"]) == pytest.approx((0.75, 0.25, 2 / 3))
    # One confidence bin holds all ten samples at confidence p with accuracy 0.6.
    assert metrics["ece"] == pytest.approx(p - 0.6) and metrics["mce"] == pytest.approx(p - 0.6)
    assert metrics["nll"] == pytest.approx((6 * -math.log(p) + 4 * -math.log(r)) / 10)
    correct, wrong = (1 - p) ** 2 + 5 * r**2, p**2 + (1 - r) ** 2 + 4 * r**2
    assert metrics["brier"] == pytest.approx((6 * correct + 4 * wrong) / 10)


def test_trainer_compute_metrics_errors():
    with pytest.raises(ValueError, match="class_counts is empty"):
        long_tail_compute_metrics([])
    compute_metrics = long_tail_compute_metrics(TRAIN_COUNTS)
    logits = np.zeros((10, 6))
    with pytest.raises(ValueError, match="keys_to_ignore_at_inference"):
        compute_metrics(EvalPrediction(predictions=(logits, logits[:, None]), label_ids=np.array(LABELS)))


def test_empty_shot_groups_are_none():
    report = long_tail_report(np.eye(3) * 5, [0, 1, 2], [500, 400, 300])
    assert report["many"] == 1.0
    assert report["medium"] is None and report["few"] is None
    json.dumps(report, allow_nan=False)


def test_shot_thresholds_are_configurable():
    report = accuracy_report(PREDS, LABELS, TRAIN_COUNTS, many=40, few=8)
    # many > 40: classes 0, 1, 2; few < 8: class 5 only (no test sample); medium: 3, 4.
    assert report["many"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert report["medium"] == pytest.approx((0.0 + 2 / 3) / 2)
    assert report["few"] is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"logits": np.zeros((2, 3)), "labels": [0, 3], "train_counts": [1, 1, 1]}, "must lie in"),
        ({"logits": np.zeros((2, 3)), "labels": [0, 1], "train_counts": [1, 1]}, "train_counts"),
        ({"logits": np.zeros((2, 3)), "labels": [0], "train_counts": [1, 1, 1]}, "shape"),
        ({"logits": np.full((2, 2), np.nan), "labels": [0, 1], "train_counts": [1, 1]}, "NaN"),
        ({"logits": np.ones((2, 2)), "labels": [0, 1], "train_counts": [1, 1], "from_probs": True},
         "sum to 1"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        long_tail_report(**kwargs)


def test_labels_that_are_not_integers_are_a_type_error():
    with pytest.raises(TypeError, match=r"labels must be integer class indices, got dtype torch\.float64"):
        long_tail_report(np.zeros((2, 3)), [0.0, 1.0], [1, 1, 1])


def test_agrees_with_torchmetrics_where_the_conventions_coincide():
    tm = pytest.importorskip("torchmetrics.functional.classification")
    generator = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(500, 7, generator=generator, dtype=torch.float64)
    labels = torch.arange(500) % 7  # every class present; random confidences never hit a bin edge
    probs = torch.softmax(logits, 1)
    report = long_tail_report(logits, labels, [100] * 7, n_bins=15)
    kwargs = {"num_classes": 7, "n_bins": 15}
    assert report["ece"] == pytest.approx(float(tm.multiclass_calibration_error(probs, labels, **kwargs)))
    assert report["mce"] == pytest.approx(
        float(tm.multiclass_calibration_error(probs, labels, norm="max", **kwargs)))
    assert report["accuracy"] == pytest.approx(
        float(tm.multiclass_accuracy(probs, labels, 7, average="micro")))
    assert report["balanced_accuracy"] == pytest.approx(
        float(tm.multiclass_accuracy(probs, labels, 7, average="macro")))


# --- local evaluate modules ---------------------------------------------------------------------------

def test_evaluate_modules_load_offline_and_combine(tmp_path):
    # The suite runs with HF_HUB_OFFLINE=1: loading by path must not need the Hub.
    evaluate = pytest.importorskip("evaluate")
    cache = str(tmp_path)
    long_tail = evaluate.load(module_path("long_tail"), train_counts=TRAIN_COUNTS, cache_dir=cache)
    calibration = evaluate.load(module_path("calibration"), n_bins=4, from_probs=True, cache_dir=cache)

    scores = 10.0 * np.eye(6)[PREDS]
    result = long_tail.compute(predictions=scores, references=LABELS)
    assert result["accuracy"] == pytest.approx(0.6)
    assert result["few"] == pytest.approx(2 / 3)
    assert long_tail.compute(predictions=PREDS, references=LABELS)["many"] == pytest.approx(0.75)

    result = calibration.compute(predictions=EDGE_PROBS, references=EDGE_LABELS)
    assert result["ece"] == pytest.approx(1.45 / 4)
    assert result["mce"] == pytest.approx(0.75)

    combined = evaluate.combine([long_tail, evaluate.load(module_path("calibration"), cache_dir=cache)])
    # Together the two modules give exactly the report of balpoe_hf.metrics.long_tail_report.
    expected = long_tail_report(scores, LABELS, TRAIN_COUNTS)
    assert combined.compute(predictions=scores, references=LABELS) == expected


def test_long_tail_module_needs_train_counts(tmp_path):
    evaluate = pytest.importorskip("evaluate")
    with pytest.raises(ValueError, match="train_counts"):
        evaluate.load(module_path("long_tail"), cache_dir=str(tmp_path))


def test_unknown_module_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="calibration"):
        module_path("nope")
