"""Evaluate a saved BalPoE model on a balanced test set and on label-shifted versions of it.

    python scripts/evaluate.py --model runs/fashion-mnist-lt-quick --dataset fashion-mnist \\
        --shifts all --prior none,oracle,em --output runs/fashion-mnist-lt-quick/eval/report.json

Prints the balanced-test-set report (accuracy, balanced and many/medium/few accuracy, ECE, MCE, NLL,
Brier), then a table shaped like Table 10 of the BalPoE paper: one row per prior mode, one column per test
distribution (forward50 ... uniform ... backward50, the LADE/SADE protocol of make_shifted_test), top-1
accuracy in the cells. Prior modes: ``none`` (uniform target prior), ``oracle`` (the shifted set's true
label distribution), ``em`` (that distribution estimated from the model's posteriors on the unlabeled
shifted set, balpoe_hf.priors.estimate_target_prior). With --output it writes the JSON report and, beside
it, a reliability diagram and a per-class accuracy plot of the balanced set.

The model runs once per balanced test image, with a uniform target prior; every shifted set is a
selection of those cached logits and every prior mode adds ``log(C * pi_t)`` to them, which is exactly
what ``model.set_target_prior(pi_t)`` does inside the model.

Test data: --dataset fashion-mnist (the Debian package dataset-fashion-mnist), --test-file with parquet
files or an imagefolder directory, or --dataset HUB_ID when online. Images are preprocessed by the image
processor saved with the model, as at inference.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import yaml
from transformers import AutoImageProcessor

from balpoe_hf import BalPoEForImageClassification
from balpoe_hf.data import (
    FASHION_MNIST_DIR,
    expand_paths,
    labels_array,
    load_fashion_mnist,
    make_shifted_test,
    offline_mode,
)
from balpoe_hf.metrics import accuracy_report, long_tail_report
from balpoe_hf.plots import per_class_accuracy_plot, reliability_diagram
from balpoe_hf.priors import adjust_logits, estimate_target_prior

ALL_SHIFTS = ["forward50", "forward25", "forward10", "forward5", "forward2", "uniform",
              "backward2", "backward5", "backward10", "backward25", "backward50"]
PRIOR_MODES = ("none", "oracle", "em")
# Settings read from a run directory's recipe.yaml (written by scripts/train.py) when not given, and their
# fallbacks: argument name -> (recipe key, default).
RECIPE_SETTINGS = {
    "dataset": ("dataset", None),
    "dataset_config": ("dataset_config", None),
    "data_dir": ("data_dir", str(FASHION_MNIST_DIR)),
    "test_file": ("test_file", None),
    "split": ("test_split", "test"),
    "image_column": ("image_column", "image"),
    "label_column": ("label_column", "label"),
    "many": ("many_threshold", 100),
    "few": ("few_threshold", 20),
}
SHIFT_PATTERN = re.compile(r"(forward|backward)(\d+(?:\.\d+)?)|uniform")


class EvaluationError(ValueError):
    """A problem with the command line, the model or the test data, with what to do about it."""


def parse_shifts(text: str) -> list[str]:
    """``"all"`` or a comma list like ``"forward50,uniform,backward10"`` -> shift names."""
    if text.strip() == "all":
        return list(ALL_SHIFTS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    bad = [name for name in names if not SHIFT_PATTERN.fullmatch(name)]
    if bad or not names:
        raise EvaluationError(f"unknown shifts {bad or text!r}; use 'all' or names like forward50, uniform, "
                              "backward10 (forward/backward followed by an imbalance ratio >= 1).")
    return names


def parse_priors(text: str) -> list[str]:
    """A comma list of prior modes out of none, oracle, em."""
    modes = [mode.strip() for mode in text.split(",") if mode.strip()]
    bad = [mode for mode in modes if mode not in PRIOR_MODES]
    if bad or not modes:
        raise EvaluationError(f"unknown prior modes {bad or text!r}; choose from {', '.join(PRIOR_MODES)}.")
    return modes


def _split_shift(name: str) -> tuple[str, float]:
    match = SHIFT_PATTERN.fullmatch(name)
    if match.group(1) is None:
        return "uniform", 1.0
    return match.group(1), float(match.group(2))


# --------------------------------------------------------------------------- model and data


def load_model(model_id: str, device: str) -> tuple[BalPoEForImageClassification, Any]:
    """The BalPoE model and the image processor saved with it, from a directory or a Hub id."""
    try:
        model = BalPoEForImageClassification.from_pretrained(model_id)
        processor = AutoImageProcessor.from_pretrained(model_id)
    except OSError as error:
        hint = ("it is offline (HF_HUB_OFFLINE=1), so pass a local directory written by scripts/train.py or "
                "save_pretrained" if offline_mode() and not Path(model_id).exists()
                else "pass a directory holding config.json, the weights and preprocessor_config.json")
        raise EvaluationError(f"cannot load a BalPoE model and its image processor from {model_id!r}: "
                              f"{error}\nHint: {hint}.") from None
    if not model.config.class_counts:
        raise EvaluationError(f"{model_id} has no class_counts in its config: the training prior is needed "
                              "for the shot groups. Set BalPoEConfig.class_counts when training.")
    return model.to(device).eval(), processor


def load_test_set(args: argparse.Namespace) -> tuple[datasets.Dataset, str]:
    """The balanced test set and a short description of where it came from."""
    if args.test_file:
        try:
            files = expand_paths(args.test_file, "--test-file")
        except FileNotFoundError as error:
            raise EvaluationError(str(error)) from None
        if len(files) == 1 and Path(files[0]).is_dir():
            ds = datasets.load_dataset("imagefolder", data_dir=files[0], split="train")
        else:
            ds = datasets.load_dataset("parquet", data_files=files, split="train")
        return ds, ",".join(files)
    if args.dataset is None:
        raise EvaluationError("no test data: pass --dataset fashion-mnist, --test-file FILE.parquet (or an "
                              "imagefolder directory) or --dataset HUB_ID.")
    if args.dataset == "fashion-mnist":
        try:
            return load_fashion_mnist(args.data_dir)[args.split], f"fashion-mnist ({args.data_dir})"
        except FileNotFoundError as error:
            raise EvaluationError(str(error)) from None
    if offline_mode():
        raise EvaluationError(
            f"cannot load the Hub dataset {args.dataset!r}: offline mode is on (HF_HUB_OFFLINE=1 or "
            "HF_DATASETS_OFFLINE=1). Point the evaluation at local files instead: --test-file with parquet "
            "files (e.g. written by Dataset.to_parquet) or an imagefolder directory, with --image-column and "
            "--label-column, or --dataset fashion-mnist for the Debian package's files.")
    try:
        ds = datasets.load_dataset(args.dataset, args.dataset_config, split=args.split)
    except (ConnectionError, FileNotFoundError, OSError, ValueError) as error:
        raise EvaluationError(f"cannot load the Hub dataset {args.dataset!r} (split {args.split!r}): "
                              f"{error}. Or pass local files with --test-file.") from None
    return ds, f"{args.dataset} ({args.split})"


def _is_default_name(name: str, index: int) -> bool:
    return name == f"LABEL_{index}" or name == str(index)


def align_labels(ds: datasets.Dataset, label_column: str, id2label: dict[int, str]) -> np.ndarray:
    """The test labels as model class indices, matched by class name when both sides have names."""
    num_classes = len(id2label)
    feature = ds.features.get(label_column)
    labels = labels_array(ds, label_column)
    model_names = [str(id2label[i]) for i in range(num_classes)]
    if not isinstance(feature, datasets.ClassLabel) or all(
            _is_default_name(n, i) for i, n in enumerate(model_names)):
        bad = labels[labels >= num_classes]
        if bad.size:
            raise EvaluationError(f"test labels {np.unique(bad)[:10].tolist()} are outside the model's "
                                  f"{num_classes} classes; check --label-column.")
        return labels
    names = [str(n) for n in feature.names]
    if names == model_names[:len(names)]:
        return labels
    unknown = [n for n in names if n not in model_names]
    if unknown:
        raise EvaluationError(f"test classes {unknown[:10]} are not classes of the model "
                              f"({model_names[:10]}{' ...' if num_classes > 10 else ''}); is this the right "
                              "dataset and --label-column?")
    # An imagefolder (or a differently ordered ClassLabel) numbers its classes its own way: map by name.
    to_model = np.asarray([model_names.index(n) for n in names], dtype=np.int64)
    return to_model[labels]


@torch.inference_mode()
def predict(model: BalPoEForImageClassification, processor: Any, ds: datasets.Dataset, image_column: str,
            batch_size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits with a uniform target prior ``(N, C)`` and expert logits ``(N, E, C)``, one pass over ``ds``."""
    if image_column not in ds.column_names:
        raise EvaluationError(f"the test set has no image column {image_column!r}; its columns are "
                              f"{ds.column_names}. Name it with --image-column.")
    if not isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image())
    images = ds.select_columns([image_column])
    logits, expert_logits = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size][image_column]
        pixel_values = processor(images=batch, return_tensors="pt")["pixel_values"].to(device)
        out = model(pixel_values=pixel_values, target_prior="uniform")
        logits.append(out.logits.float().cpu())  # (B, C)
        expert_logits.append(out.expert_logits.float().cpu())  # (B, E, C)
    return torch.cat(logits), torch.cat(expert_logits)


