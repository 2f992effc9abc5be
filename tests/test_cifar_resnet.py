import copy
import math

import pytest
import timm
import torch
from timm.models._features import FeatureGetterNet

import balpoe_hf  # noqa: F401  (registers the CIFAR ResNets with timm)
from balpoe_hf.models.balpoe.cifar_resnet import CifarResNet, OptionAShortcut

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


# timm's feature API (forward_intermediates / prune_intermediate_layers), checked as timm's own
# tests/test_models.py does: against the hook-free FeatureListNet (`features_only=True`), which runs the
# model's modules one by one and shares no code with forward_intermediates.
# Feature points of `feature_info`: stem, layer1, layer2, layer3 at 32x32 input.
FEATURE_SHAPES = [(2, 16, 32, 32), (2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8)]


@pytest.fixture(scope="module")
def model_and_reference():
    """An eval-mode resnet20_cifar, an input, and the FeatureListNet outputs of the same weights."""
    torch.manual_seed(0)
    model = timm.create_model("resnet20_cifar").eval()
    features = timm.create_model("resnet20_cifar", features_only=True).eval()
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    features.load_state_dict(weights)  # strict: the same parameter names, less the classifier
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = features(x)
    assert [tuple(f.shape) for f in reference] == FEATURE_SHAPES
    return model, x, reference


def assert_all_close(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e)


@torch.no_grad()
def test_forward_intermediates_match_features_only_and_forward(model_and_reference):
    model, x, reference = model_and_reference
    final, intermediates = model.forward_intermediates(x)
    assert_all_close(intermediates, reference)
    # Channels and strides are those that feature_info declares (timm's test_model_forward_intermediates).
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    assert [f.shape[1] for f in intermediates] == info.channels() == [16, 16, 32, 64]
    assert [32 // f.shape[-1] for f in intermediates] == info.reduction() == [1, 1, 2, 4]
    torch.testing.assert_close(final, model.forward_features(x))
    torch.testing.assert_close(model.forward_head(final), model(x))
    assert_all_close(model.forward_intermediates(x, intermediates_only=True), reference)
    # `norm` is accepted for timm's API; there is no final norm to apply.
    assert_all_close(model.forward_intermediates(x, norm=True, intermediates_only=True), reference)


@torch.no_grad()
@pytest.mark.parametrize(("indices", "expected"), [
    (None, [0, 1, 2, 3]), (1, [3]), (3, [1, 2, 3]), (4, [0, 1, 2, 3]),  # an int: the last n
    ([2], [2]), ([-1], [3]), ([0, -2], [0, 2]), ((3, 1), [1, 3]),  # listed, in forward order
])
def test_forward_intermediates_indices(model_and_reference, indices, expected):
    model, x, reference = model_and_reference
    intermediates = model.forward_intermediates(x, indices=indices, intermediates_only=True)
    assert_all_close(intermediates, [reference[i] for i in expected])


@pytest.mark.parametrize("indices", [0, 5, [4], [-5]])
def test_forward_intermediates_rejects_out_of_range_indices(model_and_reference, indices):
    model, x, _ = model_and_reference
    with pytest.raises(AssertionError, match="out of range"):  # timm's feature_take_indices check
        model.forward_intermediates(x, indices=indices)


def test_forward_intermediates_rejects_other_formats(model_and_reference):
    model, x, _ = model_and_reference
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")


@torch.no_grad()
def test_forward_intermediates_stop_early(model_and_reference):
    model, x, reference = model_and_reference
    calls = []
    hooks = [getattr(model, name).register_forward_hook(lambda *_, name=name: calls.append(name))
             for name in ("layer1", "layer2", "layer3")]
    try:
        final, intermediates = model.forward_intermediates(x, indices=[1], stop_early=True)
        assert calls == ["layer1"]  # layer2 and layer3 never run
        assert_all_close(intermediates, [reference[1]])
        torch.testing.assert_close(final, reference[1])
        calls.clear()
        final, _ = model.forward_intermediates(x, indices=[0], stop_early=True)
        assert calls == []
        torch.testing.assert_close(final, reference[0])
        calls.clear()
        final, _ = model.forward_intermediates(x, indices=[1], stop_early=False)
        assert calls == ["layer1", "layer2", "layer3"]
        torch.testing.assert_close(final, reference[3])
    finally:
        for hook in hooks:
            hook.remove()


def test_forward_intermediates_grad_checkpointing(model_and_reference):
    model, x, reference = model_and_reference
    model = copy.deepcopy(model)
    model.set_grad_checkpointing()
    final, intermediates = model.forward_intermediates(x.requires_grad_())
    assert_all_close([f.detach() for f in intermediates], reference)
    final.sum().backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if not name.startswith("fc."))


