"""BalPoE models: a timm trunk shared by several experts, each with its own late stages and classifier.

``BalPoEModel`` runs the trunk once and every expert on its output, returning per-expert pooled features
``(B, E, D)`` and logits ``(B, E, C)``. ``BalPoEForImageClassification`` adds the BalPoE ensemble: the
mean of the expert logits, adjusted from the ensemble's implied prior to a target prior
(``zbar - mean(lambda) * log pi_train + log pi_target``), and the multi-expert logit-adjusted loss.

The config is the one source of truth for the training prior, the lambdas and the target prior: the model's
prior buffers (and the loss's) are non-persistent, rebuilt from the config on every build and load, so the
weights file never holds a copy that could disagree with ``config.json``.

This module is shipped as remote code with every saved model: it imports torch, timm, transformers and the
flat ``.backbones`` / ``.configuration_balpoe`` / ``.label_shift`` / ``.losses`` / ``.pipeline_balpoe`` /
``.priors`` / ``.processing`` modules only (transformers copies the modules a model module imports so).
It is one file of over 500 lines, as transformers' ``modeling_*.py`` files are: a split would add a code file
that every saved model carries and that every folder saved before lacks.
"""

from __future__ import annotations

import copy
import os
import shutil
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput, ModelOutput
from transformers.utils import IMAGE_PROCESSOR_NAME, cached_file, logging

from .backbones import BackboneAdapter, create_backbone, get_adapter
from .configuration_balpoe import BalPoEConfig
from .label_shift import (
    PriorEstimate,
    PriorStream,
    ShiftEstimator,
    describe_auto,
    estimate_prior,
)
from .losses import BalPoELoss, LADELoss
from .pipeline_balpoe import BalPoEImageClassificationPipeline
from .priors import adjust_logits, class_prior, log_class_prior, validate_prior
from .processing import build_image_processor

logger = logging.get_logger(__name__)

TargetPrior = str | Sequence[float] | torch.Tensor
# The journal of a balpoe-hf save in progress (balpoe_hf.run_folder.JOURNAL; this module travels as remote
# code and imports no balpoe_hf module beside its flat ones).
SAVE_JOURNAL = ".balpoe-save.json"


@dataclass
class BalPoEModelOutput(ModelOutput):
    """Output of :class:`BalPoEModel`.

    Args:
        trunk_hidden_state: output of the shared trunk, e.g. ``(B, C', H', W')`` or ``(B, N, D')``.
        pooler_output: each expert's pooled features ``(B, E, D)``.
        expert_logits: each expert's raw logits ``(B, E, C)``.
    """

    trunk_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    expert_logits: torch.Tensor | None = None


@dataclass
class BalPoEImageClassifierOutput(ImageClassifierOutput):
    """Output of :class:`BalPoEForImageClassification`.

    Args:
        loss: mean over experts of the logit-adjusted cross-entropy, or the LADE loss (when ``labels`` are
            given).
        logits: ensemble logits ``(B, C)`` adjusted to the target prior.
        expert_logits: each expert's raw logits ``(B, E, C)``.
        expert_losses: each expert's loss ``(E,)`` (when ``labels`` are given), for logging.
    """

    expert_logits: torch.Tensor | None = None
    expert_losses: torch.Tensor | None = None


