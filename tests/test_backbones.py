import pytest
import timm
import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import save_file

from balpoe_hf import BalPoEConfig, BalPoEForImageClassification
from balpoe_hf.models.balpoe.backbones import SUPPORTED_FAMILIES, get_adapter

# One small member of every supported family; architecture kwargs shrink them to test size.
FAMILIES = {
    "resnet32_cifar": {},
    "resnet18": {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8},
    "resnext50_32x4d": {"layers": [1, 1, 1, 1], "channels": [16, 32, 32, 64], "stem_width": 8,
                        "base_width": 16, "cardinality": 4},
    "convnext_atto": {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]},
    "regnetx_002": {"depth": 6, "w0": 8, "wa": 8.0, "wm": 1.5, "group_size": 8},
    "vit_tiny_patch16_224": {"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 48, "num_heads": 3},
    "deit_tiny_patch16_224": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3},
}
# The split the issue asks for: CIFAR ResNets share stage 1, ResNets layer1-2, ConvNeXt/RegNet the first
# two of four stages; ViTs give each expert the last quarter of the blocks (at least one).
DEFAULT_SHARED = {"resnet32_cifar": 1, "resnet18": 2, "resnext50_32x4d": 2, "convnext_atto": 2,
                  "regnetx_002": 2, "vit_tiny_patch16_224": 3, "deit_tiny_patch16_224": 1}
NUM_CLASSES = 4


def load_plain_weights(model: BalPoEForImageClassification, plain: torch.nn.Module) -> None:
    """Copy a plain timm model's weights into a one-expert BalPoE model with a linear classifier."""
    target = model.state_dict()
    classifier = plain.pretrained_cfg["classifier"]
    mapped = {}
    for key, value in plain.state_dict().items():
        if key.startswith(classifier + "."):
            hits = ["balpoe.experts.0.classifier." + key[len(classifier) + 1:]]
        else:
            hits = [k for k in (f"balpoe.trunk.{key}", f"balpoe.experts.0.backbone.{key}") if k in target]
        assert len(hits) == 1, f"{key} must have exactly one owner, found {hits}"
        mapped[hits[0]] = value
    # Everything comes from the plain model (BalPoE's prior buffers are derived from the config, not saved).
    assert set(target) == set(mapped)
    model.load_state_dict({**target, **mapped})


@pytest.mark.parametrize("name", FAMILIES)
def test_family_forward_backward_split_and_single_expert_equivalence(name):
    torch.manual_seed(0)
    kwargs = FAMILIES[name]
    x = torch.randn(2, 3, 32, 32)

    config = BalPoEConfig(backbone=name, backbone_kwargs=kwargs, num_experts=2, class_counts=[8, 4, 2, 1])
    model = BalPoEForImageClassification(config)
    assert config.shared_stages == DEFAULT_SHARED[name]
    out = model(x, labels=torch.tensor([0, 3]))
    assert out.logits.shape == (2, NUM_CLASSES) and out.expert_logits.shape == (2, 2, NUM_CLASSES)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters()), "every parameter takes part in the forward"
    # timm's own gradient checkpointing works on the trunk and expert copies.
    model.activation_checkpointing_enable()
    assert torch.allclose(model(x, labels=torch.tensor([0, 3])).loss, out.loss, atol=1e-5)

    # Each expert sees the trunk output untouched by the other experts (no in-place ops on shared input).
    model.eval()
    with torch.no_grad():
        expert_logits = model(x).expert_logits
        adapter = model.balpoe.backbone_adapter
        trunk_out = adapter.forward_trunk(model.balpoe.trunk, x)
        for e, expert in enumerate(model.balpoe.experts):
            assert torch.allclose(expert(trunk_out.clone())[1], expert_logits[:, e], atol=1e-6)

    # num_experts=1, shared_stages=0 computes exactly what the plain timm model computes.
    plain = timm.create_model(name, num_classes=NUM_CLASSES, **kwargs).eval()
    single = BalPoEForImageClassification(BalPoEConfig(
        backbone=name, backbone_kwargs=kwargs, num_experts=1, shared_stages=0, classifier="linear",
        num_labels=NUM_CLASSES)).eval()
    load_plain_weights(single, plain)
    with torch.no_grad():
        assert torch.equal(single(x).logits, plain(x))


