"""Method presets, the method comparison (balpoe_hf.compare, scripts/compare_methods.py) and their errors.

The end-to-end tests train tiny models in-process on the synthetic 4-class set of train_synthetic.py.
"""

from __future__ import annotations

import json
import math
import time
from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_recipe
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

from balpoe_hf import cli, hub, recipes
from balpoe_hf.cli import arguments
from balpoe_hf.compare import budgets, tables
from balpoe_hf.compare import runs as compare
from balpoe_hf.errors import TrainingError
from balpoe_hf.evaluation import plots
from balpoe_hf.models.balpoe.holdout_statistics import holdout_calibration
from balpoe_hf.recipes import methods
from balpoe_hf.training import loop as training

# The presets as the issue and the README define them (independent of balpoe_hf.recipes.methods' table):
# (num_experts, lambdas, mixup_alpha, loss, remove_mean_lambda); None: the recipe's mixup.
DOCUMENTED = {
    "ce": (1, [1.0], 0.0, "balpoe", False),
    "ce-la": (1, [1.0], 0.0, "balpoe", True),
    "bs": (1, [0.0], 0.0, "balpoe", True),
    "lade": (1, [0.0], 0.0, "lade", True),
    "balpoe-erm": (3, [1.0, 0.0, -1.0], 0.0, "balpoe", True),
    "balpoe": (3, [1.0, 0.0, -1.0], None, "balpoe", True),
}
SHIFTS = "forward2,uniform,backward2"  # 8 test images per class allow ratios up to 8


pytestmark = pytest.mark.usefixtures("one_thread")


# The tiny recipe (tests/helpers.py) for one epoch, keeping one checkpoint.
COMPARE_SETTINGS = {"name": "tiny", "epochs": 1, "checkpoints_total_limit": 1}


def _base(data, **fields) -> recipes.Recipe:
    return tiny_recipe(data, **{**COMPARE_SETTINGS, **fields})


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("method", list(DOCUMENTED))
@pytest.mark.parametrize("recipe_name", ["cifar10-lt-ir100", "cifar10-lt-local"])
def test_presets_resolve_to_the_documented_settings(method, recipe_name):
    plain = recipes.load_recipe(recipe_name)
    recipe = recipes.load_recipe(recipe_name, method=method)
    experts, lambdas, mixup, loss, remove_mean = DOCUMENTED[method]
    assert recipe.method == method
    assert (recipe.num_experts, recipe.lambdas, recipe.loss, recipe.remove_mean_lambda) == (
        experts, lambdas, loss, remove_mean)
    assert recipe.mixup_alpha == (plain.mixup_alpha if mixup is None else mixup)
    # Everything else is the recipe's; its description says that the method was set over it.
    changed = {k for k, v in recipe.to_dict().items() if plain.to_dict()[k] != v}
    assert changed <= {"method", "num_experts", "lambdas", "mixup_alpha", "loss", "remove_mean_lambda",
                       "description"}
    assert recipe.description == f"{plain.description} (overridden: method={method})"


def test_method_flag_and_saved_recipe(tmp_path):
    _, recipe = arguments.parse_args(["--recipe", "cifar10-lt-ir100", "--method", "bs", "--epochs", "3"])
    assert (recipe.method, recipe.num_experts, recipe.lambdas, recipe.epochs) == ("bs", 1, [0.0], 3)
    # recipe.yaml records the method and its settings, and reloads to the same recipe.
    recipes.save_recipe(recipe, tmp_path / "recipe.yaml")
    assert recipes.load_recipe(config=tmp_path / "recipe.yaml") == recipe
    # A flag that agrees with the method is fine.
    _, recipe = arguments.parse_args(["--recipe", "cifar10-lt-ir100", "--method", "balpoe-erm",
                                    "--num-experts", "3", "--mixup-alpha", "0"])
    assert recipe.mixup_alpha == 0.0


