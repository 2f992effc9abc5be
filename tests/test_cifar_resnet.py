import math

import pytest
import timm
import torch

import balpoe_hf  # noqa: F401  (registers the CIFAR ResNets with timm)
from balpoe_hf.cifar_resnet import CifarResNet, OptionAShortcut

# He et al. (2016), Table 6: parameters of the CIFAR-10 ResNets.
PUBLISHED_MILLIONS = {"resnet20_cifar": 0.27, "resnet32_cifar": 0.46, "resnet44_cifar": 0.66,
                      "resnet56_cifar": 0.85, "resnet110_cifar": 1.7}


def hand_count(depth: int, num_classes: int) -> int:
    """Parameters of a 6n+2 CIFAR ResNet with option-A shortcuts, counted layer by layer."""
    n = (depth - 2) // 6

    def conv_bn(c_in, c_out):
        return c_in * c_out * 9 + 2 * c_out

    total = conv_bn(3, 16)
    c_in = 16
    for c in (16, 32, 64):
        for _ in range(n):
            total += conv_bn(c_in, c) + conv_bn(c, c)
            c_in = c
    return total + 64 * num_classes + num_classes


def test_registered_names_and_published_sizes():
    assert set(timm.list_models("*_cifar")) >= set(PUBLISHED_MILLIONS)
    for name, millions in PUBLISHED_MILLIONS.items():
        model = timm.create_model(name, num_classes=10)
        count = sum(p.numel() for p in model.parameters())
        assert count == hand_count(int(name[6:-6]), 10)
        assert round(count / 1e6, 1 if millions >= 1 else 2) == millions
    # The headline number of the issue: resnet32_cifar has about 0.46 M parameters.
    assert sum(p.numel() for p in timm.create_model("resnet32_cifar", num_classes=10).parameters()) == 464_154


def test_shapes_grayscale_and_head():
    model = timm.create_model("resnet32_cifar", num_classes=100, in_chans=1).eval()
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    x = torch.randn(2, 1, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (2, 64, 8, 8)
    assert model.forward_head(features, pre_logits=True).shape == (2, 64)
    assert model(x).shape == (2, 100)
    model.reset_classifier(0)
    assert model(x).shape == (2, 64)


def test_option_a_shortcut_is_parameter_free_subsample_and_zero_pad():
    shortcut = OptionAShortcut(16, 32, stride=2)
    assert not list(shortcut.parameters())
    x = torch.randn(2, 16, 8, 8)
    out = shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    # 8 zero channels on each side of the 16 input channels, sampled at even positions.
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()
    blocks = [m for m in timm.create_model("resnet20_cifar").modules() if isinstance(m, OptionAShortcut)]
    assert len(blocks) == 2  # the first block of stages 2 and 3


def test_kaiming_normal_init():
    torch.manual_seed(0)
    model = timm.create_model("resnet56_cifar")
    weights = torch.cat([b.conv2.weight.flatten() for b in model.layer3])  # fan_in = 64 * 9
    assert weights.mean().item() == pytest.approx(0.0, abs=2e-3)
    assert weights.std().item() == pytest.approx(math.sqrt(2 / 576), rel=0.02)
    assert torch.equal(model.bn1.weight, torch.ones(16)) and not model.bn1.bias.any()


def test_bad_depth():
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(depth=30)
