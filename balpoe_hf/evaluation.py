"""Evaluate a BalPoE model on a balanced test set and on label-shifted versions of it, as a Python API.

    from balpoe_hf.evaluation import evaluate_model, load_model
    from balpoe_hf.loading import load_split

    model, processor = load_model("runs/fashion-mnist-lt-quick")
    test, _ = load_split(dataset="fashion-mnist")
    result = evaluate_model(model, processor, test, shifts="all", priors=["none", "oracle", "em"])

The model runs once per balanced test image, with a uniform target prior; every shifted set (the LADE/SADE
protocol of ``make_shifted_test``: forward50 ... uniform ... backward50) is a selection of those cached
logits, and every prior mode adds ``log(C * pi_t)`` to them, which is exactly what
``model.set_target_prior(pi_t)`` does inside the model. Prior modes: ``none`` (uniform target prior),
``oracle`` (the shifted set's true label distribution), ``em`` (that distribution estimated from the model's
posteriors on the unlabeled shifted set, ``balpoe_hf.priors.estimate_target_prior``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from safetensors import SafetensorError

from .data import make_shifted_test
from .loading import align_labels, offline_mode
from .metrics import accuracy_report, long_tail_report
from .modeling_balpoe import BalPoEForImageClassification
from .priors import adjust_logits, estimate_target_prior

ALL_SHIFTS = ["forward50", "forward25", "forward10", "forward5", "forward2", "uniform",
              "backward2", "backward5", "backward10", "backward25", "backward50"]
PRIOR_MODES = ("none", "oracle", "em")
SHIFT_PATTERN = re.compile(r"(forward|backward)(\d+(?:\.\d+)?)|uniform")


class EvaluationError(ValueError):
    """A problem with the settings, the model or the test data, with what to do about it."""


def parse_shifts(shifts: str | Sequence[str]) -> list[str]:
    """``"all"``, a comma list like ``"forward50,uniform,backward10"`` or a list of names -> shift names."""
    if isinstance(shifts, str):
        if shifts.strip() == "all":
            return list(ALL_SHIFTS)
        shifts = shifts.split(",")
    names = [name.strip() for name in shifts if name.strip()]
    bad = [name for name in names if not SHIFT_PATTERN.fullmatch(name)]
    if bad or not names:
        raise EvaluationError(f"unknown shifts {bad or shifts!r}; use 'all' or names like forward50, "
                              "uniform, backward10 (forward/backward followed by an imbalance ratio >= 1).")
    return names


def parse_priors(priors: str | Sequence[str]) -> list[str]:
    """A comma list (or a list) of prior modes out of none, oracle, em."""
    if isinstance(priors, str):
        priors = priors.split(",")
    modes = [mode.strip() for mode in priors if mode.strip()]
    bad = [mode for mode in modes if mode not in PRIOR_MODES]
    if bad or not modes:
        raise EvaluationError(f"unknown prior modes {bad or priors!r}; choose from {', '.join(PRIOR_MODES)}.")
    return modes


def resolve_device(device: str | None) -> str:
    """``device``, checked to exist here (default: ``cuda`` when available, else ``cpu``)."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise EvaluationError(f"unknown device {device!r}; use cpu, cuda or cuda:N.") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"--device {device}, but torch sees no CUDA GPU here "
                              "(torch.cuda.is_available() is False); use --device cpu.")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise EvaluationError(f"--device {device}, but MPS is not available here; use --device cpu.")
    return device