@pytest.mark.parametrize("method", ["ce", "ce-la", "lade"])
def test_presets_reach_the_model_config_and_its_predictions(method, tiny_data):
    counts = [40, 10, 5]
    recipe = _base(tiny_data, method=method)
    data = SimpleNamespace(class_counts=counts, class_names=["a", "b", "c"])
    model = training.build_model(recipe, data).eval()
    assert model.config.method == method
    assert model.config.loss == DOCUMENTED[method][3]
    assert model.config.remove_mean_lambda is DOCUMENTED[method][4]
    with torch.no_grad():
        out = model(pixel_values=torch.randn(2, 3, 16, 16))
    raw = out.expert_logits[:, 0]
    log_prior = torch.log(torch.tensor(counts, dtype=torch.float32) / sum(counts))
    # ce: the raw logits; ce-la: minus lambda * log pi = minus log pi; lade (lambda 0): the raw logits.
    expected = raw - log_prior if method == "ce-la" else raw
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)


def test_scale_expert_lr_gives_each_expert_its_alone_update(tiny_data):
    import copy

    recipe = _base(tiny_data, method="balpoe-erm", scale_expert_lr=True, momentum=0.0, nesterov=False)
    data = SimpleNamespace(class_counts=[32, 16, 8, 4], class_names=["r", "g", "b", "y"])
    torch.manual_seed(0)
    model = training.build_model(recipe, data).train()
    alone = copy.deepcopy(model)
    pixels, labels = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1])
    groups = training.parameter_groups(model, recipe)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    optimizer = torch.optim.SGD(groups, lr=recipe.lr, momentum=0.0, weight_decay=recipe.weight_decay)
    model(pixel_values=pixels, labels=labels).loss.backward()
    optimizer.step()
    # Expert 0 trained alone: its own loss (not the mean over 3 experts), the recipe's lr and weight decay.
    alone(pixel_values=pixels, labels=labels).expert_losses[0].backward()
    for (name, after), before in zip(model.balpoe.experts[0].named_parameters(),
                                     alone.balpoe.experts[0].parameters(), strict=True):
        expected = before - recipe.lr * (before.grad + recipe.weight_decay * before)
        torch.testing.assert_close(after, expected.detach(), rtol=1e-5, atol=1e-6, msg=name)
    # One expert: nothing to compensate, one group at the recipe's settings.
    single_recipe = _base(tiny_data, method="bs", scale_expert_lr=True)
    single = training.build_model(single_recipe, data)
    assert len(training.parameter_groups(single, single_recipe)) == 1


# --------------------------------------------------------------------------- bad input


def test_unknown_method_suggests_the_closest():
    with pytest.raises(TrainingError, match=r"method must be one of .*got 'bss'. Did you mean 'bs'"):
        recipes.make_recipe({"method": "bss"})
    with pytest.raises(ValueError, match=r"unknown method 'balpoe_erm'.*Did you mean 'balpoe-erm'"):
        methods.parse_methods("ce,balpoe_erm")
    with pytest.raises(ValueError, match="more than once"):
        methods.parse_methods("ce,bs,ce")
    with pytest.raises(ValueError, match="no method"):
        methods.parse_methods(" , ")
    with pytest.raises(SystemExit):  # argparse: invalid choice, with the list of choices
        arguments.parse_args(["--recipe", "cifar10-lt-ir100", "--method", "bss"])


def test_lade_needs_one_expert_and_lambda_zero():
    with pytest.raises(TrainingError, match=r"loss='lade' trains a single classifier.*set num_experts=1"):
        recipes.load_recipe("cifar10-lt-ir100", loss="lade")
    with pytest.raises(TrainingError, match="method 'lade' sets num_experts"):
        arguments.parse_args(["--recipe", "cifar10-lt-ir100", "--method", "lade", "--num-experts", "3"])


