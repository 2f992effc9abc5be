"""Backbone adapters: how a timm model splits into a shared trunk and per-expert branches.

A BalPoE model runs one shared trunk (the stem and the first ``shared_stages`` stages) and, on its output,
one branch per expert (the remaining stages, the final norm and the pooling), each with its own
classifier. An adapter per timm family names the modules of each part:

=================  =========================================  ========================  ================
family             stem (trunk)                               stages                    default shared
=================  =========================================  ========================  ================
CIFAR ResNet       conv1, bn1, act1                           layer1..layer3            1 (paper)
ResNet / ResNeXt   conv1, bn1, act1, maxpool                  layer1..layer4            2 (paper)
ConvNeXt           stem                                       stages.0..stages.3        2
RegNet             stem                                       s1..s4                    2
ViT / DeiT         patch_embed, cls/pos tokens, norm_pre      blocks.0..blocks.{d-1}    d - d // 4
=================  =========================================  ========================  ================

Everything after the last stage (final norm, pooling, timm's own head) belongs to the experts. The trunk and
each expert are separate copies of the timm model in which the modules owned by the other part are replaced
by identities (and parameters by ``None``), so every parameter has exactly one owner, parameter names
stay timm's names, and the trunk runs timm's own ``forward_features``.

This module is also shipped as remote code next to a saved model: it imports torch, timm and
``.cifar_resnet`` only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.models import checkpoint_seq
from timm.models.convnext import ConvNeXt
from timm.models.regnet import RegNet
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .cifar_resnet import CifarResNet

# Keys that BalPoE sets itself when it calls `timm.create_model`.
RESERVED_BACKBONE_KWARGS = ("num_classes", "pretrained", "features_only", "pretrained_cfg_overlay")


def _vit_forward_expert(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """The expert part of ``VisionTransformer.forward_features``, then ``forward_head(pre_logits=True)``.

    ``x`` is the trunk's token sequence ``(B, N, D)``; timm's ``forward_features`` would embed it again.
    """
    if model.grad_checkpointing and not torch.jit.is_scripting():
        x = checkpoint_seq(model.blocks, x)
    else:
        x = model.blocks(x)
    return model.forward_head(model.norm(x), pre_logits=True)  # (B, D)


def _timm_forward_expert(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # The trunk-owned stem and stages are identities in an expert copy, so timm's own forward applies.
    return model.forward_head(model.forward_features(x), pre_logits=True)  # (B, D)


@dataclass(frozen=True)
class BackboneAdapter:
    """How one timm model family splits into a shared trunk and per-expert branches.

    Attributes:
        family: human-readable family name (used in error messages).
        model_classes: timm model classes of the family (checked with ``isinstance``).
        stem: top-level modules and parameters that run before the first stage (owned by the trunk).
        head: top-level modules and parameters that run after the last stage (owned by each expert).
        stage_names: the model's stages in forward order, as dotted module names.
        default_shared_stages: number of stages in the trunk when the config leaves it unset, given the
            number of stages.
        expert_forward: maps an expert copy and the trunk output to pooled features ``(B, D)``.
    """

    family: str
    model_classes: tuple[type[nn.Module], ...]
    stem: tuple[str, ...]
    head: tuple[str, ...]
    stage_names: Callable[[nn.Module], list[str]]
    default_shared_stages: Callable[[int], int]
    expert_forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] = _timm_forward_expert

    def num_stages(self, model: nn.Module) -> int:
        return len(self.stage_names(model))

    def resolve_shared_stages(self, model: nn.Module, shared_stages: int | None) -> int:
        """The number of trunk stages: ``shared_stages``, or the family default when it is ``None``."""
        num_stages = self.num_stages(model)
        if shared_stages is None:
            return self.default_shared_stages(num_stages)
        if not 0 <= shared_stages <= num_stages:
            names = self.stage_names(model)
            raise ValueError(
                f"shared_stages={shared_stages} is out of range: this {self.family} backbone has "
                f"{num_stages} stages ({names[0]} .. {names[-1]}); choose 0 (experts own every stage) to "
                f"{num_stages} (experts own only the final norm, pooling and classifier)."
            )
        return shared_stages

    def feature_dim(self, model: nn.Module) -> int:
        """Width of the pooled features that feed each expert's classifier."""
        return int(getattr(model, "head_hidden_size", None) or model.num_features)

    def _check_layout(self, model: nn.Module) -> None:
        # A timm release that adds a top-level module with parameters would otherwise leave it unowned
        # (or owned twice): refuse instead of silently building a different network.
        containers = {name.split(".")[0] for name in self.stage_names(model)}
        known = set(self.stem) | set(self.head) | containers
        unknown = [name for name, child in model.named_children()
                   if name not in known and any(True for _ in child.parameters())]
        unknown += [name for name, param in model.named_parameters(recurse=False)
                    if name not in known and param is not None]
        if unknown:
            raise NotImplementedError(
                f"the {self.family} adapter does not know whether {unknown} of {type(model).__name__} belong "
                f"to the trunk or to the experts (timm {timm.__version__}); please report this."
            )

    def make_trunk(self, model: nn.Module, shared_stages: int) -> nn.Module:
        """Turn ``model`` (in place) into the trunk: stem + the first ``shared_stages`` stages."""
        self._check_layout(model)
        _remove(model, self.head)
        _remove(model, self.stage_names(model)[shared_stages:])
        return model

    def make_expert(self, model: nn.Module, shared_stages: int) -> nn.Module:
        """Turn ``model`` (in place) into an expert branch: the remaining stages + final norm + pooling."""
        self._check_layout(model)
        _remove(model, self.stem)
        _remove(model, self.stage_names(model)[:shared_stages])
        return model

    def forward_trunk(self, trunk: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        # Expert-owned stages and norms are identities in the trunk copy: timm's forward_features stops at
        # the split point.
        return trunk.forward_features(pixel_values)


def _remove(model: nn.Module, names: list[str] | tuple[str, ...]) -> None:
    """Replace the named submodules by an identity and the named parameters by ``None``.

    The identity is an empty ``nn.Sequential`` rather than ``nn.Identity``: timm's gradient checkpointing
    (``checkpoint_seq(..., flatten=True)``) iterates over the stages, and an empty Sequential is iterable.
    """
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if attr in parent._parameters:
            parent.register_parameter(attr, None)
        elif getattr(parent, attr, None) is not None:
            setattr(parent, attr, nn.Sequential())


ADAPTERS: tuple[BackboneAdapter, ...] = (
    BackboneAdapter(
        family="CIFAR ResNet (resnet20_cifar ... resnet110_cifar)",
        model_classes=(CifarResNet,),
        stem=("conv1", "bn1", "act1"),
        head=("global_pool", "fc"),
        stage_names=lambda model: ["layer1", "layer2", "layer3"],
        default_shared_stages=lambda num_stages: 1,
    ),
    BackboneAdapter(
        family="ResNet / ResNeXt (timm.models.resnet, e.g. resnet50, resnext50_32x4d)",
        model_classes=(ResNet,),
        stem=("conv1", "bn1", "act1", "maxpool"),
        head=("global_pool", "fc"),
        stage_names=lambda model: ["layer1", "layer2", "layer3", "layer4"],
        default_shared_stages=lambda num_stages: 2,
    ),
    BackboneAdapter(
        family="ConvNeXt (timm.models.convnext, e.g. convnext_tiny)",
        model_classes=(ConvNeXt,),
        stem=("stem",),
        head=("norm_pre", "head"),
        stage_names=lambda model: [f"stages.{i}" for i in range(len(model.stages))],
        default_shared_stages=lambda num_stages: num_stages // 2,
    ),
    BackboneAdapter(
        family="RegNet (timm.models.regnet, e.g. regnety_016)",
        model_classes=(RegNet,),
        stem=("stem",),
        head=("final_conv", "head"),
        stage_names=lambda model: [name for name in ("s1", "s2", "s3", "s4") if hasattr(model, name)],
        default_shared_stages=lambda num_stages: num_stages // 2,
    ),
    BackboneAdapter(
        family="ViT / DeiT (timm.models.vision_transformer and deit, e.g. vit_small_patch16_224)",
        model_classes=(VisionTransformer,),
        stem=("patch_embed", "cls_token", "reg_token", "dist_token", "pos_embed", "pos_drop", "patch_drop",
              "norm_pre"),
        head=("norm", "fc_norm", "attn_pool", "head_drop", "head", "head_dist"),
        stage_names=lambda model: [f"blocks.{i}" for i in range(len(model.blocks))],
        # Experts own the last quarter of the blocks (at least one).
        default_shared_stages=lambda num_stages: num_stages - max(1, num_stages // 4),
        expert_forward=_vit_forward_expert,
    ),
)

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(adapter.family for adapter in ADAPTERS)


def _same_class(model_class: type, family_class: type) -> bool:
    """``issubclass``, or the same class from another copy of its module.

    A saved model's remote code is imported as ``transformers_modules.<hash>.cifar_resnet``, possibly more
    than once and next to ``balpoe_hf.models.balpoe.cifar_resnet``, while timm's registry keeps the first
    registration: match those copies by module file name and class name.
    """
    return issubclass(model_class, family_class) or any(
        cls.__name__ == family_class.__name__
        and cls.__module__.rsplit(".", 1)[-1] == family_class.__module__.rsplit(".", 1)[-1]
        for cls in model_class.__mro__
    )


def get_adapter(model: nn.Module, name: str | None = None) -> BackboneAdapter:
    """The adapter for a timm model instance; a ``ValueError`` listing the supported families otherwise."""
    for adapter in ADAPTERS:
        if any(_same_class(type(model), cls) for cls in adapter.model_classes):
            return adapter
    families = "\n  - ".join(SUPPORTED_FAMILIES)
    raise ValueError(
        f"backbone {name or type(model).__name__!r} ({type(model).__module__}.{type(model).__name__}) is not "
        f"supported by BalPoE: it needs to know where to split the network into a shared trunk and "
        f"per-expert branches. Supported timm families:\n  - {families}"
    )


def check_backbone_kwargs(backbone_kwargs: dict[str, Any]) -> None:
    """Reject keys that BalPoE sets itself."""
    reserved = sorted(set(backbone_kwargs) & set(RESERVED_BACKBONE_KWARGS))
    if reserved:
        raise ValueError(
            f"backbone_kwargs must not set {reserved}: the classes come from id2label/class_counts, "
            "pretrained weights from backbone_pretrained and backbone_weights_file."
        )


def create_backbone(name: str, backbone_kwargs: dict[str, Any] | None = None, pretrained: bool = False,
                    weights_file: str | None = None) -> nn.Module:
    """``timm.create_model(name, num_classes=0, **backbone_kwargs)``, optionally with pretrained weights.

    Args:
        name: a timm model name (after ``import balpoe_hf`` also the CIFAR ResNets).
        backbone_kwargs: extra ``timm.create_model`` arguments (``in_chans``, ``img_size``, ...).
        pretrained: load timm's pretrained weights: from ``weights_file`` when given (through timm's
            ``pretrained_cfg_overlay``), otherwise from the Hugging Face Hub (or its local cache).
        weights_file: a local ``.safetensors`` / ``.pth`` state dict of the full timm model.
    """
    kwargs = dict(backbone_kwargs or {})
    check_backbone_kwargs(kwargs)
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if weights_file is not None:
        if not os.path.isfile(weights_file):
            raise FileNotFoundError(f"backbone_weights_file {weights_file!r} does not exist.")
        kwargs["pretrained_cfg_overlay"] = {"file": os.fspath(weights_file)}
    try:
        return timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
    except (OSError, RuntimeError) as error:
        raise OSError(
            f"could not load pretrained timm weights for backbone {name!r}: {error}\n"
            "Online, timm downloads them from the Hugging Face Hub; offline (HF_HUB_OFFLINE=1 or no network) "
            "they must already be in the Hub cache. Otherwise pass a local weights file with "
            "backbone_weights_file='path/to/model.safetensors', or set backbone_pretrained=False."
        ) from error
