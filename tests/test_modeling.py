import json
import logging
import math
import os

import datasets
import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification, pipeline
from transformers.utils import logging as transformers_logging

from balpoe_hf import (
    BalPoEConfig,
    BalPoEForImageClassification,
    BalPoEImageClassificationPipeline,
    BalPoELoss,
    BalPoEModel,
    build_image_processor,
)
from balpoe_hf.data.splits import long_tailed_counts, make_long_tailed, make_shifted_test
from balpoe_hf.models.balpoe.label_shift import estimate_prior
from balpoe_hf.models.balpoe.modeling_balpoe import BalPoEImageClassifierOutput, CosineClassifier

COUNTS = [50, 20, 8, 2]
LABELS = {0: "tshirt", 1: "trouser", 2: "pullover", 3: "dress"}


def make_model(**overrides) -> BalPoEForImageClassification:
    torch.manual_seed(0)
    kwargs = dict(num_experts=3, class_counts=COUNTS, id2label=LABELS)
    return BalPoEForImageClassification(BalPoEConfig(**{**kwargs, **overrides}))


def log_train_prior() -> torch.Tensor:
    return torch.tensor([math.log(n / sum(COUNTS)) for n in COUNTS])


# ----------------------------------------------------------------------------------------- configuration


def test_config_defaults():
    config = BalPoEConfig(class_counts=COUNTS)
    assert config.model_type == "balpoe" and config.backbone == "resnet32_cifar"
    assert config.num_labels == 4 and config.label2id == {f"LABEL_{i}": i for i in range(4)}
    assert config.lambdas == [1.0, 0.0, -1.0]
    assert config.classifier == "cosine" and config.classifier_scale == 30.0
    # From resnet32_cifar's timm config: CIFAR size and statistics.
    assert config.image_size == 32 and config.image_mean == pytest.approx([0.4914, 0.4822, 0.4465])
    assert BalPoEConfig(num_experts=1).lambdas == [0.0]
    assert BalPoEConfig(num_experts=2).lambdas == [1.0, -1.0]
    assert BalPoEConfig(num_experts=5).lambdas == [1.0, 0.5, 0.0, -0.5, -1.0]
    assert BalPoEConfig(id2label=LABELS).label2id == {v: k for k, v in LABELS.items()}
    vit = BalPoEConfig(backbone="vit_tiny_patch16_224", backbone_kwargs={"img_size": 48}, num_labels=3)
    assert vit.image_size == 48 and vit.image_mean == [0.5, 0.5, 0.5]


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(num_experts=2, lambdas=[1.0, 0.0, -1.0]), "lambdas has 3 entries but there are 2 experts"),
    (dict(lambdas=[[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]], class_counts=COUNTS), "per-class lambdas"),
    (dict(num_experts=0), "num_experts must be a positive integer"),
    (dict(class_counts=[5, 0, 3, 1]), r"classes \[1\] have zero training samples"),
    (dict(class_counts=[5, 3], id2label=LABELS), "class_counts has 2 entries but the model has 4 classes"),
    (dict(class_counts=[5, -1, 3, 1]), "negative"),
    (dict(target_prior=[0.5, 0.5], class_counts=COUNTS), "target_prior has 2 entries"),
    (dict(target_prior=[0.5, 0.3, 0.1, 0.2], class_counts=COUNTS), "must sum to 1"),
    (dict(classifier="mlp"), "classifier must be one of"),
    (dict(classifier_scale=0.0), "classifier_scale must be positive"),
    (dict(image_mean=[0.5]), "image_mean has 1 entries"),
    (dict(loss="focal"), "loss must be one of"),
    (dict(loss="lade"), "loss='lade' trains a single classifier, but num_experts=3"),
    (dict(loss="lade", num_experts=1, lambdas=[1.0]), "set lambdas=\\[0.0\\]"),
    (dict(remove_mean_lambda="no"), "remove_mean_lambda must be True or False"),
    (dict(lade_weight=-0.1), "lade_weight must be a finite number >= 0"),
    (dict(lade_remine_lambda=float("nan")), "lade_remine_lambda must be a finite number >= 0"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BalPoEConfig(**kwargs)


def _calibration(**changes) -> dict:
    from balpoe_hf.models.balpoe.holdout_statistics import holdout_calibration

    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 4
    logits = 3 * F.one_hot(labels, 4).double() + torch.randn(40, 4, generator=generator, dtype=torch.float64)
    return {**holdout_calibration(logits, labels), **changes}


# What a hand-edited config.json held that loaded without a word (the sweep's cases).
@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(class_counts=[True, 20, 8, 2]), "class_counts must hold numbers, not true/false"),
    (dict(lambdas=[True, False, -1.0]), "lambdas must hold numbers, not true/false"),
    (dict(target_prior=[True, False, False, False]), "target_prior must hold numbers, not true/false"),
    (dict(class_counts=[50, 96.5, 8, 2]), r"class_counts are numbers of training images, so whole numbers; "
                                          r"got \[96\.5\]"),
    (dict(class_counts=[50, 1e-320, 8, 2]), r"so whole numbers; got \[1e-320\]"),
    (dict(id2label={0: "a", 1: "b", 2: "c", 4: "d"}), r"id2label must name the classes 0 to 3 without a gap "
                                                      r"\(class i is output i\), got the ids \[0, 1, 2, 4\]"),
    (dict(calibration=_calibration(temperature=1e300)), r"calibration\['temperature'\] is 1e\+300, outside "
                                                        r"\[1e-08, 1e\+08\]"),
    (dict(calibration=_calibration(ts_temperature=1e-300)), r"calibration\['ts_temperature'\] is 1e-300"),
    (dict(calibration=_calibration(bias=[1e300, 0.0, 0.0, 0.0])), r"calibration\['bias'\] holds values "
                                                                   r"beyond"),
])
def test_config_refuses_what_a_hand_edit_can_break(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BalPoEConfig(**{"class_counts": COUNTS, **kwargs})


def test_id2label_with_a_gap_is_refused_by_from_pretrained_and_the_pipeline(tmp_path):
    make_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["id2label"] = {"0": "tshirt", "1": "trouser", "2": "pullover", "4": "dress"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="id2label must name the classes 0 to 3 without a gap"):
        BalPoEForImageClassification.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="id2label must name the classes 0 to 3 without a gap"):
        pipeline("image-classification", model=str(tmp_path))  # was KeyError: 3 at the first prediction


