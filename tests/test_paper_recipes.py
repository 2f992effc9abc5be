"""The paper's recipes against their sources, the augmentation policies, the mean-lambda setting and the
split-list data source (training and balpoe-evaluate) on a tiny folder of generated images.

The expected settings below are copied from the paper (Sanchez Aimar et al., CVPR 2023, Sec. 4.1.2 and
Appendix B.2) and from the official configs and data loaders of emasa/BalPoE-CalibratedLT (commit ca607ae),
not from the YAML files they check.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from balpoe_hf import cli, recipes
from balpoe_hf.cli import arguments
from balpoe_hf.data import loading, transforms
from balpoe_hf.errors import TrainingError
from balpoe_hf.recipes import RECIPES_DIR
from balpoe_hf.training import loop as training

CONFIGS = "emasa/BalPoE-CalibratedLT configs/mixup/{}_training/config_{}_bs-experts.json"
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
INAT_MEAN, INAT_STD = [0.466, 0.471, 0.380], [0.195, 0.194, 0.192]
# Official configs: tau_list; the package's lambda = 1 - tau. Classifier: NormedLinear with s=30 (the paper's
# Appendix B.2 says kappa = 32; the code, which produced the numbers, uses 30).
COMMON = {"num_experts": 3, "classifier": "cosine", "classifier_scale": 30.0, "momentum": 0.9,
          "nesterov": True}


def _cifar(classes: int, ratio: int, long: bool) -> dict:
    """config_cifar{10,100}_ir{R}_bs-experts.json and cifar_data_loaders.py (standard or long_training)."""
    values = {
        **COMMON, "dataset": f"uoft-cs/cifar{classes}", "imbalance_ratio": float(ratio), "split_seed": 0,
        "backbone": "resnet32_cifar", "lambdas": [1.0, 0.0, -1.0],  # tau_list [0, 1, 2]
        "batch_size": 128, "lr": 0.1, "weight_decay": 5e-4, "lr_schedule": "multistep", "lr_gamma": 0.1,
        "mixup_alpha": 0.8 if classes == 10 else 0.4, "image_size": 32, "augment": "cifar", "crop_padding": 4,
        "hflip": True, "image_mean": CIFAR_MEAN, "image_std": CIFAR_STD, "remove_mean_lambda": True,
        # Hub CIFAR-100 is in the original order (one training file); Hub CIFAR-10 is not (see its YAML).
        "selection": "reference" if classes == 100 else "random",
    }
    if long:  # CustomLR step1 320, step2 360, warmup_epoch 10; cifar_aug_plus: crop, flip, CIFAR10Policy
        values.update(epochs=400, warmup_epochs=10.0, lr_milestones=[320, 360], rotation=0.0,
                      auto_augment="cifar10", rand_augment=None, cutout=0)
    else:  # CustomLR step1 160, step2 180, warmup_epoch 5; crop, flip, RandomRotation(15)
        values.update(epochs=200, warmup_epochs=5.0, lr_milestones=[160, 180], rotation=15.0,
                      auto_augment="none", rand_augment=None, cutout=0)
    return values


def _imagenet(backbone: str, long: bool) -> dict:
    """config_imagenet_lt_{resnet50,resnext50}_bs-experts.json and imagenet_lt_data_loaders.py."""
    return {
        **COMMON, "backbone": backbone, "backbone_kwargs": {"zero_init_last": False}, "num_classes": 1000,
        "imbalance_ratio": None, "lambdas": [1.0, -0.25, -1.5],  # tau_list [0, 1.25, 2.5]
        "remove_mean_lambda": False,  # the official test code averages the expert logits as they are
        "epochs": 400 if long else 180, "batch_size": 64, "lr": 0.025, "weight_decay": 5e-4,
        "lr_schedule": "cosine", "warmup_epochs": 0.0, "mixup_alpha": 0.3, "image_size": 224,
        "crop_pct": 0.875, "augment": "imagenet", "hflip": True, "color_jitter": 0.4,
        "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "auto_augment": "none",
        "rand_augment": "rand-n2-m10-mstd0.5" if long else None, "cutout": 0,
    }


def _inat(long: bool) -> dict:
    """config_iNaturalist_resnet50_bs-experts.json and inaturalist_data_loaders.py."""
    return {
        **COMMON, "backbone": "resnet50", "backbone_kwargs": {"zero_init_last": False}, "num_classes": 8142,
        "imbalance_ratio": None, "lambdas": [2.0, 0.0, -2.0],  # tau_list [-1, 1, 3]
        "epochs": 400 if long else 100, "batch_size": 512, "lr": 0.2, "weight_decay": 2e-4,
        "lr_schedule": "cosine", "warmup_epochs": 0.0, "mixup_alpha": 0.2, "image_size": 224,
        "crop_pct": 0.875, "augment": "imagenet", "hflip": True,
        # Standard loader: crop and flip, no colour jitter; aug_plus 'randcls': ColorJitter(0.4, 0.4, 0.4, 0).
        "color_jitter": 0.4 if long else 0.0, "image_mean": INAT_MEAN, "image_std": INAT_STD,
        "auto_augment": "none", "rand_augment": "rand-n2-m10-mstd0.5" if long else None, "cutout": 0,
    }


def _sources() -> dict[str, tuple[str | None, dict]]:
    """Recipe name -> (the official config it cites, the settings it must have)."""
    table: dict[str, tuple[str | None, dict]] = {}
    for classes in (10, 100):
        for ratio in (10, 50, 100):
            for long in (False, True):
                name = f"cifar{classes}-lt-ir{ratio}" + ("-long" if long else "")
                config = CONFIGS.format("long" if long else "standard", f"cifar{classes}_ir{ratio}")
                table[name] = (config, _cifar(classes, ratio, long))
    local = {**_cifar(10, 100, False), "dataset": None, "selection": "reference"}
    table["cifar10-lt-local"] = (CONFIGS.format("standard", "cifar10_ir100"), local)
    for arch, backbone in (("resnet50", "resnet50"), ("resnext50", "resnext50_32x4d")):
        for long in (False, True):
            name = f"imagenet-lt-{arch}" + ("-long" if long else "")
            kind = "long" if long else "standard"
            table[name] = (CONFIGS.format(kind, f"imagenet_lt_{arch}"), _imagenet(backbone, long))
    table["inat2018-resnet50"] = (CONFIGS.format("standard", "iNaturalist_resnet50"), _inat(False))
    table["inat2018-resnet50-long"] = (CONFIGS.format("long", "iNaturalist_resnet50"), _inat(True))
    table["fashion-mnist-lt-quick"] = (None, {"dataset": "fashion-mnist", "backbone": "resnet20_cifar"})
    return table


SOURCES = _sources()


def test_every_shipped_recipe_has_a_source_row():
    assert sorted(SOURCES) == recipes.available_recipes()


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_recipe_matches_the_paper_and_the_official_config_it_cites(name):
    config, expected = SOURCES[name]
    recipe = recipes.load_recipe(name)
    assert recipe.name == name
    assert {key: getattr(recipe, key) for key in expected} == expected
    comments = "".join(line.lstrip("# ") for line in (RECIPES_DIR / f"{name}.yaml").read_text().splitlines()
                       if line.startswith("#"))
    if config is not None:
        assert "".join(config.split()) in "".join(comments.split())  # cited, however the comment wraps
    # "Is this recipe's training augmentation supported by a pipeline without the PIL policies?"
    assert bool(recipe.policy_augmentations()) == name.endswith("-long")


def test_longer_recipes_differ_from_the_standard_ones_only_in_schedule_and_augmentation():
    for name in recipes.available_recipes():
        if not name.endswith("-long"):
            continue
        long, standard = recipes.load_recipe(name).to_dict(), recipes.load_recipe(name[:-5]).to_dict()
        differing = {k for k in long if long[k] != standard[k]}
        assert differing <= {"name", "description", "epochs", "warmup_epochs", "lr_milestones", "rotation",
                             "auto_augment", "rand_augment", "color_jitter"}


def test_official_residual_init_for_resnet_experts():
    """The official ResNet/ResNeXt keep every BN weight at 1; timm zeroes the last one of each block."""
    from balpoe_hf.models.balpoe.backbones import create_backbone

    recipe = recipes.load_recipe("imagenet-lt-resnet50")
    official = create_backbone(recipe.backbone, recipe.backbone_kwargs)
    blocks = [*official.layer1, *official.layer4]
    assert all(torch.all(block.bn3.weight == 1) for block in blocks)
    assert torch.all(create_backbone("resnet50").layer4[0].bn3.weight == 0)


# --------------------------------------------------------------------------- the mean-lambda setting


def test_mean_lambda_setting_reaches_the_saved_config_and_the_predictions(tmp_path):
    recipe = recipes.load_recipe("imagenet-lt-resnext50", backbone="resnet20_cifar", backbone_kwargs={},
                                 image_size=8)
    counts = [20, 6, 2]
    data = loading.TrainingData(train=None, test=None, class_names=["a", "b", "c"], class_counts=counts)
    torch.manual_seed(0)
    kept = training.build_model(recipe, data).eval()
    kept.save_pretrained(tmp_path / "kept")
    assert json.loads((tmp_path / "kept" / "config.json").read_text())["remove_mean_lambda"] is False
    recipe = dataclasses.replace(recipe, remove_mean_lambda=True)
    removed = training.build_model(recipe, data).eval()
    removed.save_pretrained(tmp_path / "removed")
    assert json.loads((tmp_path / "removed" / "config.json").read_text())["remove_mean_lambda"] is True

    removed.load_state_dict(kept.state_dict())
    pixels = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        out, out_removed = kept(pixels), removed(pixels)
    zbar = out.expert_logits.mean(1)
    # The official test code: softmax of the plain mean of the expert logits.
    torch.testing.assert_close(out.logits.softmax(1), zbar.softmax(1))
    # Sec. 3.3: the mean bias, mean(1, -0.25, -1.5) * log pi_train = -0.25 * log pi_train, removed.
    log_pi = torch.log(torch.tensor(counts, dtype=torch.float32) / sum(counts))
    torch.testing.assert_close(out_removed.logits.softmax(1), (zbar + 0.25 * log_pi).softmax(1))
    _, parsed = arguments.parse_args(["--recipe", "imagenet-lt-resnet50", "--remove-mean-lambda"])
    assert parsed.remove_mean_lambda is True


# --------------------------------------------------------------------------- augmentation policies


def _white(size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), (255, 255, 255))


@pytest.mark.parametrize("fields", [
    {"auto_augment": "cifar10", "rotation": 0},
    {"rand_augment": "rand-n2-m10-mstd0.5", "augment": "imagenet", "color_jitter": 0.4},
    {"cutout": 16, "rotation": 0},
])
def test_each_policy_runs_on_a_small_image_and_is_saved_with_the_recipe(fields, tmp_path):
    torch.manual_seed(0)
    recipe = recipes.make_recipe({"image_size": 32, **fields})
    transform = transforms.ImageTransform(recipe)
    pixels = transform({"image": [_white(), _white(20)], "label": [0, 1]})["pixel_values"]
    assert [tuple(p.shape) for p in pixels] == [(3, 32, 32)] * 2
    recipes.save_recipe(recipe, tmp_path / "recipe.yaml")
    saved = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert {key: saved[key] for key in fields} == fields


def test_policies_are_the_libraries_transforms():
    from timm.data.auto_augment import RandAugment
    from torchvision.transforms import AutoAugment, AutoAugmentPolicy

    (auto,) = transforms.policy_steps(recipes.make_recipe({"auto_augment": "cifar10"}))
    assert isinstance(auto, AutoAugment) and auto.policy == AutoAugmentPolicy.CIFAR10
    assert auto.fill == [128, 128, 128]  # the official CIFAR10Policy's fillcolor
    (rand,) = transforms.policy_steps(recipes.make_recipe({"rand_augment": "rand-n2-m10-mstd0.5",
                                                           "image_mean": IMAGENET_MEAN}))
    assert isinstance(rand, RandAugment) and rand.num_layers == 2
    # The official copy of timm's RandAugment (dataset/randaugment.py), with 'PosterizeTpu' named 'Posterize'.
    assert [op.name for op in rand.ops] == [
        "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
        "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]
    op = rand.ops[0]
    assert (op.prob, op.magnitude, op.magnitude_std) == (0.5, 10, 0.5)
    assert op.kwargs["fillcolor"] == (124, 116, 104)  # the official ra_params img_mean for ImageNet
    assert transforms.policy_steps(recipes.make_recipe({})) == []


def test_cutout_erases_one_square_before_normalisation():
    recipe = recipes.make_recipe({"cutout": 8, "rotation": 0, "crop_padding": 0, "hflip": False,
                                  "image_size": 16, "image_mean": [0.0] * 3, "image_std": [1.0] * 3})
    torch.manual_seed(0)
    pixels = transforms.ImageTransform(recipe)({"image": [_white(16)], "label": [0]})["pixel_values"][0]
    erased = (pixels == 0).all(0)
    assert int(erased.sum()) == 64  # 8 x 8, the rest stays white
    rows, cols = torch.nonzero(erased, as_tuple=True)
    assert (int(rows.max() - rows.min()), int(cols.max() - cols.min())) == (7, 7)
    assert torch.all(pixels[:, ~erased] == 1)


@pytest.mark.parametrize(("fields", "message"), [
    ({"rand_augment": "rand-n2-M9"}, "not a timm RandAugment string"),
    ({"rand_augment": "randaugment"}, "not a timm RandAugment string"),
    ({"auto_augment": "cifar100"}, "auto_augment must be one of"),
    ({"cutout": 40}, "cutout must be between 0"),
    ({"auto_augment": "cifar10", "rand_augment": "rand-m9"}, "choose one augmentation policy"),
    ({"selection": "official"}, "selection must be one of"),
    ({"train_list": "a.txt", "train_file": ["b.parquet"]}, "give one data source"),
])
def test_bad_policy_settings_are_explained(fields, message):
    with pytest.raises(TrainingError, match=message):
        recipes.make_recipe(fields)


# --------------------------------------------------------------------------- split-list files

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220)]
TRAIN_COUNTS, TEST_PER_CLASS = [12, 6, 3], 4


def _write_lists(root: Path) -> dict[str, Path]:
    """Images under root/images/<split>/ and ImageNet-LT-style lists: train, test, forward and backward."""
    rng = np.random.default_rng(0)
    lists = {}
    for split, counts in (("train", TRAIN_COUNTS), ("test", [TEST_PER_CLASS] * 3)):
        lines = []
        for label, count in enumerate(counts):
            for i in range(count):
                pixels = np.asarray(COLOURS[label], float) + rng.normal(0, 10, (8, 8, 3))
                relative = f"{split}/n{label:02d}/img {i}.png"  # a space in the name, as some lists have
                (root / relative).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / relative)
                lines.append(f"{relative} {label}")
        lists[split] = root / f"Toy_LT_{split}.txt"
        lists[split].write_text("\n".join(lines) + "\n")
    test_lines = lists["test"].read_text().splitlines()
    lists["forward"] = root / "Toy_LT_forward2.txt"  # 4 / 2 / 1 images of classes 0 / 1 / 2
    lists["forward"].write_text("\n".join(test_lines[:4] + test_lines[4:6] + test_lines[8:9]) + "\n")
    lists["backward"] = root / "Toy_LT_backward2.txt"  # 1 / 2 / 4
    lists["backward"].write_text("\n".join(test_lines[:1] + test_lines[4:6] + test_lines[8:12]) + "\n")
    return lists


@pytest.fixture(scope="module")
def toy_lists(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("toy_lt")
    return root, _write_lists(root)


def _list_recipe(root: Path, lists: dict[str, Path], **fields) -> recipes.Recipe:
    values = {"train_list": str(lists["train"]), "test_list": str(lists["test"]), "data_root": str(root),
              "backbone": "resnet20_cifar", "image_size": 8, "epochs": 1, "batch_size": 6, "mixup_alpha": 0.0,
              "warmup_epochs": 0, "eval_every": 0, "num_workers": 0, "many_threshold": 10, "few_threshold": 4}
    return recipes.make_recipe({**values, **fields})


def test_split_lists_train_and_evaluate_end_to_end(toy_lists, tmp_path, capsys):
    root, lists = toy_lists
    torch.set_num_threads(1)
    data = loading.load_training_data(_list_recipe(root, lists, num_classes=3))
    assert data.class_counts == TRAIN_COUNTS and len(data.test) == 3 * TEST_PER_CLASS
    assert data.train[0]["image"].size == (8, 8)  # decoded on access

    run = tmp_path / "run"
    training.train(_list_recipe(root, lists), run)
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["train_list"] == str(lists["train"]) and saved["data_root"] == str(root)

    # The run's recipe names the test list and data root: balpoe-evaluate finds them.
    assert cli.evaluate_main(["--model", str(run), "--shifts", "uniform", "--device", "cpu"]) == 0
    assert "Balanced test set (12 images" in capsys.readouterr().out
    # Several lists: each is its own test set, one column per file.
    output = tmp_path / "eval" / "report.json"
    argv = ["--model", str(run), "--device", "cpu", "--test-list", str(lists["forward"]),
            str(lists["backward"]), "--output", str(output)]
    assert cli.evaluate_main(argv) == 0
    out = capsys.readouterr().out
    assert "Toy_LT_forward2: 7 images" in out and "Toy_LT_backward2: 7 images" in out
    assert "| prior \u2193 / test set \u2192 | Toy_LT_forward2 | Toy_LT_backward2 |" in out
    summary = json.loads(output.read_text())
    assert set(summary["shift_accuracy"]) == {"none", "oracle", "auto"}  # auto needs no calibration
    # Portable names: the run's folder name, the reports beside the summary, the list's file name.
    assert summary["model"] == "run"
    assert summary["reports"]["Toy_LT_forward2"] == "report_Toy_LT_forward2.json"
    forward = json.loads(output.with_name(summary["reports"]["Toy_LT_forward2"]).read_text())
    assert forward["dataset"] == "Toy_LT_forward2.txt"  # its file name, not where it lies
    # The oracle prior of a list is its own label distribution.
    assert forward["shifts"]["uniform"]["test_prior"] == pytest.approx([4 / 7, 2 / 7, 1 / 7])


@pytest.mark.parametrize(("edit", "message"), [
    (lambda root, lists: (root / "test/n01/img 1.png").rename(root / "moved.png"),
     r"--test-list: 1 of the 12 images listed in .*Toy_LT_test.txt are missing; the first is "
     r".*img 1.png \(line 6\)"),
    (lambda root, lists: lists["test"].write_text("test/n00/img 0.png\n"),
     r"--test-list: .*Toy_LT_test.txt, line 1: expected 'relative/path label'"),
    (lambda root, lists: lists["test"].write_text("test/n00/img 0.png 7\n"),
     r"--test-list: .*Toy_LT_test.txt, line 1: label 7 is outside \[0, 2\]"),
    (lambda root, lists: lists["test"].unlink(), r"--test-list .*Toy_LT_test.txt is not a file"),
])
def test_list_errors_through_the_command_lines(tmp_path, capsys, edit, message):
    root = tmp_path / "data"
    lists = _write_lists(root)
    edit(root, lists)
    argv = ["--train-list", str(lists["train"]), "--test-list", str(lists["test"]), "--data-root", str(root),
            "--num-classes", "3", "--backbone", "resnet20_cifar", "--output-dir", str(tmp_path / "run")]
    assert cli.train_main(argv) == 2
    assert re.search(message, capsys.readouterr().err)


def test_evaluate_list_errors(toy_lists, tmp_path, capsys):
    """balpoe-evaluate checks labels against the model's classes and needs --data-root."""
    root, lists = toy_lists
    run = tmp_path / "run"
    recipe = _list_recipe(root, lists)
    model = training.build_model(recipe, loading.TrainingData(None, None, ["0", "1", "2"], TRAIN_COUNTS))
    model.save_pretrained(run)
    transforms.build_processor(recipe).save_pretrained(run)
    bad = tmp_path / "bad.txt"
    bad.write_text("test/n00/img 0.png 0\ntest/n00/img 1.png 3\n")
    assert cli.evaluate_main(["--model", str(run), "--test-list", str(bad), "--data-root", str(root)]) == 2
    assert "bad.txt, line 2: label 3 is outside [0, 2]" in capsys.readouterr().err
    assert cli.evaluate_main(["--model", str(run), "--test-list", str(lists["test"])]) == 2
    assert "needs --data-root" in capsys.readouterr().err
    for extra in (["--deployment-sizes", "300"], ["--stream", "300"]):
        argv = ["--model", str(run), "--test-list", str(lists["test"]), str(bad), "--data-root", str(root)]
        assert cli.evaluate_main(argv + extra) == 2
        assert "several --test-list files are each evaluated as they are" in capsys.readouterr().err
