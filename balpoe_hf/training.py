"""Everything ``scripts/train.py`` needs besides the loop itself: recipes, datasets, transforms, schedules.

A *recipe* is a flat set of training settings (``Recipe``), shipped as YAML files in
``balpoe_hf/recipes/``. A run resolves its settings in three layers: the ``Recipe`` defaults, then a
shipped recipe (``--recipe NAME``) or the user's own YAML file (``--config FILE``, which may start from a
shipped recipe with ``base: NAME``), then command-line flags, one per recipe field
(``--epochs 5 --lambdas 1 0 -1``).

Datasets come from the Hub (``dataset: uoft-cs/cifar100``), from local parquet files or an ``imagefolder``
directory (``train_file``/``test_file``), or from the Fashion-MNIST IDX files of Debian's
``dataset-fashion-mnist`` (``dataset: fashion-mnist``). Images are decoded and augmented on the fly
(``Dataset.with_transform``) and always converted to RGB, so every backbone sees 3 channels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import yaml

from .data import (
    FASHION_MNIST_DIR,
    class_counts,
    expand_paths,
    labels_array,
    load_fashion_mnist,
    make_long_tailed,
    offline_mode,
)

if TYPE_CHECKING:
    from transformers.image_processing_utils import BaseImageProcessor

RECIPES_DIR = Path(__file__).parent / "recipes"
FASHION_MNIST = "fashion-mnist"
AUGMENTATIONS = ("cifar", "imagenet", "none")
LR_SCHEDULES = ("multistep", "cosine", "constant")
MIXED_PRECISION = ("no", "bf16", "fp16")
CLASSIFIERS = ("cosine", "linear")
PROFILES = ("exponential", "step")


class TrainingError(ValueError):
    """A problem with the recipe, the data or the output directory, explained for the user.

    ``scripts/train.py`` prints the message and exits with a non-zero status instead of a traceback.
    """


def _help(text: str, choices: Sequence[str] | None = None) -> dict[str, Any]:
    """Field metadata: the ``--help`` text and the allowed values."""
    return {"help": text, "choices": choices}


@dataclass
class Recipe:
    """Every setting of a training run: a recipe file's YAML keys, and ``--field-name`` on the CLI."""

    # --- description
    name: str = field(default="custom", metadata=_help(
        "Name of the recipe (the default output directory is runs/NAME)."))
    description: str = field(default="", metadata=_help("One line describing the recipe."))
    # --- data
    dataset: str | None = field(default=None, metadata=_help(
        "Hub dataset id (e.g. uoft-cs/cifar100), or 'fashion-mnist' for the IDX files of Debian's "
        "dataset-fashion-mnist in --data-dir. Ignored when --train-file is given."))
    dataset_config: str | None = field(default=None, metadata=_help(
        "Configuration name of the Hub dataset, if it has several."))
    data_dir: str | None = field(default=None, metadata=_help(
        f"Directory of the Fashion-MNIST IDX files (default {FASHION_MNIST_DIR})."))
    train_file: list[str] | None = field(default=None, metadata=_help(
        "Local training data: parquet file(s) (glob patterns allowed) or one imagefolder directory "
        "(a sub-folder per class). Takes precedence over --dataset."))
    test_file: list[str] | None = field(default=None, metadata=_help(
        "Local test data (the balanced test set), in the same format as --train-file."))
    train_split: str = field(default="train", metadata=_help("Split of the Hub dataset to train on."))
    test_split: str = field(default="test", metadata=_help(
        "Split of the Hub dataset to evaluate on (the balanced test set)."))
    image_column: str = field(default="image", metadata=_help("Column holding the images."))
    label_column: str = field(default="label", metadata=_help("Column holding the integer class labels."))
    num_classes: int | None = field(default=None, metadata=_help(
        "Number of classes; 'none': from the label column's ClassLabel feature, else the largest label + 1."))
    imbalance_ratio: float | None = field(default=None, metadata=_help(
        "Make the training split long-tailed with this head/tail ratio (make_long_tailed); 'none' trains on "
        "the split as it is (for data that is long-tailed already, like ImageNet-LT)."))
    imbalance_profile: str = field(default="exponential", metadata=_help(
        "Profile of the long-tailed split.", PROFILES))
    split_seed: int = field(default=0, metadata=_help(
        "Seed of the long-tailed subsampling (the same split every run)."))
    many_threshold: int = field(default=100, metadata=_help(
        "Classes with more training images than this are many-shot."))
    few_threshold: int = field(default=20, metadata=_help(
        "Classes with fewer training images than this are few-shot."))
    # --- model
    backbone: str = field(default="resnet32_cifar", metadata=_help("timm model name of the backbone."))
    backbone_kwargs: dict = field(default_factory=dict, metadata=_help(
        "Extra keyword arguments for timm.create_model (JSON on the command line)."))
    backbone_pretrained: bool = field(default=False, metadata=_help(
        "Start the backbone from timm's pretrained weights."))
    num_experts: int = field(default=3, metadata=_help("Number of experts."))
    lambdas: list[float] | None = field(default_factory=lambda: [1.0, 0.0, -1.0], metadata=_help(
        "Bias lambda of each expert (mean 0 for a balanced ensemble); 'none': evenly spaced from 1 to -1."))
    shared_stages: int | None = field(default=None, metadata=_help(
        "Backbone stages shared by all experts; 'none': the backbone adapter's default."))
    classifier: str = field(default="cosine", metadata=_help("Expert classifier.", CLASSIFIERS))
    classifier_scale: float = field(default=30.0, metadata=_help("Scale of the cosine classifier."))
    # --- preprocessing and augmentation
    image_size: int = field(default=32, metadata=_help("Side of the square images the model sees."))
    image_mean: list[float] = field(default_factory=lambda: [0.4914, 0.4822, 0.4465], metadata=_help(
        "Per-channel normalisation mean (RGB)."))
    image_std: list[float] = field(default_factory=lambda: [0.2023, 0.1994, 0.2010], metadata=_help(
        "Per-channel normalisation std (RGB)."))
    crop_pct: float = field(default=1.0, metadata=_help(
        "Evaluation: resize the shorter side to image_size / crop_pct, then centre-crop image_size."))
    augment: str = field(default="cifar", metadata=_help(
        "Training augmentation: 'cifar' (pad + random crop, flip, rotation), 'imagenet' (random resized "
        "crop, flip, colour jitter) or 'none'.", AUGMENTATIONS))
    crop_padding: int = field(default=4, metadata=_help(
        "'cifar' augmentation: zero padding before the random crop."))
    rotation: float = field(default=15.0, metadata=_help(
        "'cifar' augmentation: largest random rotation in degrees (0: none)."))
    hflip: bool = field(default=True, metadata=_help("Random horizontal flips."))
    color_jitter: float = field(default=0.0, metadata=_help(
        "'imagenet' augmentation: brightness/contrast/saturation jitter."))
    # --- optimisation
    epochs: int = field(default=200, metadata=_help("Training epochs."))
    batch_size: int = field(default=128, metadata=_help(
        "Batch size per process; the global batch is batch_size x processes x accumulation steps."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help(
        "Batches accumulated per optimizer step."))
    lr: float = field(default=0.1, metadata=_help(
        "Peak learning rate, for the recipe's global batch (see the README on scaling it)."))
    momentum: float = field(default=0.9, metadata=_help("SGD momentum."))
    nesterov: bool = field(default=True, metadata=_help("Nesterov momentum."))
    weight_decay: float = field(default=5e-4, metadata=_help("Weight decay."))
    lr_schedule: str = field(default="multistep", metadata=_help(
        "Learning-rate schedule after the warm-up.", LR_SCHEDULES))
    warmup_epochs: float = field(default=5.0, metadata=_help("Linear warm-up length in epochs (0: none)."))
    lr_milestones: list[int] = field(default_factory=lambda: [160, 180], metadata=_help(
        "'multistep': epochs at which the lr is multiplied by lr_gamma."))
    lr_gamma: float = field(default=0.1, metadata=_help("'multistep': lr factor at each milestone."))
    max_grad_norm: float | None = field(default=None, metadata=_help(
        "Clip the gradient norm to this value; 'none': no clipping."))
    mixup_alpha: float = field(default=0.4, metadata=_help(
        "Mixup Beta(alpha, alpha) parameter; 0 turns mixup off."))
    mixed_precision: str | None = field(default=None, metadata=_help(
        "'no', 'bf16' or 'fp16'; 'none': what accelerate launch was told (default 'no').", MIXED_PRECISION))
    seed: int = field(default=0, metadata=_help(
        "Seed of the weight initialisation, shuffling, augmentation and mixup."))
    # --- loop
    eval_every: int = field(default=10, metadata=_help(
        "Evaluate on the test set every N epochs (0: only at the end)."))
    eval_batch_size: int = field(default=256, metadata=_help("Evaluation batch size per process."))
    checkpoints_total_limit: int = field(default=2, metadata=_help("Keep the last K epoch checkpoints."))
    num_workers: int = field(default=4, metadata=_help(
        "DataLoader worker processes per training process (0: load in the training process)."))
    logging_steps: int = field(default=50, metadata=_help(
        "Log the training loss and lr to the tracker every N optimizer steps."))

    def validate(self) -> Recipe:
        """Check the settings that would otherwise fail late or silently; returns ``self``."""
        for name, f in ((f.name, f) for f in dataclasses.fields(self)):
            choices = f.metadata.get("choices")
            value = getattr(self, name)
            if choices and value is not None and value not in choices:
                raise TrainingError(f"{name} must be one of {list(choices)}, got {value!r}.")
        if self.lambdas is not None and len(self.lambdas) != self.num_experts:
            raise TrainingError(f"lambdas has {len(self.lambdas)} values but num_experts is "
                                f"{self.num_experts}; "
                                "give one lambda per expert (--lambdas 1 0 -1 --num-experts 3).")
        positive = ("epochs", "batch_size", "gradient_accumulation_steps", "eval_batch_size",
                    "checkpoints_total_limit", "image_size", "num_experts", "logging_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.mixup_alpha < 0:
            raise TrainingError(f"mixup_alpha must be >= 0 (0 turns mixup off), got {self.mixup_alpha}.")
        if self.mixup_alpha > 0 and self.batch_size % 2:
            raise TrainingError(f"mixup pairs each batch with its reverse, so batch_size must be even; "
                                f"got {self.batch_size}.")
        if self.few_threshold > self.many_threshold:
            raise TrainingError(f"few_threshold ({self.few_threshold}) must not exceed many_threshold "
                                f"({self.many_threshold}).")
        if not 0 < self.crop_pct <= 1:
            raise TrainingError(f"crop_pct must be in (0, 1], got {self.crop_pct}.")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise TrainingError("image_mean and image_std need 3 values (images are fed as RGB).")
        if self.eval_every < 0 or self.num_workers < 0 or self.warmup_epochs < 0:
            raise TrainingError("eval_every, num_workers and warmup_epochs must not be negative.")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RECIPE_FIELDS = {f.name: f for f in dataclasses.fields(Recipe)}


def available_recipes() -> list[str]:
    """Names of the recipes shipped with the package."""
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise TrainingError(f"cannot parse the recipe file {path}: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise TrainingError(f"the recipe file {path} must hold a mapping of recipe fields, got "
                            f"{type(values).__name__}.")
    return values


def recipe_values(name: str | None = None, config: str | Path | None = None) -> dict[str, Any]:
    """The raw values of a shipped recipe ``name`` or of a YAML file ``config`` (with its ``base`` merged)."""
    if config is not None and name is not None:
        raise TrainingError("give either --recipe or --config, not both (a config file can start from a "
                            "recipe with `base: NAME`).")
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise TrainingError(f"recipe file {path} does not exist.")
        values = _read_yaml(path)
        base = values.pop("base", None)
        merged = recipe_values(base) if base else {}
        merged.update(values)
        return merged
    if name is None:
        return {}
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(available_recipes())
        raise TrainingError(f"unknown recipe {name!r}; the known recipes are: {known}. "
                            "Use --config FILE.yaml for your own.")
    values = _read_yaml(path)
    values.setdefault("name", name)
    return values


def make_recipe(values: dict[str, Any]) -> Recipe:
    """A validated ``Recipe`` from a mapping of field values (unknown keys are an error)."""
    unknown = sorted(set(values) - set(RECIPE_FIELDS))
    if unknown:
        raise TrainingError(f"unknown recipe fields {unknown}; the fields are: {', '.join(RECIPE_FIELDS)}.")
    hints = typing.get_type_hints(Recipe)
    coerced = {key: _coerce(key, hints[key], value) for key, value in values.items()}
    return Recipe(**coerced).validate()


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """Check a YAML value against the field type (ints are accepted for floats)."""
    base, optional = _unwrap_optional(hint)
    if value is None:
        if optional:
            return None
        raise TrainingError(f"recipe field {name} cannot be null.")
    origin = typing.get_origin(base)
    if origin is list:
        item = typing.get_args(base)[0]
        if not isinstance(value, list):
            value = [value]
        return [_coerce(name, item, v) for v in value]
    if base is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if base is dict and isinstance(value, dict):
        return value
    if isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    raise TrainingError(f"recipe field {name} must be {_type_name(hint)}, got {value!r}.")


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def _type_name(hint: Any) -> str:
    base, optional = _unwrap_optional(hint)
    origin = typing.get_origin(base)
    name = f"a list of {typing.get_args(base)[0].__name__}" if origin is list else base.__name__
    return f"{name} or null" if optional else name


# --------------------------------------------------------------------------- command line


def _none_or(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else convert(text)
    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"in_chans\": 3}}', got {text!r}")
    return value


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--field-name`` flag per ``Recipe`` field; unset flags leave the recipe's value alone."""
    group = parser.add_argument_group("recipe fields (override the recipe)")
    hints = typing.get_type_hints(Recipe)
    for name, f in RECIPE_FIELDS.items():
        base, optional = _unwrap_optional(hints[name])
        flag = "--" + name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata['help']} (built-in default: {default})"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is list:
            item = typing.get_args(base)[0]
            kwargs.update(nargs="+", type=_none_or(item) if optional else item, metavar=item.__name__.upper())
        elif base is dict:
            kwargs.update(type=_json_object, metavar="JSON")
        else:
            kwargs.update(type=_none_or(base) if optional else base, metavar=base.__name__.upper())
            if f.metadata.get("choices"):
                kwargs["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
        group.add_argument(flag, **kwargs)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_argument_group("run")
    run.add_argument("--recipe", help=f"Shipped recipe: {', '.join(available_recipes())}.")
    run.add_argument("--config", metavar="FILE.yaml",
                     help="Your own recipe file (YAML mapping of recipe fields; `base: NAME` starts from a "
                          "shipped recipe).")
    run.add_argument("--output-dir", help="Where the model, results and checkpoints go (default: runs/NAME).")
    run.add_argument("--resume", action="store_true",
                     help="Continue from the latest checkpoint in --output-dir (start afresh if there is "
                          "none).")
    run.add_argument("--overwrite", action="store_true", help="Empty a non-empty --output-dir first.")
    run.add_argument("--report-to", choices=["none", "tensorboard"], default="none",
                     help="Experiment tracker (TensorBoard logs go to OUTPUT_DIR/logs).")
    run.add_argument("--push-to-hub", action="store_true",
                     help="Upload the trained model to the Hub (balpoe_hf.hub.push_to_hub) at the end.")
    run.add_argument("--hub-model-id", metavar="ID", help="Hub repository for --push-to-hub (user/name).")
    add_recipe_arguments(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None, description: str | None = None
               ) -> tuple[argparse.Namespace, Recipe]:
    """The run options and the resolved recipe (defaults < recipe or config file < command line)."""
    parser = build_parser(description)
    args = parser.parse_args(argv)
    if args.recipe is None and args.config is None and "dataset" not in vars(args) \
            and "train_file" not in vars(args):
        parser.error(f"pass --recipe NAME (one of: {', '.join(available_recipes())}), --config FILE.yaml, "
                     "or the data flags (--dataset / --train-file and --test-file).")
    values = recipe_values(args.recipe, args.config)
    for name in RECIPE_FIELDS:
        if name in vars(args):
            value = getattr(args, name)
            # `--lambdas none` parses as [None]: the list field itself is unset.
            values[name] = None if isinstance(value, list) and None in value else value
    recipe = make_recipe(values)
    if args.push_to_hub and not args.hub_model_id:
        raise TrainingError("--push-to-hub needs --hub-model-id USER/NAME.")
    if args.output_dir is None:
        args.output_dir = str(Path("runs") / recipe.name)
    return args, recipe


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))