def test_config_edits_are_rechecked_on_save(tmp_path):
    config = BalPoEConfig(class_counts=COUNTS)
    config.lambdas = [1.0, 0.0]
    with pytest.raises(Exception, match="lambdas has 2 entries"):
        config.save_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------- formulas


def test_ensemble_is_mean_of_expert_logits_for_zero_mean_lambdas():
    model = make_model().eval()
    out = model(torch.randn(3, 3, 32, 32))
    assert isinstance(out, BalPoEImageClassifierOutput)
    assert out.expert_logits.shape == (3, 3, 4) and out.logits.shape == (3, 4)
    assert torch.allclose(out.logits, out.expert_logits.mean(1), atol=1e-6)


def test_nonzero_mean_lambda_applies_full_adjustment():
    model = make_model(num_experts=2, lambdas=[1.0, 0.5]).eval()
    out = model(torch.randn(3, 3, 32, 32))
    expected = out.expert_logits.mean(1) - 0.75 * log_train_prior()
    assert torch.allclose(out.logits, expected, atol=1e-5)


def test_per_class_lambdas():
    lambdas = [[1.0, 1.0, 0.0, 0.0], [0.0, -1.0, 0.0, 2.0]]
    model = make_model(num_experts=2, lambdas=lambdas).eval()
    out = model(torch.randn(2, 3, 32, 32))
    mean_lambda = torch.tensor([0.5, 0.0, 0.0, 1.0])
    assert torch.allclose(out.logits, out.expert_logits.mean(1) - mean_lambda * log_train_prior(), atol=1e-5)


def test_keeping_mean_lambda_predicts_with_the_plain_expert_mean(tmp_path):
    lambdas = [[1.0, 1.0, 0.0, -1.0], [0.5, -1.0, 0.0, 0.0]]  # per-class mean lambda 0.75, 0, 0, -0.5
    removed, kept = (make_model(num_experts=2, lambdas=lambdas, remove_mean_lambda=flag).eval()
                     for flag in (True, False))
    kept.load_state_dict(removed.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out_removed, out_kept = removed(x), kept(x)
    mean_lambda = torch.tensor([0.75, 0.0, 0.0, -0.5])
    assert torch.equal(out_kept.expert_logits, out_removed.expert_logits)
    assert torch.allclose(out_kept.logits, out_kept.expert_logits.mean(1), atol=1e-6)
    shift = (mean_lambda * log_train_prior()).expand(3, 4)
    assert torch.allclose(out_kept.logits - out_removed.logits, shift, atol=1e-5)
    # With a test prior the official code adds log pi_t to the expert mean (log C only shifts every class).
    target = [0.1, 0.2, 0.3, 0.4]
    with torch.no_grad():
        shifted = kept(x, target_prior=target).logits
    expected = out_kept.expert_logits.mean(1) + torch.log(4 * torch.tensor(target))
    assert torch.allclose(shifted, expected, atol=1e-5)

    kept.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["remove_mean_lambda"] is False
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.remove_mean_lambda is False
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, out_kept.logits)


