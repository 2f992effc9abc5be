"""CIFAR ResNets of He et al. (2016), Sec. 4.2, registered in timm's model registry.

``resnet20_cifar`` ... ``resnet110_cifar``: a 3x3 stem with 16 channels, then three stages of ``n`` basic
blocks with 16, 32 and 64 channels (depth ``6n + 2``), global average pooling and a linear classifier.
Shortcuts that change shape use option A of the paper: subsample by 2 and zero-pad the new channels, so
shortcuts carry no parameters and ``resnet32_cifar`` has 0.46 M parameters for 10 classes. Convolutions and
the classifier get Kaiming-normal weights, as in the reference BalPoE / RIDE code.

Importing this module registers the models, after which ``timm.create_model("resnet32_cifar",
num_classes=100, in_chans=1)`` works like any timm model (``forward_features``, ``forward_head``,
``reset_classifier``, ``pretrained_cfg``), including timm's feature API (``forward_intermediates``,
``prune_intermediate_layers``), so ``features_only=True`` works with the default ``FeatureListNet`` and with
``feature_cls="getter"``. Feature points, as in ``feature_info``: the stem (index 0) and the three stages.

This module is also shipped as remote code next to a saved model: it imports torch and timm only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, is_model, register_model
from timm.models._features import feature_take_indices  # timm's own models import it from here too
from torch import nn

__all__ = ["CifarResNet"]

# Channel statistics of the CIFAR-10 training set, as used by the BalPoE / RIDE / LDAM reference code.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
STAGE_CHANNELS = (16, 32, 64)


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut: subsample spatially by ``stride`` and zero-pad the channel dimension."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = out_channels - in_channels
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # (B, C_in, H/s, W/s)
        return F.pad(x, (0, 0, 0, 0, *self.pad))  # (B, C_out, H/s, W/s)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a ReLU between them and after the residual sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = nn.ReLU(inplace=True)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = OptionAShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs with option-A shortcuts (He et al., 2016).

    Args:
        depth: ``6n + 2`` (20, 32, 44, 56, 110, ...).
        num_classes: classifier outputs; 0 makes ``fc`` an identity (pooled features out).
        in_chans: input channels (1 for grayscale).
        global_pool: timm pooling type of the head.
        drop_rate: dropout before the classifier.
    """

    def __init__(self, depth: int = 32, num_classes: int = 10, in_chans: int = 3, global_pool: str = "avg",
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110), "
                             f"got {depth}.")
        blocks_per_stage = (depth - 2) // 6
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(in_chans, STAGE_CHANNELS[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_CHANNELS[0])
        self.act1 = nn.ReLU(inplace=True)
        in_channels = STAGE_CHANNELS[0]
        self.feature_info = [dict(num_chs=in_channels, reduction=1, module="act1")]
        for index, channels in enumerate(STAGE_CHANNELS):
            stride = 1 if index == 0 else 2
            blocks = [BasicBlock(in_channels, channels, stride)]
            blocks += [BasicBlock(channels, channels) for _ in range(blocks_per_stage - 1)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
            in_channels = channels
            self.feature_info.append(dict(num_chs=channels, reduction=2**index, module=f"layer{index + 1}"))
        self.num_features = in_channels

        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.init_weights()

    def init_weights(self) -> None:
        """Kaiming-normal convolutions and classifier, unit BatchNorm scales (He et al., 2015/2016)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        return dict(stem=r"^conv1|bn1", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> str | nn.Module:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for ``num_classes`` (0: none); ``global_pool=""`` also drops the pooling.

        timm's ``create_classifier`` flattens only when it pools, so ``reset_classifier(0, "")`` makes
        ``forward`` return the unpooled ``(B, C, H, W)`` features, as in timm's own models.
        """
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """``forward_features`` that also returns the features of the stem and of each stage (timm 1.x API).

        Args:
            x: input images ``(B, C, H, W)``.
            indices: feature points to return (0 = stem, 1..3 = stages, as in ``feature_info``): the last
                ``n`` if an int, all if ``None``, the listed ones (negative counts from the end) if a list.
            norm: accepted for timm's API; the network has no final norm, so it changes nothing.
            stop_early: skip the stages after the last requested feature point (the returned final
                features are then that point's output).
            output_fmt: only ``"NCHW"``.
            intermediates_only: return only the list of intermediate features.

        Returns:
            ``(final features, intermediates)``, or only the intermediates.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"CifarResNet features are NCHW only, got output_fmt={output_fmt!r}.")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        intermediates = []
        x = self.act1(self.bn1(self.conv1(x)))  # (B, 16, H, W)
        if 0 in take_indices:
            intermediates.append(x)
        stages = [self.layer1, self.layer2, self.layer3]
        if stop_early:
            stages = stages[:max_index]
        for feat_idx, stage in enumerate(stages, start=1):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)  # block by block, as forward_features
            else:
                x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: int | list[int] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> list[int]:
        """Remove the stages after the last requested feature point, and the head (timm 1.x API).

        Args:
            indices: feature points to keep, as in ``forward_intermediates``.
            prune_norm: accepted for timm's API; the network has no final norm.
            prune_head: drop pooling and classifier. They go anyway when stages are removed, since the
                classifier is sized for the last stage.

        Returns:
            The absolute indices of the kept feature points (negative indices would point elsewhere after
            pruning).
        """
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        for name in ("layer1", "layer2", "layer3")[max_index:]:
            # An empty Sequential rather than nn.Identity: forward_features' flattened checkpoint_seq
            # iterates over each stage.
            setattr(self, name, nn.Sequential())
        prune_end = max_index < len(self.feature_info) - 1
        if prune_end:
            self.num_features = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))  # (B, 16, H, W)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq([self.layer1, self.layer2, self.layer3], x, flatten=True)
        x = self.layer1(x)
        x = self.layer2(x)  # (B, 32, H/2, W/2)
        return self.layer3(x)  # (B, 64, H/4, W/4)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)  # (B, 64)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs) -> dict:
    return {
        "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (8, 8), "crop_pct": 1.0,
        "interpolation": "bilinear", "mean": CIFAR_MEAN, "std": CIFAR_STD, "first_conv": "conv1",
        "classifier": "fc", "license": "apache-2.0", **kwargs,
    }


DEPTHS = {"resnet20_cifar": 20, "resnet32_cifar": 32, "resnet44_cifar": 44, "resnet56_cifar": 56,
          "resnet110_cifar": 110}
# No released weights: `pretrained=True` needs a local file through `pretrained_cfg_overlay=dict(file=...)`.
default_cfgs = generate_default_cfgs({name: _cfg() for name in DEPTHS})


def _create(variant: str, pretrained: bool = False, **kwargs) -> CifarResNet:
    return build_model_with_cfg(CifarResNet, variant, pretrained, depth=DEPTHS[variant],
                                feature_cfg=dict(out_indices=(0, 1, 2, 3)), **kwargs)


def resnet20_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-20 for CIFAR (0.27 M parameters)."""
    return _create("resnet20_cifar", pretrained, **kwargs)


def resnet32_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-32 for CIFAR (0.46 M parameters), the backbone of the BalPoE CIFAR-LT experiments."""
    return _create("resnet32_cifar", pretrained, **kwargs)


def resnet44_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-44 for CIFAR (0.66 M parameters)."""
    return _create("resnet44_cifar", pretrained, **kwargs)


def resnet56_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-56 for CIFAR (0.85 M parameters)."""
    return _create("resnet56_cifar", pretrained, **kwargs)


def resnet110_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-110 for CIFAR (1.7 M parameters)."""
    return _create("resnet110_cifar", pretrained, **kwargs)


# A saved model's remote-code copy of this module may be imported next to
# `balpoe_hf.models.balpoe.cifar_resnet`: register each name once so timm does not warn about overwriting an
# identical entry.
for _entrypoint in (resnet20_cifar, resnet32_cifar, resnet44_cifar, resnet56_cifar, resnet110_cifar):
    if not is_model(_entrypoint.__name__):
        register_model(_entrypoint)