def recipe_differences(recipe: Recipe, path: str | Path) -> dict[str, tuple[Any, Any]]:
    """Fields whose value in the saved recipe file differ from ``recipe``: name -> (saved, now)."""
    saved = _read_yaml(Path(path))
    now = recipe.to_dict()
    return {k: (saved.get(k), now[k]) for k in now if saved.get(k) != now[k]}


# --------------------------------------------------------------------------- data


@dataclass
class TrainingData:
    """The long-tailed training split, the balanced test set and what the model needs to know about them."""

    train: datasets.Dataset
    test: datasets.Dataset
    class_names: list[str]
    class_counts: list[int]  # training images per class, in label order


def _load_local(recipe: Recipe) -> datasets.DatasetDict:
    try:
        train = expand_paths(recipe.train_file or [], "train_file")
        test = expand_paths(recipe.test_file or [], "test_file")
    except FileNotFoundError as error:
        raise TrainingError(str(error)) from None
    if all(Path(p).is_dir() for p in train + test):
        if len(train) != 1 or len(test) != 1:
            raise TrainingError("an imagefolder dataset takes one training and one test directory.")
        # One call over both folders, so that the class labels inferred from the sub-folder names are the
        # same in both splits even if the test folder lacks a class.
        files = {"train": str(Path(train[0]) / "**"), "test": str(Path(test[0]) / "**")}
        return datasets.load_dataset("imagefolder", data_files=files)
    if any(Path(p).is_dir() for p in train + test):
        raise TrainingError("train_file and test_file must both be imagefolder directories or both parquet "
                            "files.")
    return datasets.load_dataset("parquet", data_files={"train": train, "test": test})