def test_explicit_settings_that_contradict_the_method_are_refused():
    with pytest.raises(TrainingError, match=r"mixup_alpha=0.4 \(the method sets 0.0\)"):
        recipes.load_recipe("cifar10-lt-ir100", method="bs", mixup_alpha=0.4)
    with pytest.raises(TrainingError, match="remove_mean_lambda"):
        arguments.parse_args(["--recipe", "cifar10-lt-ir100", "--method", "ce", "--remove-mean-lambda"])
    with pytest.raises(TrainingError, match="method 'balpoe' trains with mixup"):
        recipes.load_recipe("cifar10-lt-ir100", method="balpoe", mixup_alpha=0)


def test_compare_command_line_errors(tiny_data, capsys):
    train, test = (str(p) for p in tiny_data)
    data = ["--train-file", train, "--test-file", test, "--image-column", "picture", "--label-column",
            "target"]
    cases = [
        (["--methods", "ce,bss"], "Did you mean 'bs'"),
        (["--num-experts", "3"], "--num-experts: every method sets these itself"),
        (["--method", "bs"], "--method: every method sets these itself"),
        (["--budget", "cpu"], "the cpu budget reads CIFAR-10 from local parquet files"),
        (["--time-limit", "30", *data], "--time-limit must exceed 60 s"),
        (["--seeds", "0,0", *data], "--seeds must be a comma list of distinct integers"),
        # Refused where parsed, not after the data are loaded (numpy's seeds are below 2**32).
        (["--seeds", "99999999999999999999", *data], "distinct integers from 0 to 2**32 - 1 (numpy's seeds)"),
        (["--seeds", "0,1", "--seed", "2", *data], "--seed and --seeds: give one of them"),
    ]
    for argv, message in cases:
        assert cli.compare_main(argv) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(TrainingError, match="leave it unset"):
        compare.compare(_base(tiny_data, method="bs"), ["ce"], "unused")


def test_seed_table_is_the_mean_and_range_of_the_finished_seeds(tmp_path):
    def report(seed, method, accuracy, ece):
        path = compare.seed_dir(tmp_path, seed) / method / compare.EVAL_DIR / "report.json"
        path.parent.mkdir(parents=True)
        balanced = {"balanced_accuracy": accuracy, "many": 0.9, "medium": 0.7, "few": 0.5, "ece": ece}
        path.write_text(json.dumps({"balanced": balanced}))

    report(0, "bs", 0.70, 0.10)
    report(1, "bs", 0.74, 0.08)
    report(0, "balpoe", 0.75, 0.05)  # seed 1 not finished
    summaries = compare.seed_summaries(tmp_path, ["bs", "balpoe", "ce"], [0, 1])
    assert list(summaries) == ["bs", "balpoe"]
    assert summaries["bs"]["balanced_accuracy"] == pytest.approx({"mean": 0.72, "min": 0.70, "max": 0.74})
    table = tables.format_seed_table(summaries).splitlines()
    assert table[2] == "| bs | 0,1 | 72.00 (70.00-74.00) | 90.00 (90.00-90.00) | 70.00 (70.00-70.00) | " \
                       "50.00 (50.00-50.00) | 9.00 (8.00-10.00) |"
    assert table[3] == "| balpoe | 0 | 75.00 | 90.00 | 70.00 | 50.00 | 5.00 |"


def test_time_limit_must_be_positive():
    with pytest.raises(TrainingError, match="--time-limit must be a positive number"):
        arguments.parse_args(["--recipe", "cifar10-lt-ir100", "--time-limit", "0"])
    _, recipe = arguments.parse_args(["--recipe", "cifar10-lt-ir100", "--method", "bs"])
    assert recipe.method == "bs"


def test_a_run_from_an_older_recipe_file_is_recognised(tiny_data, tmp_path):
    import yaml

    recipe = compare.method_recipe(_base(tiny_data), "bs")
    run = tmp_path / "bs"
    run.mkdir()
    saved = recipe.to_dict()
    # Written before holdout_fraction existed, with another checkpoint limit (which changes no weights).
    del saved["holdout_fraction"]
    saved["checkpoints_total_limit"] = 5
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved))
    assert compare.run_state(run, recipe) == "unfinished"
    (run / "config.json").write_text("{}")
    (run / "eval_results.json").write_text("{}")
    assert compare.run_state(run, recipe) == "finished"
    with pytest.raises(TrainingError, match=r"holdout_fraction: 0.0 -> 0.1"):
        compare.run_state(run, compare.method_recipe(_base(tiny_data, holdout_fraction=0.1), "bs"))