# --------------------------------------------------------------------------- shifts and priors


def shifted_rows(labels: np.ndarray, train_counts: list[int], shift: str, seed: int) -> np.ndarray:
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


# --------------------------------------------------------------------------- printing


def _pct(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}"


def format_balanced(report: dict[str, Any], num_samples: int) -> str:
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


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved BalPoE model: a directory (scripts/train.py "
                        "--output-dir) or a Hub id")
    parser.add_argument("--dataset", default=None,
                        help="'fashion-mnist' (Debian's dataset-fashion-mnist files) or a Hub dataset id; "
                        "default: the test data of the run's recipe.yaml")
    parser.add_argument("--dataset-config", default=None, help="Hub dataset configuration name")
    parser.add_argument("--split", default=None, help="the balanced test split (default: test)")
    parser.add_argument("--data-dir", default=None,
                        help=f"where the Fashion-MNIST files are (default: {FASHION_MNIST_DIR})")
    parser.add_argument("--test-file", nargs="+", default=None,
                        help="local test data: parquet file(s) (glob patterns allowed) or one imagefolder "
                        "directory")
    parser.add_argument("--image-column", default=None, help="column of the images (default: image)")
    parser.add_argument("--label-column", default=None, help="column of the class labels (default: label)")
    parser.add_argument("--shifts", default="all",
                        help="'all' (forward50 ... uniform ... backward50) or a comma list of shift names")
    parser.add_argument("--prior", default="none,oracle,em",
                        help="comma list of prior modes: none, oracle, em")
    parser.add_argument("--output", default=None,
                        help="write the JSON report here, and the PNG plots beside it")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n-bins", type=int, default=15, help="confidence bins of ECE / MCE")
    parser.add_argument("--many", type=int, default=None,
                        help="many-shot: more training images than this (default 100)")
    parser.add_argument("--few", type=int, default=None,
                        help="few-shot: fewer training images than this (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shifted test sets' subsampling")
    return parser.parse_args(argv)