def _load_hub(recipe: Recipe) -> datasets.DatasetDict:
    try:
        splits = {
            split: datasets.load_dataset(recipe.dataset, recipe.dataset_config, split=split)
            for split in (recipe.train_split, recipe.test_split)
        }
    except (ConnectionError, FileNotFoundError, OSError) as error:
        how = ("Point the run at local copies instead: --train-file/--test-file with parquet files (e.g. "
               "saved by Dataset.to_parquet) or imagefolder directories, e.g. the recipe cifar10-lt-local.")
        if offline_mode():
            raise TrainingError(f"cannot load the Hub dataset {recipe.dataset!r}: offline mode is on "
                                "(HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1) and it is not in the local "
                                "cache. "
                                f"{how}") from None
        raise TrainingError(f"cannot load the Hub dataset {recipe.dataset!r}: {error}. {how}") from None
    return datasets.DatasetDict({"train": splits[recipe.train_split], "test": splits[recipe.test_split]})


def _check_columns(ds: datasets.Dataset, recipe: Recipe, split: str) -> None:
    for kind in ("image", "label"):
        column = getattr(recipe, f"{kind}_column")
        if column not in ds.column_names:
            raise TrainingError(f"the {split} split has no {kind} column {column!r}; its columns are "
                                f"{ds.column_names}. Name the right one with --{kind}-column.")