# --------------------------------------------------------------------------- comparison


def test_compare_trains_evaluates_and_skips_finished_methods(tiny_data, tmp_path, monkeypatch):
    base = _base(tiny_data, holdout_fraction=0.25)  # held out: 8 / 4 / 2 / 1 images
    result = compare.compare(base, "bs,lade", tmp_path, shifts=SHIFTS, priors="none,oracle")
    assert result.complete and list(result.summaries) == ["bs", "lade"]
    assert result.summaries["bs"]["validation"]["samples"] == 15
    printed = tables.format_comparison(result, base)
    assert "Held-out validation split" in printed
    assert "(prior: none = uniform target, oracle = the shifted set's true prior):" in printed
    for method in ("bs", "lade"):
        run = tmp_path / method
        config = json.loads((run / "config.json").read_text())
        assert config["method"] == method and config["num_experts"] == 1
        assert recipes.load_recipe(config=run / "recipe.yaml").method == method
        # The comparison's evaluation (image processor, evaluate_model) agrees with the training loop's.
        trained = json.loads((run / "eval_results.json").read_text())["eval_balanced_accuracy"]
        assert math.isclose(result.summaries[method]["balanced"]["balanced_accuracy"], trained)
        assert set(result.summaries[method]["shift_accuracy"]) == {"none", "oracle"}
    assert json.loads((run / "config.json").read_text())["loss"] == "lade"
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["complete"] and list(saved["methods"]) == ["bs", "lade"]
    assert saved["train_counts"] == [24, 12, 6, 3]
    assert Image.open(tmp_path / "comparison.png").format == "PNG"

    def no_training(*args, **kwargs):
        raise AssertionError("a finished method was trained again")

    monkeypatch.setattr(training, "train", no_training)
    again = compare.compare(base, ["bs", "lade"], tmp_path, shifts=SHIFTS, priors="none,oracle")
    assert again.summaries == result.summaries
    # A cached report cut short (it was a JSONDecodeError traceback): evaluated again, listed as a report.
    report = tmp_path / "bs" / compare.EVAL_DIR / "report.json"
    report.write_bytes(report.read_bytes()[:100])
    again = compare.compare(base, ["bs", "lade"], tmp_path, shifts=SHIFTS, priors="none,oracle")
    assert again.summaries == result.summaries
    from balpoe_hf.run_folder import written_by_package

    assert written_by_package(tmp_path / "bs", "eval/report.json", report=True)
    # A finished run with other settings is refused rather than mixed in.
    with pytest.raises(TrainingError, match=r"holds a run with other settings.*epochs"):
        compare.compare(_base(tiny_data, epochs=2), ["bs"], tmp_path, shifts=SHIFTS)