def check_output(output: str | Path) -> None:
    """Check that the report and its pictures can be written at ``output``, before any inference.

    The nearest existing folder on the way to ``output`` must take a new file (tried with a temporary
    file, which is removed), and matplotlib must be installed for the pictures.
    """
    output = Path(output)
    if output.is_dir():
        raise EvaluationError(f"--output {output} is a directory; give a file name, e.g. "
                              f"{output / 'report.json'}.")
    folder = next(p for p in (output.parent, *output.parent.parents) if p.exists() or p == Path(p.anchor))
    if not folder.is_dir():
        raise EvaluationError(f"cannot write --output {output}: {folder} is a file, not a directory.")
    try:
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise EvaluationError(f"cannot write --output {output}: {folder} does not take new files "
                              f"({error.strerror}). Choose another --output.") from None
    for path in (output, *_picture_paths(output).values()):
        if path.exists() and not os.access(path, os.W_OK):
            raise EvaluationError(f"cannot write --output {output}: {path} exists and is read-only.")
    if importlib.util.find_spec("matplotlib") is None:
        raise EvaluationError("--output also draws a reliability diagram and a per-class plot, which need "
                              "matplotlib: pip install 'balpoe-hf[plots]'.")


def check_shifts(labels: np.ndarray, train_counts: list[int], shifts: list[str], seed: int = 0) -> None:
    """Build every shifted test set from the labels alone, so that a test set too small for a shift is
    refused before the inference (``shifted_rows`` reads no image)."""
    for shift in shifts:
        shifted_rows(labels, train_counts, shift, seed)


def _split_shift(name: str) -> tuple[str, float]:
    match = SHIFT_PATTERN.fullmatch(name)
    if match.group(1) is None:
        return "uniform", 1.0
    return match.group(1), float(match.group(2))


# --------------------------------------------------------------------------- model and predictions


def load_model(model_id: str | Path, device: str = "cpu") -> tuple[BalPoEForImageClassification, Any]:
    """The BalPoE model (in eval mode, on ``device``) and the image processor saved with it."""
    from transformers import AutoImageProcessor

    try:
        model = BalPoEForImageClassification.from_pretrained(model_id)
        processor = AutoImageProcessor.from_pretrained(model_id)
    except SafetensorError as error:
        raise EvaluationError(f"the weights in {str(model_id)!r} cannot be read ({error}): the file is "
                              "truncated or damaged; save the model again (or copy it again).") from None
    except OSError as error:
        hint = ("it is offline (HF_HUB_OFFLINE=1), so pass a local directory written by balpoe-train or "
                "save_pretrained" if offline_mode() and not Path(model_id).exists()
                else "pass a directory holding config.json, the weights and preprocessor_config.json")
        raise EvaluationError(f"cannot load a BalPoE model and its image processor from {str(model_id)!r}: "
                              f"{error}\nHint: {hint}.") from None
    if not model.config.class_counts:
        raise EvaluationError(f"{model_id} has no class_counts in its config: the training prior is needed "
                              "for the shot groups. Set BalPoEConfig.class_counts when training.")
    return model.to(device).eval(), processor


