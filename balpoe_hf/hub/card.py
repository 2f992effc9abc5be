"""Publishing trained BalPoE runs to the Hugging Face Hub.

``prepare_hub_folder`` renders the model card (``README.md`` with YAML metadata, from the Jinja template in
``model_cards/``) and its pictures into a saved model directory and checks that the directory holds
everything a Hub repository needs; ``push_to_hub`` does the same and uploads the publishable files with
``huggingface_hub.HfApi`` (``create_repo`` + ``create_commit``). Nothing uploaded names a path of the
machine that trained: the run's ``recipe.yaml`` goes up with file names only, and a file that still names
the run's folder, the home directory or a data path stops the upload.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import huggingface_hub
import yaml
from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub import constants as hub_constants
from transformers.dynamic_module_utils import get_imports, get_relative_imports
from transformers.utils import (
    CONFIG_NAME,
    IMAGE_PROCESSOR_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
)

from ..data.loading import FASHION_MNIST, local_name
from ..data.splits import imbalance_ratio
from ..errors import HubFolderError, HubPublishError, TrainingError
from ..metrics import percent
from ..recipes import read_recipe_file
from ..recipes.methods import METHOD_DESCRIPTIONS, METHOD_SETTINGS
from ..run_folder import (
    check_writable,
    finish_interrupted_save,
    output_lock,
    save_failure,
    staged_save,
    weights_fingerprint,
    written_by_package,
)

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
# Recipe fields that name paths on the machine that trained: the published recipe.yaml has their file names.
LOCAL_PATH_FIELDS = ("data_dir", "train_file", "test_file", "train_list", "test_list", "data_root")
# Published files read as text when looking for local paths (the others are weights and pictures).
TEXT_SUFFIXES = (".json", ".yaml", ".md", ".py", ".txt")
# Pickled weights can run code when loaded; this project publishes safetensors only.
PICKLE_WEIGHT_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")


@dataclass
class HubFolder:
    """A model directory ready to upload: the rendered card and the files that would be uploaded."""

    path: Path
    files: list[str]  # paths relative to ``path``, POSIX separators, sorted
    card: ModelCard
    # What is uploaded instead of the local file, for the files of ``files`` that name local paths (the
    # run's ``recipe.yaml`` keeps its data paths for --resume and balpoe-evaluate; the Hub gets file names).
    published: dict[str, bytes] = field(default_factory=dict)

    def content(self, name: str) -> bytes:
        """The bytes ``push_to_hub`` uploads as ``name``."""
        return self.published[name] if name in self.published else (self.path / name).read_bytes()


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


def _label_names(config: Mapping[str, Any], num_classes: int) -> list[str]:
    id2label = config.get("id2label") or {}
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(num_classes)]


def _number(value: Any) -> str:
    return f"{float(value):g}"


# --------------------------------------------------------------------------- what the run was


def describe_data(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """How the card names a run's data: ``train`` and ``test`` (Markdown), ``short`` (the training data in a
    few words, for the card's first sentence), ``dataset_id`` (a Hub dataset id or ``None``), ``name``
    (short, for the model-index), ``flags`` (the data flags of the command that retrains on the reader's own
    copy of the data) and ``note`` (what to adapt in it). Local paths are reduced to their file names."""
    if recipe.get("train_list"):
        train, test = local_name(recipe["train_list"]), local_name(recipe.get("test_list") or "TEST_LIST")
        return {"train": f"split list `{train}` (image paths relative to a data root)",
                "test": f"split list `{test}`", "short": f"the split list `{train}`", "dataset_id": None,
                "name": test, "flags": f"--train-list {train} --test-list {test} --data-root DATA_ROOT",
                "note": "with the list files and the image folder where you keep them"}
    if recipe.get("train_file"):
        train = [local_name(p) for p in recipe["train_file"]]
        test = [local_name(p) for p in recipe.get("test_file") or []] or ["TEST_FILE"]
        files = ", ".join(f"`{name}`" for name in train)
        return {"train": f"{files} (local files)", "test": ", ".join(f"`{name}`" for name in test),
                "short": files, "dataset_id": None, "name": ", ".join(test),
                "flags": f"--train-file {' '.join(train)} --test-file {' '.join(test)}",
                "note": "with the data files where you keep them"}
    dataset = recipe.get("dataset")
    if dataset == FASHION_MNIST:
        hub_id = LOCAL_DATASET_HUB_IDS[FASHION_MNIST]
        return {"train": f"Fashion-MNIST training split (IDX files; on the Hub: [`{hub_id}`]"
                         f"(https://huggingface.co/datasets/{hub_id}))",
                "test": "Fashion-MNIST test split", "short": "Fashion-MNIST", "dataset_id": hub_id,
                "name": "Fashion-MNIST", "flags": "",
                "note": "adding `--data-dir DIR` where Debian's `dataset-fashion-mnist` is not installed "
                        "(DIR: the four IDX files)"}
    if dataset:
        config = f" (configuration `{recipe['dataset_config']}`)" if recipe.get("dataset_config") else ""
        link = f"[`{dataset}`](https://huggingface.co/datasets/{dataset})"
        return {"train": f"{link}{config}, split `{recipe.get('train_split', 'train')}`",
                "test": f"`{dataset}`, split `{recipe.get('test_split', 'test')}`", "short": link,
                "dataset_id": dataset, "name": dataset, "flags": "", "note": ""}
    return {"train": "not recorded", "test": "not recorded", "short": None, "dataset_id": None,
            "name": "test set", "flags": "", "note": ""}


def run_method(config: Mapping[str, Any], recipe: Mapping[str, Any] | None = None) -> str | None:
    """The method of a run as the README names it: its ``--method`` preset, else the one preset whose
    settings the run has (a recipe may set them itself, as ``fashion-mnist-lt-quick`` sets ``balpoe-erm``'s),
    else ``None``. Without the recipe, mixup is unknown and ``balpoe`` and ``balpoe-erm`` cannot be told
    apart."""
    if config.get("method"):
        return str(config["method"])
    lambdas = list(config.get("lambdas") or [])
    if any(isinstance(x, list) for x in lambdas):
        return None  # per-class lambdas: no preset has them
    run = {"num_experts": int(config.get("num_experts") or max(1, len(lambdas))),
           "lambdas": [float(x) for x in lambdas], "loss": config.get("loss", "balpoe"),
           "remove_mean_lambda": bool(config.get("remove_mean_lambda", True))}
    if recipe:
        run["mixup_alpha"] = float(recipe.get("mixup_alpha") or 0)
    matches = []
    for method, settings in METHOD_SETTINGS.items():
        same = all(run[name] == value for name, value in settings.items() if name in run)
        # The balpoe preset keeps the recipe's mixup, which must be on.
        if same and (method != "balpoe" or run.get("mixup_alpha", 1.0) > 0):
            matches.append(method)
    return matches[0] if len(matches) == 1 else None


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
    lr, decay = float(recipe.get("lr", 0.1)), float(recipe.get("weight_decay", 0))
    momentum = ("Nesterov momentum" if recipe.get("nesterov", True) else "momentum") \
        + f" {_number(recipe.get('momentum', 0.9))}"
    text = (f"{epochs} epoch{'s' if epochs != 1 else ''}, batch {recipe.get('batch_size')}, SGD lr "
            f"{_number(lr)} ({schedule}"
            + (f", {_number(warmup)} warm-up epoch{'s' if warmup != 1 else ''}" if warmup else "")
            + f"), {momentum}, weight decay {_number(decay)}")
    experts = int(recipe.get("num_experts") or 1)
    if recipe.get("scale_expert_lr") and experts > 1:
        # training.parameter_groups: the experts' own parameters at E x lr with weight decay / E.
        text += (f"; the experts' own layers at {experts} x lr = {_number(experts * lr)} with weight decay "
                 f"{_number(decay)} / {experts}")
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


def _headline(method: str | None, experts: int, recipe: Mapping[str, Any] | None, backbone: str,
              lambda_text: str) -> str:
    """The card's first sentence: what kind of model this is, in the words of its method."""
    mixup = float((recipe or {}).get("mixup_alpha") or 0)
    # Mixup is named only when the recipe says it was on; without a recipe the card does not guess.
    training = ("" if recipe is None else f", trained with mixup (alpha {_number(mixup)})" if mixup > 0
                else ", trained without mixup")
    if experts > 1:
        if method == "balpoe-erm":
            training = ", trained without mixup (the paper's ERM variant)"
        named = f"; `{method}`" if method else ""
        return (f"A **Balanced Product of Calibrated Experts** (BalPoE, Sanchez Aimar et al., CVPR 2023"
                f"{named}) image classifier for long-tailed data{training}: {experts} experts "
                f"(lambda = {lambda_text}) on a shared `{backbone}` trunk, averaged into one ensemble")
    baseline = {"ce": "plain cross-entropy", "ce-la": "cross-entropy with post-hoc logit adjustment "
                "(Menon et al., ICLR 2021)", "bs": "balanced softmax (Ren et al., NeurIPS 2020)",
                "lade": "LADE (Hong et al., CVPR 2021)"}.get(method or "", "single-network")
    named = f" (`{method}`)" if method else ""
    return (f"A long-tailed image classifier, the **{baseline}** baseline{named} built with balpoe-hf"
            f"{training}: one `{backbone}` network")


def _data_sentence(counts: list[int], recipe: Mapping[str, Any], data: Mapping[str, Any] | None) -> str:
    """The card's second sentence: the training data, its classes and imbalance, the epochs."""
    ratio = imbalance_ratio(counts)
    ratio_text = "infinite" if math.isinf(ratio) else _number(round(ratio, 2))
    source = (data or {}).get("short")
    made = " made long-tailed" if recipe.get("imbalance_ratio") is not None else ""
    epochs = recipe.get("epochs")
    classes = (f"{len(counts)} classes, {max(counts):,} down to {min(counts):,} training images per class "
               f"(imbalance ratio {ratio_text})")
    if not source:
        return f"Trained on {classes}"
    duration = f" for {epochs} epoch{'s' if epochs != 1 else ''}" if epochs else ""
    return f"Trained on {source}{made}{duration}: {classes}"


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
    method = run_method(config, recipe)
    rows: list[tuple[str, str]] = []
    if method:
        chosen = "" if config.get("method") else ": the recipe's own settings are this preset's"
        rows.append(("Method", f"`{method}` ({METHOD_DESCRIPTIONS[method]}{chosen})"))
    else:
        rows.append(("Method", "the recipe's own settings, which match no preset of `balpoe_hf.methods`"))
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
    headline = _headline(method, experts, recipe or None, backbone, lambda_text)
    if counts:
        headline += ". " + _data_sentence(counts, recipe, describe_data(recipe) if recipe else None)
    return {"headline": headline, "rows": rows, "experts": experts, "method": method}


def _target_prior_text(target_prior: Any) -> str:
    if target_prior is None or target_prior == "uniform":
        return "uniform by default (balanced predictions)"
    if target_prior == "train":
        return "the training prior by default"
    return "a custom prior by default (`config.json`, `target_prior`)"


def _card_shift_rows(shift_report: Mapping[str, Any] | None, config: Mapping[str, Any]
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
    dataset_label = dataset_name or (data or {}).get("name") or dataset_id or "test set"
    report = _balanced_report(eval_results)
    settings = (shift_report or {}).get("settings") or {}
    shots = {"many": settings.get("many", recipe.get("many_threshold", 100)),
             "few": settings.get("few", recipe.get("few_threshold", 20))}
    shift_columns, shift_rows = _card_shift_rows(shift_report, config)
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
        datasets=[dataset_id] if dataset_id else None,
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
    # auto_map values look like "modeling_balpoe.BalPoEForImageClassification" (or "repo--module.Class"),
    # as do the pipelines' "impl".
    pipelines = config.get("custom_pipelines") or {}
    refs = [ref for ref in auto_map.values() if isinstance(ref, str)]
    refs += [task["impl"] for task in pipelines.values()
             if isinstance(task, Mapping) and isinstance(task.get("impl"), str)]
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
    if config and "image-classification" not in (config.get("custom_pipelines") or {}):
        problems.append(f"{CONFIG_NAME} names no image-classification pipeline (custom_pipelines), so the "
                        "card's pipeline(..., target_prior=...) would fail: the model was saved by an "
                        "earlier release; save it again with this one: "
                        "BalPoEForImageClassification.from_pretrained(dir).save_pretrained(dir).")
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


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _report_owner(report_path: Path, folder: Path) -> tuple[Path, str]:
    """The folder whose manifest lists the report as balpoe-evaluate's, and its name there: the model's
    folder, or the nearest folder above the report that lists it (another run's, for a report written into
    it); else where ``evaluation.report_owner`` would have listed it."""
    from ..evaluation.reports import report_owner

    report = report_path.resolve()
    for owner in (folder.resolve(), *report.parents):
        if report.is_relative_to(owner):
            name = report.relative_to(owner).as_posix()
            with contextlib.suppress(TrainingError):  # a damaged manifest lists nothing
                if written_by_package(owner, name, report=True):
                    return owner, name
    owner = report_owner(report_path, folder)
    return owner, report.relative_to(owner.resolve()).as_posix()


def _check_report_is_the_models(report: Mapping[str, Any], report_path: Path, folder: Path) -> None:
    """Refuse a report that is not balpoe-evaluate's unedited evaluation of this model's weights: it must be
    listed with its current content in its manifest, and name the SHA-256 of the folder's weights."""
    owner, name = _report_owner(report_path, folder)
    if not written_by_package(owner, name, report=True):
        raise HubFolderError(f"{report_path} is not a report balpoe-evaluate wrote there, or it was edited "
                             f"since: the card publishes its numbers only as written. Write it again with "
                             f"balpoe-evaluate --model {folder} --output {report_path}. Nothing was written.")
    weights = weights_fingerprint(folder)
    if report.get("model_sha256") != weights:
        whose = ("without the fingerprint of the weights it evaluated (an older report)"
                 if report.get("model_sha256") is None else "of other weights" + (
                     f" (the model in {report['model']})" if report.get("model") else ""))
        raise HubFolderError(f"{report_path} is an evaluation {whose}, not of the weights in {folder}: its "
                             "numbers would be published as this model's. Evaluate this model with "
                             f"balpoe-evaluate --model {folder} --output {folder / DEFAULT_EVAL_REPORT} (or "
                             "give that report with --eval-report). Nothing was written.")


def _report_pictures(report: Mapping[str, Any], report_path: Path, folder: Path) -> dict[str, Path]:
    """The report's pictures to copy: card-relative target -> source (a missing source is left out).

    A picture is a file balpoe-evaluate wrote beside the report (a plain file name, no link out of the
    report's folder, listed in its manifest) and a PNG: a report naming another file (``/etc/passwd``,
    ``../../secret.txt``) is refused, never copied into the folder to upload.
    """
    report_images = report.get("images") or {}
    if not isinstance(report_images, Mapping):
        raise HubFolderError(f"{report_path} has images {report_images!r}, not a mapping of picture names. "
                             "Nothing was written.")
    owner, _ = _report_owner(report_path, folder)
    pictures = {}
    for name in ("reliability_diagram", "per_class_accuracy"):
        file_name = report_images.get(name)
        if file_name is None:
            continue
        if not isinstance(file_name, str) or Path(file_name).name != file_name or file_name in ("", ".."):
            raise HubFolderError(f"{report_path} names the picture {file_name!r}, which is not a file name "
                                 "beside the report: a report's pictures are the PNG files balpoe-evaluate "
                                 "wrote next to it. Nothing was written.")
        source = report_path.parent / file_name
        if not source.is_file():
            continue
        resolved = source.resolve()
        relative = resolved.relative_to(owner.resolve()).as_posix() if resolved.is_relative_to(
            owner.resolve()) else None
        with source.open("rb") as handle:
            is_png = handle.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
        if resolved.parent != report_path.parent.resolve() or not is_png or relative is None or (
                not written_by_package(owner, relative, report=True)):
            raise HubFolderError(f"{source} is not a picture balpoe-evaluate wrote beside {report_path} (a "
                                 "PNG file listed in its manifest): write the report again with "
                                 "balpoe-evaluate --output. Nothing was written.")
        pictures[f"{IMAGES_DIR}/{name}.png"] = source
    return pictures


def _published_recipe(text: str) -> tuple[bytes, list[str]]:
    """A run's ``recipe.yaml`` as published, and the local paths it named: each path of
    ``LOCAL_PATH_FIELDS`` reduced to its file name, there and where other values quote it (the
    ``description`` lists command-line overrides)."""
    values = yaml.safe_load(text) or {}
    names: dict[str, str] = {}
    for key in LOCAL_PATH_FIELDS:
        value = values.get(key)
        paths = value if isinstance(value, list) else [value] if isinstance(value, str) else []
        names.update({str(path): local_name(path) for path in paths})
        if paths:
            values[key] = [names[str(path)] for path in paths] if isinstance(value, list) else names[value]
    for key, value in values.items():
        if isinstance(value, str) and key not in LOCAL_PATH_FIELDS:
            for path, name in sorted(names.items(), key=lambda item: -len(item[0])):
                value = value.replace(path, name)
            values[key] = value
    return yaml.safe_dump(values, sort_keys=False, allow_unicode=True).encode(), list(names)


def published_files(folder: str | Path, files: Sequence[str]) -> tuple[dict[str, bytes], list[str]]:
    """What ``push_to_hub`` uploads instead of a local file, and the local paths that the run's files name.

    ``recipe.yaml`` is published with its data paths reduced to file names (``_published_recipe``) and
    ``config.json`` with ``backbone_weights_file`` reduced so (only used to build a model from pretrained
    weights, never to load one); the run keeps both as they are.
    """
    folder = Path(folder)
    published: dict[str, bytes] = {}
    local: list[str] = []
    if RECIPE_NAME in files:
        recipe, local = _published_recipe((folder / RECIPE_NAME).read_text(encoding="utf-8"))
        if local:  # else the file goes up as it is
            published[RECIPE_NAME] = recipe
    config = _read_json(folder / CONFIG_NAME, "model config") or {}
    weights_file = config.get("backbone_weights_file")
    if isinstance(weights_file, str) and weights_file != local_name(weights_file):
        local.append(weights_file)
        published[CONFIG_NAME] = (json.dumps({**config, "backbone_weights_file": local_name(weights_file)},
                                             indent=2, sort_keys=True) + "\n").encode()
    return published, local


def _local_paths(folder: Path, named: Sequence[str]) -> list[str]:
    """The strings that would give away where the run lies: the run folder, the home directory, the
    absolute form of each data path its recipe names (and the path as given, when it has a folder)."""
    paths = {str(folder.resolve())}
    home = str(Path.home())
    if home.strip("/"):
        paths.add(home)
    for path in named:
        if "/" in path or os.sep in path:
            paths.update({path, str(Path(path).expanduser().resolve())})
    return sorted(paths, key=len, reverse=True)


def check_no_local_paths(folder: str | Path, files: Sequence[str], published: Mapping[str, bytes],
                         extra: Mapping[str, str] | None = None, named: Sequence[str] = ()) -> None:
    """Refuse to publish a text file that names the run's folder, the home directory or a data path.

    ``files`` are read as uploaded (``published`` replaces a local file), ``extra`` maps names to texts
    not written yet (the card); ``named`` are the data paths of the run (``published_files``).
    """
    folder = Path(folder)
    paths = _local_paths(folder, named)
    texts = {name: published[name].decode("utf-8", "replace") if name in published else
             (folder / name).read_text(encoding="utf-8", errors="replace")
             for name in files if name.endswith(TEXT_SUFFIXES) and name not in (extra or {})}
    texts.update(extra or {})
    leaks = [f"{name} names {path}" for name, text in sorted(texts.items()) for path in paths
             if path in text]
    if leaks:
        raise HubFolderError(f"{folder} would publish paths of this machine: {'; '.join(leaks)}. Write the "
                             "file again with this version of balpoe-hf (an evaluation report: "
                             "balpoe-evaluate --output), or remove the path. Nothing was written.")


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

    The report must be balpoe-evaluate's, unedited, of this folder's weights (``_check_report_is_the_models``)
    and its pictures PNG files beside it. The card and its pictures are written in one
    ``checkpoints.staged_save`` under the folder's lock: a kill or a full disk leaves the old ones.
    ``also_upload``: more files of the folder to upload (paths relative to it; the Space files of
    ``balpoe-push --demo``).
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise HubFolderError(f"model directory {folder} does not exist.")
    try:
        with output_lock(folder, "balpoe-push"):
            finish_interrupted_save(folder)  # a save a kill interrupted there: finished or undone first
            return _prepare_hub_folder(folder, repo_id, eval_report=eval_report, dataset_id=dataset_id,
                                       dataset_name=dataset_name, license=license, also_upload=also_upload)
    except TrainingError as error:  # the lock held elsewhere, a read-only folder, a damaged save journal
        raise HubFolderError(f"{error} Nothing was written.") from None


def _prepare_hub_folder(folder: Path, repo_id: str | None, *, eval_report: str | Path | None,
                        dataset_id: str | None, dataset_name: str | None, license: str | None,
                        also_upload: Sequence[str]) -> HubFolder:
    """``prepare_hub_folder`` holding the folder's lock."""

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
        _check_report_is_the_models(report, report_path, folder)
        # The report's metrics and its reliability diagram come from the same evaluation: keep them together.
        metrics = report.get("balanced") or metrics
        pictures = _report_pictures(report, report_path, folder)
        if report_path.resolve().is_relative_to(folder.resolve()):
            extra_files.append(report_path.resolve().relative_to(folder.resolve()).as_posix())

    # Check first, then write: the folder must be publishable but for the card, nothing of the user's may be
    # replaced, and nothing uploaded may name a path of this machine.
    upload_files = [*extra_files, *also_upload]
    files = check_hub_folder(folder, require_card=False, extra_files=upload_files)
    published, named = published_files(folder, files)
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
    check_no_local_paths(folder, files, published, extra={CARD_NAME: str(card)}, named=named)

    from ..evaluation.plots import class_count_histogram

    try:
        with staged_save(folder) as stage:
            (stage / IMAGES_DIR).mkdir()
            class_count_histogram(counts, stage / histogram, class_names=_label_names(config, len(counts)))
            for name, source in pictures.items():
                shutil.copyfile(source, stage / name)
            card.save(stage / CARD_NAME)
    except OSError as error:
        raise HubFolderError(f"could not write the model card into {folder}: {save_failure(error, folder)} "
                             "Nothing there was replaced.") from None
    return HubFolder(path=folder, files=check_hub_folder(folder, extra_files=upload_files), card=card,
                     published=published)


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
    (``HfApi.create_commit``): each as it is, but ``recipe.yaml`` and a ``config.json`` naming local
    weights, whose published copies name files only (``published_files``). In offline mode
    (``HF_HUB_OFFLINE=1``) or without a token it raises ``HubPublishError`` before touching the folder or
    the network.
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
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=hub_folder.published.get(
        name, str(hub_folder.path / name))) for name in hub_folder.files]
    api.create_commit(repo_id=repo_url.repo_id, operations=operations, commit_message=commit_message,
                      repo_type="model")
    return str(repo_url)
