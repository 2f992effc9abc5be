"""Configuration of BalPoE models (``model_type="balpoe"``).

This module is also shipped as remote code next to a saved model: it imports torch, timm, transformers and
the flat ``.label_shift`` / ``.holdout_statistics`` / ``.priors`` / ``.backbones`` modules only.

The dataclass fields of ``BalPoEConfig`` are the one declaration of the model's settings: their types (with
the allowed values as ``Literal`` types), defaults and help (the class docstring), and ``check`` holds their
rules. A training recipe derives its model fields from them (``balpoe_hf.recipes.recipe``). The annotations
are evaluated (no ``from __future__ import annotations``), so that ``dataclasses.fields`` gives the recipe
real types.
"""

import dataclasses
import math
import re
import typing
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import timm
import torch
from transformers import PreTrainedConfig

# Importing .backbones also registers the CIFAR ResNets (the default backbone) with timm.
from .backbones import check_backbone_kwargs
from .holdout_statistics import validate_calibration
from .label_shift import validate_shift_estimator
from .priors import expert_lambdas, validate_class_counts, validate_prior

Classifier = Literal["cosine", "linear"]
Loss = Literal["balpoe", "lade"]
CLASSIFIERS: tuple[str, ...] = typing.get_args(Classifier)
LOSSES: tuple[str, ...] = typing.get_args(Loss)


def default_lambdas(num_experts: int) -> list[float]:
    """Evenly spaced expert biases from 1 (head expert) to -1 (tail expert), mean 0; ``[0.0]`` for one."""
    if num_experts == 1:
        return [0.0]
    return [1.0 - 2.0 * e / (num_experts - 1) for e in range(num_experts)]