def _as_image_column(ds: datasets.Dataset, column: str, split: str) -> datasets.Dataset:
    if isinstance(ds.features[column], datasets.Image):
        return ds
    try:
        return ds.cast_column(column, datasets.Image())
    except (TypeError, ValueError) as error:
        raise TrainingError(f"the column {column!r} of the {split} split does not hold images "
                            f"({ds.features[column]}): {error}") from None


def load_training_data(recipe: Recipe) -> TrainingData:
    """Load the recipe's data, make the training split long-tailed, and check columns and labels."""
    if recipe.train_file is None and recipe.dataset is None:
        raise TrainingError(f"the recipe {recipe.name!r} names no data: pass --train-file and --test-file "
                            "(parquet files or imagefolder directories), or --dataset (a Hub id or "
                            f"'{FASHION_MNIST}').")
    if (recipe.train_file is None) != (recipe.test_file is None):
        raise TrainingError("give both --train-file and --test-file (the balanced test set), in the same "
                            "format.")
    if recipe.train_file is not None:
        splits = _load_local(recipe)
    elif recipe.dataset == FASHION_MNIST:
        try:
            splits = load_fashion_mnist(recipe.data_dir or FASHION_MNIST_DIR)
        except FileNotFoundError as error:
            raise TrainingError(str(error)) from None
    else:
        splits = _load_hub(recipe)
    train, test = splits["train"], splits["test"]
    for ds, split in ((train, "train"), (test, "test")):
        _check_columns(ds, recipe, split)
    train = _as_image_column(train, recipe.image_column, "train")
    test = _as_image_column(test, recipe.image_column, "test")

    feature = train.features[recipe.label_column]
    names = feature.names if isinstance(feature, datasets.ClassLabel) else None
    num_classes = recipe.num_classes or (len(names) if names else None)
    try:
        if num_classes is None:
            num_classes = int(labels_array(train, recipe.label_column).max(initial=-1)) + 1
        for ds, split in ((train, "train"), (test, "test")):
            _check_label_range(ds, recipe.label_column, num_classes, split)
        if recipe.imbalance_ratio is not None:
            train = make_long_tailed(train, recipe.imbalance_ratio, recipe.label_column, recipe.split_seed,
                                     recipe.imbalance_profile)
        counts = class_counts(train, recipe.label_column, num_classes)
    except ValueError as error:
        raise TrainingError(str(error)) from None
    empty = [c for c, n in enumerate(counts) if n == 0]
    if empty:
        raise TrainingError(f"classes {empty[:20]} have no training image; BalPoE needs every class in the "
                            f"training prior (set --num-classes to the number of classes actually present).")
    if names is None or len(names) != num_classes:
        names = [str(c) for c in range(num_classes)]
    return TrainingData(train=train, test=test, class_names=list(names), class_counts=counts)