class CosineClassifier(nn.Module):
    """``scale * cos(x, w_c)`` for every class ``c``: the normalised classifier of the reference code."""

    def __init__(self, in_features: int, out_features: int, scale: float = 30.0) -> None:
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(out_features, in_features))  # (C, D)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Unit-norm rows drawn from U(-1, 1), as NormedLinear in the LDAM / RIDE / BalPoE code. The forward is
        # scale invariant, but the row norm sets the size of the gradient steps.
        self.weight.uniform_(-1.0, 1.0)
        self.weight.copy_(F.normalize(self.weight, dim=1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # (B, D) x (C, D) -> (B, C)
        return self.scale * F.linear(F.normalize(features, dim=-1), F.normalize(self.weight, dim=-1))

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, scale={self.scale}"


class LinearClassifier(nn.Linear):
    """A plain linear classifier (its own class so weight init can tell it from timm's linear layers)."""


class BalPoEExpert(nn.Module):
    """One expert: its copy of the late backbone stages, final norm and pooling, and its classifier."""

    def __init__(self, backbone: nn.Module, classifier: nn.Module, adapter: BackboneAdapter) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.backbone_adapter = adapter

    def forward(self, trunk_hidden_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone_adapter.expert_forward(self.backbone, trunk_hidden_state)  # (B, D)
        return features, self.classifier(features)  # (B, D), (B, C)


def _build_classifier(config: BalPoEConfig, in_features: int) -> nn.Module:
    if config.classifier == "cosine":
        return CosineClassifier(in_features, config.num_labels, config.classifier_scale)
    return LinearClassifier(in_features, config.num_labels)


def _building_on_meta() -> bool:
    # transformers' from_pretrained builds the model under `torch.device("meta")`, then loads the weights.
    return torch.empty(0).device.type == "meta"


class BalPoEPreTrainedModel(PreTrainedModel):
    """Weight init, gradient checkpointing and the remote-code ``auto_map`` shared by the BalPoE models."""

    config_class = BalPoEConfig
    config: BalPoEConfig
    base_model_prefix = "balpoe"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["BalPoEExpert"]
    # Labels may be soft (mixup) targets; there are no loss kwargs to forward from the Trainer.
    accepts_loss_kwargs = False
    # Older checkpoints saved the prior buffers; they now come from the config, so those keys are dropped.
    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [r"^loss_fn\.", r"^target_prior$"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Initialise what the checkpoint did not provide.

        A freshly built model keeps timm's own initialisation (its timm parameters are marked as initialised);
        this runs for BalPoE's own modules and buffers, and for backbone weights missing from a checkpoint,
        which get a generic init (Kaiming for convolutions, truncated normal for the rest).
        """
        if isinstance(module, BalPoEForImageClassification | BalPoELoss | LADELoss):
            # The non-persistent prior buffers: from_pretrained leaves them empty, the config defines them.
            with torch.device("cpu"):
                if isinstance(module, BalPoEForImageClassification):
                    source = _prior_buffers(self.config)
                else:
                    source = dict(build_loss(self.config).named_buffers())
            for name, value in source.items():
                init.copy_(module.get_buffer(name), value)
        elif isinstance(module, CosineClassifier | LinearClassifier):
            module.reset_parameters()
        elif isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm):
            if module.weight is not None:
                init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        else:
            # Remaining direct parameters of timm modules: ViT tokens and position embeddings, layer scales.
            for param in module.parameters(recurse=False):
                init.trunc_normal_(param, std=0.02)

    def _set_gradient_checkpointing(self, enable: bool = True, *args: Any, **kwargs: Any) -> None:
        # timm models checkpoint their own stages (`checkpoint_seq`); switch every backbone copy.
        for module in self.modules():
            if hasattr(module, "set_grad_checkpointing") and hasattr(module, "grad_checkpointing"):
                module.set_grad_checkpointing(enable)

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True,
                        **kwargs: Any) -> Any:
        """``PreTrainedModel.save_pretrained`` plus an ``auto_map``, the pipeline and an image processor.

        The code files are copied next to the weights, so the folder loads with ``trust_remote_code=True``
        where ``balpoe_hf`` is not installed, through ``AutoConfig``, ``AutoModel`` and
        ``AutoModelForImageClassification`` alike, and ``pipeline("image-classification", model=folder,
        trust_remote_code=True)`` is :class:`~.pipeline_balpoe.BalPoEImageClassificationPipeline` (named in
        ``config.custom_pipelines``). When the folder has no ``preprocessor_config.json`` yet, the processor
        of the folder or Hub repository the model was loaded from is copied, or else the one built from the
        config's ``image_size``, ``image_mean`` and ``image_std``
        (:func:`~.processing.build_image_processor`) is saved, so ``AutoImageProcessor`` and the pipeline load
        the folder as it is; an existing processor file (e.g. one a training script saved with its own
        settings) is left alone. With ``push_to_hub=True`` transformers uploads only the files it wrote
        itself; ``model.push_to_hub`` uploads the processor as well.
        """
        config_module = type(self.config).__module__.rsplit(".", 1)[-1]
        model_module = __name__.rsplit(".", 1)[-1]
        self.config.auto_map = {
            **(getattr(self.config, "auto_map", None) or {}),
            "AutoConfig": f"{config_module}.{type(self.config).__name__}",
            "AutoModel": f"{model_module}.BalPoEModel",
            "AutoModelForImageClassification": f"{model_module}.BalPoEForImageClassification",
        }
        # transformers' custom-pipeline mechanism: pipeline() loads this class from the saved folder.
        pipeline_class = BalPoEImageClassificationPipeline
        self.config.custom_pipelines = {"image-classification": {
            "impl": f"{pipeline_class.__module__.rsplit('.', 1)[-1]}.{pipeline_class.__name__}",
            "pt": ["AutoModelForImageClassification"], "type": "image"}}
        result = super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        processor_file = os.path.join(save_directory, IMAGE_PROCESSOR_NAME)
        if is_main_process and os.path.isdir(save_directory) and not os.path.exists(processor_file):
            self._save_image_processor(save_directory)
        return result

    def _save_image_processor(self, save_directory: str | os.PathLike) -> None:
        source = self._loaded_image_processor()
        if source is not None:
            # The processor the model was published with may differ from the config's default (e.g. the
            # resize-and-centre-crop of ImageNet recipes): keep it.
            shutil.copyfile(source, os.path.join(save_directory, IMAGE_PROCESSOR_NAME))
            return
        channels = len(self.config.image_mean or ())
        if channels != 3:
            # transformers' image processors (and the pipeline) feed RGB images.
            logger.warning(f"No {IMAGE_PROCESSOR_NAME} saved: the backbone takes {channels} input channels "
                           "but the image processor produces RGB images; save a processor of your own.")
            return
        build_image_processor(self.config).save_pretrained(save_directory)

    def _loaded_image_processor(self) -> str | None:
        """The ``preprocessor_config.json`` beside the weights this model was loaded from, if there is one."""
        if not self.name_or_path:
            return None
        try:
            return cached_file(self.name_or_path, IMAGE_PROCESSOR_NAME,
                               _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
        except OSError:  # not a folder nor a reachable repository any more
            return None


class BalPoEModel(BalPoEPreTrainedModel):
    """Shared timm trunk and ``num_experts`` expert branches, each with its own classifier.

    The backbone is split by its family's adapter (:mod:`backbones`): the stem and the first
    ``config.shared_stages`` stages form the trunk, every expert owns its copy of the other stages, the
    final norm and pooling. Each expert copy starts from its own random timm initialisation, or from the
    same pretrained weights with ``config.backbone_pretrained``.
    """

    def __init__(self, config: BalPoEConfig) -> None:
        super().__init__(config)
        on_meta = _building_on_meta()
        # On the meta device (from_pretrained) the checkpoint supplies the weights: never download them.
        pretrained = config.backbone_pretrained and not on_meta
        name, kwargs = config.backbone, config.backbone_kwargs
        base = create_backbone(name, kwargs, pretrained, config.backbone_weights_file)
        adapter = get_adapter(base, config.backbone)
        shared_stages = adapter.resolve_shared_stages(base, config.shared_stages)
        config.shared_stages = shared_stages  # saved, so a later default change cannot alter this model
        feature_dim = adapter.feature_dim(base)

        experts = []
        for _ in range(config.num_experts):
            # Pretrained: every expert starts from the same weights; otherwise each gets its own random init.
            backbone = copy.deepcopy(base) if pretrained else create_backbone(name, kwargs)
            experts.append(BalPoEExpert(adapter.make_expert(backbone, shared_stages),
                                        _build_classifier(config, feature_dim), adapter))
        self.trunk = adapter.make_trunk(base, shared_stages)
        self.experts = nn.ModuleList(experts)
        self.backbone_adapter = adapter
        if not on_meta:
            # timm initialised the backbone copies (Kaiming, zero-init residual BNs, ...): keep that init.
            for tensor in [*self.trunk.parameters(), *self.trunk.buffers(),
                           *(t for expert in self.experts for t in (*expert.backbone.parameters(),
                                                                    *expert.backbone.buffers()))]:
                tensor._is_hf_initialized = True
        self.post_init()

    def forward(self, pixel_values: torch.Tensor,
                return_dict: bool | None = None) -> BalPoEModelOutput | tuple:
        """Args:
        pixel_values: images ``(B, 3, H, W)``, normalised as the image processor does.
        """
        trunk_hidden_state = self.backbone_adapter.forward_trunk(self.trunk, pixel_values)
        features, logits = zip(*(expert(trunk_hidden_state) for expert in self.experts), strict=True)
        output = BalPoEModelOutput(
            trunk_hidden_state=trunk_hidden_state,
            pooler_output=torch.stack(features, dim=1),  # (B, E, D)
            expert_logits=torch.stack(logits, dim=1),  # (B, E, C)
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()


def _as_key(prior: Sequence[float] | None) -> tuple[float, ...] | None:
    """A config's ``target_prior`` as a comparable value (the list may be edited in place)."""
    return None if prior is None else tuple(prior)


def _target_prior_tensor(config: BalPoEConfig) -> torch.Tensor:
    """``config.target_prior`` as float32 ``(C,)``; uniform when unset."""
    if config.target_prior is None:
        return torch.full((config.num_labels,), 1.0 / config.num_labels)
    return validate_prior(config.target_prior, config.num_labels).float()


def _train_counts(config: BalPoEConfig) -> list[int] | list[float]:
    """``config.class_counts``, or equal counts (a balanced training set) when unset."""
    return config.class_counts or [1] * config.num_labels


def build_loss(config: BalPoEConfig) -> BalPoELoss | LADELoss:
    """The training loss ``config.loss`` names, its buffers built from ``class_counts`` and ``lambdas``."""
    if config.loss == "lade":
        return LADELoss(_train_counts(config), config.lade_weight, config.lade_remine_lambda)
    return BalPoELoss(_train_counts(config), config.lambdas)


def _prior_buffers(config: BalPoEConfig) -> dict[str, torch.Tensor]:
    """The model's prior buffers, all derived from the config.

    ``log_train_prior`` ``(C,)`` (``log pi_train``), ``mean_lambda`` ``(C,)`` (``mean_e lambda_e`` per class)
    and ``target_prior`` ``(C,)``.
    """
    return {
        "log_train_prior": log_class_prior(_train_counts(config)),
        "mean_lambda": config.lambdas_tensor.mean(0),
        "target_prior": _target_prior_tensor(config),
    }


class BalPoEForImageClassification(BalPoEPreTrainedModel):
    """BalPoE image classifier: expert ensemble, prior adjustment and the multi-expert loss.

    ``logits = mean_e(z_e) - mean(lambda) * log pi_train + log(C * pi_target)``; with the default uniform
    target and mean lambda 0 that is the plain mean of the expert logits. ``config.remove_mean_lambda=False``
    drops the ``mean(lambda)`` term, as the official BalPoE code predicts. The target prior comes from
    ``config.target_prior`` (change it with :meth:`set_target_prior`) or per call from ``target_prior``.
    The loss is BalPoE's (each expert's logit-adjusted cross-entropy) or, with ``config.loss="lade"`` and
    one expert, LADE's (:class:`~.losses.LADELoss`).
    """

    def __init__(self, config: BalPoEConfig) -> None:
        super().__init__(config)
        self.balpoe = BalPoEModel(config)
        device = torch.empty(0).device
        # The prior helpers validate on the CPU, which a meta-device build (from_pretrained) cannot do.
        with torch.device("cpu"):
            loss_fn = build_loss(config)
            buffers = _prior_buffers(config)
        self.loss_fn = loss_fn.to(device)
        for name, value in buffers.items():
            # Non-persistent: rebuilt from the config (here and in `_init_weights`), never read from weights.
            self.register_buffer(name, value.to(device), persistent=False)
        self._buffered_target_prior = _as_key(config.target_prior)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.from_pretrained``; warns when the config has no ``class_counts``.

        Without them the model cannot undo a training prior: it assumes the training set was balanced. Refuses
        a local folder that a kill left in the middle of a balpoe-hf save (its files of two saves).
        """
        folder = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if isinstance(folder, str | os.PathLike) and os.path.isfile(os.path.join(folder, SAVE_JOURNAL)):
            raise OSError(f"{folder} holds a save that was interrupted half-way ({SAVE_JOURNAL}): its files "
                          "are from two saves. Any balpoe-hf command on the folder finishes it first, e.g. "
                          f"balpoe-evaluate --model {folder}; then load it again.")
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading_info) on request
        if model.config.class_counts is None:
            logger.warning(
                "This BalPoE checkpoint's config has no class_counts, so the model assumes a balanced "
                "training set (uniform training prior, no logit adjustment). If it was trained on a "
                "long-tailed set, set class_counts in its config.json to the training samples per class."
            )
        return loaded

    def _resolve_target_prior(self, prior: TargetPrior) -> torch.Tensor | None:
        """A target prior as float64 probabilities ``(C,)``, or ``None`` for uniform."""
        if isinstance(prior, str):
            if prior == "uniform":
                return None
            if prior == "train":
                if self.config.class_counts is None:
                    raise ValueError(
                        "target prior 'train' needs the training class counts, but config.class_counts is "
                        "None (the model assumes a balanced training set). Pass the training prior as "
                        f"{self.config.num_labels} probabilities instead, or rebuild the model with "
                        "class_counts."
                    )
                return class_prior(self.config.class_counts).double()
            raise ValueError(f"target prior must be 'uniform', 'train' or {self.config.num_labels} "
                             f"probabilities, got {prior!r}.")
        return validate_prior(prior, self.config.num_labels)

    @torch.no_grad()
    def set_target_prior(self, prior: TargetPrior) -> None:
        """Adjust future predictions to a test-time class prior.

        Args:
            prior: ``"uniform"`` (balanced test set, the default), ``"train"`` (test distributed like the
                training set) or a sequence of ``num_labels`` probabilities summing to 1.

        Updates ``config.target_prior`` too, so ``save_pretrained`` keeps the choice.
        """
        probs = self._resolve_target_prior(prior)
        self.config.target_prior = None if probs is None else probs.tolist()
        self.target_prior.copy_(_target_prior_tensor(self.config))
        self._buffered_target_prior = _as_key(self.config.target_prior)

    def _check_pixel_values(self, pixel_values: Any) -> torch.Tensor:
        channels = self.config.backbone_kwargs.get("in_chans", 3)
        expected = f"(batch > 0, {channels}, height, width)"
        if not torch.is_tensor(pixel_values) or not pixel_values.is_floating_point():
            is_tensor = torch.is_tensor(pixel_values)
            got = f"a {pixel_values.dtype} tensor" if is_tensor else type(pixel_values).__name__
            raise TypeError(f"unlabelled images must be float pixel_values tensors {expected} from the "
                            f"model's image processor, got {got}.")
        if pixel_values.ndim != 4 or pixel_values.shape[0] == 0 or pixel_values.shape[1] != channels:
            raise ValueError(f"unlabelled pixel_values must have shape {expected}, got "
                             f"{tuple(pixel_values.shape)}; preprocess the images with the model's image "
                             "processor (AutoImageProcessor.from_pretrained).")
        side = self.config.image_size
        if side is not None and tuple(pixel_values.shape[-2:]) != (side, side):
            # A convolutional trunk runs on any size, but its logits, and the prior estimated from them, are
            # those of images the model was never trained on: the processor's size is the model's.
            raise ValueError(f"unlabelled pixel_values must be {side} x {side} pixels (config.image_size, "
                             f"what the model's image processor makes), got "
                             f"{tuple(pixel_values.shape[-2:])}; preprocess the images with "
                             "AutoImageProcessor.from_pretrained(model folder).")
        return pixel_values

    @torch.no_grad()
    def adapt_to_unlabeled(self, images: torch.Tensor | Iterable[Any], *,
                           method: str | ShiftEstimator = "auto", stream: PriorStream | None = None,
                           set_prior: bool = True, batch_size: int = 256) -> PriorEstimate:
        """Estimate the class prior of unlabelled deployment images and, by default, predict for it.

        Args:
            images: ``pixel_values`` ``(N, C, H, W)`` from the model's image processor (run in batches of
                ``batch_size``), or an iterable of such tensors or of batches with a ``"pixel_values"``
                entry, e.g. a ``DataLoader``.
            method: ``"auto"`` (the default), another mode of ``label_shift.PRIOR_ESTIMATORS`` or a
                ``label_shift.ShiftEstimator``. ``auto`` shrinks the estimate towards the uniform prior by
                as much as its errors on these images and in the model's calibration are large, so it
                keeps the uniform prior on unshifted data; it uses ``config.calibration`` (saved by
                training with ``holdout_fraction > 0``) when the model has one, so it works on a model
                loaded from the Hub or a folder, without the training data. Without one it reads the raw
                posteriors, which lean to the frequent classes when the model is over-fitted, and warns
                when it moves the prior on them.
            stream: a ``label_shift.PriorStream``: these images are added to it and the estimate rests on
                everything it holds (a stream of batches converges to the estimate of all of them; its
                ``forgetting`` follows a prior that drifts).
            set_prior: call ``set_target_prior(estimate.prior)`` (predictions ``logits + log(C * prior)``;
                the calibration only serves the estimate, so a uniform estimate changes nothing).

        Returns the ``label_shift.PriorEstimate``: ``prior`` (what was set), ``estimate`` (before shrinkage),
        its errors and whether the prior stayed uniform. The model is in eval mode afterwards.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if torch.is_tensor(images):
            batches: Iterable[Any] = self._check_pixel_values(images).split(batch_size)
        elif isinstance(images, Iterable) and not isinstance(images, str | bytes | Mapping):
            batches = images
        else:
            raise TypeError(f"images must be a pixel_values tensor or an iterable of batches, got "
                            f"{type(images).__name__}.")
        self.eval()
        device = next(self.parameters()).device
        logits = []
        for batch in batches:
            pixel_values = batch["pixel_values"] if isinstance(batch, Mapping) else batch
            pixel_values = self._check_pixel_values(pixel_values).to(device)
            logits.append(self(pixel_values=pixel_values, target_prior="uniform").logits.double().cpu())
        if not logits:
            raise ValueError("no unlabelled images were given: the iterable yielded no batch.")
        evidence, weights = torch.cat(logits), None
        if stream is not None:
            stream.add(evidence)
            evidence, weights = stream.logits, stream.weights
        estimate = estimate_prior(evidence, self.config.calibration, method, weights=weights,
                                  shift_estimator=self.config.shift_estimator)
        if estimate.details.get("no_holdout") and not estimate.kept_uniform:
            # Raw posteriors of an over-fitted model lean to the frequent classes (measured: a 200-epoch
            # balanced softmax model lost 0.9 points on an unshifted test set): say so where it adapts.
            # stacklevel 3: the caller's line, past torch.no_grad's wrapper of this method.
            warnings.warn(f"the prior moved on uncalibrated evidence: {describe_auto(None)}.", stacklevel=3)
        if set_prior:
            self.set_target_prior(estimate.prior)
        return estimate

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                target_prior: TargetPrior | None = None,
                return_dict: bool | None = None) -> BalPoEImageClassifierOutput | tuple:
        """Args:
        pixel_values: images ``(B, 3, H, W)``.
        labels: class indices ``(B,)`` or soft targets ``(B, C)`` (mixup); adds ``loss`` and
            ``expert_losses``.
        target_prior: overrides the model's target prior for this call (same values as
            :meth:`set_target_prior`).
        """
        outputs = self.balpoe(pixel_values, return_dict=True)
        expert_logits = outputs.expert_logits  # (B, E, C)
        if target_prior is None:
            if _as_key(self.config.target_prior) != self._buffered_target_prior:
                # config.target_prior set directly, as save_pretrained / from_pretrained would carry it: the
                # buffer follows (validated), so the model predicts in memory as it will once reloaded.
                self.set_target_prior(self.config.target_prior or "uniform")
            prior = None if self.config.target_prior is None else self.target_prior
        else:
            prior = self._resolve_target_prior(target_prior)
        removed_lambda = self.mean_lambda if self.config.remove_mean_lambda else 0.0
        logits = adjust_logits(expert_logits.mean(1), self.log_train_prior, removed_lambda, prior)  # (B, C)

        loss = expert_losses = None
        if labels is not None:
            expert_losses = self.loss_fn.expert_losses(expert_logits, labels.to(expert_logits.device))  # (E,)
            loss = expert_losses.mean()
        output = BalPoEImageClassifierOutput(loss=loss, logits=logits, expert_logits=expert_logits,
                                             expert_losses=expert_losses)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()


BalPoEModel.register_for_auto_class("AutoModel")
BalPoEForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "BalPoEForImageClassification",
    "BalPoEImageClassifierOutput",
    "BalPoEModel",
    "BalPoEModelOutput",
    "BalPoEPreTrainedModel",
    "CosineClassifier",
]