def test_one_plain_expert_without_mean_lambda_predicts_raw_logits():
    model = make_model(num_experts=1, lambdas=[1.0], remove_mean_lambda=False).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    # Lambda 1 is plain cross-entropy; its raw logits are the paper's CE baseline.
    assert torch.equal(out.logits, out.expert_logits[:, 0])


def test_target_prior_shifts_logits_by_log_prior():
    model = make_model().eval()
    x = torch.randn(5, 3, 32, 32)
    uniform = model(x).logits
    target = [0.1, 0.2, 0.3, 0.4]
    shifted = model(x, target_prior=target).logits
    # log(C * pi_t) per class, the same for every image.
    expected_shift = torch.log(4 * torch.tensor(target)).expand(5, 4)
    assert torch.allclose(shifted - uniform, expected_shift, atol=1e-5)
    train = model(x, target_prior="train").logits
    assert torch.allclose(train - uniform, (math.log(4) + log_train_prior()).expand(5, 4), atol=1e-5)
    # The prediction follows the argmax of the shifted scores.
    assert torch.equal(shifted.argmax(1), (uniform + expected_shift).argmax(1))


def test_set_target_prior_persists(tmp_path):
    model = make_model().eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x, target_prior="train").logits
    model.set_target_prior("train")
    assert model.config.target_prior == pytest.approx([n / sum(COUNTS) for n in COUNTS])
    assert torch.allclose(model(x).logits, expected)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.target_prior == pytest.approx(model.config.target_prior)
    assert torch.allclose(loaded(x).logits, expected)
    model.set_target_prior("uniform")
    assert model.config.target_prior is None
    assert torch.allclose(model(x).logits, model(x).expert_logits.mean(1), atol=1e-6)


def test_a_target_prior_set_in_the_config_predicts_in_memory_as_after_a_reload(tmp_path):
    # save_pretrained writes the config and from_pretrained builds the prior from it: the same object must
    # not predict otherwise before the round trip (it kept the old prior until set_target_prior).
    model = make_model().eval()
    x = torch.randn(2, 3, 32, 32)
    target = [0.7, 0.1, 0.1, 0.1]
    expected = model(x).logits + torch.log(4 * torch.tensor(target))
    model.config.target_prior = target
    torch.testing.assert_close(model(x).logits, expected, atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(AutoModelForImageClassification.from_pretrained(tmp_path).eval()(x).logits,
                               expected, atol=1e-5, rtol=0)
    model.config.target_prior[0], model.config.target_prior[1] = 0.1, 0.7  # edited in place
    torch.testing.assert_close(model(x).logits, model(x, target_prior=[0.1, 0.7, 0.1, 0.1]).logits)
    model.config.target_prior = None
    torch.testing.assert_close(model(x).logits, model(x).expert_logits.mean(1), atol=1e-6, rtol=0)
    model.config.target_prior = [0.5, 0.5]
    with pytest.raises(ValueError, match="target_prior has 2 entries"):
        model(x)


@pytest.mark.parametrize(("prior", "message"), [
    ("balanced", "must be 'uniform', 'train'"),
    ([0.5, 0.5], "target_prior has 2 entries"),
    ([1.2, -0.2, 0.0, 0.0], "non-negative"),
    ([0.3, 0.3, 0.3, 0.3], "must sum to 1"),
])
def test_target_prior_errors(prior, message):
    model = make_model()
    with pytest.raises(ValueError, match=message):
        model.set_target_prior(prior)
    with pytest.raises(ValueError, match=message):
        model(torch.randn(1, 3, 32, 32), target_prior=prior)


def test_loss_is_mean_of_expert_logit_adjusted_losses():
    model = make_model().train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out = model(x, labels=y)
    # Expert e: CE(z_e + (1 - lambda_e) log pi, y) with lambdas 1, 0, -1.
    expected = torch.stack([
        F.cross_entropy(out.expert_logits[:, e] + (1 - lam) * log_train_prior(), y)
        for e, lam in enumerate([1.0, 0.0, -1.0])
    ])
    assert torch.allclose(out.expert_losses, expected, atol=1e-5)
    assert torch.allclose(out.loss, expected.mean(), atol=1e-5)
    model.eval()
    with torch.no_grad():
        hard = model(x, labels=y).loss
        soft = model(x, labels=F.one_hot(y, 4).float()).loss
    assert torch.allclose(hard, soft)
    _, logits, expert_logits, expert_losses = model(x, labels=y, return_dict=False)
    assert logits.shape == (4, 4) and expert_logits.shape == (4, 3, 4) and expert_losses.shape == (3,)


def test_lade_model_loss_trains_and_round_trips(tmp_path):
    model = make_model(num_experts=1, loss="lade", lade_weight=0.2, lade_remine_lambda=0.1).train()
    assert model.config.lambdas == [0.0]
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 0, 1, 1, 2, 0])  # class 3 absent from the batch
    out = model(x, labels=y)
    z = out.expert_logits[:, 0].detach()
    pi = torch.tensor(COUNTS) / sum(COUNTS)
    balanced_softmax = F.cross_entropy(z + pi.log(), y)
    # The regulariser per class c: mean z_c over class-c images (0 if none) minus
    # s_c = log mean_i exp(z_ic) - log pi_c - log C, minus 0.1 s_c^2; weighted by pi_c and negated.
    first = torch.stack([z[y == c, c].mean() if (y == c).any() else torch.tensor(0.0) for c in range(4)])
    second = z.exp().mean(0).log() - pi.log() - math.log(4)
    regulariser = -(pi * (first - second - 0.1 * second**2)).sum()
    assert out.expert_losses.shape == (1,)
    assert torch.allclose(out.loss, balanced_softmax + 0.2 * regulariser, atol=1e-5)
    # LADE predicts with z + log(C pi_t): the raw logits for a uniform target.
    assert torch.allclose(out.logits, out.expert_logits[:, 0], atol=1e-6)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out.loss.backward()
    before = model.balpoe.experts[0].classifier.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model.balpoe.experts[0].classifier.weight, before)
    model.eval().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["loss"] == "lade"
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.loss == "lade" and loaded.config.lade_weight == 0.2
    with torch.no_grad():
        expected, got = model(x, labels=y), loaded(x, labels=y)
    assert torch.equal(got.logits, expected.logits)
    assert torch.allclose(got.loss, expected.loss)