def _check_label_range(ds: datasets.Dataset, column: str, num_classes: int, split: str) -> None:
    labels = labels_array(ds, column)
    bad = np.unique(labels[(labels < 0) | (labels >= num_classes)])
    if bad.size:
        raise TrainingError(f"the {split} split has labels {bad[:10].tolist()} outside the class range "
                            f"[0, {num_classes - 1}]; fix the labels or set --num-classes.")


# --------------------------------------------------------------------------- transforms


def build_processor(recipe: Recipe) -> BaseImageProcessor:
    """The image processor saved with the model, and the evaluation transform of the training run.

    ``crop_pct == 1`` (CIFAR-like recipes): ``balpoe_hf.processing.build_image_processor``, a square resize
    to ``image_size``. ``crop_pct < 1`` (ImageNet-like): the ImageNet protocol of resizing the shorter side
    to ``image_size / crop_pct`` and centre-cropping ``image_size``, with transformers'
    ``ConvNextImageProcessor``, which implements exactly that. Both convert to RGB, rescale and normalise.
    """
    from transformers import ConvNextImageProcessor
    from transformers.image_utils import PILImageResampling

    from .processing import build_image_processor

    if recipe.crop_pct == 1:
        return build_image_processor(recipe.image_size, recipe.image_mean, recipe.image_std)
    return ConvNextImageProcessor(
        do_convert_rgb=True, size={"shortest_edge": recipe.image_size}, crop_pct=recipe.crop_pct,
        resample=PILImageResampling.BILINEAR, image_mean=recipe.image_mean, image_std=recipe.image_std,
    )


