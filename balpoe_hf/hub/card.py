"""The model card of a BalPoE model: ``render_model_card`` fills the Jinja template in ``model_cards/`` (YAML
metadata with the model-index, the run in words, the metrics and the label-shift table) from the model's
``config.json``, the run's recipe and its evaluation report. Nothing it writes names a path of the machine
that trained: data are named by file name or Hub id only."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers.utils import CONFIG_NAME

from ..data.splits import imbalance_ratio
from ..errors import HubFolderError
from ..metrics import percent
from ..models.balpoe.configuration_balpoe import BalPoEConfig
from ..recipes.recipe import FEW_SHOT_THRESHOLD, MANY_SHOT_THRESHOLD
from .run_description import RECIPE_NAME, as_config, describe_data, describe_run, label_names

CARD_NAME = "README.md"
IMAGES_DIR = "images"
TEMPLATE_NAME = "modelcard_template.md"
# With more classes than this the card and its metadata carry a summary of the class counts and point to
# config.json, which always holds the full list.
MAX_LISTED_CLASSES = 20
# The metrics of the balanced test set that go into the card: (report key, model-index type, label).
BALANCED_METRICS = (
    ("balanced_accuracy", "balanced_accuracy", "Balanced accuracy"),
    ("accuracy", "accuracy", "Accuracy"),
    ("many", "many_shot_accuracy", "Many-shot accuracy"),
    ("medium", "medium_shot_accuracy", "Medium-shot accuracy"),
    ("few", "few_shot_accuracy", "Few-shot accuracy"),
    ("ece", "ece", "Expected calibration error (ECE)"),
    ("mce", "mce", "Maximum calibration error (MCE)"),
    ("nll", "nll", "Negative log-likelihood"),
    ("brier", "brier", "Brier score"),
)
# Column heads of the card's metrics table.
SHORT_LABELS = {"balanced_accuracy": "Balanced acc.", "accuracy": "Accuracy", "many": "Many",
                "medium": "Medium", "few": "Few", "ece": "ECE", "mce": "MCE", "nll": "NLL", "brier": "Brier"}
# Reported in percent in the card body; the others are plain numbers.
PERCENT_METRICS = {"balanced_accuracy", "accuracy", "many", "medium", "few", "ece", "mce"}


def template_path() -> Path:
    """The Jinja template of the model card.

    In an installed wheel it ships as ``balpoe_hf/model_cards/``; in a source checkout (editable install)
    it sits in the top-level ``model_cards/`` folder next to the package.
    """
    package_dir = Path(__file__).resolve().parents[1]
    for folder in (package_dir / "model_cards", package_dir.parent / "model_cards"):
        if (folder / TEMPLATE_NAME).is_file():
            return folder / TEMPLATE_NAME
    raise FileNotFoundError(f"model card template {TEMPLATE_NAME} not found next to {package_dir}; "
                            "reinstall balpoe-hf.")


def _balanced_report(eval_results: Mapping[str, Any] | None) -> dict[str, Any]:
    """The balanced-test-set metrics, with the ``eval_`` prefix of transformers-style result files dropped."""
    if not eval_results:
        return {}
    return {key.removeprefix("eval_"): value for key, value in eval_results.items()}


def _card_shift_rows(shift_report: Mapping[str, Any] | None
                     ) -> tuple[list[str], list[tuple[str, str, dict[str, Any]]]]:
    """The shifts and ``(mode, row label, {shift: accuracy})`` of the prior modes a card shows: ``none``,
    ``oracle`` and the default unknown-prior mode; every other mode stays in the evaluation report."""
    from ..evaluation.shifts import default_priors

    table = (shift_report or {}).get("shift_accuracy") or {}
    rows = [(mode, mode, dict(table[mode])) for mode in default_priors() if mode in table]
    columns: list[str] = []
    for _, _, accuracies in rows:
        columns.extend(shift for shift in accuracies if shift not in columns)
    return columns, rows


# What each row of the card's shift table predicts for.
MODE_TEXT = {
    "none": "`none` predicts for the uniform prior (balanced predictions)",
    "oracle": "`oracle` for the test set's true label distribution (a reference, unknown in practice)",
    "auto": "`auto` for the distribution estimated from the unlabeled test images by the default estimator "
            "(`model.adapt_to_unlabeled`), which keeps the uniform prior unless the shift exceeds its errors",
}

# What `auto` rests on, by whether the model has a held-out calibration (config.calibration).
AUTO_BASIS = {
    True: "For this model the estimate rests on the calibration that a held-out split of its training data "
          "measured.",
    False: "This model was trained without a held-out split, so the estimate reads its raw posteriors: on an "
           "over-confident model they lean to the frequent classes and can move the prior on images whose "
           "label distribution has not shifted (`adapt_to_unlabeled` warns when it moves the prior); known "
           "priors are not affected.",
}

# The settings of config.json that a published model and its card need, and what each of them is.
REQUIRED_SETTINGS = {"class_counts": "the training prior", "lambdas": "the expert biases"}


def missing_settings(config: Mapping[str, Any], where: str = CONFIG_NAME,
                     keys: Sequence[str] = tuple(REQUIRED_SETTINGS)) -> list[str]:
    """One problem for each of ``keys`` (of ``REQUIRED_SETTINGS``) that ``config`` lacks or holds empty;
    ``where`` names the config in the message."""
    return [f"{where} has no {key}: {REQUIRED_SETTINGS[key]} must travel with the model (set "
            f"BalPoEConfig.{key} when training)." for key in keys if not config.get(key)]


def class_counts_of(config: Mapping[str, Any], where: str = CONFIG_NAME) -> list[int]:
    """The training class counts of a ``config.json`` dict; ``HubFolderError`` without them."""
    problems = missing_settings(config, where, ["class_counts"])
    if problems:
        raise HubFolderError(problems[0])
    return [int(c) for c in config["class_counts"]]


def render_model_card(
    config: BalPoEConfig | Mapping[str, Any],
    eval_results: Mapping[str, Any] | None = None,
    shift_report: Mapping[str, Any] | None = None,
    *,
    repo_id: str = "balpoe-model",
    images: Mapping[str, str] | None = None,
    recipe: Mapping[str, Any] | None = None,
    dataset_id: str | None = None,
    dataset_name: str | None = None,
    report_file: str | None = None,
    license: str | None = "apache-2.0",
) -> ModelCard:
    """The Hub model card of a BalPoE model, from its ``config.json`` dict, the recipe it was trained with
    and its evaluation results.

    Args:
        config: the model's ``BalPoEConfig``, or its ``config.json`` dict (read through the class); it needs
            ``class_counts``, and ``id2label`` names the classes.
        eval_results: the balanced-test-set report (``long_tail_report`` keys, optionally ``eval_``-prefixed).
        shift_report: a ``balpoe-evaluate`` report; the ``none``, ``oracle`` and default unknown-prior rows
            of its ``shift_accuracy`` table (``{prior mode: {shift: accuracy}}``) become the label-shift
            table and model-index entries (the other modes stay in the report).
        repo_id: the Hub id used in the usage snippet and as the model name.
        images: card-relative paths of the pictures: ``class_counts``, ``reliability_diagram`` and
            ``per_class_accuracy`` (each optional).
        recipe: the resolved recipe the run saved (``recipe.yaml``): the training table, the data names
            (file names only, never local paths) and the shot thresholds.
        dataset_id, dataset_name: override the Hub dataset id and the readable data name of the recipe.
        report_file: the card-relative path of the uploaded evaluation report, linked as the full grid.
    """
    counts = class_counts_of(config.to_dict() if isinstance(config, BalPoEConfig) else config, "the config")
    config = as_config(config)
    lambdas, backbone = config.lambdas, config.backbone
    per_class_lambdas = any(isinstance(x, list) for x in lambdas)
    num_classes = len(counts)
    names = label_names(config, num_classes)
    ratio = imbalance_ratio(counts)
    ratio_value = None if math.isinf(ratio) else round(ratio, 2)
    recipe = dict(recipe or {})
    data = describe_data(recipe) if recipe else None
    training_dataset_id = dataset_id or (data or {}).get("dataset_id")
    evaluated = (shift_report or {}).get("dataset")
    if data and evaluated and evaluated != data["source"]:
        # The report, whose numbers the card shows, evaluated other data than the recipe's test set.
        data = {**data, "test": f"`{evaluated}`", "name": evaluated, "dataset_id": None}
    dataset_id = dataset_id or (data or {}).get("dataset_id")
    dataset_label = dataset_name or (data or {}).get("name") or dataset_id or "test set"
    report = _balanced_report(eval_results)
    settings = (shift_report or {}).get("settings") or {}
    shots = {"many": settings.get("many", recipe.get("many_threshold", MANY_SHOT_THRESHOLD)),
             "few": settings.get("few", recipe.get("few_threshold", FEW_SHOT_THRESHOLD))}
    shift_columns, shift_rows = _card_shift_rows(shift_report)
    model_name = repo_id.rstrip("/").split("/")[-1]
    run = describe_run(config, recipe)

    balpoe_meta: dict[str, Any] = {
        "backbone": backbone,
        "num_experts": run["experts"],
        "lambdas": "per class, see config.json" if per_class_lambdas else [float(x) for x in lambdas],
        "num_classes": num_classes,
        "imbalance_ratio": ratio_value,
    }
    if run["method"]:
        balpoe_meta["method"] = run["method"]
    if recipe:
        balpoe_meta.update({"recipe": recipe.get("name"), "epochs": recipe.get("epochs"),
                            "mixup_alpha": float(recipe.get("mixup_alpha") or 0)})

    # The metadata holds the balanced test set's metrics only; the shifted sets are in the body and in the
    # uploaded report (a model-index entry per shifted set and prior mode made the header most of the card).
    eval_entries = []
    metric_cells = []
    for key, metric_type, label in BALANCED_METRICS:
        if key not in report:
            continue
        value = report[key]
        metric_cells.append({"name": SHORT_LABELS[key] + (" %" if key in PERCENT_METRICS else ""),
                             "value": percent(value) if key in PERCENT_METRICS else
                             ("n/a" if value is None else f"{value:.3f}")})
        if value is not None:
            eval_entries.append(EvalResult(
                task_type="image-classification", task_name="Long-tailed image classification",
                dataset_type=dataset_id or "custom", dataset_name=f"{dataset_label} (balanced test set)",
                dataset_split="test", metric_type=metric_type, metric_name=label,
                metric_value=round(float(value), 4)))

    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        license=license,
        tags=["image-classification", "long-tailed", "balpoe", "timm", backbone],
        datasets=[training_dataset_id] if training_dataset_id else None,
        metrics=["balanced_accuracy", "accuracy", "ece"] if report else None,
        model_name=model_name if eval_entries else None,
        eval_results=eval_entries or None,
        balpoe=balpoe_meta,
    )
    num_test = (shift_report or {}).get("num_test_samples") or report.get("samples")
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        model_name=model_name,
        repo_id=repo_id,
        headline=run["headline"],
        results=_results_text(report, shift_rows, (data or {}).get("test"), num_test),
        run_rows=run["rows"],
        num_classes=num_classes,
        class_table=[{"id": i, "label": names[i], "count": counts[i]} for i in range(num_classes)]
        if num_classes <= MAX_LISTED_CLASSES else None,
        test_data=(data or {}).get("test"),
        num_test=f"{num_test:,}" if num_test else None,
        metrics=metric_cells or None,
        shot_thresholds=shots,
        # One row per test distribution, one column per prior mode: 11 shifts fit no page as columns.
        shift_table={"heads": [label for _, label, _ in shift_rows],
                     "rows": [{"shift": shift,
                               "values": [percent(acc.get(shift)) for _, _, acc in shift_rows]}
                              for shift in shift_columns],
                     "modes": [MODE_TEXT[mode] for mode, _, _ in shift_rows]} if shift_rows else None,
        report_file=report_file,
        auto_basis=AUTO_BASIS[config.calibration is not None],
        images=dict(images or {}),
        retrain_command=(f"balpoe-train --config {RECIPE_NAME} {data['flags']}".strip() if data else None),
        retrain_note=(data or {}).get("note"),
    )


def _points(value: float) -> str:
    return f"{value:+.2f}"


def _results_text(report: Mapping[str, Any], shift_rows: list[tuple[str, str, dict[str, Any]]],
                  test_data: str | None, num_test: int | None) -> str | None:
    """The card's result in a few lines, for its first screen: the balanced test set's balanced accuracy and
    ECE, and under label shift, what the unknown-prior mode and the true prior gain over uniform predictions
    (mean and range over the shifted sets, in accuracy points)."""
    if report.get("balanced_accuracy") is None:
        return None
    where = ", ".join(part for part in (test_data, f"{num_test:,} images" if num_test else None) if part)
    text = (f"**Balanced test set**{f' ({where})' if where else ''}: balanced accuracy "
            f"**{percent(report['balanced_accuracy'])} %**"
            + (f", ECE **{percent(report['ece'])} %**" if report.get("ece") is not None else "") + ".")
    accuracy = {mode: table for mode, _, table in shift_rows}
    shifts = [shift for shift in accuracy.get("none", {}) if shift != "uniform"
              and all(accuracy[mode].get(shift) is not None for mode in accuracy)]
    unknown = next((mode for mode in accuracy if mode not in ("none", "oracle")), None)
    if not shifts or unknown is None:
        return text
    gains = {mode: [100 * (accuracy[mode][shift] - accuracy["none"][shift]) for shift in shifts]
             for mode in (unknown, "oracle") if mode in accuracy}
    how = "(`auto`)" if unknown == "auto" else "by EM (`em`)"
    text += (f"\n\n**Under label shift** (the test set resampled to {len(shifts)} other label "
             f"distributions): predicting for the distribution estimated from the unlabeled test images "
             f"{how} changes top-1 accuracy by "
             f"**{_points(statistics.fmean(gains[unknown]))} points** on average over uniform predictions "
             f"(from {_points(min(gains[unknown]))} to {_points(max(gains[unknown]))})")
    if "oracle" in gains:
        text += (f"; the true distribution would give {_points(statistics.fmean(gains['oracle']))} "
                 f"(up to {_points(max(gains['oracle']))})")
    return text + "."