def test_cosine_and_linear_classifiers():
    classifier = CosineClassifier(8, 5, scale=30.0)
    features = torch.randn(6, 8)
    logits = classifier(features)
    assert logits.abs().max() <= 30.0 + 1e-4
    assert torch.allclose(classifier(features * 7.0), logits, atol=1e-5)
    # Aligned with a class weight: cosine 1, logit 30.
    assert classifier(classifier.weight[2:3].detach() * 3)[0, 2].item() == pytest.approx(30.0, rel=1e-5)
    linear = make_model(classifier="linear")
    assert isinstance(linear.balpoe.experts[0].classifier, torch.nn.Linear)
    assert linear.balpoe.experts[0].classifier.bias.shape == (4,)


def test_every_parameter_has_one_owner():
    model = make_model(num_experts=3)
    params = list(model.parameters())
    assert len(list(model.named_parameters(remove_duplicate=False))) == len(params)
    assert len({p.data_ptr() for p in params}) == len(params)
    # Hand count for resnet32_cifar: trunk = stem 464 + stage 1 23,360; each expert = stages 2-3
    # 439,680 + a 64 x 4 cosine classifier.
    assert sum(p.numel() for p in model.balpoe.trunk.parameters()) == 23_824
    assert sum(p.numel() for p in params) == 23_824 + 3 * (439_680 + 64 * 4)
    # Experts start from independent random inits.
    first, second = (expert.backbone.layer3[0].conv1.weight for expert in model.balpoe.experts[:2])
    assert not torch.equal(first, second)


def test_gradient_checkpointing_gives_same_loss():
    model = make_model().train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    torch.manual_seed(0)
    reference = model(x, labels=y).loss
    model.activation_checkpointing_enable()
    assert model.balpoe.trunk.grad_checkpointing and model.balpoe.experts[0].backbone.grad_checkpointing
    loss = model(x, labels=y).loss
    loss.backward()
    assert torch.allclose(loss, reference, atol=1e-5)


# ----------------------------------------------------------------------------------------- save / load


def trained_model() -> BalPoEForImageClassification:
    model = make_model()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(torch.randn(8, 3, 32, 32), labels=torch.randint(0, 4, (8,))).loss
    loss.backward()
    optimizer.step()  # BN running statistics and weights move away from their init
    model.set_target_prior([0.4, 0.3, 0.2, 0.1])
    return model.eval()