class ImageTransform:
    """Batch transform for ``Dataset.with_transform``: images -> normalised RGB tensors ``(3, H, W)``.

    Training images go through the recipe's augmentation (torchvision); evaluation images through the
    image processor saved with the model, so that the pipeline sees exactly what the evaluation saw.
    """

    def __init__(self, recipe: Recipe, processor: BaseImageProcessor | None = None):
        from torchvision import transforms as T

        self.image_column, self.label_column = recipe.image_column, recipe.label_column
        self.processor, self.transform = processor, None
        if processor is not None:
            return
        size = recipe.image_size
        if recipe.augment == "cifar":
            steps = [T.Resize(size), T.CenterCrop(size), T.RandomCrop(size, padding=recipe.crop_padding)]
            if recipe.hflip:
                steps.append(T.RandomHorizontalFlip())
            if recipe.rotation:
                steps.append(T.RandomRotation(recipe.rotation))
        elif recipe.augment == "imagenet":
            steps = [T.RandomResizedCrop(size)]
            if recipe.hflip:
                steps.append(T.RandomHorizontalFlip())
            if recipe.color_jitter:
                steps.append(T.ColorJitter(recipe.color_jitter, recipe.color_jitter, recipe.color_jitter))
        else:
            steps = [T.Resize((size, size))]
            if recipe.hflip:
                steps.append(T.RandomHorizontalFlip())
        steps += [T.ToTensor(), T.Normalize(recipe.image_mean, recipe.image_std)]
        self.transform = T.Compose(steps)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        images = [image.convert("RGB") for image in batch[self.image_column]]
        if self.processor is not None:
            pixel_values = list(self.processor(images=images, return_tensors="pt")["pixel_values"])
        else:
            pixel_values = [self.transform(image) for image in images]
        return {"pixel_values": pixel_values, "labels": batch[self.label_column]}