@torch.no_grad()
def test_prune_intermediate_layers(model_and_reference):
    model, x, reference = model_and_reference
    full_count = sum(p.numel() for name, p in model.named_parameters()
                     if not name.startswith(("fc.", "layer3.")))

    pruned = copy.deepcopy(model)
    assert pruned.prune_intermediate_layers([0, -2]) == [0, 2]  # absolute indices, valid after pruning
    assert sum(p.numel() for p in pruned.parameters()) == full_count  # layer3 and the classifier are gone
    assert pruned.num_features == pruned.head_hidden_size == 32
    assert_all_close(pruned.forward_intermediates(x, indices=[0, 2], intermediates_only=True),
                     [reference[0], reference[2]])
    # Without pooling and classifier, forward returns the last kept feature map unpooled.
    torch.testing.assert_close(pruned.forward_features(x), reference[2])
    torch.testing.assert_close(pruned(x), reference[2])

    # Defaults (last feature point, head pruned): all stages stay, forward gives layer3's (B, 64, 8, 8).
    pruned = copy.deepcopy(model)
    assert pruned.prune_intermediate_layers() == [3]
    torch.testing.assert_close(pruned(x), reference[3])

    # prune_head=False with every stage kept leaves the classifier, so forward still gives the logits.
    pruned = copy.deepcopy(model)
    assert pruned.prune_intermediate_layers([1, 3], prune_head=False) == [1, 3]
    torch.testing.assert_close(pruned(x), model(x))

    # Stem only: every stage is removed, even when asked to keep the head (it was sized for layer3).
    pruned = copy.deepcopy(model)
    assert pruned.prune_intermediate_layers([0], prune_head=False) == [0]
    assert isinstance(pruned.fc, torch.nn.Identity) and pruned.num_features == 16
    torch.testing.assert_close(pruned(x), reference[0])


@torch.no_grad()
@pytest.mark.parametrize(("out_indices", "expected"), [((0, 1, 2, 3), [0, 1, 2, 3]), ((0, -2), [0, 2])])
def test_features_only_getter(model_and_reference, out_indices, expected):
    model, x, reference = model_and_reference
    getter = timm.create_model("resnet20_cifar", features_only=True, feature_cls="getter",
                               out_indices=out_indices).eval()
    assert isinstance(getter, FeatureGetterNet)  # it calls forward_intermediates
    wanted = getter.state_dict()
    # Strict: every parameter of the getter is found in the full model (the pruned parts have none).
    getter.load_state_dict({f"model.{k}": v for k, v in model.state_dict().items() if f"model.{k}" in wanted})
    assert getter.feature_info.channels() == [FEATURE_SHAPES[i][1] for i in expected]
    assert_all_close(getter(x), [reference[i] for i in expected])


def test_reset_classifier_without_pooling_keeps_feature_maps():
    # timm's test_model_default_cfgs: `reset_classifier(0, "")` returns the unpooled (B, C, *pool_size).
    model = timm.create_model("resnet20_cifar").eval()
    x = torch.randn(2, 3, 32, 32)
    model.reset_classifier(0, "")
    assert model(x).shape == (2, 64, *model.pretrained_cfg["pool_size"])
    # Concatenated average and max pooling doubles the pooled width that BalPoE's experts see.
    model = timm.create_model("resnet20_cifar", global_pool="catavgmax", num_classes=0).eval()
    assert model(x).shape == (2, model.head_hidden_size) == (2, 128)