def test_save_and_load_restores_every_tensor(tmp_path):
    model = trained_model()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["class_counts"] == COUNTS and saved["lambdas"] == [1.0, 0.0, -1.0]
    assert saved["shared_stages"] == 1
    assert saved["auto_map"] == {
        "AutoConfig": "configuration_balpoe.BalPoEConfig",
        "AutoModel": "modeling_balpoe.BalPoEModel",
        "AutoModelForImageClassification": "modeling_balpoe.BalPoEForImageClassification",
    }
    code = {"configuration_balpoe.py", "modeling_balpoe.py", "backbones.py", "cifar_resnet.py", "losses.py",
            "priors.py", "label_shift.py", "prior_estimators.py", "holdout_statistics.py", "shrinkage.py",
            "calibration.py", "processing.py", "pipeline_balpoe.py"}
    assert {name for name in os.listdir(tmp_path) if name.endswith(".py")} == code

    assert isinstance(AutoConfig.from_pretrained(tmp_path), BalPoEConfig)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, BalPoEForImageClassification)
    expected = dict(model.named_parameters()) | dict(model.named_buffers())
    got = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert torch.equal(value, got[key]), key
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x).logits, loaded(x).logits)

    base = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(base, BalPoEModel)
    assert torch.equal(base(x).expert_logits, model(x).expert_logits)
    assert base(x).pooler_output.shape == (2, 3, 64)


def test_meta_device_build_reinitialises_every_buffer_and_parameter():
    config = BalPoEConfig(num_experts=2, class_counts=COUNTS, target_prior=[0.4, 0.3, 0.2, 0.1])
    reference = BalPoEForImageClassification(config)
    with torch.device("meta"):
        model = BalPoEForImageClassification(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.fill_(float("nan") if tensor.is_floating_point() else -1)
    model.init_weights()
    buffers, expected = dict(model.named_buffers()), dict(reference.named_buffers())
    assert buffers.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(buffers[key], value), key
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name


def test_prior_buffers_are_not_saved_and_follow_the_edited_config(tmp_path):
    model = make_model(num_experts=2, lambdas=[1.0, 0.5]).eval()
    model.save_pretrained(tmp_path)
    saved_keys = safetensors.torch.load_file(tmp_path / "model.safetensors").keys()
    assert not [key for key in saved_keys if key.startswith("loss_fn.") or "prior" in key or "lambda" in key]
    config = json.loads((tmp_path / "config.json").read_text())
    config["class_counts"] = [2, 8, 20, 50]  # reversed long tail
    (tmp_path / "config.json").write_text(json.dumps(config))

    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 2, 3])
    with torch.no_grad():
        out = loaded(x, labels=y)
    log_pi = torch.tensor([math.log(n / 80) for n in [2, 8, 20, 50]])
    # mean(lambda) = 0.75 times the edited log prior is removed at inference.
    assert torch.allclose(out.logits, out.expert_logits.mean(1) - 0.75 * log_pi, atol=1e-5)
    # The loss uses the edited prior too: tau = 1 - lambda = 0 and 0.5.
    expected_loss = (F.cross_entropy(out.expert_logits[:, 0], y)
                     + F.cross_entropy(out.expert_logits[:, 1] + 0.5 * log_pi, y)) / 2
    assert torch.allclose(out.loss, expected_loss, atol=1e-5)
    # The expert weights themselves are the saved ones.
    assert torch.equal(out.expert_logits, model(x).expert_logits)


def test_old_checkpoint_with_prior_buffers_loads_silently(tmp_path, caplog):
    model = make_model(num_experts=2, lambdas=[1.0, 0.5], target_prior=[0.4, 0.3, 0.2, 0.1]).eval()
    model.save_pretrained(tmp_path)
    weights = safetensors.torch.load_file(tmp_path / "model.safetensors")
    # Checkpoints written before the buffers became non-persistent carry them; make them stale.
    weights |= {"loss_fn.log_prior": torch.zeros(4), "loss_fn.taus": torch.zeros(2, 4),
                "target_prior": torch.full((4,), 0.25)}
    safetensors.torch.save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    transformers_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            loaded, info = AutoModelForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
            AutoModel.from_pretrained(tmp_path)
    finally:
        transformers_logging.disable_propagation()
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert info["unexpected_keys"] == set() and info["missing_keys"] == set()
    assert loaded.target_prior.tolist() == pytest.approx([0.4, 0.3, 0.2, 0.1])
    assert torch.allclose(loaded.log_train_prior, log_train_prior())
    assert loaded.mean_lambda.tolist() == pytest.approx([0.75] * 4)
    assert loaded.loss_fn.taus.tolist() == [[0.0] * 4, [0.5] * 4]
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.eval()(x).logits, model(x).logits)