def with_transforms(data: TrainingData, recipe: Recipe, processor: BaseImageProcessor
                    ) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The two splits with their on-the-fly transforms (only the image and label columns are read)."""
    columns = [recipe.image_column, recipe.label_column]
    train = data.train.with_transform(ImageTransform(recipe), columns=columns)
    test = data.test.with_transform(ImageTransform(recipe, processor), columns=columns)
    return train, test


# --------------------------------------------------------------------------- schedule


def lr_lambda(recipe: Recipe, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step ``step`` (for ``torch.optim.lr_scheduler.LambdaLR``).

    A linear warm-up over ``warmup_epochs``, then the recipe's schedule: ``multistep`` multiplies by
    ``lr_gamma`` at each milestone epoch, ``cosine`` decays to 0 at the last step, ``constant`` stays.
    """
    warmup = round(recipe.warmup_epochs * steps_per_epoch)
    total = recipe.epochs * steps_per_epoch

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if recipe.lr_schedule == "multistep":
            epoch = step // steps_per_epoch
            return recipe.lr_gamma ** sum(epoch >= m for m in recipe.lr_milestones)
        if recipe.lr_schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return multiplier


# --------------------------------------------------------------------------- runs and checkpoints

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint: its presence marks it complete


def check_output_dir(output_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix a new run into a non-empty directory unless told to resume or overwrite (read-only)."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise TrainingError(f"--output-dir {path} exists and is not a directory.")
    if resume and overwrite:
        raise TrainingError("--resume and --overwrite contradict each other; pick one.")
    if path.is_dir() and any(path.iterdir()) and not (resume or overwrite):
        raise TrainingError(f"the output directory {path} is not empty. Pass --resume to continue its run "
                            "from the latest checkpoint, --overwrite to start over (its contents are "
                            "deleted), or another --output-dir.")


def clear_directory(path: str | Path) -> None:
    import shutil

    for child in Path(path).iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def checkpoint_dir(output_dir: str | Path, epoch: int) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR / f"epoch-{epoch:04d}"


def completed_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (with their trainer state) from the oldest to the latest."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    found = [p for p in root.glob("epoch-*") if (p / TRAINER_STATE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` latest complete checkpoints, and any incomplete one left by a crash."""
    import shutil

    complete = completed_checkpoints(output_dir)
    root = Path(output_dir) / CHECKPOINTS_DIR
    incomplete = [p for p in root.glob("epoch-*") if p not in complete]
    for path in complete[:-keep] + incomplete:
        shutil.rmtree(path, ignore_errors=True)


def expected_world_size() -> int | None:
    """How many processes the launcher meant to start, where it says so.

    ``torchrun`` (and ``accelerate launch --multi_gpu``) export ``WORLD_SIZE``. accelerate's single-process
    launcher exports ``MASTER_ADDR`` only when it was asked for more than one process (as with
    ``accelerate launch --cpu --num_processes 2``, which still starts a single process); it then
    returns 2, meaning "more than one".
    """
    if os.environ.get("WORLD_SIZE"):
        return int(os.environ["WORLD_SIZE"])
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in os.environ
    if launched_by_accelerate and os.environ.get("MASTER_ADDR") and not os.environ.get("RANK"):
        return 2
    return None


def check_world_size(num_processes: int) -> None:
    """Stop when the launcher asked for more processes than the Accelerator runs."""
    expected = expected_world_size()
    if expected is None or num_processes >= expected:
        return
    asked = f"{expected} processes" if os.environ.get("WORLD_SIZE") else "more than one process"
    raise TrainingError(
        f"the launcher asked for {asked} but this run sees {num_processes}: the processes would each train "
        "on their own instead of together. `accelerate launch --cpu --num_processes N` starts ONE process; "
        "for N CPU processes use `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N "
        "scripts/train.py ...`, on N GPUs `accelerate launch --multi_gpu --num_processes N ...`, and for "
        "one process leave out --num_processes."
    )
