"""balpoe_hf.recipes and the recipe flags of balpoe-train (balpoe_hf.cli.arguments): the shipped recipes,
config files over a base, command-line overrides, and the checks of every field.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from balpoe_hf import (
    cli,
    recipes,
)
from balpoe_hf.cli import arguments
from balpoe_hf.data.splits import long_tailed_counts
from balpoe_hf.errors import TrainingError
from balpoe_hf.training import loop as training
from balpoe_hf.training import resume

REPO = Path(__file__).resolve().parents[1]


def test_fashion_mnist_quick_recipe_shot_groups_cover_every_group():
    from balpoe_hf.data.splits import shot_groups

    recipe = recipes.make_recipe(recipes.recipe_values("fashion-mnist-lt-quick"))
    counts = long_tailed_counts(6000, 10, recipe.imbalance_ratio)
    assert counts == [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]
    # Training counts once a tenth of each class (rounded half up) is held out.
    training = [5400, 3236, 1940, 1163, 697, 418, 250, 149, 90, 54]
    assert recipe.holdout_fraction == 0.1
    groups = shot_groups(training, recipe.many_threshold, recipe.few_threshold)
    assert groups == {"many": [0, 1, 2, 3], "medium": [4, 5, 6], "few": [7, 8, 9]}
    assert shot_groups(training)["few"] == []  # why the recipe sets its own thresholds


def test_every_recipe_field_has_a_documented_flag():
    help_text = arguments.build_parser().format_help()
    for name, field in recipes.RECIPE_FIELDS.items():
        assert "--" + name.replace("_", "-") in help_text, name
        assert field.metadata["help"]


def test_command_line_overrides_the_recipe():
    args, recipe = arguments.parse_args([
        "--recipe", "cifar100-lt-ir100", "--epochs", "5", "--lambdas", "1", "0", "-1", "--num-experts", "3",
        "--mixup-alpha", "0", "--no-hflip", "--backbone-kwargs", '{"drop_rate": 0.1}',
        "--imbalance-ratio", "none", "--lr-milestones", "3", "4", "--mixed-precision", "bf16",
        "--train-file", "a.parquet", "b.parquet"])
    assert (recipe.epochs, recipe.lambdas, recipe.mixup_alpha) == (5, [1.0, 0.0, -1.0], 0.0)
    assert recipe.hflip is False
    assert recipe.backbone_kwargs == {"drop_rate": 0.1}
    assert recipe.imbalance_ratio is None and recipe.lr_milestones == [3, 4]
    assert recipe.mixed_precision == "bf16" and recipe.train_file == ["a.parquet", "b.parquet"]
    # Fields left alone keep the recipe's value.
    assert recipe.lr == 0.1 and recipe.label_column == "fine_label"
    assert args.output_dir == "runs/cifar100-lt-ir100"
    _, recipe = arguments.parse_args(["--recipe", "cifar100-lt-ir100", "--num-experts", "5",
                                     "--lambdas", "none"])
    assert recipe.lambdas is None  # BalPoEConfig then spaces 5 lambdas evenly from 1 to -1


def test_config_file_starts_from_a_base_recipe(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("base: cifar10-lt-ir50\nname: mine\nepochs: 3\nlambdas: [0.5, -0.5]\nnum_experts: 2\n")
    args, recipe = arguments.parse_args(["--config", str(config), "--epochs", "7"])
    assert (recipe.name, recipe.epochs, recipe.lambdas, recipe.num_experts) == ("mine", 7, [0.5, -0.5], 2)
    assert recipe.imbalance_ratio == 50 and recipe.mixup_alpha == 0.8  # from the base
    assert args.output_dir == "runs/mine"
    # The resolved recipe written to a run reads back as the same recipe.
    recipes.save_recipe(recipe, tmp_path / "recipe.yaml")
    assert recipes.recipe_differences(recipe, tmp_path / "recipe.yaml") == {}
    assert recipes.make_recipe(recipes.recipe_values(config=tmp_path / "recipe.yaml")) == recipe


@pytest.mark.parametrize("values,message", [
    ({"epochs": "many"}, "epochs must be int"),
    ({"colour": 1}, "unknown recipe fields ['colour']"),
    ({"lambdas": [1.0, 0.0]}, "lambdas has 2 values but num_experts is 3"),
    ({"batch_size": 7, "mixup_alpha": 0.2}, "batch_size must be even"),
    ({"lr_schedule": "linear"}, "lr_schedule must be one of ['multistep', 'cosine', 'constant']"),
    ({"few_threshold": 200, "many_threshold": 100}, "few_threshold (200) must not exceed many_threshold"),
    ({"seed": 2**32}, "seed must be below 2**32 = 4294967296 (numpy seeds its generators with 32-bit"),
    ({"split_seed": 10**20}, "split_seed must be below 2**32"),
])
def test_bad_recipe_values_are_explained(values, message):
    with pytest.raises(TrainingError) as error:
        recipes.make_recipe(values)
    assert message in str(error.value)


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(TrainingError) as error:
        recipes.recipe_values("cifar1000")
    assert "unknown recipe 'cifar1000'" in str(error.value)
    for name in recipes.available_recipes():
        assert name in str(error.value)


def test_recipe_files_take_no_yaml_aliases_and_base_names_a_shipped_recipe(tmp_path):
    # A "billion laughs" in backbone_kwargs gave a 40 MB error message.
    laughs = tmp_path / "laughs.yaml"
    laughs.write_text("base: cifar10-lt-local\nbackbone_kwargs:\n  a: &a [lol, lol, lol, lol, lol]\n"
                      + "".join(f"  {x}: &{x} [{', '.join([f'*{y}'] * 9)}]\n"
                                for y, x in zip("abcdefgh", "bcdefghi", strict=True)))
    with pytest.raises(TrainingError) as error:
        recipes.load_recipe(config=laughs)
    assert len(str(error.value)) < 400
    assert "the alias *a repeats an anchored value; recipe files take no anchors (&name) or aliases" in str(
        error.value)
    # `base: ../../...` read YAML outside the recipes folder.
    outside = tmp_path / "outside.yaml"
    outside.write_text("epochs: 2\n")
    relative = "../" * 12 + str(outside.with_suffix("")).lstrip("/")  # from the recipes folder to it
    escape = tmp_path / "escape.yaml"
    escape.write_text(f"base: {relative}\n")
    for load in (lambda: recipes.load_recipe(config=escape), lambda: recipes.load_recipe(relative)):
        with pytest.raises(TrainingError, match=r"unknown recipe '\.\./\.\./.*outside'; the known recipes"):
            load()


def test_list_recipes_prints_every_shipped_recipe(capsys):
    from balpoe_hf import cli

    assert cli.train_main(["--list-recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == recipes.available_recipes()
    (quick,) = [line for line in lines if line.startswith("fashion-mnist-lt-quick ")]
    assert "Fashion-MNIST-LT IR100" in quick


@pytest.mark.parametrize("values,message", [
    ({"lr": float("nan")}, "lr must be finite, got nan"),
    ({"lr": float("inf")}, "lr must be finite, got inf"),
    ({"lr": -0.1}, "lr must be positive, got -0.1"),
    ({"lr": 0}, "lr must be positive, got 0.0"),
    ({"mixup_alpha": float("nan")}, "mixup_alpha must be finite"),
    ({"mixup_alpha": -1}, "mixup_alpha must be >= 0"),
    ({"image_size": 0}, "image_size must be at least 1, got 0"),
    ({"image_std": [0.2, float("nan"), 0.2]}, "image_std must be finite"),
    ({"image_std": [0.2, 0.0, 0.2]}, "image_std must be positive"),
    ({"lambdas": [1.0, float("inf"), -1.0]}, "lambdas must be finite"),
    ({"momentum": 1.5}, "momentum must be below 1"),
    ({"weight_decay": -1e-4}, "weight_decay must not be negative"),
    ({"max_grad_norm": 0}, "max_grad_norm must be positive"),
    ({"imbalance_ratio": 0.5}, "imbalance_ratio must be >= 1"),
    ({"checkpoint_every_steps": -1}, "checkpoint_every_steps must not be negative"),
])
def test_numeric_recipe_fields_are_checked_up_front(values, message):
    with pytest.raises(TrainingError) as error:
        recipes.make_recipe(values)
    assert message in str(error.value)


def test_lr_nan_on_the_command_line_is_refused_before_training(tiny_data, tmp_path, capsys):
    argv = ["--train-file", str(tiny_data[0]), "--test-file", str(tiny_data[1]), "--image-column", "picture",
            "--label-column", "target", "--output-dir", str(tmp_path / "run"), "--lr", "nan"]
    assert cli.train_main(argv) == 2
    assert "lr must be finite, got nan" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_backbone_override_resets_what_the_recipe_set_for_its_backbone(tmp_path):
    # The recipe's backbone_kwargs ({zero_init_last: false}) are for its ResNeXt; the CIFAR ResNet has none.
    stale = recipes.make_recipe({**recipes.recipe_values("imagenet-lt-resnext50"),
                                 "backbone": "resnet20_cifar"})
    with pytest.raises(TrainingError, match=r"cannot build the backbone resnet20_cifar with backbone_kwargs "
                                            r"\{'zero_init_last': False\}: .*unexpected keyword argument"):
        training.check_model(stale)
    _, recipe = arguments.parse_args(["--recipe", "imagenet-lt-resnext50", "--backbone", "resnet20_cifar",
                                    "--epochs", "8"])
    assert recipe.backbone_kwargs == {} and recipe.lambdas == [1.0, -0.25, -1.5]
    assert recipe.overridden == ("backbone", "epochs", "backbone_kwargs")
    assert recipe.notes == ("the recipe's backbone_kwargs {'zero_init_last': False} were set for its "
                            "backbone resnext50_32x4d: dropped for resnet20_cifar (set them for it with "
                            "--backbone-kwargs)",)
    assert recipe.description.endswith("180 epochs, cosine lr 0.025, mixup 0.3 (overridden: "
                                       "backbone=resnet20_cifar, epochs=8; reset: backbone_kwargs)")
    training.check_model(recipe)  # builds
    # Set with the override, they are the user's; the Python API resolves the same way.
    _, given = arguments.parse_args(["--recipe", "imagenet-lt-resnext50", "--backbone", "resnet20_cifar",
                                   "--backbone-kwargs", '{"drop_rate": 0.1}'])
    assert given.backbone_kwargs == {"drop_rate": 0.1} and given.notes == ()
    assert recipes.load_recipe("imagenet-lt-resnext50", backbone="resnet20_cifar", epochs=8).to_dict() == \
        recipe.to_dict()
    # recipe.yaml says which fields were overridden, and reads back as the same recipe.
    resume.start_run(tmp_path / "run", recipe)
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert saved[recipes.OVERRIDDEN_KEY] == ["backbone", "epochs", "backbone_kwargs"]
    assert recipes.load_recipe(config=tmp_path / "run" / "recipe.yaml").to_dict() == recipe.to_dict()
    # A config file over its base is an override too.
    (tmp_path / "mine.yaml").write_text("base: imagenet-lt-resnext50\nbackbone: resnet50\nepochs: 2\n")
    mine = recipes.load_recipe(config=tmp_path / "mine.yaml")
    assert mine.backbone_kwargs == {} and mine.overridden == ("backbone", "epochs", "backbone_kwargs")
    unchanged = recipes.load_recipe("imagenet-lt-resnext50")
    assert unchanged.overridden == () and "overridden" not in unchanged.description


def test_recipe_files_that_are_not_one_yaml_mapping_are_refused(tiny_data, tmp_path, capsys):
    twice = tmp_path / "twice.yaml"
    twice.write_text("base: cifar10-lt-ir100\nepochs: 3\nbase: imagenet-lt-resnext50\n")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(tiny_data[0].read_bytes()[:2000])
    for config, message in [(twice, f"cannot parse the recipe file {twice}: the key(s) ['base'] are given "
                                     "twice; keep one"),
                            (binary, f"the recipe file {binary} is not a text file"),
                            (tmp_path, f"recipe file {tmp_path} is a folder")]:
        assert cli.train_main(["--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