def test_train_target_prior_needs_class_counts(tmp_path, caplog):
    model = BalPoEForImageClassification(BalPoEConfig(num_experts=1, num_labels=4)).eval()
    with pytest.raises(ValueError, match="target prior 'train' needs the training class counts"):
        model.set_target_prior("train")
    with pytest.raises(ValueError, match=r"config\.class_counts is None"):
        model(torch.randn(1, 3, 32, 32), target_prior="train")
    model.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        AutoModelForImageClassification.from_pretrained(tmp_path)
    assert "assumes a balanced training set" in caplog.text
    caplog.clear()
    make_model().save_pretrained(tmp_path / "counted")
    with caplog.at_level(logging.WARNING):
        AutoModelForImageClassification.from_pretrained(tmp_path / "counted")
    assert "balanced training set" not in caplog.text


# ----------------------------------------------------------------------------------------- pipeline


def test_image_processor_and_pipeline(tmp_path):
    model = trained_model()
    processor = build_image_processor(model.config)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    # A grayscale image becomes three equal channels, each (v / 255 - mean) / std.
    gray = Image.fromarray(np.full((28, 28), 128, dtype=np.uint8), mode="L")
    pixels = processor(gray, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    for channel, (mean, std) in enumerate(zip(model.config.image_mean, model.config.image_std, strict=True)):
        assert torch.allclose(pixels[0, channel], torch.tensor((128 / 255 - mean) / std), atol=1e-5)

    classify = pipeline("image-classification", model=str(tmp_path),
                        pipeline_class=BalPoEImageClassificationPipeline)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), mode="RGB")
    scores = classify(image)
    assert [s["label"] for s in scores] and {s["label"] for s in scores} == set(LABELS.values())
    assert sum(s["score"] for s in scores) == pytest.approx(1.0, abs=1e-4)
    with torch.no_grad():
        probs = model(processor(image, return_tensors="pt")["pixel_values"]).logits.softmax(-1)[0]
    assert scores[0]["label"] == LABELS[int(probs.argmax())]
    assert scores[0]["score"] == pytest.approx(float(probs.max()), abs=1e-4)
    assert classify(gray)[0]["label"] in LABELS.values()


def test_save_pretrained_alone_gives_a_pipeline_ready_folder(tmp_path):
    model = trained_model()
    model.save_pretrained(tmp_path)
    assert {"preprocessor_config.json", "processing.py"} <= set(os.listdir(tmp_path))
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert processor.size == {"height": 32, "width": 32}
    assert processor.image_mean == pytest.approx([0.4914, 0.4822, 0.4465])  # resnet32_cifar's statistics
    assert processor.image_std == pytest.approx(model.config.image_std)
    # Mid-grey: every channel of every pixel becomes (128 / 255 - mean) / std.
    gray = Image.fromarray(np.full((20, 20), 128, dtype=np.uint8), mode="L")
    pixels = processor(gray, return_tensors="pt")["pixel_values"]
    stats = zip(model.config.image_mean, model.config.image_std, strict=True)
    expected = [(128 / 255 - mean) / std for mean, std in stats]
    assert pixels.shape == (1, 3, 32, 32)
    assert torch.allclose(pixels[0, :, 0, 0], torch.tensor(expected), atol=1e-5)

    scores = pipeline("image-classification", model=str(tmp_path),
                      pipeline_class=BalPoEImageClassificationPipeline)(gray)
    with torch.no_grad():
        probs = model(pixels).logits.softmax(-1)[0]
    assert scores[0]["label"] == LABELS[int(probs.argmax())]
    assert scores[0]["score"] == pytest.approx(float(probs.max()), abs=1e-4)


def _images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), mode="RGB")
            for _ in range(count)]


def _scores(rows: list[dict]) -> list[float]:
    """A pipeline's answer for one image as probabilities in class order."""
    by_label = {row["label"]: row["score"] for row in rows}
    return [by_label[LABELS[i]] for i in range(len(LABELS))]


