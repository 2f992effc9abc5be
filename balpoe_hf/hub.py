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
from .methods import METHOD_DESCRIPTIONS
from .recipes import TrainingError, read_recipe_file

CARD_NAME = "README.md"
IMAGES_DIR = "images"
TEMPLATE_NAME = "modelcard_template.md"
EVAL_RESULTS_NAME = "eval_results.json"
RECIPE_NAME = "recipe.yaml"
# Where the README tells scripts/evaluate.py to write its report (--output), relative to the run directory.
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
# Reported in percent in the card body; the others are plain numbers.
PERCENT_METRICS = {"balanced_accuracy", "accuracy", "many", "medium", "few", "ece", "mce"}
# Pickled weights can run code when loaded; this project publishes safetensors only.
PICKLE_WEIGHT_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")


class HubFolderError(ValueError):
    """The model directory cannot be published as it is; the message lists every problem and its fix."""


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


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _balanced_report(eval_results: Mapping[str, Any] | None) -> dict[str, Any]:
    """The balanced-test-set metrics, with the ``eval_`` prefix of transformers-style result files dropped."""
    if not eval_results:
        return {}
    return {key.removeprefix("eval_"): value for key, value in eval_results.items()}


def _target_prior_description(target_prior: Any) -> str:
    if target_prior is None or target_prior == "uniform":
        return "uniform (balanced predictions)"
    if target_prior == "train":
        return "the training prior"
    return "a custom prior stored in `config.json` (`target_prior`)"


def _label_names(config: Mapping[str, Any], num_classes: int) -> list[str]:
    id2label = config.get("id2label") or {}
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(num_classes)]