def test_compare_resumes_an_unfinished_method_and_shares_identical_training(tiny_data, tmp_path, capsys):
    base = _base(tiny_data, epochs=2, holdout_fraction=0.25)
    # A run cut short by its deadline: one epoch checkpoint, no model yet.
    cut = training.train(compare.method_recipe(base, "ce"), tmp_path / "ce", deadline=time.time())
    assert not cut.finished and cut.train_results["epochs_done"] == 1
    assert not (tmp_path / "ce" / "config.json").exists()
    result = compare.compare(base, ["ce-la", "ce"], tmp_path, shifts=SHIFTS, priors="none")
    assert "resumed from" in capsys.readouterr().out
    assert list(result.summaries) == ["ce-la", "ce"]
    assert json.loads((tmp_path / "ce" / "train_results.json").read_text())["epochs"] == 2
    # ce-la is ce's weights with the logit-adjusted prediction, not a second training.
    assert result.summaries["ce-la"]["weights_from"] == str(tmp_path / "ce")
    ce, ce_la = (load_file(tmp_path / m / "model.safetensors") for m in ("ce", "ce-la"))
    assert ce.keys() == ce_la.keys() and all(torch.equal(ce[k], ce_la[k]) for k in ce)
    configs = {m: json.loads((tmp_path / m / "config.json").read_text()) for m in ("ce", "ce-la")}
    assert (configs["ce"]["remove_mean_lambda"], configs["ce-la"]["remove_mean_lambda"]) == (False, True)
    assert configs["ce-la"]["method"] == "ce-la"
    # The held-out calibration is fitted again for ce-la's logits z - log pi (same held-out images), not
    # copied from ce; that the plain fit then only moves the biases is test_bcts_absorbs_a_logit_shift.
    fitted = {m: configs[m]["calibration"] for m in ("ce", "ce-la")}
    assert fitted["ce-la"]["holdout_counts"] == fitted["ce"]["holdout_counts"]
    assert fitted["ce-la"]["bias"] != fitted["ce"]["bias"]
    assert result.summaries["ce-la"]["train_runtime"] == result.summaries["ce"]["train_runtime"]
    # The derived run is the package's own: every file it holds is in its manifest, unchanged.
    from balpoe_hf.run_folder import run_output_files, written_by_package

    derived = [name for name in run_output_files() if (tmp_path / "ce-la" / name).is_file()]
    assert "eval_results.json" in derived and all(written_by_package(tmp_path / "ce-la", n) for n in derived)