def fill_from_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """Fill settings not given on the command line from ``MODEL/recipe.yaml`` if the model is a training run
    directory, so that ``--model runs/NAME`` alone evaluates on the run's own test set."""
    recipe_file = Path(args.model) / "recipe.yaml"
    recipe = {}
    if recipe_file.is_file():
        recipe = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}
    # The recipe names one data source; a data source on the command line replaces it as a whole.
    if args.dataset is not None or args.test_file is not None:
        recipe = {k: v for k, v in recipe.items() if k not in ("dataset", "dataset_config", "test_file")}
    for name, (key, default) in RECIPE_SETTINGS.items():
        if getattr(args, name) is None:
            value = recipe.get(key)
            setattr(args, name, default if value is None else value)
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate as the command line says; print the report and return it as a JSON-ready dict."""
    shifts, priors = parse_shifts(args.shifts), parse_priors(args.prior)
    model, processor = load_model(args.model, args.device)
    train_counts = [int(c) for c in model.config.class_counts]
    ds, source = load_test_set(args)
    labels = align_labels(ds, args.label_column, model.config.id2label)
    report_kwargs = {"n_bins": args.n_bins, "many": args.many, "few": args.few}

    start = time.perf_counter()
    uniform_logits, expert_logits = predict(model, processor, ds, args.image_column, args.batch_size,
                                            args.device)
    seconds = time.perf_counter() - start
    balanced = long_tail_report(uniform_logits, labels, train_counts, **report_kwargs)
    # Each expert as trained (biased towards the head for lambda > 0, the tail for lambda < 0).
    experts = []
    for e in range(expert_logits.shape[1]):
        accuracy = accuracy_report(expert_logits[:, e].argmax(1), labels, train_counts, args.many, args.few)
        accuracy.pop("per_class_accuracy")
        experts.append({"lambda": model.config.lambdas[e], **accuracy})
    shift_results = evaluate_shifts(uniform_logits, labels, train_counts, shifts, priors, args.seed,
                                    **report_kwargs)
    shift_accuracy = {mode: {shift: shift_results[shift]["reports"][mode]["accuracy"] for shift in shifts}
                      for mode in priors}
    result: dict[str, Any] = {
        "model": args.model,
        "dataset": source,
        "num_test_samples": len(labels),
        "inference_seconds": round(seconds, 2),
        "train_counts": train_counts,
        "settings": {"n_bins": args.n_bins, "many": args.many, "few": args.few, "seed": args.seed},
        "balanced": balanced,
        "experts": experts,
        "shift_accuracy": shift_accuracy,
        "shifts": shift_results,
    }

    print(format_balanced(balanced, len(labels)))
    print("\nTop-1 accuracy (%) on label-shifted test sets (rows: prior mode, columns: test distribution):")
    print(format_shift_table(shift_accuracy, shifts))
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        images = {
            "reliability_diagram": f"{output.stem}_reliability.png",
            "per_class_accuracy": f"{output.stem}_per_class_accuracy.png",
        }
        reliability_diagram(uniform_logits, labels, output.parent / images["reliability_diagram"],
                            n_bins=args.n_bins, from_probs=False, title="Balanced test set")
        per_class_accuracy_plot(balanced["per_class_accuracy"], train_counts,
                                output.parent / images["per_class_accuracy"], many=args.many, few=args.few)
        result["images"] = images
        output.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        print(f"\nwrote {output} and {', '.join(images.values())} beside it")
    return result


def main(argv: list[str] | None = None) -> int:
    args = fill_from_recipe(parse_args(argv))
    try:
        run(args)
    except EvaluationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