def _shift_results(shift_report: Mapping[str, Any] | None) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Columns (shift names) and ``{prior mode: {shift: accuracy}}`` from an evaluation report."""
    if not shift_report:
        return [], {}
    table = shift_report.get("shift_accuracy") or {}
    columns: list[str] = []
    for accuracies in table.values():
        columns.extend(shift for shift in accuracies if shift not in columns)
    return columns, {mode: dict(accuracies) for mode, accuracies in table.items()}


def render_model_card(
    config: Mapping[str, Any],
    eval_results: Mapping[str, Any] | None = None,
    shift_report: Mapping[str, Any] | None = None,
    *,
    repo_id: str = "balpoe-model",
    images: Mapping[str, str] | None = None,
    dataset_id: str | None = None,
    dataset_name: str | None = None,
    recipe_name: str | None = None,
    recipe_text: str | None = None,
    train_command: str | None = None,
    shot_thresholds: Mapping[str, int] | None = None,
    license: str | None = "apache-2.0",
) -> ModelCard:
    """The Hub model card of a BalPoE model, from its ``config.json`` dict and its evaluation results.

    Args:
        config: the model's config as saved in ``config.json`` (needs ``backbone``, ``lambdas``,
            ``class_counts``; ``id2label`` names the classes).
        eval_results: the balanced-test-set report (``long_tail_report`` keys, optionally ``eval_``-prefixed).
        shift_report: a ``scripts/evaluate.py`` report; its ``shift_accuracy`` table
            (``{prior mode: {shift: accuracy}}``) becomes the label-shift section and model-index entries.
        repo_id: the Hub id used in the usage snippet and as the model name.
        images: card-relative paths of the pictures: ``class_counts`` (required in the card),
            ``reliability_diagram`` and ``per_class_accuracy`` (optional).
        dataset_id: the Hub dataset id for the metadata (omit for local data).
        dataset_name: a readable dataset name for the card and the model-index.
        recipe_name, recipe_text, train_command: how the model was trained, for the Training section.
        shot_thresholds: ``{"many": M, "few": F}`` of the many/medium/few split (default 100 / 20).
    """
    counts = [int(c) for c in config.get("class_counts") or []]
    if not counts:
        raise HubFolderError("config has no class_counts: the card needs the training class counts "
                             "(train with balpoe_hf so that BalPoEConfig.class_counts is set).")
    lambdas = list(config.get("lambdas") or [])
    # Per-class lambdas (one list per expert) are too long for the card: it points to config.json instead.
    per_class_lambdas = any(isinstance(x, list) for x in lambdas)
    # Models saved before the setting existed removed the mean bias.
    remove_mean_lambda = bool(config.get("remove_mean_lambda", True))
    mean_lambda = ("per class" if per_class_lambdas else
                   f"{statistics.fmean(float(x) for x in lambdas):g}" if lambdas else "unknown")
    backbone = str(config.get("backbone", "unknown"))
    num_classes = len(counts)
    names = _label_names(config, num_classes)
    ratio = imbalance_ratio(counts)
    ratio_value = None if math.isinf(ratio) else round(ratio, 2)
    listed = num_classes <= MAX_LISTED_CLASSES
    report = _balanced_report(eval_results)
    shift_columns, shift_rows = _shift_results(shift_report)
    model_name = repo_id.rstrip("/").split("/")[-1]
    dataset_label = dataset_name or dataset_id or "test set"

    balpoe_meta: dict[str, Any] = {
        "backbone": backbone,
        "num_experts": int(config.get("num_experts", len(lambdas))),
        "lambdas": "per class, see config.json" if per_class_lambdas else [float(x) for x in lambdas],
        "num_classes": num_classes,
        "imbalance_ratio": ratio_value,
        "target_prior": config.get("target_prior") or "uniform",
        "remove_mean_lambda": remove_mean_lambda,
    }
    if listed:
        balpoe_meta["class_counts"] = counts
    else:
        balpoe_meta["class_counts_summary"] = {
            "total": sum(counts), "max": max(counts), "median": statistics.median(counts), "min": min(counts),
            "full_list": "config.json: class_counts",
        }
    if recipe_name:
        balpoe_meta["recipe"] = recipe_name
    method = config.get("method")
    if method:
        balpoe_meta["method"] = method

    eval_entries = []
    metric_rows = []
    for key, metric_type, label in BALANCED_METRICS:
        if key not in report:
            continue
        value = report[key]
        metric_rows.append({"name": label + (" (%)" if key in PERCENT_METRICS else ""),
                            "value": _percent(value) if key in PERCENT_METRICS else
                            ("n/a" if value is None else f"{value:.4f}")})
        if value is not None:
            eval_entries.append(EvalResult(
                task_type="image-classification", task_name="Long-tailed image classification",
                dataset_type=dataset_id or "custom", dataset_name=f"{dataset_label} (balanced test set)",
                dataset_split="test", metric_type=metric_type, metric_name=label,
                metric_value=round(float(value), 4)))
    for mode, accuracies in shift_rows.items():
        for shift, value in accuracies.items():
            if value is None:
                continue
            eval_entries.append(EvalResult(
                task_type="image-classification", task_name="Long-tailed image classification",
                dataset_type=dataset_id or "custom",
                dataset_name=f"{dataset_label} (test, label shift {shift})",
                dataset_split=f"test-{shift}", dataset_args={"label_shift": shift},
                metric_type="accuracy", metric_name=f"Top-1 accuracy (target prior: {mode})",
                metric_args={"target_prior": mode}, metric_value=round(float(value), 4)))

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
    images = dict(images or {})  # a missing picture leaves its line out of the card
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        model_name=model_name,
        repo_id=repo_id,
        backbone=backbone,
        num_experts=balpoe_meta["num_experts"],
        lambdas=["per class (see `config.json`)"] if per_class_lambdas else [f"{x:g}" for x in lambdas],
        classifier=config.get("classifier", "cosine"),
        remove_mean_lambda=remove_mean_lambda,
        mean_lambda=mean_lambda,
        num_classes=num_classes,
        num_train=sum(counts),
        imbalance_ratio="infinite" if ratio_value is None else f"{ratio_value:g}",
        count_max=max(counts),
        count_min=min(counts),
        count_median=f"{statistics.median(counts):g}",
        class_table=[{"id": i, "label": names[i], "count": counts[i]} for i in range(num_classes)]
        if listed else None,
        target_prior_description=_target_prior_description(config.get("target_prior")),
        dataset_name=dataset_name,
        dataset_id=dataset_id,
        metrics=metric_rows or None,
        shot_thresholds=dict(shot_thresholds or {"many": 100, "few": 20}),
        shift_table={"columns": shift_columns,
                     "rows": [{"mode": mode, "values": [_percent(acc.get(shift)) for shift in shift_columns]}
                              for mode, acc in shift_rows.items()]} if shift_rows else None,
        images=images,
        image_size=int(config.get("image_size") or 224),
        recipe_name=recipe_name,
        recipe_text=recipe_text.strip() if recipe_text else None,
        train_command=train_command,
        method=method,
        method_description=METHOD_DESCRIPTIONS.get(method),
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


class HubPublishError(RuntimeError):
    """Publishing cannot start (offline mode or no token); nothing was uploaded, the folder is unchanged."""


def _recipe_card_fields(recipe: Mapping[str, Any], recipe_text: str) -> dict[str, Any]:
    """Card fields from the resolved recipe that scripts/train.py saves as ``recipe.yaml``."""
    dataset = recipe.get("dataset")
    train_file = recipe.get("train_file")
    if train_file:  # local parquet or imagefolder data: there is no Hub dataset to point to
        dataset_id, source = None, "local data"
    else:
        dataset_id = LOCAL_DATASET_HUB_IDS.get(dataset, dataset)
        source = dataset_id or "local data"
    return {
        "recipe_name": recipe.get("name"),
        "recipe_text": recipe_text,
        "dataset_id": dataset_id,
        "dataset_name": source,
        # The uploaded recipe.yaml is the resolved recipe: training from it reproduces the run.
        "train_command": f"accelerate launch scripts/train.py --config {RECIPE_NAME}",
        "shot_thresholds": {"many": recipe.get("many_threshold", 100),
                            "few": recipe.get("few_threshold", 20)},
    }


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
    card_fields: dict[str, Any] = {}
    recipe_path = folder / RECIPE_NAME
    if recipe_path.is_file():
        try:
            recipe = read_recipe_file(recipe_path)
        except TrainingError as error:
            raise HubFolderError(f"{error} Nothing was written.") from None
        card_fields.update(_recipe_card_fields(recipe, recipe_path.read_text(encoding="utf-8")))
    card_fields.update({k: v for k, v in (("dataset_id", dataset_id), ("dataset_name", dataset_name)) if v})

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
        settings = report.get("settings") or {}
        if "many" in settings and "few" in settings:
            card_fields["shot_thresholds"] = {"many": settings["many"], "few": settings["few"]}
        pictures = _report_pictures(report, report_path, folder)
        if report_path.resolve().is_relative_to(folder.resolve()):
            extra_files.append(report_path.resolve().relative_to(folder.resolve()).as_posix())

    # Check first, then write: the folder must be publishable but for the card, and nothing of the user's
    # may be replaced.
    check_hub_folder(folder, require_card=False, extra_files=extra_files)
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
                             license=license, **card_fields)

    from .plots import class_count_histogram

    (folder / IMAGES_DIR).mkdir(exist_ok=True)
    class_count_histogram(counts, folder / histogram, class_names=_label_names(config, len(counts)))
    for name, source in pictures.items():
        if source.resolve() != (folder / name).resolve():
            shutil.copyfile(source, folder / name)
    card.save(folder / CARD_NAME)
    record_outputs(folder, [folder / name for name in targets])
    return HubFolder(path=folder, files=check_hub_folder(folder, extra_files=extra_files), card=card)


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