def stage_params(model: torch.nn.Module, prefixes) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in prefixes)


@pytest.mark.parametrize("shared", [0, 1, 2, 3])
def test_shared_stages_moves_the_split(shared):
    plain = timm.create_model("resnet32_cifar", num_classes=0)
    stages = ["layer1", "layer2", "layer3"]
    trunk_expected = stage_params(plain, ["conv1", "bn1", *stages[:shared]])
    expert_expected = stage_params(plain, stages[shared:])
    model = BalPoEForImageClassification(BalPoEConfig(num_experts=3, shared_stages=shared, num_labels=10))
    trunk = sum(p.numel() for p in model.balpoe.trunk.parameters())
    assert trunk == trunk_expected
    for expert in model.balpoe.experts:
        assert sum(p.numel() for p in expert.backbone.parameters()) == expert_expected
    if shared == 2:  # hand count: stem 464 + stage 1 23,360 + stage 2 88,192
        assert trunk == 112_016


def test_unsupported_and_unknown_backbones():
    with pytest.raises(ValueError, match="not supported by BalPoE") as error:
        BalPoEForImageClassification(BalPoEConfig(backbone="mobilenetv3_small_050", num_labels=3))
    for family in SUPPORTED_FAMILIES:
        assert family in str(error.value)
    with pytest.raises(ValueError, match="not a timm model name"):
        BalPoEConfig(backbone="resnet32_cifarr")


def test_shared_stages_out_of_range():
    with pytest.raises(ValueError, match=r"shared_stages=4 is out of range.*3 stages"):
        BalPoEForImageClassification(BalPoEConfig(shared_stages=4, num_labels=3))
    with pytest.raises(ValueError, match="shared_stages must be None"):
        BalPoEConfig(shared_stages=-1)


def test_reserved_backbone_kwargs():
    for key in ("num_classes", "pretrained", "pretrained_cfg_overlay"):
        with pytest.raises(ValueError, match="backbone_kwargs must not set"):
            BalPoEConfig(backbone_kwargs={key: 3})


def test_unknown_top_level_module_is_refused():
    model = timm.create_model("resnet32_cifar", num_classes=0)
    model.extra = torch.nn.Linear(2, 2)  # a module the adapter cannot place in trunk or experts
    with pytest.raises(NotImplementedError, match="extra"):
        get_adapter(model).make_trunk(model, 1)


def test_pretrained_weights_from_local_file(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("resnet32_cifar", num_classes=10)
    path = tmp_path / "resnet32_cifar.safetensors"
    save_file(source.state_dict(), path)
    config = BalPoEConfig(num_experts=2, num_labels=3, backbone_pretrained=True,
                          backbone_weights_file=str(path))
    model = BalPoEForImageClassification(config)
    weights = source.state_dict()
    parts = [model.balpoe.trunk, *(expert.backbone for expert in model.balpoe.experts)]
    checked = 0
    for part in parts:
        for key, value in part.state_dict().items():
            assert torch.equal(value, weights[key]), key
            checked += 1
    expert_keys = sum(1 for k in weights if k.startswith(("layer2", "layer3")))
    trunk_keys = sum(1 for k in weights if not k.startswith(("layer2", "layer3", "fc.")))
    assert checked == trunk_keys + 2 * expert_keys


def test_pretrained_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="backbone_pretrained is False"):
        BalPoEConfig(backbone_weights_file=str(tmp_path / "w.safetensors"))
    missing = BalPoEConfig(backbone_pretrained=True,
                           backbone_weights_file=str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BalPoEForImageClassification(missing)
    # No released CIFAR ResNet weights: pretrained needs a file.
    with pytest.raises(OSError, match="backbone_weights_file"):
        BalPoEForImageClassification(BalPoEConfig(backbone_pretrained=True, num_labels=3))
    # Offline with an empty Hub cache: a clear error instead of a download attempt.
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    config = BalPoEConfig(backbone="convnext_atto", backbone_pretrained=True, num_labels=3)
    with pytest.raises(OSError, match=r"offline .*backbone_weights_file"):
        BalPoEForImageClassification(config)
