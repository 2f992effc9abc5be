"""Long-tail classification metrics: balanced and shot-group accuracy, calibration (ECE, MCE), NLL, Brier.

All values are fractions (accuracy 0.523, not 52.3). Conventions:

- The prediction is the arg-max class (ties go to the lowest class index) and the confidence its
  probability.
- ECE and MCE use ``n_bins`` equal-width confidence bins; a sample with confidence ``p`` falls in the
  bin with ``lower < p <= upper`` (edges ``i / n_bins`` compared in float64). ECE is the sample-weighted
  mean of ``|accuracy - mean confidence|`` over the bins, MCE its maximum over non-empty bins.
- NLL is the mean of ``-log p(y|x)`` (from logits through ``log_softmax``; given probabilities are
  clipped at float64 machine epsilon, as in scikit-learn's ``log_loss``).
- Brier is the multi-class score of Brier (1950): the mean over samples of ``sum_c (p_c - [y = c])^2``,
  between 0 and 2.
- Per-class accuracy is the recall of each class; classes with no test sample get ``None``. Balanced
  accuracy is the mean per-class accuracy over classes that have test samples; the many / medium / few
  accuracies are the mean per-class accuracy over the classes of each shot group (the LADE / SADE
  convention), ``None`` for a group without classes with test samples.

These are written here rather than taken from torchmetrics because its conventions differ on exactly the
cases that matter here: its calibration error bins ``lower <= p < upper`` (so ``p = 1`` gets a bin of its
own) and its macro accuracy counts a class that is predicted but absent from the labels as 0 and drops
one that is neither. On data without those cases the numbers agree (the tests check that).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import EvalPrediction

from .data.splits import shot_groups
from .models.balpoe.calibration import validate_labels
from .recipes.recipe import FEW_SHOT_THRESHOLD, MANY_SHOT_THRESHOLD

ArrayLike = torch.Tensor | np.ndarray | Sequence[Any]
EVALUATE_MODULES_DIR = Path(__file__).parent / "evaluate_modules"
# Rows of given probabilities must sum to one within this tolerance (float32 softmax outputs included).
PROB_SUM_TOLERANCE = 1e-3


def percent(value: float | None, digits: int = 2) -> str:
    """A fraction as a percentage for printed reports and tables, ``"n/a"`` for ``None`` (undefined):
    ``percent(0.52345) == "52.35"``."""
    return "n/a" if value is None else f"{100 * value:.{digits}f}"


def module_path(name: str) -> str:
    """Path of a local ``evaluate`` module shipped with balpoe-hf, for ``evaluate.load`` (works offline).

    ``name`` is ``"long_tail"`` (accuracy, balanced / per-class / shot-group accuracy; load it with
    ``train_counts=...``) or ``"calibration"`` (ECE, MCE, NLL, Brier).
    """
    path = EVALUATE_MODULES_DIR / name
    if not (path / f"{name}.py").is_file():
        available = sorted(p.name for p in EVALUATE_MODULES_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"no evaluate module named {name!r}; available: {available}.")
    return str(path)


def _to_tensor(values: ArrayLike) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu()
    return torch.as_tensor(np.asarray(values))


def _as_scores(scores: ArrayLike, name: str) -> torch.Tensor:
    tensor = _to_tensor(scores).to(torch.float64)
    if tensor.ndim != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"{name} must have shape (num_samples, num_classes) with both > 0, "
                         f"got {tuple(tensor.shape)}.")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return tensor


def _labels_for(scores: torch.Tensor, labels: ArrayLike) -> torch.Tensor:
    """``labels`` checked against the ``(N, C)`` scores they go with (``calibration.validate_labels``)."""
    return validate_labels(_to_tensor(labels), scores.shape[1], scores.shape[0])


def log_probabilities(scores: ArrayLike, from_probs: bool = False) -> torch.Tensor:
    """Log-probabilities ``(N, C)`` in float64 from logits (``log_softmax``) or from probabilities.

    Given probabilities must be non-negative with rows summing to one; they are clipped at float64
    epsilon before the log so that a zero probability gives a large but finite NLL.
    """
    tensor = _as_scores(scores, "probabilities" if from_probs else "logits")
    if not from_probs:
        return torch.log_softmax(tensor, dim=1)
    if (tensor < 0).any() or (tensor > 1).any():
        raise ValueError("from_probs=True but the scores are not in [0, 1]; "
                         "pass logits with from_probs=False.")
    sums = tensor.sum(dim=1)
    bad = torch.nonzero((sums - 1).abs() > PROB_SUM_TOLERANCE).flatten()
    if bad.numel():
        raise ValueError(f"from_probs=True but rows {bad[:10].tolist()} do not sum to 1 (e.g. "
                         f"{float(sums[bad[0]]):.6g}); pass logits with from_probs=False or normalise "
                         "the rows.")
    return tensor.clamp_min(torch.finfo(torch.float64).eps).log()


def _bin_edges(n_bins: int) -> torch.Tensor:
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}.")
    # i / n_bins is the correctly rounded edge, the same float as a literal like 0.4 for 2 / 5.
    return torch.arange(n_bins + 1, dtype=torch.float64) / n_bins


def calibration_bins(confidences: ArrayLike, correct: ArrayLike, n_bins: int = 15,
                     weights: ArrayLike | None = None) -> dict[str, list]:
    """Per-bin statistics of equal-width confidence bins, the data of a reliability diagram.

    A confidence ``p`` falls in the bin with ``lower < p <= upper`` (``p = 0`` in the first bin). Returns
    lists of length ``n_bins``: ``lower``, ``upper``, ``count``, ``confidence`` (mean confidence) and
    ``accuracy``; the last two are ``None`` for an empty bin. With ``weights`` (one per sample, >= 0) the
    means are weighted, and ``weight`` holds each bin's total weight (``calibration_errors`` weighs the bins
    by it instead of ``count``).
    """
    edges = _bin_edges(n_bins)
    conf = _to_tensor(confidences).to(torch.float64).flatten()
    hits = _to_tensor(correct).to(torch.float64).flatten()
    if conf.numel() != hits.numel():
        raise ValueError(f"confidences and correct have different lengths ({conf.numel()} vs "
                         f"{hits.numel()}).")
    if conf.numel() and ((conf < 0).any() or (conf > 1).any()):
        raise ValueError("confidences must lie in [0, 1].")
    # bucketize(right=False) returns i with edges[i - 1] < p <= edges[i]; p = 0 gives 0, moved to bin 0.
    index = (torch.bucketize(conf, edges, right=False) - 1).clamp_min(0)
    count = torch.bincount(index, minlength=n_bins).to(torch.float64)
    total = count
    if weights is not None:
        sample_weights = _to_tensor(weights).to(torch.float64).flatten()
        if sample_weights.shape != conf.shape or (sample_weights < 0).any():
            raise ValueError("weights must be one number >= 0 per confidence.")
        conf, hits = conf * sample_weights, hits * sample_weights
        total = torch.bincount(index, weights=sample_weights, minlength=n_bins)
    conf_sum = torch.bincount(index, weights=conf, minlength=n_bins)
    hit_sum = torch.bincount(index, weights=hits, minlength=n_bins)
    bins = {
        "lower": edges[:-1].tolist(),
        "upper": edges[1:].tolist(),
        "count": [int(c) for c in count.tolist()],
        "confidence": [float(s / w) if w > 0 else None for s, w in zip(conf_sum, total, strict=True)],
        "accuracy": [float(s / w) if w > 0 else None for s, w in zip(hit_sum, total, strict=True)],
    }
    if weights is not None:
        bins["weight"] = total.tolist()
    return bins


def calibration_report(scores: ArrayLike, labels: ArrayLike, n_bins: int = 15,
                       from_probs: bool = False) -> dict[str, float]:
    """``ece``, ``mce``, ``nll`` and ``brier`` from logits (or probabilities) ``(N, C)``, labels ``(N,)``."""
    log_probs = log_probabilities(scores, from_probs)
    return _calibration(log_probs, _labels_for(log_probs, labels), n_bins)


def reliability_bins(scores: ArrayLike, labels: ArrayLike, n_bins: int = 15,
                     from_probs: bool = False) -> dict[str, list]:
    """:func:`calibration_bins` of the arg-max confidence and correctness of logits (or probabilities)."""
    log_probs = log_probabilities(scores, from_probs)
    return _reliability_bins(log_probs, _labels_for(log_probs, labels), n_bins)


def calibration_errors(bins: dict[str, list]) -> tuple[float, float]:
    """``(ece, mce)`` from :func:`calibration_bins` statistics (bins with samples only; weighted bins by
    their ``weight``)."""
    stats = zip(bins["accuracy"], bins["confidence"], bins.get("weight", bins["count"]), strict=True)
    gaps = [(abs(acc - conf), n) for acc, conf, n in stats if n > 0]
    if not gaps:
        raise ValueError("every bin is empty: there are no samples to compute a calibration error on.")
    total = sum(n for _, n in gaps)
    return float(sum(gap * n for gap, n in gaps) / total), float(max(gap for gap, _ in gaps))


def _reliability_bins(log_probs: torch.Tensor, targets: torch.Tensor, n_bins: int) -> dict[str, list]:
    probs = log_probs.exp()
    prediction = probs.argmax(dim=1)  # first index on ties, as everywhere in this module
    confidence = probs.gather(1, prediction[:, None]).squeeze(1)
    return calibration_bins(confidence, prediction == targets, n_bins)


def _calibration(log_probs: torch.Tensor, targets: torch.Tensor, n_bins: int) -> dict[str, float]:
    ece, mce = calibration_errors(_reliability_bins(log_probs, targets, n_bins))
    one_hot = torch.nn.functional.one_hot(targets, log_probs.shape[1]).to(torch.float64)
    return {
        "ece": ece,
        "mce": mce,
        "nll": float(-log_probs.gather(1, targets[:, None]).mean()),
        "brier": float(((log_probs.exp() - one_hot) ** 2).sum(dim=1).mean()),
    }


def _mean_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(sum(present) / len(present)) if present else None


def accuracy_report(predictions: ArrayLike, labels: ArrayLike, train_counts: Sequence[int],
                    many: int = MANY_SHOT_THRESHOLD, few: int = FEW_SHOT_THRESHOLD) -> dict[str, Any]:
    """Top-1, balanced, per-class and many / medium / few accuracy from predicted classes ``(N,)``.

    ``train_counts`` (one training count per class) fixes the number of classes and the shot groups
    (many-shot ``> many``, few-shot ``< few`` training samples).
    """
    num_classes = len(train_counts)
    if num_classes == 0:
        raise ValueError("train_counts is empty; pass one training count per class.")
    preds = _to_tensor(predictions).flatten()
    if preds.numel() == 0:
        raise ValueError("there are no predictions to evaluate.")
    preds = validate_labels(preds, num_classes, name="predictions")
    targets = validate_labels(_to_tensor(labels), num_classes, preds.numel())
    correct = (preds == targets).to(torch.float64)
    support = torch.bincount(targets, minlength=num_classes)
    hits = torch.bincount(targets, weights=correct, minlength=num_classes)
    per_class = [float(h / n) if n > 0 else None for h, n in zip(hits, support, strict=True)]
    groups = shot_groups(list(train_counts), many=many, few=few)
    report: dict[str, Any] = {
        "accuracy": float(correct.mean()),
        "balanced_accuracy": _mean_or_none(per_class),
        "per_class_accuracy": per_class,
    }
    for name, classes in groups.items():
        report[name] = _mean_or_none([per_class[c] for c in classes])
    return report


def long_tail_report(logits: ArrayLike, labels: ArrayLike, train_counts: Sequence[int], n_bins: int = 15,
                     from_probs: bool = False, many: int = MANY_SHOT_THRESHOLD,
                     few: int = FEW_SHOT_THRESHOLD) -> dict[str, Any]:
    """Every metric of this module for logits (or probabilities) ``(N, C)`` and integer labels ``(N,)``.

    Keys: ``accuracy``, ``balanced_accuracy``, ``per_class_accuracy`` (list of ``C``), ``many``,
    ``medium``, ``few``, ``ece``, ``mce``, ``nll``, ``brier``; fractions, ``None`` where undefined (an
    empty shot group, a class without test samples), never NaN. See the module docstring for the
    conventions.
    """
    log_probs = log_probabilities(logits, from_probs)
    if log_probs.shape[1] != len(train_counts):
        raise ValueError(f"the scores have {log_probs.shape[1]} classes but train_counts has "
                         f"{len(train_counts)} entries; pass one training count per class.")
    report = accuracy_report(log_probs.argmax(dim=1), labels, train_counts, many=many, few=few)
    report.update(_calibration(log_probs, _labels_for(log_probs, labels), n_bins))
    return report


def long_tail_compute_metrics(class_counts: Sequence[int], many: int = MANY_SHOT_THRESHOLD,
                              few: int = FEW_SHOT_THRESHOLD, n_bins: int = 15
                              ) -> Callable[[EvalPrediction], dict[str, float | None]]:
    """A ``compute_metrics`` for ``transformers.Trainer``: the scalar metrics of :func:`long_tail_report`.

    Args:
        class_counts: training samples per class (they fix the shot groups): ``model.config.class_counts``.
        many, few: shot-group thresholds (many-shot ``> many``, few-shot ``< few`` training samples).
        n_bins: confidence bins of ECE and MCE.

    The returned function takes the ``EvalPrediction`` of ``Trainer.evaluate`` (logits ``(N, C)``, integer
    labels ``(N,)``) and returns ``accuracy``, ``balanced_accuracy``, ``many``, ``medium``, ``few``, ``ece``,
    ``mce``, ``nll`` and ``brier`` (``None`` where undefined; the per-class list is left out, as Trainer
    metrics are scalars). A BalPoE config's ``keys_to_ignore_at_inference`` makes Trainer pass the ensemble
    logits alone.
    """
    counts = [int(count) for count in class_counts]
    # Fail at construction rather than after the first evaluation pass.
    if not counts:
        raise ValueError("class_counts is empty; pass one training count per class "
                         "(model.config.class_counts).")
    _bin_edges(n_bins)

    def compute_metrics(eval_prediction: EvalPrediction) -> dict[str, float | None]:
        logits = eval_prediction.predictions
        if isinstance(logits, tuple | list):
            raise ValueError(
                f"compute_metrics got {len(logits)} prediction arrays but needs the (N, C) logits alone; set "
                "the model config's keys_to_ignore_at_inference (BalPoE configs do) or pass ignore_keys to "
                "Trainer.evaluate."
            )
        report = long_tail_report(logits, eval_prediction.label_ids, counts, n_bins=n_bins, many=many,
                                  few=few)
        del report["per_class_accuracy"]
        return report

    return compute_metrics