def _to_list(value: Any) -> Any:
    """Plain (nested) Python lists from tuples, numpy arrays or tensors, so the config serialises to JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_to_list(item) for item in value]
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _leaves(value: Any) -> list[Any]:
    """The scalars of a (nested) list, or the value itself."""
    if isinstance(value, list | tuple):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


def backbone_image_defaults(backbone: str, backbone_kwargs: Mapping[str, Any] | None = None
                            ) -> dict[str, Any]:
    """The input a timm ``backbone`` expects: ``{"image_size", "image_mean", "image_std"}`` from
    ``backbone_kwargs["img_size"]`` or the model's pretrained config (ImageNet's 224 and statistics where it
    has none), the defaults of those three settings."""
    pretrained_cfg = timm.get_pretrained_cfg(backbone)
    img_size = (backbone_kwargs or {}).get("img_size")
    if img_size is None:
        img_size = pretrained_cfg.input_size[-1] if pretrained_cfg else 224
    return {"image_size": int(img_size if isinstance(img_size, int) else img_size[-1]),
            "image_mean": list(pretrained_cfg.mean) if pretrained_cfg else [0.485, 0.456, 0.406],
            "image_std": list(pretrained_cfg.std) if pretrained_cfg else [0.229, 0.224, 0.225]}


# What a held-out calibration can hold. Fits on held-out logits give temperatures of about 0.1 to 10, above
# 1e4 for a model trained for an epoch, biases of a few units; beyond 1e8 either way (a hand edit) every
# calibrated logit is crushed to 0 or overflows float32.
TEMPERATURE_RANGE = (1e-8, 1e8)
CALIBRATION_MAGNITUDE = 1e8


class BalPoEConfig(PreTrainedConfig):
    r"""Configuration of a Balanced Product of Calibrated Experts (BalPoE) image classifier.

    Args:
        backbone (`str`, defaults to `"resnet32_cifar"`):
            A timm model name from a supported family (CIFAR ResNet, ResNet/ResNeXt, ConvNeXt, RegNet,
            ViT/DeiT).
        backbone_kwargs (`dict`, *optional*):
            Extra `timm.create_model` arguments, e.g. `{"in_chans": 1}` or `{"img_size": 32}`.
        backbone_pretrained (`bool`, defaults to `False`):
            Load timm's pretrained weights into the trunk and every expert copy when the model is built.
        backbone_weights_file (`str`, *optional*):
            Local state dict of the full timm model to load instead of downloading (needs
            `backbone_pretrained=True`).
        num_experts (`int`, defaults to 3):
            Number of experts sharing the trunk.
        lambdas (`list[float]` or `list[list[float]]`, *optional*):
            Expert biases `lambda_e` (one per expert, or one per class per expert). Expert `e` is trained with
            `CE(z_e + (1 - lambda_e) log pi, y)`. Defaults to evenly spaced values from 1 to -1 (`[0.0]` for
            one expert). A mean other than 0 is allowed: inference then removes `mean(lambda) log pi` (see
            `remove_mean_lambda`).
        shared_stages (`int`, *optional*):
            Number of backbone stages in the shared trunk; the experts own the rest. Defaults to the
            backbone family's choice (e.g. 1 of 3 for CIFAR ResNets, 2 of 4 for ResNets) and is filled in
            when the model is built.
        classifier (`str`, defaults to `"cosine"`):
            `"cosine"` (normalised features and weights times `classifier_scale`, as in the reference code)
            or `"linear"`.
        classifier_scale (`float`, defaults to 30.0):
            Scale of the cosine classifier.
        class_counts (`list[int]`, *optional*):
            Training samples per class (label-index order); they define the training prior `pi`. `None`
            means a balanced training set (uniform prior, no logit adjustment).
        target_prior (`list[float]`, *optional*):
            Test-time class prior the logits are adjusted to; `None` means uniform (balanced accuracy).
        calibration (`dict`, *optional*):
            What the model learnt about itself on held-out labelled data from the training distribution
            (`holdout_statistics.holdout_calibration`, filled in by training with
            `holdout_fraction > 0`): `temperature` and `bias` (BCTS: `softmax(z / T + b)` calibrates the
            uniform-prior logits `z`) fitted with `bias_std` (the Gaussian prior of the biases), with their
            uncertainty (`bias_se`, `bias_cov_factor`), `ts_temperature` (temperature scaling alone),
            `holdout_counts` and `confusion` (held-out labels against `argmax z`). Used to estimate an
            unknown test prior from unlabelled data (`adapt_to_unlabeled`); it does not change the logits.
            `None`: no held-out data.
        shift_estimator (`dict`, *optional*):
            `{"settings": ShiftEstimator(...).to_dict()}` (`label_shift`): other settings for the
            unknown-prior mode `auto` of this model. `None` (the default) runs the package's default. A choice
            recorded by an earlier release (with a `name`) loads and is ignored.
        image_size (`int`, *optional*):
            Input resolution; defaults to `backbone_kwargs["img_size"]` or the timm model's input size.
        image_mean, image_std (`list[float]`, *optional*):
            Normalisation of the RGB input; default to the timm model's pretrained config.
        loss (`str`, defaults to `"balpoe"`):
            `"balpoe"` (each expert's logit-adjusted cross-entropy) or `"lade"`: the LADE loss of Hong et al.
            (CVPR 2021), balanced softmax `CE(z + log pi, y)` plus `lade_weight` times the LADE regulariser.
            LADE trains one classifier: it needs `num_experts=1` and lambda 0 (its cross-entropy is the
            balanced softmax); at test time it adds `log pi_target` like any BalPoE model.
        lade_weight (`float`, defaults to 0.1):
            Weight of the LADE regulariser (0.1 in the reference configs); only used with `loss="lade"`.
        lade_remine_lambda (`float`, defaults to 0.1):
            Weight of the ReMINE penalty inside the LADE regulariser; only used with `loss="lade"`.
        remove_mean_lambda (`bool`, defaults to `True`):
            `True`: predict with `mean_e z_e - mean(lambda) log pi_train + log(C pi_target)`, the adjustment
            of the paper's Sec. 3.3 (the mean expert logits carry a `mean(lambda) log pi_train` bias).
            `False`: predict with `mean_e z_e + log(C pi_target)`, as the official BalPoE code does at test
            time (it adds `log pi_test` to the expert mean, e.g. for ImageNet-LT with mean lambda -0.25).
            Both agree when the lambdas average to 0; with one expert and lambda 1 `False` gives the plain
            cross-entropy model's raw logits.
        method (`str`, *optional*):
            Name of the method preset the model was trained with (`balpoe_hf.recipes.methods`: `"ce"`,
            `"ce-la"`, `"bs"`, `"lade"`, `"balpoe-erm"`, `"balpoe"`), recorded for the reader; the other
            settings define the model.
    """

    model_type = "balpoe"
    # transformers.Trainer drops these output keys at evaluation, so compute_metrics gets the ensemble logits.
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["expert_logits", "expert_losses"]

    backbone: str = "resnet32_cifar"
    backbone_kwargs: dict[str, Any] | None = None
    backbone_pretrained: bool = False
    backbone_weights_file: str | None = None
    num_experts: int = 3
    lambdas: list[float] | list[list[float]] | None = None
    shared_stages: int | None = None
    classifier: Classifier = "cosine"
    classifier_scale: float = 30.0
    class_counts: list[int] | None = None
    target_prior: list[float] | None = None
    calibration: dict[str, Any] | None = None
    image_size: int | None = None
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    loss: Loss = "balpoe"
    lade_weight: float = 0.1
    lade_remine_lambda: float = 0.1
    remove_mean_lambda: bool = True
    method: str | None = None
    shift_estimator: dict[str, Any] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        labels_given = self.id2label is not None or kwargs.get("num_labels") is not None
        super().__post_init__(**kwargs)
        if not labels_given and self.class_counts is not None:
            self.num_labels = len(self.class_counts)
        if self.id2label is not None and self.label2id is None:
            self.label2id = {label: index for index, label in self.id2label.items()}

        if not isinstance(self.backbone_kwargs, Mapping | None):
            raise ValueError(f"backbone_kwargs must be a mapping of timm.create_model arguments, got "
                             f"{self.backbone_kwargs!r}.")
        self.backbone_kwargs = dict(self.backbone_kwargs or {})
        for name in ("lambdas", "class_counts", "target_prior", "image_mean", "image_std"):
            setattr(self, name, _to_list(getattr(self, name)))
        if isinstance(self.calibration, dict):
            self.calibration = {key: _to_list(value) for key, value in self.calibration.items()}
        if self.lambdas is None and isinstance(self.num_experts, int) and self.num_experts >= 1:
            self.lambdas = default_lambdas(self.num_experts)
        self._fill_image_defaults()
        self.check()

    def _fill_image_defaults(self) -> None:
        if not isinstance(self.backbone, str) or not timm.is_model(self.backbone):
            return  # `check` reports the unknown backbone
        defaults = backbone_image_defaults(self.backbone, self.backbone_kwargs)
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def check(self) -> None:
        """Raise a ``ValueError`` naming the problem and the fix when the settings do not fit together."""
        if not isinstance(self.backbone, str) or not timm.is_model(self.backbone):
            hint = timm.list_models(f"*{self.backbone}*")[:8] if isinstance(self.backbone, str) else []
            raise ValueError(
                f"backbone {self.backbone!r} is not a timm model name"
                + (f"; close matches: {hint}" if hint else "; see timm.list_models()") + "."
            )
        if not _is_int(self.num_experts) or self.num_experts < 1:
            raise ValueError(f"num_experts must be a positive integer, got {self.num_experts!r}.")
        num_classes = self.num_labels
        self._check_hand_edits()
        # The validators read numbers; a string or None where numbers belong (a hand-edited config.json) is a
        # TypeError there, reported here as the setting's ValueError.
        try:
            lambdas = expert_lambdas(self.lambdas, self.num_experts, num_classes)
            self._check_loss(lambdas)
            if self.class_counts is not None:
                validate_class_counts(self.class_counts, num_classes)
            if self.target_prior is not None:
                validate_prior(self.target_prior, num_classes)
            if self.calibration is not None:
                validate_calibration(self.calibration, num_classes)
                self._check_calibration_ranges()
        except TypeError as error:
            raise ValueError(f"lambdas, class_counts, target_prior and calibration must hold numbers "
                             f"({error}); got lambdas={self.lambdas!r}, class_counts={self.class_counts!r}, "
                             f"target_prior={self.target_prior!r}.") from None
        if not isinstance(self.backbone_pretrained, bool):
            raise ValueError(f"backbone_pretrained must be True or False, got {self.backbone_pretrained!r}.")
        if self.image_size is not None and (not _is_int(self.image_size) or self.image_size < 1):
            raise ValueError(f"image_size must be a positive integer number of pixels, got "
                             f"{self.image_size!r}.")
        for name in ("image_mean", "image_std"):
            values = getattr(self, name)
            if values is not None and not (isinstance(values, list) and all(map(_is_finite_number, values))):
                raise ValueError(f"{name} must be a list of finite numbers, one per input channel, got "
                                 f"{values!r}.")
        if self.shift_estimator is not None:
            validate_shift_estimator(self.shift_estimator)
        if not isinstance(self.remove_mean_lambda, bool):
            raise ValueError(f"remove_mean_lambda must be True or False, got {self.remove_mean_lambda!r}.")
        if self.method is not None and not isinstance(self.method, str):
            raise ValueError(f"method must be a preset name (a string) or None, got {self.method!r}.")
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {self.classifier!r}.")
        if not _is_finite_number(self.classifier_scale) or self.classifier_scale <= 0:
            raise ValueError(f"classifier_scale must be positive and finite, got "
                             f"{self.classifier_scale!r}.")
        if self.shared_stages is not None and (not _is_int(self.shared_stages) or self.shared_stages < 0):
            raise ValueError(
                "shared_stages must be None (the backbone's default) or an integer >= 0, "
                f"got {self.shared_stages!r}."
            )
        check_backbone_kwargs(self.backbone_kwargs)
        if self.backbone_weights_file is not None and not self.backbone_pretrained:
            raise ValueError("backbone_weights_file is set but backbone_pretrained is False; set it to True.")
        in_chans = self.backbone_kwargs.get("in_chans", 3)
        for name in ("image_mean", "image_std"):
            values = getattr(self, name)
            if values is not None and len(values) != in_chans:
                raise ValueError(
                    f"{name} has {len(values)} entries but the backbone takes {in_chans} input channels "
                    f"(backbone_kwargs in_chans); give one value per channel."
                )
        if self.image_std is not None and any(value <= 0 for value in self.image_std):
            raise ValueError(f"image_std must be positive, got {self.image_std}.")

    def _check_hand_edits(self) -> None:
        """What a hand-edited ``config.json`` can hold that the validators below would read as numbers:
        booleans where numbers belong, fractional class counts, class ids with gaps."""
        for name in ("lambdas", "class_counts", "target_prior"):
            value = getattr(self, name)
            if value is not None and any(isinstance(leaf, bool) for leaf in _leaves(value)):
                raise ValueError(f"{name} must hold numbers, not true/false; got {value!r}.")
        if self.class_counts is not None:
            fractional = [count for count in _leaves(self.class_counts) if isinstance(count, float)
                          and not (math.isfinite(count) and count.is_integer())]
            if fractional:
                raise ValueError(f"class_counts are numbers of training images, so whole numbers; got "
                                 f"{fractional[:5]} among {self.class_counts!r}.")
        if self.id2label is not None:
            ids = sorted(int(key) for key in self.id2label)
            if ids != list(range(len(ids))):
                raise ValueError(f"id2label must name the classes 0 to {len(ids) - 1} without a gap (class i "
                                 f"is output i), got the ids {ids[:20]}; renumber them.")

    def _check_calibration_ranges(self) -> None:
        calibration = self.calibration
        low, high = TEMPERATURE_RANGE
        for key in ("temperature", "ts_temperature"):
            if not low <= calibration[key] <= high:
                raise ValueError(f"calibration[{key!r}] is {calibration[key]!r}, outside [{low:g}, "
                                 f"{high:g}]: no temperature fitted on held-out logits lies there. Fit it "
                                 "again (holdout_statistics.holdout_calibration) or set calibration to null.")
        for key in ("bias", "bias_std", "bias_se", "bias_cov_factor", "holdout_counts", "confusion"):
            leaves = _leaves(calibration.get(key))
            if any(isinstance(leaf, bool) for leaf in leaves):
                raise ValueError(f"calibration[{key!r}] must hold numbers, not true/false.")
            if key.startswith("bias") and any(abs(leaf) > CALIBRATION_MAGNITUDE for leaf in leaves
                                              if leaf is not None):
                raise ValueError(f"calibration[{key!r}] holds values beyond +-{CALIBRATION_MAGNITUDE:g}, "
                                 "which no fit on held-out logits gives. Fit it again "
                                 "(holdout_statistics.holdout_calibration) or set calibration to null.")

    def _check_loss(self, lambdas: torch.Tensor) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}.")
        for name in ("lade_weight", "lade_remine_lambda"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        if self.loss != "lade":
            return
        if self.num_experts != 1:
            raise ValueError(f"loss='lade' trains a single classifier, but num_experts={self.num_experts}; "
                             "set num_experts=1 (or use loss='balpoe' for several experts).")
        if bool((lambdas != 0).any()):
            raise ValueError(f"loss='lade' trains with the balanced softmax CE(z + log pi, y), i.e. lambda "
                             f"0, but lambdas={self.lambdas}; set lambdas=[0.0] (the one-expert default).")

    def validate(self) -> None:
        """transformers' checks plus :meth:`check`; ``save_pretrained`` calls it, so edits are re-checked."""
        super().validate()
        self.check()

    @property
    def lambdas_tensor(self) -> torch.Tensor:
        """Expert biases expanded to ``(num_experts, num_labels)``."""
        return expert_lambdas(self.lambdas, self.num_experts, self.num_labels)


BalPoEConfig.register_for_auto_class()

# The settings BalPoEConfig adds to transformers' PreTrainedConfig, in their order: the one list of what
# defines a BalPoE model (training copies the recipe's fields of these names, resume compares them).
SETTINGS = tuple(f.name for f in dataclasses.fields(BalPoEConfig)
                 if f.name not in {base.name for base in dataclasses.fields(PreTrainedConfig)})
# Settings that change how a trained model predicts, not what it learns: models that differ only in them
# can share their weights.
PREDICTION_SETTINGS = ("remove_mean_lambda", "target_prior", "method")
# Settings given to a trained model (the target prior; what is fitted on held-out data after the last epoch):
# they leave its weights alone, and a model is built without them.
POST_TRAINING_SETTINGS = ("target_prior", "calibration", "shift_estimator")



def _documented_settings(doc: str) -> dict[str, str]:
    """The entries of a transformers-style ``Args:`` section (``name (`type`, ...):`` then indented text), as
    ``{name: text on one line}``; an entry naming several settings (``image_mean, image_std``) gives each."""
    entries = re.findall(r"^ {8}([\w, ]+) \(.*\):\n((?: {12}.*\n?)+)", doc, flags=re.MULTILINE)
    return {name.strip(): " ".join(text.split()).replace("`", "")
            for names, text in entries for name in names.split(",")}


# Each setting's help, from the class docstring (the help of the recipe fields derived from the settings).
SETTING_HELP = _documented_settings(BalPoEConfig.__doc__)
# Each setting's type, as declared (for the recipe's derived fields).
SETTING_TYPES = {f.name: f.type for f in dataclasses.fields(BalPoEConfig) if f.name in SETTINGS}

__all__ = ["BalPoEConfig", "backbone_image_defaults"]