def test_pipeline_takes_the_target_prior_per_call(tmp_path):
    model = trained_model()  # its own target prior: [0.4, 0.3, 0.2, 0.1]
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["custom_pipelines"]["image-classification"]["impl"] == \
        "pipeline_balpoe.BalPoEImageClassificationPipeline"
    # The package's class, as pipeline(..., trust_remote_code=True) loads it from the folder's copy.
    classify = pipeline("image-classification", model=str(tmp_path), top_k=None,
                        pipeline_class=BalPoEImageClassificationPipeline)
    images = _images(6)
    pixels = build_image_processor(model.config)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        uniform = model(pixels, target_prior="uniform").logits.double()
    counts = torch.tensor(COUNTS, dtype=torch.float64)
    # Predicting for a prior p: softmax(uniform logits + log p), whatever constant the model adds.
    expected = {"uniform": uniform.softmax(-1),
                "train": (uniform + (counts / counts.sum()).log()).softmax(-1),
                (0.1, 0.2, 0.3, 0.4): (uniform + torch.tensor([0.1, 0.2, 0.3, 0.4]).log()).softmax(-1),
                None: (uniform + torch.tensor([0.4, 0.3, 0.2, 0.1]).log()).softmax(-1)}
    for prior, probs in expected.items():
        kwargs = {} if prior is None else {"target_prior": list(prior) if isinstance(prior, tuple) else prior}
        for image, want in zip(images, probs, strict=True):
            assert _scores(classify(image, **kwargs)) == pytest.approx(want.tolist(), abs=1e-5), prior
    # "auto": the prior of the call's images (the model's default estimate from their logits), then
    # predicting for it; the model's own prior is untouched.
    estimate = estimate_prior(uniform, None).prior
    auto = classify(images, target_prior="auto")
    for rows, want in zip(auto, (uniform + estimate.log()).softmax(-1), strict=True):
        assert _scores(rows) == pytest.approx(want.tolist(), abs=1e-5)
    assert model.config.target_prior == pytest.approx([0.4, 0.3, 0.2, 0.1])
    assert classify.model.config.target_prior == pytest.approx([0.4, 0.3, 0.2, 0.1])
    assert _scores(classify(images[0])) == pytest.approx(expected[None][0].tolist(), abs=1e-5)
    # A prior given when the pipeline is built holds for every call.
    trained = pipeline("image-classification", model=str(tmp_path), top_k=None, target_prior="train",
                       pipeline_class=BalPoEImageClassificationPipeline)
    assert _scores(trained(images[1])) == pytest.approx(expected["train"][1].tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="'uniform', 'train', 'auto' or one probability per class"):
        classify(images[0], target_prior="balanced")
    with pytest.raises(ValueError, match="has 2 entries but the model has 4 classes"):
        classify(images[0], target_prior=[0.5, 0.5])
    with pytest.raises(TypeError, match="pass them as a list"):
        classify(iter(images), target_prior="auto")


def test_pipeline_code_travels_with_the_model(tmp_path, remote_code_cache):
    """pipeline(..., trust_remote_code=True) gives the folder's own pipeline code; without it, transformers
    refuses to run that code."""
    model = trained_model()
    model.save_pretrained(tmp_path)
    assert "pipeline_balpoe.py" in os.listdir(tmp_path)
    classify = pipeline("image-classification", model=str(tmp_path), trust_remote_code=True)
    assert type(classify).__name__ == "BalPoEImageClassificationPipeline"
    assert type(classify).__module__.startswith("transformers_modules.")
    assert classify(_images(1)[0], target_prior="train")[0]["label"] in LABELS.values()
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        pipeline("image-classification", model=str(tmp_path))


def test_a_model_loaded_with_trust_remote_code_saves_a_complete_folder(tmp_path, remote_code_cache):
    """The documented loading call, with the package imported (transformers then prefers the registered
    classes; test_hub_card runs the folder's own code where the package cannot be imported)."""
    model = trained_model()
    model.save_pretrained(tmp_path / "run")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "run", trust_remote_code=True).eval()
    loaded.save_pretrained(tmp_path / "again")
    assert set(os.listdir(tmp_path / "run")) == set(os.listdir(tmp_path / "again"))
    processor = (tmp_path / "run" / "preprocessor_config.json").read_text()
    assert (tmp_path / "again" / "preprocessor_config.json").read_text() == processor
    pixels = torch.randn(3, 3, 32, 32)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "again", trust_remote_code=True)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(pixels).logits, model(pixels).logits)


def test_a_loaded_model_saves_the_processor_it_came_with(tmp_path):
    """A folder's own processor (here a 64-pixel resize, not the config's 32) goes with the model."""
    make_model().save_pretrained(tmp_path / "run")
    build_image_processor(64, mean=[0.5] * 3, std=[0.25] * 3).save_pretrained(tmp_path / "run")
    BalPoEForImageClassification.from_pretrained(tmp_path / "run").save_pretrained(tmp_path / "copy")
    processor = AutoImageProcessor.from_pretrained(tmp_path / "copy")
    assert processor.size == {"height": 64, "width": 64} and list(processor.image_std) == [0.25] * 3