def test_ctrl_c_ends_compare_with_one_line(tiny_data, capsys, monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", interrupted)
    train, test = (str(p) for p in tiny_data)
    assert cli.compare_main(["--train-file", train, "--test-file", test, "--image-column", "picture",
                             "--label-column", "target", "--imbalance-ratio", "4", "--holdout-fraction", "0",
                             "--methods", "bs", "--output-dir",
                             str(tmp_path / "compare")]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "interrupted; the finished methods and every run's checkpoints are kept: rerun the same command to "
        "continue.")
    assert not (tmp_path / "compare" / ".balpoe.lock").exists()


def test_bcts_absorbs_a_logit_shift():
    """The maximum-likelihood fit of softmax(z / T + b) on z - log pi reaches the same likelihood with the
    same T and b + log(pi) / T (softmax ignores a constant): why ce-la's calibration is fitted afresh."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(torch.tensor([40, 20, 10, 5]))
    logits = torch.randn(len(labels), 4, generator=generator) * 2 + 3 * torch.nn.functional.one_hot(labels, 4)
    counts = torch.tensor([40.0, 20, 10, 5])
    log_pi = torch.log(counts / counts.sum())
    plain, adjusted = (holdout_calibration(z, labels, bias_std=None) for z in (logits, logits - log_pi))
    assert math.isclose(adjusted["temperature"], plain["temperature"], rel_tol=1e-3)
    shift = (torch.tensor(adjusted["bias"]) - torch.tensor(plain["bias"])
             - log_pi.double() / plain["temperature"])
    assert float(shift.max() - shift.min()) < 1e-2


def test_deadline_in_the_past_leaves_every_method_pending(tiny_data, tmp_path):
    result = compare.compare(_base(tiny_data), ["bs"], tmp_path, shifts=SHIFTS, deadline=time.time())
    assert result.pending == ["bs"] and not result.summaries and not result.complete
    assert not (tmp_path / "bs").exists()


def test_balanced_validation_report_by_hand():
    # Class 0 has 3 held-out images, class 1 one: weights 1/6, 1/6, 1/6 and 1/2.
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.6, 0.4]], dtype=torch.float64)
    report = compare.balanced_validation_report(probs.log(), [0, 0, 0, 1], num_classes=2)
    assert math.isclose(report["balanced_accuracy"], (2 / 3 + 0) / 2)
    # One image per occupied bin except 0.9 (two): |1/3 (1 - 0.9)| + |1/6 (0 - 0.7)| + |1/2 (0 - 0.6)|.
    assert math.isclose(report["ece"], 1 / 30 + 0.7 / 6 + 0.3)
    nll = -(2 / 6 * math.log(0.9) + 1 / 6 * math.log(0.3) + 1 / 2 * math.log(0.4))
    assert math.isclose(report["nll"], nll)


def test_balanced_validation_report_of_a_balanced_split_is_the_plain_one():
    from balpoe_hf.metrics import calibration_report

    logits = torch.randn(15, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    labels = [0, 1, 2] * 5
    report = compare.balanced_validation_report(logits, labels, num_classes=3)
    plain = calibration_report(logits, torch.tensor(labels))
    assert math.isclose(report["ece"], plain["ece"]) and math.isclose(report["nll"], plain["nll"])


# --------------------------------------------------------------------------- output


def _summary(balanced: float, ece: float, weights_from: str | None = None) -> dict:
    return {"balanced": {"balanced_accuracy": balanced, "many": 0.9, "medium": 0.5, "few": None, "ece": ece,
                         "mce": 0.25, "nll": 1.23456},
            "train_runtime": 90.0, "weights_from": weights_from,
            "shift_accuracy": {"none": {"forward2": 0.5, "uniform": 0.25},
                               "oracle": {"forward2": 0.625, "uniform": 0.25}}}


def test_tables():
    summaries = {"ce": _summary(0.5, 0.125), "ce-la": _summary(0.75, 0.0625, weights_from="runs/x/ce")}
    table = tables.format_method_table(summaries, paper=budgets.PAPER_CIFAR10_LT_IR100).splitlines()
    assert table[2] == "| ce | 50.00 | 90.00 | 50.00 | n/a | 12.50 | 25.00 | 1.235 | 1.5 min | 71.3 | 19.1 |"
    assert table[3] == ("| ce-la | 75.00 | 90.00 | 50.00 | n/a | 6.25 | 25.00 | 1.235 | (weights of ce) "
                        "| - | - |")
    rows = tables.format_shift_rows(summaries).splitlines()
    assert rows[0] == "| method | prior | forward2 | uniform |"
    assert rows[2:4] == ["| ce | none | 50.0 | 25.0 |", "| ce | oracle | 62.5 | 25.0 |"]


def test_method_comparison_plot(tmp_path):
    bins = {"lower": [0.0, 0.5], "upper": [0.5, 1.0], "count": [2, 6], "confidence": [0.4, 0.8],
            "accuracy": [0.5, 0.5]}
    entries = {"a": {"reliability": bins, "per_class_accuracy": [1.0, 0.5, None]},
               "b": {"reliability": bins, "per_class_accuracy": [0.5, 0.5, 0.0]}}
    path = plots.method_comparison_plot(entries, [100, 10, 1], tmp_path / "cmp.png", many=50, few=5)
    image = Image.open(path)
    assert image.format == "PNG" and image.width > image.height
    with pytest.raises(ValueError, match="one of each per class"):
        plots.method_comparison_plot(entries, [100, 10], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="no method"):
        plots.method_comparison_plot({}, [1], tmp_path / "none.png")


def test_card_names_the_method(tmp_path):
    config = {"model_type": "balpoe", "backbone": "resnet20_cifar", "num_experts": 1, "lambdas": [0.0],
              "class_counts": [50, 5], "method": "bs", "image_size": 32}
    card = hub.render_model_card(config, images={"class_counts": "images/class_counts.png"})
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.balpoe["method"] == "bs"
    assert "| Method | `bs` (balanced softmax) |" in loaded.text


def test_shift_caption_names_the_modes_of_the_table():
    summaries = {"bs": {"shift_accuracy": {"none": {}, "oracle": {}, "auto": {}}},
                 "ce": {"shift_accuracy": {"none": {}, "oracle": {}, "em": {}}}}
    assert tables.prior_caption(summaries) == (
        "none = uniform target, oracle = the shifted set's true prior, auto = estimated from its unlabeled "
        "images by the default estimator, em = estimated from its unlabeled images by EM on the raw "
        "posteriors")
