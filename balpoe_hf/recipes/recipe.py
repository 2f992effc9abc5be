"""The ``Recipe`` dataclass: every setting of a training run, with its type, default and help text (some 75
fields, each with the text ``balpoe-train --help`` prints), and their checks (``Recipe.validate``).

The model's fields are not declared here: they are ``BalPoEConfig``'s settings (``MODEL_FIELDS``), with the
config's types, allowed values, defaults, help and rules. A recipe is normalised and checked when it is built
(``__post_init__``): field types, the method preset, the backbone's input defaults, then ``validate``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import timm

from ..errors import TrainingError
from ..models.balpoe.configuration_balpoe import (
    POST_TRAINING_SETTINGS,
    SETTING_HELP,
    SETTING_TYPES,
    SETTINGS,
    BalPoEConfig,
    backbone_image_defaults,
    default_lambdas,
)
from .methods import Method, method_settings

Profile = Literal["exponential", "step"]
Augmentation = Literal["cifar", "imagenet", "none"]
AutoAugmentPolicy = Literal["none", "cifar10", "imagenet", "svhn"]
Selection = Literal["random", "reference"]
LRSchedule = Literal["multistep", "cosine", "constant"]
MixedPrecision = Literal["no", "bf16", "fp16"]
DataPipeline = Literal["auto", "device", "workers"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]

# numpy seeds its generators with 0 <= seed < 2**32: the bound of ``seed`` and ``split_seed``.
SEED_LIMIT = 2**32
# The shot groups of the long-tailed literature (Liu et al., CVPR 2019): many-shot classes have more than 100
# training images, few-shot ones fewer than 20. The defaults of the recipe, the metrics and the commands.
MANY_SHOT_THRESHOLD = 100
FEW_SHOT_THRESHOLD = 20

# The config settings that are recipe fields, derived from BalPoEConfig (type, default, help): all but the
# class counts (a run takes them from its data), the settings given to a trained model
# (POST_TRAINING_SETTINGS), a weights file on the machine that builds the model (recipes start pretrained
# trunks from timm) and ``method``, which the recipe declares itself: a preset it applies, that the config
# only records.
MODEL_FIELDS = tuple(name for name in SETTINGS if name not in {
    "class_counts", "backbone_weights_file", "method", *POST_TRAINING_SETTINGS})
# Where a recipe field is narrower than the setting, for the command line: one lambda per expert (a lambda
# per class and expert is set on the config itself), backbone_kwargs as one JSON object.
NARROWER_TYPES = {"lambdas": list[float] | None, "backbone_kwargs": dict | None}


def _help(text: str) -> dict[str, Any]:
    """Field metadata: the ``--help`` text (HfArgumentParser passes metadata on to ``add_argument``)."""
    return {"help": text}


def _with_model_fields(cls: type) -> type:
    """Add the ``MODEL_FIELDS`` to the class body after ``method`` (before ``@dataclass`` makes fields of
    them): the config's type (or ``NARROWER_TYPES``'), default and docstring help."""
    config_fields = {f.name: f for f in dataclasses.fields(BalPoEConfig)}
    annotations = {}
    for name, hint in cls.__annotations__.items():
        annotations[name] = hint
        if name == "method":
            for setting in MODEL_FIELDS:
                annotations[setting] = NARROWER_TYPES.get(setting, SETTING_TYPES[setting])
                setattr(cls, setting, field(default=config_fields[setting].default,
                                            metadata=_help(SETTING_HELP[setting])))
    cls.__annotations__ = annotations
    return cls


@dataclass(frozen=True)
@_with_model_fields
class Recipe:
    """Every setting of a training run: a recipe file's YAML keys, and ``--field-name`` on the CLI.

    Built, a recipe is normalised (``__post_init__``) and checked (``validate``), once: it is frozen, and
    ``dataclasses.replace(recipe, epochs=8)`` builds a changed one, checked in turn.
    """

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
        "Directory of the Fashion-MNIST IDX files (default: the folder of Debian's dataset-fashion-mnist, "
        "balpoe_hf.data.loading.FASHION_MNIST_DIR)."))
    train_file: list[str] | None = field(default=None, metadata=_help(
        "Local training data: parquet file(s) (glob patterns allowed) or one imagefolder directory "
        "(a sub-folder per class). Takes precedence over --dataset."))
    test_file: list[str] | None = field(default=None, metadata=_help(
        "Local test data (the balanced test set), in the same format as --train-file."))
    train_list: str | None = field(default=None, metadata=_help(
        "Split-list file of the training images (one 'relative/path label' line per image, like "
        "ImageNet_LT_train.txt), read with --data-root. Takes precedence over --dataset."))
    test_list: str | None = field(default=None, metadata=_help(
        "Split-list file of the test images (e.g. ImageNet_LT_test.txt), with --train-list."))
    data_root: str | None = field(default=None, metadata=_help(
        "Folder that the paths in --train-list / --test-list are relative to."))
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
    imbalance_profile: Profile = field(default="exponential", metadata=_help(
        "Profile of the long-tailed split."))
    split_seed: int = field(default=0, metadata=_help(
        "Seed of the long-tailed subsampling and of the held-out split (the same split every run)."))
    holdout_fraction: float = field(default=0.0, metadata=_help(
        "Hold out this fraction of every class of the long-tailed training split (at least one image per "
        "class; never trained on) to calibrate the model and estimate test priors (0: no held-out split)."))
    selection: Selection = field(default="random", metadata=_help(
        "Which images the long-tailed split keeps (make_long_tailed): 'random' (numpy's default_rng) or "
        "'reference' (the official CIFAR-LT code's selection: the published split on CIFAR-10/100 whose "
        "rows of each class are in the original order)."))
    many_threshold: int = field(default=MANY_SHOT_THRESHOLD, metadata=_help(
        "Classes with more training images than this are many-shot."))
    few_threshold: int = field(default=FEW_SHOT_THRESHOLD, metadata=_help(
        "Classes with fewer training images than this are few-shot."))
    # --- method
    method: Method | None = field(default=None, metadata=_help(
        "Method preset applied on top of the recipe (balpoe_hf.recipes.methods): 'ce' (cross-entropy, raw "
        "logits), "
        "'ce-la' (+ post-hoc logit adjustment), 'bs' (balanced softmax), 'lade', 'balpoe-erm' (3 experts, "
        "no mixup), 'balpoe' (3 experts + the recipe's mixup). It sets num_experts, lambdas, mixup_alpha, "
        "loss and remove_mean_lambda; 'none': the recipe as written."))
    # --- model: the fields of BalPoEConfig's settings (MODEL_FIELDS) are added here by _with_model_fields
    # --- preprocessing and augmentation
    crop_pct: float = field(default=1.0, metadata=_help(
        "Evaluation: resize the shorter side to image_size / crop_pct, then centre-crop image_size."))
    augment: Augmentation = field(default="cifar", metadata=_help(
        "Training augmentation: 'cifar' (pad + random crop, flip, rotation), 'imagenet' (random resized "
        "crop, flip, colour jitter) or 'none'."))
    crop_padding: int = field(default=4, metadata=_help(
        "'cifar' augmentation: zero padding before the random crop."))
    rotation: float = field(default=15.0, metadata=_help(
        "'cifar' augmentation: largest random rotation in degrees (0: none)."))
    hflip: bool = field(default=True, metadata=_help("Random horizontal flips."))
    color_jitter: float = field(default=0.0, metadata=_help(
        "'imagenet' augmentation: brightness/contrast/saturation jitter."))
    # The three policy fields below run only in the PIL pipeline (transforms.py), after the --augment steps;
    # Recipe.policy_augmentations() lists the ones a recipe turns on.
    auto_augment: AutoAugmentPolicy = field(default="none", metadata=_help(
        "AutoAugment policy (torchvision AutoAugment), e.g. 'cifar10' as in the paper's longer CIFAR "
        "training."))
    rand_augment: str | None = field(default=None, metadata=_help(
        "RandAugment as a timm config string (timm.data.rand_augment_transform), e.g. 'rand-n2-m10-mstd0.5' "
        "as in the paper's longer ImageNet-LT / iNaturalist training; 'none': off."))
    cutout: int = field(default=0, metadata=_help(
        "Cutout: erase one random square of this side in pixels (torchvision RandomErasing, before "
        "normalisation); 0: off."))
    # --- optimisation
    epochs: int = field(default=200, metadata=_help("Training epochs."))
    batch_size: int = field(default=128, metadata=_help(
        "Batch size per process; the global batch is batch_size x processes x accumulation steps."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help(
        "Batches accumulated per optimizer step."))
    lr: float = field(default=0.1, metadata=_help(
        "Peak learning rate, for the recipe's global batch (docs/training.md on scaling it)."))
    momentum: float = field(default=0.9, metadata=_help("SGD momentum."))
    nesterov: bool = field(default=True, metadata=_help("Nesterov momentum."))
    weight_decay: float = field(default=5e-4, metadata=_help("Weight decay."))
    scale_expert_lr: bool = field(default=False, metadata=_help(
        "Train the experts' own parameters at num_experts x lr with weight decay / num_experts: the loss is "
        "the mean over experts, so each expert gets 1/num_experts of the gradient, and this makes its update "
        "the one it would get trained alone. Off: the paper's optimisation. Helps short budgets (docs/"
        "benchmarks.md); no effect with one expert."))
    lr_schedule: LRSchedule = field(default="multistep", metadata=_help(
        "Learning-rate schedule after the warm-up."))
    warmup_epochs: float = field(default=5.0, metadata=_help("Linear warm-up length in epochs (0: none)."))
    lr_milestones: list[int] = field(default_factory=lambda: [160, 180], metadata=_help(
        "'multistep': epochs at which the lr is multiplied by lr_gamma."))
    lr_gamma: float = field(default=0.1, metadata=_help("'multistep': lr factor at each milestone."))
    max_grad_norm: float | None = field(default=None, metadata=_help(
        "Clip the gradient norm to this value; 'none': no clipping."))
    mixup_alpha: float = field(default=0.4, metadata=_help(
        "Mixup Beta(alpha, alpha) parameter; 0 turns mixup off."))
    mixed_precision: MixedPrecision | None = field(default=None, metadata=_help(
        "'no', 'bf16' or 'fp16'; 'none': what accelerate launch was told (default 'no')."))
    channels_last: bool = field(default=False, metadata=_help(
        "Train in the channels_last memory format (faster convolutions on CPUs with oneDNN and on "
        "tensor-core GPUs; the saved model is in the usual format)."))
    compile: bool = field(default=False, metadata=_help(
        "torch.compile the model (pays a compilation of a minute or more at the start; for long runs)."))
    compile_mode: CompileMode = field(default="default", metadata=_help(
        "--compile: torch.compile's mode ('reduce-overhead' adds CUDA graphs on GPUs)."))
    fused_optimizer: bool = field(default=True, metadata=_help(
        "SGD's fused kernel (torch.optim.SGD(fused=True)) where torch has one for the device."))
    sync_batchnorm: bool = field(default=True, metadata=_help(
        "Under several processes, batch-norm layers normalise with the statistics of the global batch "
        "(SyncBatchNorm; balpoe_hf.training.sync_batchnorm), so that N processes train the model one process "
        "trains "
        "on the same global batch. Off: each process's own batch (timm's and accelerate's default; on GPUs "
        "it saves a collective per layer, and the model depends on the number of processes)."))
    seed: int = field(default=0, metadata=_help(
        "Seed of the weight initialisation, shuffling, augmentation and mixup."))
    # --- loop
    eval_every: int = field(default=10, metadata=_help(
        "Evaluate on the test set every N epochs (0: only at the end)."))
    eval_batch_size: int = field(default=256, metadata=_help("Evaluation batch size per process."))
    checkpoints_total_limit: int = field(default=2, metadata=_help(
        "Keep the last K checkpoints (epoch and step checkpoints alike)."))
    checkpoint_every_steps: int = field(default=0, metadata=_help(
        "Also save a checkpoint every N optimizer steps inside an epoch, so that --resume continues from "
        "that step (0: only at the end of each epoch)."))
    data_pipeline: DataPipeline = field(default="auto", metadata=_help(
        "'device': decode the splits once into uint8 tensors kept on the training device and augment whole "
        "batches there (balpoe_hf.data.device_data); 'workers': decode and augment image by image with PIL "
        "in "
        "DataLoader workers; 'auto': 'device' when the augmentation and the evaluation transform have a "
        "device version and both splits fit in balpoe_hf.data.loaders.DEVICE_DATA_LIMIT_BYTES, else "
        "'workers'."))
    num_workers: int = field(default=4, metadata=_help(
        "'workers' pipeline: DataLoader worker processes per training process (0: load in the training "
        "process)."))
    logging_steps: int = field(default=50, metadata=_help(
        "Log the training loss and lr to the tracker every N optimizer steps."))

    # How the recipe was resolved (not settings: no flag, not in to_dict): the fields a config file or the
    # command line changed, and notes for the user (e.g. backbone fields reset). Set by load_recipe and
    # parse_args (resolve.resolved_recipe, through record_resolution); save_recipe writes ``overridden`` into
    # recipe.yaml.
    overridden: ClassVar[tuple[str, ...]] = ()
    notes: ClassVar[tuple[str, ...]] = ()

    def record_resolution(self, overridden: Sequence[str], notes: Sequence[str]) -> None:
        """Keep how the recipe was resolved beside its fields: the fields changed (each once, in order) and
        the notes for the user. Not settings, so the frozen recipe takes them without a new check."""
        object.__setattr__(self, "overridden", tuple(dict.fromkeys(overridden)))
        object.__setattr__(self, "notes", tuple(notes))

    def __post_init__(self) -> None:
        """Normalise the settings, then check them: each value to its field's type, the method preset over
        its fields, the backbone's input size and statistics where ``image_size`` / ``image_mean`` /
        ``image_std`` are ``None``, evenly spaced lambdas where they are ``None``."""
        def set_field(name: str, value: Any) -> None:  # the way a frozen dataclass sets its own fields
            object.__setattr__(self, name, value)

        for name, hint in _FIELD_TYPES.items():
            set_field(name, coerce_field(name, hint, getattr(self, name)))
        if self.method is not None:
            for name, value in method_settings(self.method).items():
                set_field(name, value)
        set_field("backbone_kwargs", dict(self.backbone_kwargs or {}))
        if timm.is_model(self.backbone):  # the config check names an unknown backbone
            for name, value in backbone_image_defaults(self.backbone, self.backbone_kwargs).items():
                if getattr(self, name) is None:
                    set_field(name, value)
        if self.lambdas is None and self.num_experts >= 1:
            set_field("lambdas", default_lambdas(self.num_experts))
        self.validate()

    def validate(self) -> Recipe:
        """Check the settings that would otherwise fail late or silently (the model's by ``BalPoEConfig``);
        changes nothing, returns ``self``. Building a recipe calls it."""
        if self.method == "balpoe" and self.mixup_alpha == 0:
            raise TrainingError("method 'balpoe' trains with mixup, but mixup_alpha is 0: set "
                                "--mixup-alpha (the paper: 0.8 on CIFAR-10-LT, 0.4 on CIFAR-100-LT) or "
                                "use --method balpoe-erm.")
        # NaN passes every comparison below as False, and inf makes the run diverge: refuse both first.
        for name, value in self.to_dict().items():
            values = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise TrainingError(f"{name} must be finite, got {value}.")
        if self.num_classes is not None and self.num_classes < 2:
            raise TrainingError(f"num_classes must be at least 2, got {self.num_classes}.")
        if self.backbone_kwargs.get("in_chans", 3) != 3:
            raise TrainingError(f"backbone_kwargs sets in_chans={self.backbone_kwargs['in_chans']!r}, but "
                                "training feeds RGB images (grayscale ones as three equal channels), so the "
                                "backbone takes 3 input channels: drop in_chans from --backbone-kwargs.")
        self.model_config()  # the model's settings, checked by the config that declares them
        positive = ("epochs", "batch_size", "gradient_accumulation_steps", "eval_batch_size",
                    "checkpoints_total_limit", "logging_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("lr", "lr_gamma", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise TrainingError(f"{name} must be positive, got {value}.")
        not_negative = ("weight_decay", "momentum", "rotation", "color_jitter", "crop_padding",
                        "checkpoint_every_steps", "eval_every", "num_workers", "warmup_epochs", "seed",
                        "split_seed", "many_threshold", "few_threshold")
        for name in not_negative:
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise TrainingError(f"{name} must not be negative, got {getattr(self, name)}.")
        for name in ("seed", "split_seed"):
            if getattr(self, name) >= SEED_LIMIT:
                raise TrainingError(f"{name} must be below 2**32 = {SEED_LIMIT} (numpy seeds its generators "
                                    f"with 32-bit numbers), got {getattr(self, name)}.")
        if min(self.lr_milestones, default=0) < 0:
            raise TrainingError(f"lr_milestones are epochs, so not negative; got {self.lr_milestones}.")
        if self.rotation > 180:
            raise TrainingError(f"rotation is the largest angle, at most 180 degrees; got {self.rotation}.")
        if not all(0 <= value <= 1 for value in self.image_mean):
            raise TrainingError(f"image_mean is the mean of pixels scaled to [0, 1], so each value lies in "
                                f"[0, 1]; got {self.image_mean}.")
        if self.momentum >= 1:
            raise TrainingError(f"momentum must be below 1, got {self.momentum}.")
        if self.imbalance_ratio is not None and self.imbalance_ratio < 1:
            raise TrainingError(f"imbalance_ratio must be >= 1 (head count / tail count), got "
                                f"{self.imbalance_ratio}.")
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
        if not 0 <= self.holdout_fraction < 1:
            raise TrainingError(f"holdout_fraction must be in [0, 1) (0: no held-out split), got "
                                f"{self.holdout_fraction}.")
        if self.image_column == self.label_column:
            raise TrainingError(f"image_column and label_column are both {self.image_column!r}; name the "
                                "column of the images with --image-column and that of the class labels with "
                                "--label-column.")
        if not 0 <= self.cutout <= self.image_size:
            raise TrainingError(f"cutout must be between 0 (off) and image_size ({self.image_size}) pixels, "
                                f"got {self.cutout}.")
        if self.auto_augment != "none" and self.rand_augment is not None:
            raise TrainingError("choose one augmentation policy: auto_augment or rand_augment, not both.")
        if self.rand_augment is not None:
            _check_rand_augment(self.rand_augment)
        if self.train_list is not None and (self.train_file is not None or self.test_file is not None):
            raise TrainingError("give one data source: --train-list/--test-list or --train-file/--test-file.")
        return self

    def model_config(self, class_counts: list[int] | None = None,
                     class_names: list[str] | None = None) -> BalPoEConfig:
        """The ``BalPoEConfig`` of the recipe's model: its ``CONFIG_FIELDS``, and the training split's classes
        and counts (without them, ``num_classes`` or 2 unnamed classes, as for the check of the settings).

        Raises ``TrainingError`` with the config's explanation when the settings do not fit together.
        """
        if class_names is None:
            num_classes = len(class_counts) if class_counts else self.num_classes or 2
            class_names = [str(c) for c in range(num_classes)]
        try:
            return BalPoEConfig(**{name: getattr(self, name) for name in CONFIG_FIELDS},
                                class_counts=class_counts, id2label=dict(enumerate(class_names)),
                                label2id={name: i for i, name in enumerate(class_names)})
        except ValueError as error:
            raise TrainingError(f"model settings: {error}") from None

    def policy_augmentations(self) -> list[str]:
        """The augmentation policies this recipe turns on, e.g. ``["auto_augment=cifar10"]``.

        They exist only in the PIL pipeline (``transforms.py``); a recipe with none of them trains with its
        ``augment`` steps alone.
        """
        active = {"auto_augment": self.auto_augment != "none", "rand_augment": self.rand_augment is not None,
                  "cutout": self.cutout > 0}
        return [f"{name}={getattr(self, name)}" for name, on in active.items() if on]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RECIPE_FIELDS = {f.name: f for f in dataclasses.fields(Recipe)}
_FIELD_TYPES = {name: hint for name, hint in typing.get_type_hints(Recipe).items() if name in RECIPE_FIELDS}


@functools.cache
def _default_values() -> dict[str, Any]:
    return Recipe().to_dict()


def recipe_defaults() -> dict[str, Any]:
    """Every field's default as a recipe built without settings holds it (normalised: ``backbone_kwargs``
    ``{}``, the default backbone's input size and statistics, evenly spaced lambdas); a fresh copy."""
    return copy.deepcopy(_default_values())
# The recipe fields that are settings of the model's config: Recipe.model_config copies them into the
# BalPoEConfig, and a resumed run must keep them (training.resume.RESUME_FIELDS).
CONFIG_FIELDS = (*MODEL_FIELDS, "method")

# timm's RandAugment string: 'rand' then dash-separated sections; timm skips a section it cannot parse
# (say 'rand-n2-M9'), so the whole string is checked here.
_RAND_AUGMENT = re.compile(r"rand(-(m\d+|n\d+|p[\d.]+|mstd[\d.]+|mmax\d+|inc[01]|t\w+))*")


def _check_rand_augment(config: str) -> None:
    """Refuse a RandAugment string that timm cannot build, now rather than in a DataLoader worker."""
    from timm.data import rand_augment_transform

    try:
        if not _RAND_AUGMENT.fullmatch(config):
            raise ValueError("unknown section")
        rand_augment_transform(config, {})
    except (AssertionError, ValueError, KeyError) as error:
        reason = str(error) or "unknown section"
        raise TrainingError(f"rand_augment {config!r} is not a timm RandAugment string ({reason}); write "
                            "it like 'rand-n2-m10-mstd0.5' (n: ops per image, m: magnitude 0-10, mstd: "
                            "magnitude noise).") from None


def unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """``(T, True)`` for a field type ``T | None``, ``(T, False)`` for ``T``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def _type_name(hint: Any) -> str:
    base, optional = unwrap_optional(hint)
    origin = typing.get_origin(base)
    if origin is Literal:
        name = f"one of {list(typing.get_args(base))}"
    elif origin is list:
        name = f"a list of {typing.get_args(base)[0].__name__}"
    else:
        name = base.__name__
    return f"{name} or null" if optional else name


def coerce_field(name: str, hint: Any, value: Any) -> Any:
    """``value`` checked against the field type ``hint`` (ints are accepted for floats, tuples for lists)."""
    base, optional = unwrap_optional(hint)
    if value is None:
        if optional:
            return None
        raise TrainingError(f"recipe field {name} cannot be null.")
    origin = typing.get_origin(base)
    if origin is Literal:
        if value in typing.get_args(base):
            return value
        choices = [str(choice) for choice in typing.get_args(base)]
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise TrainingError(f"{name} must be one of {list(typing.get_args(base))}, got {value!r}.{hint}")
    if origin is list:
        item = typing.get_args(base)[0]
        items = list(value) if isinstance(value, list | tuple) else [value]
        return [coerce_field(name, item, v) for v in items]
    if base is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if base is dict and isinstance(value, dict):
        return value
    if isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    raise TrainingError(f"recipe field {name} must be {_type_name(hint)}, got {value!r}.")
