"""scripts/benchmark_reference.py: its refusal of a folder that is not the official code, and its package
step (the official side needs a clone of emasa/BalPoE-CalibratedLT, which the tests do not have)."""

import pytest
import torch
from helpers import load_script

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_folder_without_the_official_code_is_refused_with_the_clone_command(tmp_path, monkeypatch, capsys):
    script = load_script("benchmark_reference")
    labels = torch.zeros(2, dtype=torch.long)
    with pytest.raises(FileNotFoundError, match=r"not a clone of emasa/BalPoE-CalibratedLT.*git clone"):
        script.reference_step(tmp_path, [5, 1], torch.zeros(2, 3, 32, 32), labels)
    monkeypatch.setattr("sys.argv", ["benchmark_reference.py", "--reference-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as stopped:
        script.main()
    assert stopped.value.code == 2 and "not a clone of emasa/BalPoE-CalibratedLT" in capsys.readouterr().err


@pytest.mark.parametrize("options", [(), ("channels_last",), ("channels_last", "bf16")])
def test_the_package_step_trains_the_recipes_network(options):
    torch.manual_seed(0)
    step, model = load_script("benchmark_reference").package_step(
        [50, 20, 5], torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 1, 2]), options)
    # The 3-expert ResNet-32 with 3 classes: a shared stem and first stage of 23,824 parameters, three
    # experts of 88,192 (stage 2) + 351,488 (stage 3) + 64 x 3 (cosine classifier) each.
    assert sum(p.numel() for p in model.parameters()) == 23_824 + 3 * (88_192 + 351_488 + 192)
    before = [p.detach().clone() for p in model.parameters()]
    step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # zeroed after the step
    assert sum(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)) == len(before)


def test_official_names_map_onto_the_packages_model():
    script = load_script("benchmark_reference")
    _, model = script.package_step([50, 20, 5], torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 1, 2]))
    ours = model.state_dict()
    # Names as the official ResNet32Model (model/ldam_drw_resnets/expert_resnet_cifar.py) has them.
    official = {"backbone.conv1.weight": torch.zeros(16, 3, 3, 3),
                "backbone.layer1.4.bn2.running_var": torch.zeros(16),
                "backbone.layer2s.1.0.conv1.weight": torch.zeros(32, 16, 3, 3),
                "backbone.layer3s.2.4.bn1.num_batches_tracked": torch.zeros((), dtype=torch.long),
                "backbone.linears.0.weight": torch.arange(64 * 3.0).reshape(64, 3)}  # (features, classes)
    renamed = script.package_state(official)
    assert list(renamed) == ["balpoe.trunk.conv1.weight", "balpoe.trunk.layer1.4.bn2.running_var",
                             "balpoe.experts.1.backbone.layer2.0.conv1.weight",
                             "balpoe.experts.2.backbone.layer3.4.bn1.num_batches_tracked",
                             "balpoe.experts.0.classifier.weight"]
    assert all(renamed[name].shape == ours[name].shape for name in renamed)
    assert torch.equal(renamed["balpoe.experts.0.classifier.weight"][2], torch.arange(2, 64 * 3, 3.0))
    with pytest.raises(KeyError, match=r"backbone\.fc\.weight has no counterpart"):
        script.package_state({"backbone.fc.weight": torch.zeros(3, 64)})


def test_configurations_are_package_and_known_options():
    script = load_script("benchmark_reference")
    assert script.package_options("package") == set()
    assert script.package_options("package+channels_last+bf16") == {"channels_last", "bf16"}
    for bad in ("reference", "package+fp8", "pkg+compile"):
        with pytest.raises(ValueError, match="is not a configuration: write 'package' and any of"):
            script.package_options(bad)