@torch.inference_mode()
def predict(model: BalPoEForImageClassification, processor: Any, ds: datasets.Dataset,
            image_column: str = "image", batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits with a uniform target prior ``(N, C)`` and expert logits ``(N, E, C)``, one pass over ``ds``."""
    if image_column not in ds.column_names:
        raise EvaluationError(f"the test set has no image column {image_column!r}; its columns are "
                              f"{ds.column_names}. Name it with --image-column.")
    if not isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image())
    images = ds.select_columns([image_column])
    device = next(model.parameters()).device
    logits, expert_logits = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size][image_column]
        pixel_values = processor(images=batch, return_tensors="pt")["pixel_values"].to(device)
        out = model(pixel_values=pixel_values, target_prior="uniform")
        logits.append(out.logits.float().cpu())  # (B, C)
        expert_logits.append(out.expert_logits.float().cpu())  # (B, E, C)
    return torch.cat(logits), torch.cat(expert_logits)


# --------------------------------------------------------------------------- shifts and priors


def shifted_rows(labels: np.ndarray, train_counts: list[int], shift: str, seed: int = 0) -> np.ndarray:
    """Row indices of the balanced test set that make up one shifted test set."""
    kind, ratio = _split_shift(shift)
    # make_shifted_test reads only the label column: give it the labels and a row number, no images.
    table = datasets.Dataset.from_dict({"label": labels, "row": np.arange(len(labels))})
    try:
        shifted = make_shifted_test(table, train_counts, kind, ratio, label_column="label", seed=seed)
    except ValueError as error:
        raise EvaluationError(f"cannot build the {shift} test set: {error}") from None
    return np.asarray(shifted["row"], dtype=np.int64)


def with_target_prior(uniform_logits: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Logits ``(N, C)`` for target prior ``pi_t`` from logits with a uniform target: ``+ log(C * pi_t)``."""
    # A class the prior gives exactly zero (EM can drive one there) would get -inf and an infinite NLL;
    # the smallest positive float keeps it finite.
    floor = torch.finfo(torch.float64).tiny
    # The logits are already adjusted to a uniform target, so no training-prior term is left to remove.
    return adjust_logits(uniform_logits.double(), torch.zeros(()), 0.0, prior.double().clamp_min(floor))


def evaluate_shifts(uniform_logits: torch.Tensor, labels: np.ndarray, train_counts: list[int],
                    shifts: list[str], priors: list[str], seed: int = 0,
                    **report_kwargs: Any) -> dict[str, Any]:
    """Per shift: its size, true and EM-estimated priors, and a long_tail_report per prior mode."""
    num_classes = uniform_logits.shape[1]
    results: dict[str, Any] = {}
    for shift in shifts:
        rows = shifted_rows(labels, train_counts, shift, seed)
        logits, targets = uniform_logits[rows], labels[rows]
        true_prior = torch.from_numpy(np.bincount(targets, minlength=num_classes) / len(targets))
        entry: dict[str, Any] = {"num_samples": len(rows), "test_prior": true_prior.tolist(), "reports": {}}
        for mode in priors:
            if mode == "none":
                adjusted = logits
            elif mode == "oracle":
                adjusted = with_target_prior(logits, true_prior)
            else:
                em_prior = estimate_target_prior(torch.softmax(logits.double(), dim=1))
                entry["em_prior"] = em_prior.tolist()
                # Total variation distance between the estimate and the truth: how well EM did.
                entry["em_prior_error"] = float(0.5 * (em_prior - true_prior).abs().sum())
                adjusted = with_target_prior(logits, em_prior)
            entry["reports"][mode] = long_tail_report(adjusted, targets, train_counts, **report_kwargs)
        results[shift] = entry
    return results


@dataclass
class EvaluationResult:
    """``evaluate_model``'s output: the JSON-ready ``report`` and the predictions it was computed from."""

    report: dict[str, Any]
    logits: torch.Tensor  # (N, C), adjusted to a uniform target prior
    expert_logits: torch.Tensor  # (N, E, C), raw
    labels: np.ndarray  # (N,), model class indices


def evaluate_model(model: BalPoEForImageClassification, processor: Any, ds: datasets.Dataset, *,
                   image_column: str = "image", label_column: str = "label",
                   shifts: str | Sequence[str] = "all",
                   priors: str | Sequence[str] = ("none", "oracle", "em"),
                   batch_size: int = 256, n_bins: int = 15, many: int = 100, few: int = 20,
                   seed: int = 0) -> EvaluationResult:
    """The balanced-test-set report, each expert's accuracy, and the shifted sets under every prior mode.

    The report is a JSON-ready dict: ``balanced`` (``long_tail_report``), ``experts`` (raw-logit accuracy of
    each expert as trained), ``shift_accuracy`` (prior mode -> shift -> top-1 accuracy) and ``shifts`` (per
    shift: its size, true prior, EM estimate and a full report per prior mode).
    """
    shifts, priors = parse_shifts(shifts), parse_priors(priors)
    train_counts = [int(c) for c in model.config.class_counts]
    id2label = model.config.id2label
    labels = align_labels(ds, label_column, [id2label[i] for i in range(len(id2label))])
    check_shifts(labels, train_counts, shifts, seed)
    report_kwargs = {"n_bins": n_bins, "many": many, "few": few}

    start = time.perf_counter()
    uniform_logits, expert_logits = predict(model, processor, ds, image_column, batch_size)
    seconds = time.perf_counter() - start
    balanced = long_tail_report(uniform_logits, labels, train_counts, **report_kwargs)
    # Each expert as trained (biased towards the head for lambda > 0, the tail for lambda < 0).
    experts = []
    for e in range(expert_logits.shape[1]):
        accuracy = accuracy_report(expert_logits[:, e].argmax(1), labels, train_counts, many, few)
        accuracy.pop("per_class_accuracy")
        experts.append({"lambda": model.config.lambdas[e], **accuracy})
    shift_results = evaluate_shifts(uniform_logits, labels, train_counts, shifts, priors, seed,
                                    **report_kwargs)
    shift_accuracy = {mode: {shift: shift_results[shift]["reports"][mode]["accuracy"] for shift in shifts}
                      for mode in priors}
    report = {
        "num_test_samples": len(labels),
        "inference_seconds": round(seconds, 2),
        "train_counts": train_counts,
        "settings": {"n_bins": n_bins, "many": many, "few": few, "seed": seed},
        "balanced": balanced,
        "experts": experts,
        "shift_accuracy": shift_accuracy,
        "shifts": shift_results,
    }
    return EvaluationResult(report, uniform_logits, expert_logits, labels)


def _picture_paths(output: Path) -> dict[str, Path]:
    return {"reliability_diagram": output.with_name(f"{output.stem}_reliability.png"),
            "per_class_accuracy": output.with_name(f"{output.stem}_per_class_accuracy.png")}


def write_report(result: EvaluationResult, output: str | Path) -> dict[str, str]:
    """Write ``result.report`` as JSON to ``output``, and beside it a reliability diagram and per-class plot.

    Returns the names of the two PNG files (also recorded in the JSON under ``images``).
    """
    from .plots import per_class_accuracy_plot, reliability_diagram

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    report = result.report
    settings = report["settings"]
    images = {name: path.name for name, path in _picture_paths(output).items()}
    reliability_diagram(result.logits, result.labels, output.parent / images["reliability_diagram"],
                        n_bins=settings["n_bins"], from_probs=False, title="Balanced test set")
    per_class_accuracy_plot(report["balanced"]["per_class_accuracy"], report["train_counts"],
                            output.parent / images["per_class_accuracy"], many=settings["many"],
                            few=settings["few"])
    output.write_text(json.dumps({**report, "images": images}, indent=2, allow_nan=False) + "\n",
                      encoding="utf-8")
    return images


# --------------------------------------------------------------------------- printing


def _pct(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}"


def format_balanced(report: dict[str, Any], num_samples: int) -> str:
    """The balanced-test-set report as a few aligned lines, in percent."""
    rows = [
        ("accuracy", f"{_pct(report['accuracy'])}%"),
        ("balanced accuracy", f"{_pct(report['balanced_accuracy'])}%"),
        ("many / medium / few", " / ".join(f"{_pct(report[g])}" for g in ("many", "medium", "few")) + " %"),
        ("ECE / MCE", f"{_pct(report['ece'])} / {_pct(report['mce'])} %"),
        ("NLL / Brier", f"{report['nll']:.4f} / {report['brier']:.4f}"),
    ]
    lines = [f"Balanced test set ({num_samples} images, uniform target prior):"]
    lines += [f"  {name:<20} {value}" for name, value in rows]
    return "\n".join(lines)


def format_shift_table(shift_accuracy: dict[str, dict[str, float]], shifts: list[str]) -> str:
    """A Markdown table: rows are prior modes, columns the test distributions, cells top-1 accuracy (%)."""
    header = "| prior \u2193 / test set \u2192 | " + " | ".join(shifts) + " |"
    rule = "|---|" + "---:|" * len(shifts)
    rows = [f"| {mode} | " + " | ".join(_pct(acc.get(s), 1) for s in shifts) + " |"
            for mode, acc in shift_accuracy.items()]
    return "\n".join([header, rule, *rows])
