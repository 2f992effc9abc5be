"""Publishing trained BalPoE runs to the Hugging Face Hub.

``prepare_hub_folder`` renders the model card (``README.md`` with YAML metadata, from the Jinja template in
``model_cards/``) and its pictures into a saved model directory and checks that the directory holds
everything a Hub repository needs; ``push_to_hub`` does the same and uploads the publishable files with
``huggingface_hub.HfApi`` (``create_repo`` + ``upload_folder``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub import constants as hub_constants
from transformers.dynamic_module_utils import get_imports, get_relative_imports
from transformers.utils import (
    CONFIG_NAME,
    IMAGE_PROCESSOR_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
)

from .checkpoints import check_writable, record_outputs, written_by_package
from .data import imbalance_ratio
from .errors import HubFolderError, HubPublishError, TrainingError
from .loading import FASHION_MNIST
from .methods import METHOD_DESCRIPTIONS
from .metrics import percent
from .recipes import read_recipe_file

CARD_NAME = "README.md"
IMAGES_DIR = "images"
TEMPLATE_NAME = "modelcard_template.md"
EVAL_RESULTS_NAME = "eval_results.json"
RECIPE_NAME = "recipe.yaml"
# Where the docs tell balpoe-evaluate to write its report (--output), relative to the run directory.
DEFAULT_EVAL_REPORT = "eval/report.json"
# Run artefacts of scripts/train.py published next to the model when present.
OPTIONAL_FILES = (EVAL_RESULTS_NAME, "train_results.json", RECIPE_NAME)
# The Hub id of a dataset that a recipe reads from local files.
LOCAL_DATASET_HUB_IDS = {"fashion-mnist": "zalando-datasets/fashion_mnist"}
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
# Pickled weights can run code when loaded; this project publishes safetensors only.
PICKLE_WEIGHT_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")


@dataclass
class HubFolder:
    """A model directory ready to upload: the rendered card and the files that would be uploaded."""

    path: Path
    files: list[str]  # paths relative to ``path``, POSIX separators, sorted
    card: ModelCard


def template_path() -> Path:
    """The Jinja template of the model card.

    In an installed wheel it ships as ``balpoe_hf/model_cards/``; in a source checkout (editable install)
    it sits in the top-level ``model_cards/`` folder next to the package.
    """
    package_dir = Path(__file__).resolve().parent
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


def _label_names(config: Mapping[str, Any], num_classes: int) -> list[str]:
    id2label = config.get("id2label") or {}
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(num_classes)]


def _number(value: Any) -> str:
    return f"{float(value):g}"


# --------------------------------------------------------------------------- what the run was


def _local_name(path: str) -> str:
    """A local file or folder as the card names it: its last part only, never where it lies on the machine
    that trained (``/data/cifar10/train.parquet`` -> ``train.parquet``, a folder -> ``train/``)."""
    name = Path(path).name or str(path)
    return f"{name}/" if Path(path).is_dir() else name


def describe_data(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """How the card names a run's data: ``train`` and ``test`` (Markdown), ``dataset_id`` (a Hub dataset
    id or ``None``), ``name`` (short, for the model-index), ``flags`` (the data flags of the command that
    retrains on the reader's own copy of the data) and ``note`` (what to adapt in it). Local paths are
    reduced to their file names."""
    if recipe.get("train_list"):
        train, test = _local_name(recipe["train_list"]), _local_name(recipe.get("test_list") or "TEST_LIST")
        return {"train": f"split list `{train}` (image paths relative to a data root)",
                "test": f"split list `{test}`", "dataset_id": None, "name": test,
                "flags": f"--train-list {train} --test-list {test} --data-root DATA_ROOT",
                "note": "with the list files and the image folder where you keep them"}
    if recipe.get("train_file"):
        train = [_local_name(p) for p in recipe["train_file"]]
        test = [_local_name(p) for p in recipe.get("test_file") or []] or ["TEST_FILE"]
        return {"train": ", ".join(f"`{name}`" for name in train) + " (local files)",
                "test": ", ".join(f"`{name}`" for name in test), "dataset_id": None,
                "name": ", ".join(test),
                "flags": f"--train-file {' '.join(train)} --test-file {' '.join(test)}",
                "note": "with the data files where you keep them"}
    dataset = recipe.get("dataset")
    if dataset == FASHION_MNIST:
        hub_id = LOCAL_DATASET_HUB_IDS[FASHION_MNIST]
        return {"train": f"Fashion-MNIST training split (IDX files; on the Hub: [`{hub_id}`]"
                         f"(https://huggingface.co/datasets/{hub_id}))",
                "test": "Fashion-MNIST test split", "dataset_id": hub_id, "name": "Fashion-MNIST",
                "flags": "", "note": "adding `--data-dir DIR` where Debian's `dataset-fashion-mnist` is not "
                                     "installed (DIR: the four IDX files)"}
    if dataset:
        config = f" (configuration `{recipe['dataset_config']}`)" if recipe.get("dataset_config") else ""
        link = f"[`{dataset}`](https://huggingface.co/datasets/{dataset}){config}"
        return {"train": f"{link}, split `{recipe.get('train_split', 'train')}`",
                "test": f"`{dataset}`, split `{recipe.get('test_split', 'test')}`", "dataset_id": dataset,
                "name": dataset, "flags": "", "note": ""}
    return {"train": "not recorded", "test": "not recorded", "dataset_id": None, "name": "test set",
            "flags": "", "note": ""}


def _loss_text(config: Mapping[str, Any], lambdas: list[float]) -> str:
    if config.get("loss") == "lade":
        weight = _number(config.get("lade_weight", 0.1))
        return f"balanced softmax `CE(z + log pi, y)` + {weight} x the LADE regulariser (Hong et al., 2021)"
    if len(lambdas) == 1:
        return {1.0: "cross-entropy `CE(z, y)`",
                0.0: "balanced softmax `CE(z + log pi, y)` (Ren et al., NeurIPS 2020)"}.get(
            lambdas[0], f"logit-adjusted cross-entropy `CE(z + {_number(1 - lambdas[0])} log pi, y)`")
    return "each expert's logit-adjusted cross-entropy `CE(z_e + (1 - lambda_e) log pi, y)`, averaged"


def _prediction_text(lambdas: list[float], remove_mean_lambda: bool, per_class: bool) -> str:
    zbar = "z" if len(lambdas) == 1 else "mean_e z_e"
    mean = 0.0 if per_class or not lambdas else statistics.fmean(lambdas)
    if mean == 0 or per_class:
        bias = ""
    elif remove_mean_lambda:
        bias = " - log pi" if mean == 1 else f" - {_number(mean)} log pi"
    elif len(lambdas) == 1 and mean == 1:
        return "`z + log pi_target`: the raw logits, which keep the training distribution's bias"
    else:
        return (f"`{zbar} + log pi_target`, keeping the mean bias (mean lambda {_number(mean)}, as the "
                "official BalPoE code)")
    return f"`{zbar}{bias} + log pi_target`"


def _schedule_text(recipe: Mapping[str, Any]) -> str:
    schedule = recipe.get("lr_schedule", "multistep")
    epochs = recipe.get("epochs")
    if schedule == "multistep":
        # Milestones past the last epoch never applied: a shortened paper schedule ran at a constant lr.
        milestones = [str(m) for m in recipe.get("lr_milestones") or [] if m < (epochs or 0)]
        schedule = (f"x{_number(recipe.get('lr_gamma', 0.1))} at epochs {', '.join(milestones)}" if milestones
                    else "constant")
    warmup = float(recipe.get("warmup_epochs") or 0)
    text = (f"{epochs} epoch{'s' if epochs != 1 else ''}, batch {recipe.get('batch_size')}, SGD lr "
            f"{_number(recipe.get('lr', 0.1))} ({schedule}"
            + (f", {_number(warmup)} warm-up epoch{'s' if warmup != 1 else ''}" if warmup else "")
            + f"), weight decay {_number(recipe.get('weight_decay', 0))}")
    if recipe.get("scale_expert_lr") and int(recipe.get("num_experts") or 1) > 1:
        text += "; the experts' own layers at num_experts x lr"
    return text


def _augmentation_text(recipe: Mapping[str, Any]) -> str:
    augment = recipe.get("augment", "cifar")
    if augment == "cifar":
        steps = [f"random crop (padding {recipe.get('crop_padding', 4)})"]
        if recipe.get("hflip", True):
            steps.append("horizontal flip")
        if recipe.get("rotation"):
            steps.append(f"rotation up to {_number(recipe['rotation'])} degrees")
    elif augment == "imagenet":
        steps = ["random resized crop", "horizontal flip"]
        if recipe.get("color_jitter"):
            steps.append(f"colour jitter {_number(recipe['color_jitter'])}")
    else:
        steps = []
    if recipe.get("auto_augment", "none") != "none":
        steps.append(f"AutoAugment ({recipe['auto_augment']})")
    if recipe.get("rand_augment"):
        steps.append(f"RandAugment `{recipe['rand_augment']}`")
    if recipe.get("cutout"):
        steps.append(f"cutout {recipe['cutout']}")
    return ", ".join(steps) or "none"


def _headline(config: Mapping[str, Any], recipe: Mapping[str, Any] | None, backbone: str,
              lambda_text: str) -> str:
    """The card's first sentence: what kind of model this is, in the words of its method."""
    method = config.get("method")
    experts = int(config.get("num_experts") or 1)
    mixup = float((recipe or {}).get("mixup_alpha") or 0)
    # Mixup is named only when the recipe says it was on; without a recipe the card does not guess.
    training = ("" if recipe is None else f", trained with mixup (alpha {_number(mixup)})" if mixup > 0
                else ", trained without mixup")
    if experts > 1:
        if method == "balpoe-erm":
            training = ", trained without mixup (the paper's ERM variant)"
        return (f"A **Balanced Product of Calibrated Experts** (BalPoE, Sanchez Aimar et al., CVPR 2023) "
                f"image classifier for long-tailed data{training}: {experts} experts "
                f"(lambda = {lambda_text}) on a shared `{backbone}` trunk, averaged into one ensemble")
    baseline = {"ce": "plain cross-entropy", "ce-la": "cross-entropy with post-hoc logit adjustment "
                "(Menon et al., ICLR 2021)", "bs": "balanced softmax (Ren et al., NeurIPS 2020)",
                "lade": "LADE (Hong et al., CVPR 2021)"}.get(method or "", "single-network")
    return (f"A long-tailed image classifier, the **{baseline}** baseline built with balpoe-hf{training}: "
            f"one `{backbone}` network")


def describe_run(config: Mapping[str, Any], recipe: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a card says about how its model was trained, from the saved config and the recipe as run.

    Built from the fields themselves (a recipe's ``description`` is the shipped recipe's and need not hold
    after command-line overrides, so it is not used). Returns ``headline`` (the first sentence) and
    ``rows`` (``(setting, value)`` pairs of the card's training table); without a recipe only what the
    config says (model, loss, prediction) is described.
    """
    recipe = dict(recipe or {})
    counts = [int(c) for c in config.get("class_counts") or []]
    lambdas_raw = list(config.get("lambdas") or [])
    per_class = any(isinstance(x, list) for x in lambdas_raw)
    lambdas = [] if per_class else [float(x) for x in lambdas_raw]
    lambda_text = "per class (see `config.json`)" if per_class else ", ".join(_number(x) for x in lambdas)
    backbone = str(config.get("backbone", "unknown"))
    experts = int(config.get("num_experts") or max(1, len(lambdas_raw)))
    remove_mean_lambda = bool(config.get("remove_mean_lambda", True))
    method = config.get("method")
    rows: list[tuple[str, str]] = []
    rows.append(("Method", f"`{method}` ({METHOD_DESCRIPTIONS.get(method, 'see balpoe_hf.methods')})"
                 if method else "the recipe's own settings (no method preset)"))
    shared = config.get("shared_stages")
    trunk = "a shared trunk" + ("" if shared is None else f" of {shared} stage{'s' if shared != 1 else ''}")
    model = (f"`{backbone}` (timm): {trunk} and {experts} expert branches" if experts > 1
             else f"one `{backbone}` network (timm)")
    classifier = config.get("classifier", "cosine")
    rows.append(("Model", f"{model}, {classifier} classifier; lambda = {lambda_text}"))
    rows.append(("Loss", _loss_text(config, lambdas)))
    if recipe:
        mixup = float(recipe.get("mixup_alpha") or 0)
        rows.append(("Mixup", f"alpha {_number(mixup)} (soft targets)" if mixup > 0 else "off"))
    rows.append(("Prediction", _prediction_text(lambdas, remove_mean_lambda, per_class)
                 + "; target prior " + _target_prior_text(config.get("target_prior"))))
    if recipe:
        data = describe_data(recipe)
        rows.append(("Training data", data["train"]))
        ratio = recipe.get("imbalance_ratio")
        profile = recipe.get("imbalance_profile", "exponential")
        split = (f"made long-tailed with imbalance ratio {_number(ratio)} ({profile} profile, seed "
                 f"{recipe.get('split_seed', 0)})" if ratio is not None else "as given (not subsampled)")
        if float(recipe.get("holdout_fraction") or 0) > 0:
            split += (f"; {float(recipe['holdout_fraction']):.0%} of each class held out (never trained on) "
                      "to calibrate the model")
        rows.append(("Long-tailed split", split))
    if counts:
        ratio = imbalance_ratio(counts)
        rows.append(("Training images", f"{sum(counts):,} in {len(counts)} classes, {max(counts):,} down to "
                                        f"{min(counts):,} (imbalance ratio "
                                        f"{'infinite' if math.isinf(ratio) else _number(round(ratio, 2))})"))
    if recipe:
        rows.append(("Test data", data["test"]))
        rows.append(("Schedule", _schedule_text(recipe)))
        rows.append(("Augmentation", f"{_augmentation_text(recipe)}; images {recipe.get('image_size')} px"))
        rows.append(("Recipe", f"`{recipe.get('name', 'custom')}`, seed {recipe.get('seed', 0)}; every "
                               f"setting in [`{RECIPE_NAME}`]({RECIPE_NAME})"))
    return {"headline": _headline(config, recipe or None, backbone, lambda_text), "rows": rows,
            "experts": experts}


def _target_prior_text(target_prior: Any) -> str:
    if target_prior is None or target_prior == "uniform":
        return "uniform by default (balanced predictions)"
    if target_prior == "train":
        return "the training prior by default"
    return "a custom prior by default (`config.json`, `target_prior`)"


def _chosen_estimator(config: Mapping[str, Any]) -> str | None:
    """The estimator ``auto`` chose for this model (``config.shift_estimator["name"]``), if recorded."""
    estimator = config.get("shift_estimator")
    return estimator.get("name") if isinstance(estimator, Mapping) else None


def _card_shift_rows(shift_report: Mapping[str, Any] | None, config: Mapping[str, Any]
                     ) -> tuple[list[str], list[tuple[str, str, dict[str, Any]]]]:
    """The shifts and ``(mode, row label, {shift: accuracy})`` of the prior modes a card shows: ``none``,
    ``oracle`` and the default unknown-prior mode; every other mode stays in the evaluation report."""
    from .evaluation import default_priors

    table = (shift_report or {}).get("shift_accuracy") or {}
    modes = [mode for mode in default_priors(config.get("calibration")) if mode in table]
    chosen = _chosen_estimator(config)
    rows = [(mode, f"auto (chose {chosen})" if mode == "auto" and chosen else mode, dict(table[mode]))
            for mode in modes]
    columns: list[str] = []
    for _, _, accuracies in rows:
        columns.extend(shift for shift in accuracies if shift not in columns)
    return columns, rows


# What each row of the card's shift table predicts for.
MODE_TEXT = {
    "none": "`none` predicts for the uniform prior (balanced predictions)",
    "oracle": "`oracle` for the test set's true label distribution (a reference, unknown in practice)",
    "auto": "`auto` for the distribution estimated from the unlabeled test images by the default estimator "
            "(`model.adapt_to_unlabeled`)",
    "em": "`em` for the distribution estimated from the unlabeled test images by EM on the model's "
          "posteriors (Saerens et al., 2002; the model has no held-out calibration, which the default `auto` "
          "needs)",
}


def render_model_card(
    config: Mapping[str, Any],
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
        config: the model's config as saved in ``config.json`` (needs ``backbone``, ``lambdas``,
            ``class_counts``; ``id2label`` names the classes).
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
    counts = [int(c) for c in config.get("class_counts") or []]
    if not counts:
        raise HubFolderError("config has no class_counts: the card needs the training class counts "
                             "(train with balpoe_hf so that BalPoEConfig.class_counts is set).")
    lambdas = list(config.get("lambdas") or [])
    per_class_lambdas = any(isinstance(x, list) for x in lambdas)
    backbone = str(config.get("backbone", "unknown"))
    num_classes = len(counts)
    names = _label_names(config, num_classes)
    ratio = imbalance_ratio(counts)
    ratio_value = None if math.isinf(ratio) else round(ratio, 2)
    recipe = dict(recipe or {})
    data = describe_data(recipe) if recipe else None
    dataset_id = dataset_id or (data or {}).get("dataset_id")
    dataset_label = dataset_name or dataset_id or (data or {}).get("name") or "test set"
    report = _balanced_report(eval_results)
    settings = (shift_report or {}).get("settings") or {}
    shots = {"many": settings.get("many", recipe.get("many_threshold", 100)),
             "few": settings.get("few", recipe.get("few_threshold", 20))}
    shift_columns, shift_rows = _card_shift_rows(shift_report, config)
    model_name = repo_id.rstrip("/").split("/")[-1]
    run = describe_run(config, recipe)
    method = config.get("method")

    balpoe_meta: dict[str, Any] = {
        "backbone": backbone,
        "num_experts": run["experts"],
        "lambdas": "per class, see config.json" if per_class_lambdas else [float(x) for x in lambdas],
        "num_classes": num_classes,
        "imbalance_ratio": ratio_value,
        "target_prior": config.get("target_prior") or "uniform",
        "remove_mean_lambda": bool(config.get("remove_mean_lambda", True)),
    }
    if method:
        balpoe_meta["method"] = method
    if recipe:
        balpoe_meta.update({"recipe": recipe.get("name"), "epochs": recipe.get("epochs"),
                            "mixup_alpha": float(recipe.get("mixup_alpha") or 0)})
    if num_classes <= MAX_LISTED_CLASSES:
        balpoe_meta["class_counts"] = counts
    else:
        balpoe_meta["class_counts_summary"] = {
            "total": sum(counts), "max": max(counts), "median": statistics.median(counts), "min": min(counts),
            "full_list": "config.json: class_counts",
        }

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
    for mode, _, accuracies in shift_rows:
        for shift, value in accuracies.items():
            if value is None:
                continue
            eval_entries.append(EvalResult(
                task_type="image-classification", task_name="Long-tailed image classification",
                dataset_type=dataset_id or "custom",
                dataset_name=f"{dataset_label} (test, label shift {shift})",
                dataset_split=f"test-{shift}", dataset_args={"label_shift": shift},
                metric_type="accuracy", metric_name=f"Top-1 accuracy (target prior: {mode})",
                metric_value=round(float(value), 4)))

    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        license=license,
        tags=["image-classification", "long-tailed", "balpoe", "timm", backbone],
        datasets=[dataset_id] if dataset_id else None,
        metrics=["balanced_accuracy", "accuracy", "ece"] if report else None,
        model_name=model_name if eval_entries else None,
        eval_results=eval_entries or None,
        balpoe=balpoe_meta,
    )
    unknown_mode = "auto" if config.get("calibration") is not None else "em"
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        model_name=model_name,
        repo_id=repo_id,
        headline=run["headline"],
        run_rows=run["rows"],
        num_classes=num_classes,
        class_table=[{"id": i, "label": names[i], "count": counts[i]} for i in range(num_classes)]
        if num_classes <= MAX_LISTED_CLASSES else None,
        test_data=(data or {}).get("test"),
        num_test=(shift_report or {}).get("num_test_samples"),
        metrics=metric_cells or None,
        shot_thresholds=shots,
        shift_table={"columns": shift_columns,
                     "rows": [{"label": label, "values": [percent(acc.get(s)) for s in shift_columns]}
                              for _, label, acc in shift_rows],
                     "modes": [MODE_TEXT[mode] for mode, _, _ in shift_rows]} if shift_rows else None,
        chosen_estimator=_chosen_estimator(config) if any(mode == "auto" for mode, _, _ in shift_rows)
        else None,
        report_file=report_file,
        images=dict(images or {}),
        image_size=int(config.get("image_size") or 224),
        unknown_mode=unknown_mode,
        retrain_command=(f"balpoe-train --config {RECIPE_NAME} {data['flags']}".strip() if data else None),
        retrain_note=(data or {}).get("note"),
    )


def _read_json(path: Path, what: str = "file") -> dict[str, Any] | None:
    """The JSON object in ``path`` (``None`` if there is no such file); ``HubFolderError`` naming ``what``
    for anything else (malformed JSON, a binary file, a list)."""
    if not path.is_file():
        return None
    try:
        with path.open(encoding="utf-8") as handle:
            values = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        problem = f"is not valid JSON ({error})"
    else:
        if isinstance(values, dict):
            return values
        problem = f"holds a JSON {type(values).__name__}, not an object"
    raise HubFolderError(f"the {what} {path} {problem}: give the file balpoe-hf wrote, or write it again. "
                         "Nothing was written.")


def check_repo_id(repo_id: str) -> None:
    """Refuse a Hub repository id the Hub would refuse, before anything is written (it goes into the card)."""
    try:
        huggingface_hub.utils.validate_repo_id(repo_id)
    except huggingface_hub.utils.HFValidationError as error:
        raise HubFolderError(f"{repo_id!r} is not a Hub repository id ({error}); write it as NAME or "
                             "USER/NAME, e.g. me/balpoe-cifar10-lt. Nothing was written.") from None


def _check_folder_writable(folder: Path, names: Sequence[str]) -> None:
    """Refuse a model folder that cannot take the card and its pictures (a read-only copy, say)."""
    try:
        check_writable(folder, "the model card into")
    except TrainingError as error:
        raise HubFolderError(f"{error} Nothing was written.") from None
    read_only = [name for name in names if (folder / name).exists() and not os.access(folder / name, os.W_OK)]
    if read_only:
        raise HubFolderError(f"cannot write the model card into {folder}: {read_only} are read-only; make "
                             "them writable or move them away. Nothing was written.")


def _weight_files(folder: Path, problems: list[str]) -> list[str]:
    """The safetensors weight files of ``folder`` (one file, or the shards of an index)."""
    pickled = sorted({p.name for pattern in PICKLE_WEIGHT_PATTERNS for p in folder.glob(pattern)})
    if pickled:
        problems.append(f"pickle weights {pickled}: this project publishes safetensors only. Load the model "
                        "and re-save it with model.save_pretrained(dir) (safetensors is the default), then "
                        "move the pickle files out of the folder.")
    index = _read_json(folder / SAFE_WEIGHTS_INDEX_NAME, "weights index")
    if index is not None:
        shards = sorted(set(index.get("weight_map", {}).values()))
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing:
            problems.append(f"{SAFE_WEIGHTS_INDEX_NAME} names missing shards {missing}: copy them in "
                            "or re-save the model.")
        return [SAFE_WEIGHTS_INDEX_NAME, *shards]
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        return [SAFE_WEIGHTS_NAME]
    problems.append(f"no weights ({SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}): save the model with "
                    "model.save_pretrained(dir).")
    return []


def _code_files(folder: Path, config: Mapping[str, Any], problems: list[str]) -> list[str]:
    """The remote-code files that ``config.json``'s ``auto_map`` needs, following ``from .x import`` links."""
    auto_map = config.get("auto_map") or {}
    if not auto_map:
        problems.append("config.json has no auto_map, so trust_remote_code=True cannot load the model "
                        "without balpoe_hf: save it with a balpoe_hf BalPoEForImageClassification.")
        return []
    # auto_map values look like "modeling_balpoe.BalPoEForImageClassification" (or "repo--module.Class").
    refs = [ref for ref in auto_map.values() if isinstance(ref, str)]
    queue = sorted({ref.split("--")[-1].rsplit(".", 1)[0] for ref in refs})
    seen: list[str] = []
    while queue:
        module = queue.pop()
        if module in seen:
            continue
        seen.append(module)
        path = folder / f"{module}.py"
        if not path.is_file():
            problems.append(f"code file {module}.py (needed by auto_map or a relative import) is missing: "
                            "re-save the model with save_pretrained, which copies the code files.")
            continue
        if "balpoe_hf" in get_imports(path):
            problems.append(f"code file {module}.py imports balpoe_hf, which a user loading with "
                            "trust_remote_code=True may not have: use flat relative imports "
                            "(from .x import Y).")
        queue.extend(get_relative_imports(path))
    return sorted(f"{module}.py" for module in seen if (folder / f"{module}.py").is_file())


def check_hub_folder(model_dir: str | Path, require_card: bool = True, extra_files: Sequence[str] = ()
                     ) -> list[str]:
    """Check that ``model_dir`` holds a publishable model and return the files to upload.

    Required: safetensors weights (pickle weights are refused), ``config.json`` of a BalPoE model with
    ``class_counts`` and ``lambdas``, the remote-code files its ``auto_map`` needs, the image processor
    config, and (with ``require_card``) ``README.md`` with every image it links. Optional run artefacts
    (``eval_results.json``, ``train_results.json``, ``recipe.yaml``) and ``extra_files`` (relative paths
    that must exist) are added. Raises ``HubFolderError`` listing every problem.
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise HubFolderError(f"model directory {folder} does not exist.")
    problems: list[str] = []
    config = _read_json(folder / CONFIG_NAME, "model config")
    files = [CONFIG_NAME]
    if config is None:
        problems.append(f"no {CONFIG_NAME}: save the model with model.save_pretrained(dir).")
        config = {}
    elif config.get("model_type") != "balpoe":
        problems.append(f"{CONFIG_NAME} has model_type {config.get('model_type')!r}, not 'balpoe'.")
    for key in ("class_counts", "lambdas"):
        if config and not config.get(key):
            problems.append(f"{CONFIG_NAME} has no {key}: the training prior and the expert biases must "
                            "travel with the model (set them in BalPoEConfig).")
    files += _weight_files(folder, problems)
    files += _code_files(folder, config, problems)
    if (folder / IMAGE_PROCESSOR_NAME).is_file():
        files.append(IMAGE_PROCESSOR_NAME)
    else:
        problems.append(f"no {IMAGE_PROCESSOR_NAME}: save the image processor beside the model "
                        "(balpoe_hf.processing.build_image_processor(config).save_pretrained(dir)) so that "
                        "pipeline('image-classification') works.")
    if require_card:
        card_path = folder / CARD_NAME
        if card_path.is_file():
            files.append(CARD_NAME)
            for link in _linked_images(card_path.read_text(encoding="utf-8")):
                if (folder / link).is_file():
                    files.append(link)
                else:
                    problems.append(f"{CARD_NAME} links the image {link}, which is not in the folder.")
        else:
            problems.append(f"no {CARD_NAME} (model card): run balpoe_hf.hub.prepare_hub_folder(dir).")
    files += [name for name in OPTIONAL_FILES if (folder / name).is_file()]
    for name in extra_files:
        if (folder / name).is_file():
            files.append(Path(name).as_posix())
        else:
            problems.append(f"{name} is not a file in the folder.")
    if problems:
        raise HubFolderError(f"{folder} is not ready for the Hub:\n- " + "\n- ".join(problems))
    return sorted(set(files))


def _linked_images(markdown: str) -> list[str]:
    """Local image paths linked as ``![alt](path)`` in a markdown text (web links are skipped)."""
    links = re.findall(r"!\[[^\]]*\]\(([^)\s]+)", markdown)
    return [link for link in links if "://" not in link]


def _require_card_packages() -> None:
    missing = [name for name in ("matplotlib", "jinja2") if importlib.util.find_spec(name) is None]
    if missing:
        raise HubFolderError(f"rendering the model card needs {' and '.join(missing)}: pip install "
                             "'balpoe-hf[hub]'. Nothing was written.")


def _report_pictures(report: Mapping[str, Any], report_path: Path, folder: Path) -> dict[str, Path]:
    """The report's pictures to copy: card-relative target -> source (a missing source is left out)."""
    report_images = report.get("images") or {}
    pictures = {}
    for name in ("reliability_diagram", "per_class_accuracy"):
        source = report_path.parent / report_images[name] if name in report_images else None
        if source is not None and source.is_file():
            pictures[f"{IMAGES_DIR}/{name}.png"] = source
    return pictures


def prepare_hub_folder(
    model_dir: str | Path,
    repo_id: str | None = None,
    *,
    eval_report: str | Path | None = None,
    dataset_id: str | None = None,
    dataset_name: str | None = None,
    license: str | None = "apache-2.0",
    also_upload: Sequence[str] = (),
) -> HubFolder:
    """Render the model card and its pictures into ``model_dir`` and check it; everything but the upload.

    Reads ``config.json`` (class counts, lambdas, labels), ``eval_results.json`` and ``recipe.yaml`` (from
    ``scripts/train.py``) and the ``scripts/evaluate.py`` report ``eval_report`` (default
    ``MODEL_DIR/eval/report.json`` when it exists: its balanced-set metrics, label-shift table and
    reliability diagram). Checks the folder first and writes nothing when it is not publishable; then writes
    ``README.md`` and ``images/`` and lists them in the folder's manifest (``balpoe_hf.checkpoints``). A
    ``README.md`` or picture that the package did not write there (or that was edited since) is never
    replaced: ``HubFolderError`` asks to move it away. Returns the card and the files that ``push_to_hub``
    would upload, so that the folder can be inspected first. ``repo_id`` is used in the card's usage
    snippet (default: the folder name); ``dataset_id`` and ``dataset_name`` override what the recipe says.
    ``also_upload``: more files of the folder to upload (paths relative to it; the Space files of
    ``balpoe-push --demo``).
    """
    folder = Path(model_dir)
    _require_card_packages()
    if repo_id is not None:
        check_repo_id(repo_id)
    if not folder.is_dir():
        raise HubFolderError(f"model directory {folder} does not exist.")
    config = _read_json(folder / CONFIG_NAME, "model config")
    if config is None:
        raise HubFolderError(f"no {CONFIG_NAME} in {folder}: save the model with model.save_pretrained(dir).")
    counts = [int(c) for c in config.get("class_counts") or []]
    if not counts:
        raise HubFolderError(f"{folder / CONFIG_NAME} has no class_counts: the training prior must travel "
                             "with the model (set BalPoEConfig.class_counts).")
    recipe_path = folder / RECIPE_NAME
    recipe: dict[str, Any] = {}
    if recipe_path.is_file():
        try:
            recipe = read_recipe_file(recipe_path)
        except TrainingError as error:
            raise HubFolderError(f"{error} Nothing was written.") from None

    metrics = _read_json(folder / EVAL_RESULTS_NAME, "evaluation results")
    report_path = Path(eval_report) if eval_report is not None else folder / DEFAULT_EVAL_REPORT
    report = _read_json(report_path, "evaluation report")
    if report is not None and not isinstance(report.get("shift_accuracy", {}), dict):
        raise HubFolderError(f"{report_path} is not a balpoe-evaluate report (its shift_accuracy is not a "
                             "table): write it with balpoe-evaluate --output. Nothing was written.")
    if eval_report is not None and report is None:
        raise HubFolderError(f"evaluation report {report_path} does not exist: write it with "
                             f"scripts/evaluate.py --model {folder} --output {report_path}.")
    extra_files = []
    pictures: dict[str, Path] = {}
    if report is not None:
        # The report's metrics and its reliability diagram come from the same evaluation: keep them together.
        metrics = report.get("balanced") or metrics
        pictures = _report_pictures(report, report_path, folder)
        if report_path.resolve().is_relative_to(folder.resolve()):
            extra_files.append(report_path.resolve().relative_to(folder.resolve()).as_posix())

    # Check first, then write: the folder must be publishable but for the card, and nothing of the user's
    # may be replaced.
    upload_files = [*extra_files, *also_upload]
    check_hub_folder(folder, require_card=False, extra_files=upload_files)
    histogram = f"{IMAGES_DIR}/class_counts.png"
    targets = [CARD_NAME, histogram, *pictures]
    is_source = {name for name, source in pictures.items() if source.resolve() == (folder / name).resolve()}
    foreign = [name for name in targets if (folder / name).exists() and name not in is_source
               and not written_by_package(folder, name)]
    if foreign:
        raise HubFolderError(f"{folder} holds {foreign}, which balpoe-hf did not write there (or which were "
                             "edited since): move them out of the folder to let it write the model card and "
                             "its pictures. Nothing was written.")
    _check_folder_writable(folder, [*targets, IMAGES_DIR])
    images = {"class_counts": histogram, **{Path(name).stem: name for name in pictures}}
    card = render_model_card(config, metrics, report, repo_id=repo_id or folder.resolve().name, images=images,
                             recipe=recipe, dataset_id=dataset_id, dataset_name=dataset_name,
                             report_file=extra_files[0] if extra_files else None, license=license)

    from .plots import class_count_histogram

    (folder / IMAGES_DIR).mkdir(exist_ok=True)
    class_count_histogram(counts, folder / histogram, class_names=_label_names(config, len(counts)))
    for name, source in pictures.items():
        if source.resolve() != (folder / name).resolve():
            shutil.copyfile(source, folder / name)
    card.save(folder / CARD_NAME)
    record_outputs(folder, [folder / name for name in targets])
    return HubFolder(path=folder, files=check_hub_folder(folder, extra_files=upload_files), card=card)


def push_to_hub(
    model_dir: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload BalPoE model with balpoe-hf",
    **card_options: Any,
) -> str:
    """Publish a saved BalPoE run to the Hub as ``repo_id`` and return the repository URL.

    Renders the card (see ``prepare_hub_folder``; ``card_options`` go to it), checks the folder, creates
    the repository if needed (``HfApi.create_repo``) and uploads the publishable files in one commit
    (``HfApi.upload_folder``). In offline mode (``HF_HUB_OFFLINE=1``) or without a token it raises
    ``HubPublishError`` before touching the folder or the network.
    """
    if hub_constants.is_offline_mode():
        raise HubPublishError("cannot push to the Hub in offline mode (HF_HUB_OFFLINE=1 or "
                              "TRANSFORMERS_OFFLINE=1 is set): unset it to publish, or run "
                              "balpoe_hf.hub.prepare_hub_folder(model_dir) to render and check the folder "
                              "without uploading. Nothing was uploaded.")
    check_repo_id(repo_id)
    token = token or huggingface_hub.get_token()
    if not token:
        raise HubPublishError("no Hugging Face token: log in with `hf auth login`, set HF_TOKEN, or pass "
                              "token=... (--token on the command line). Nothing was uploaded.")
    hub_folder = prepare_hub_folder(model_dir, repo_id, **card_options)
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=repo_url.repo_id, folder_path=hub_folder.path, repo_type="model",
                      allow_patterns=hub_folder.files, commit_message=commit_message)
    return str(repo_url)