def test_save_pretrained_keeps_an_existing_processor(tmp_path):
    build_image_processor(64, mean=[0.5] * 3, std=[0.25] * 3).save_pretrained(tmp_path)
    make_model().save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert processor.size == {"height": 64, "width": 64} and list(processor.image_std) == [0.25] * 3


def test_save_pretrained_writes_no_processor_for_non_rgb_backbones(tmp_path, caplog):
    config = BalPoEConfig(num_experts=1, num_labels=4, backbone_kwargs={"in_chans": 1}, image_mean=[0.5],
                          image_std=[0.5])
    with caplog.at_level(logging.WARNING):
        BalPoEForImageClassification(config).save_pretrained(tmp_path)
    assert "preprocessor_config.json" not in os.listdir(tmp_path)
    assert "takes 1 input channels" in caplog.text


def test_image_processor_errors():
    with pytest.raises(ValueError, match="pass mean and std"):
        build_image_processor(32)
    with pytest.raises(ValueError, match="pass mean and std"):  # a config of another model type
        build_image_processor(AutoConfig.for_model("resnet"))
    with pytest.raises(ValueError, match="one value per RGB channel"):
        build_image_processor(32, mean=[0.5], std=[0.5])
    with pytest.raises(ValueError, match="std must be positive"):
        build_image_processor(32, mean=[0.5] * 3, std=[0.5, 0.0, 0.5])
    with pytest.raises(ValueError, match="positive integer"):
        build_image_processor(0, mean=[0.5] * 3, std=[0.5] * 3)
    with pytest.raises(ValueError, match="resample must be one of"):
        build_image_processor(BalPoEConfig(), resample="lanczos")


# ----------------------------------------------------------------------------------------- adapt_to_unlabeled


def test_adapt_to_unlabeled_takes_images_of_the_models_size_only():
    model = make_model()  # resnet32_cifar: 32 x 32 images, as its image processor makes
    assert model.config.image_size == 32
    estimate = model.adapt_to_unlabeled(torch.randn(6, 3, 32, 32), method="em", set_prior=False)
    assert estimate.prior.shape == (4,)
    for images in (torch.randn(6, 3, 2, 2), torch.randn(6, 3, 64, 64),
                   [torch.randn(3, 3, 32, 32), torch.randn(3, 3, 16, 16)]):  # mixed sizes, batch by batch
        with pytest.raises(ValueError, match=r"must be 32 x 32 pixels \(config\.image_size, what the model's "
                                             r"image processor makes\), got \((2, 2|64, 64|16, 16)\)"):
            model.adapt_to_unlabeled(images, method="em")


def test_constructors_refuse_what_would_fail_late_or_silently():
    with pytest.raises(ValueError, match=r"lambdas must hold one bias per expert \(at least one expert\), "
                                         r"got \[\]"):
        BalPoELoss([30, 20, 10], lambdas=[])  # it used to construct and return NaN at the first call
    ds = datasets.Dataset.from_dict({"label": [0] * 8 + [1] * 8 + [2] * 8})
    with pytest.raises(ValueError, match=r"train_counts must be integers >= 0 \(images per class\), but "
                                         r"classes \[1\] have \[-5\]"):
        make_shifted_test(ds, [30, -5, 10], "forward", 2.0)
    for build in (lambda: make_long_tailed(ds, float("nan")),
                  lambda: make_shifted_test(ds, [30, 20, 10], "backward", float("nan")),
                  lambda: long_tailed_counts(100, 10, float("inf"))):
        with pytest.raises(ValueError, match=r"must be >= 1 and finite \(head count / tail count\)"):
            build()
    counts = {"backbone": "resnet20_cifar", "class_counts": [3, 2, 1]}
    for values, message in [({"lambdas": [1.0, "a", -1.0]}, r"must hold numbers .* got lambdas=\[1.0, 'a'"),
                            ({"classifier_scale": None}, "classifier_scale must be positive and finite"),
                            ({"image_size": "32"}, "image_size must be a positive integer number of pixels"),
                            ({"image_mean": "abc"}, "image_mean must be a list of finite numbers"),
                            ({"backbone_kwargs": [1]}, "backbone_kwargs must be a mapping"),
                            ({"backbone_pretrained": "yes"}, "backbone_pretrained must be True or False")]:
        with pytest.raises(ValueError, match=message):
            BalPoEConfig(**counts, **values)
