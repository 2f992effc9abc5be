"""balpoe_hf.training.loop and scripts/train.py: seeds, schedules, the launch checks, the stops and the early
checks of a run, and the script's error exits.

In-process and fast; recipes are in test_recipes.py, data in test_loading.py and test_transforms.py, resume
in test_checkpoints.py, and the end-to-end runs through ``accelerate launch`` in test_train_e2e.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import metrics_from_scratch, tiny_recipe
from train_synthetic import CLASS_NAMES, TEST_PER_CLASS, TRAIN_COUNTS

from balpoe_hf import BalPoEForImageClassification, cli, recipes
from balpoe_hf.errors import EvaluationError, TrainingError
from balpoe_hf.evaluation.fit import run_fit
from balpoe_hf.training import checkpoints, non_finite
from balpoe_hf.training import loop as training

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_script():
    spec = importlib.util.spec_from_file_location("train_script", REPO / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- seeds
















def test_the_largest_seed_trains_past_its_first_epoch(tiny_data, tmp_path):
    # seed + epoch passed 2**32 in epoch 2 (numpy's seeds): epoch seeds wrap, the same below that.
    assert training.epoch_global_seed(7, 3) == 10
    # Below 2**32 also with accelerate's process index added.
    assert 0 <= training.epoch_global_seed(2**32 - 1, 1) + 2**16 - 1 < 2**32
    recipe = tiny_recipe(tiny_data, seed=2**32 - 1, epochs=2, batch_size=16, num_workers=0, eval_every=0,
                    warmup_epochs=0)
    assert training.train(recipe, tmp_path / "run").train_results["epochs"] == 2




















# --------------------------------------------------------------------------- schedule, runs, launch


def test_learning_rate_schedules():
    multistep = training.lr_lambda(recipes.make_recipe({"warmup_epochs": 2, "lr_milestones": [3, 4],
                                                         "lr_gamma": 0.1, "epochs": 5}), steps_per_epoch=10)
    assert [multistep(s) for s in (0, 9, 19)] == [0.05, 0.5, 1.0]  # linear warm-up over 20 steps
    assert [multistep(s) for s in (20, 29, 30, 39, 40, 49)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cosine = training.lr_lambda(recipes.make_recipe({"warmup_epochs": 0, "lr_schedule": "cosine",
                                                      "epochs": 4}), steps_per_epoch=25)
    assert [cosine(s) for s in (0, 50, 100)] == pytest.approx([1.0, 0.5, 0.0])
    assert cosine(25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))






@pytest.mark.parametrize("env,processes,fails", [
    ({}, 1, False),
    ({"WORLD_SIZE": "2"}, 2, False),
    ({"WORLD_SIZE": "2"}, 1, True),
    # accelerate's single-process launcher asked for --num_processes 2 (it exports MASTER_ADDR, not RANK).
    ({"ACCELERATE_MIXED_PRECISION": "no", "MASTER_ADDR": "127.0.0.1"}, 1, True),
    ({"ACCELERATE_MIXED_PRECISION": "no"}, 1, False),
])
def test_world_size_check(monkeypatch, env, processes, fails):
    for key in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if fails:
        with pytest.raises(TrainingError, match="ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu"):
            training.check_world_size(processes)
    else:
        training.check_world_size(processes)


# --------------------------------------------------------------------------- the script's error exits


@pytest.fixture
def fresh_accelerator_state():
    """accelerate's process-wide state, reset before and after: its mixed precision is fixed once set."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_fp16_on_the_cpu_is_refused_before_training(tiny_data, tmp_path, fresh_accelerator_state):
    # accelerate would train in fp32 and report fp16.
    with pytest.raises(TrainingError, match=r"mixed precision fp16 needs a GPU: on the CPU accelerate trains "
                                            r"in fp32\. Use --mixed-precision bf16"):
        training.train(tiny_recipe(tiny_data, mixed_precision="fp16"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra,message", [
    (["--recipe", "no-such-recipe"], "unknown recipe 'no-such-recipe'; the known recipes are: cifar10-lt"),
    (["--image-column", "img"], "the train split has no image column 'img'"),
    (["--num-classes", "3"], "outside the class range [0, 2]"),
    (["--backbone", "efficientnet_b0"], "cannot build the model"),
    (["--backbone", "no_such_net"], "'no_such_net' is not a timm model name"),
])
def test_script_errors_exit_non_zero_with_a_message(train_script, tiny_data, tmp_path, capsys, extra,
                                                    message):
    train, test = tiny_data
    argv = ["--train-file", str(train), "--test-file", str(test), "--image-column", "picture",
            "--label-column", "target", "--image-size", "16", "--output-dir", str(tmp_path / "run"), *extra]
    assert train_script.main(argv) == 2
    assert message in capsys.readouterr().err


def test_script_refuses_a_non_empty_output_directory(train_script, tiny_data, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    argv = ["--recipe", "fashion-mnist-lt-quick", "--output-dir", str(tmp_path / "run")]
    assert train_script.main(argv) == 2
    assert "is not empty. Pass --resume" in capsys.readouterr().err
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_push_to_hub_needs_an_id_and_the_network(train_script, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    argv = ["--recipe", "fashion-mnist-lt-quick", "--output-dir", str(tmp_path / "run"), "--push-to-hub"]
    assert train_script.main(argv) == 2
    assert "--push-to-hub needs --hub-model-id" in capsys.readouterr().err
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert train_script.main([*argv, "--hub-model-id", "me/x"]) == 2  # before any training
    assert "--push-to-hub needs the network, but offline mode is on" in capsys.readouterr().err




# --------------------------------------------------------------------------- a finished run


def test_single_process_run_writes_model_results_and_logs(tiny_run, tiny_run_output):
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "recipe.yaml",
                 "train_results.json", "eval_results.json"):
        assert (tiny_run / name).is_file(), name
    train_results = json.loads((tiny_run / "train_results.json").read_text())
    eval_results = json.loads((tiny_run / "eval_results.json").read_text())
    assert train_results["class_counts"] == TRAIN_COUNTS
    assert train_results["train_samples"] == sum(TRAIN_COUNTS)
    assert eval_results["eval_samples"] == TEST_PER_CLASS * len(CLASS_NAMES)
    assert [h["epoch"] for h in train_results["eval_history"]] == [1, 2, 3]  # eval_every 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((tiny_run / "logs").rglob("events.out.tfevents.*"))
    tags = {tag for path in events for tag in EventAccumulator(str(path)).Reload().Tags()["scalars"]}
    # Each expert's loss at every logging step and per epoch, beside the ensemble's.
    assert {f"train/{kind}loss_expert_{e}" for kind in ("", "epoch_") for e in range(3)} <= tags
    assert {"train/loss", "train/epoch_loss", "eval/balanced_accuracy"} <= tags
    assert "images/s" in tiny_run_output and "balanced accuracy" in tiny_run_output
    # No held-out split: the run says what `auto` rests on and how to calibrate it.
    assert "'auto' adapts from the raw posteriors" in tiny_run_output
    assert "train with --holdout-fraction 0.1 for a calibrated estimate" in tiny_run_output
    assert "data pipeline: device (auto: 92 images at 16x16" in tiny_run_output
    assert train_results["data_pipeline"] == "device" and len(train_results["epoch_images_per_second"]) == 3


def test_the_learning_rate_printed_and_logged_is_the_one_each_step_trained_with(tiny_run, tiny_run_output):
    # The tiny run: cosine from 0.05 to 0 over 3 epochs of 60 // 8 = 7 batches (the last partial one dropped),
    # no warm-up: optimizer step k (0-based) trains with 0.05 * (1 + cos(pi * k / 21)) / 2.
    steps_per_epoch = sum(TRAIN_COUNTS) // 8
    total = 3 * steps_per_epoch

    def rate(step: int) -> float:
        return 0.05 * 0.5 * (1 + math.cos(math.pi * step / total))

    # An epoch's line gives the rate of its last step (0.00028 for the third: not the 0 of the step after it).
    printed = [float(lr) for lr in re.findall(r"^epoch \d/3: .*, lr ([0-9.]+), ", tiny_run_output, re.M)]
    assert printed == pytest.approx([rate(epoch * steps_per_epoch - 1) for epoch in (1, 2, 3)], abs=5e-6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # TensorBoard's train/lr at step n (steps counted from 1, logged every step) is step n's rate.
    accumulators = [EventAccumulator(str(path)).Reload() for path in (tiny_run / "logs").rglob("events.*")]
    logged = {event.step: event.value for events in accumulators if "train/lr" in events.Tags()["scalars"]
              for event in events.Scalars("train/lr")}
    steps = range(1, total + 1)
    assert sorted(logged) == list(steps)
    assert [logged[n] for n in steps] == pytest.approx([rate(n - 1) for n in steps], rel=1e-6)


def test_saved_model_loads_with_auto_classes_and_reproduces_the_reported_metrics(tiny_run, tiny_data):
    reference = metrics_from_scratch(tiny_run, tiny_data[1])
    eval_results = json.loads((tiny_run / "eval_results.json").read_text())
    assert reference["config"].class_counts == TRAIN_COUNTS  # the long-tailed split's counts are the prior
    assert reference["config"].lambdas == [1.0, 0.0, -1.0]
    assert eval_results["eval_accuracy"] == pytest.approx(reference["accuracy"], abs=1e-9)
    assert eval_results["eval_balanced_accuracy"] == pytest.approx(reference["balanced_accuracy"], abs=1e-9)
    # A colour per class is easy: the run learns it (chance is 0.25).
    assert eval_results["eval_balanced_accuracy"] >= 0.75


def test_training_fit_counts_both_splits_as_a_from_scratch_pass(tiny_run, tiny_data, capsys, monkeypatch):
    fit = run_fit(tiny_run)
    assert fit["lambdas"] == [1.0, 0.0, -1.0]
    for split, path, images in (("train", tiny_data[0], sum(TRAIN_COUNTS)),
                                ("test", tiny_data[1], TEST_PER_CLASS * len(CLASS_NAMES))):
        reference = metrics_from_scratch(tiny_run, path)
        assert fit[split]["images"] == images
        for key in ("accuracy", "balanced_accuracy", "mean_confidence"):
            assert fit[split][key] == pytest.approx(reference[key], abs=1e-6), (split, key)
        assert len(fit[split]["experts_balanced_accuracy"]) == 3
    monkeypatch.setattr("sys.argv", ["training_fit.py", str(tiny_run)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / "scripts" / "training_fit.py"), run_name="__main__")
    assert done.value.code == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == ("| split | images | balanced acc. | accuracy | mean confidence | ECE | NLL | "
                        "lambda 1 | lambda 0 | lambda -1 |")
    train_row = table[2].split(" | ")
    assert train_row[:2] == ["| train", "60"] and float(train_row[2]) == pytest.approx(
        100 * fit["train"]["balanced_accuracy"], abs=0.005)
    assert table[3].startswith(f"| test | {TEST_PER_CLASS * len(CLASS_NAMES)} | ") and len(table) == 4
    with pytest.raises(EvaluationError, match=r"holds no recipe\.yaml: give the folder of a training run"):
        run_fit(tiny_run / "checkpoints")
    # The script says the same in one line and exits 2 (bad input), without a traceback.
    monkeypatch.setattr("sys.argv", ["training_fit.py", str(tiny_run / "checkpoints")])
    with pytest.raises(SystemExit) as refused:
        runpy.run_path(str(REPO / "scripts" / "training_fit.py"), run_name="__main__")
    assert refused.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {tiny_run / 'checkpoints'} holds no recipe.yaml")


# --------------------------------------------------------------------------- stops and early checks


def test_non_finite_loss_guard_keeps_the_first_bad_batch():
    guard = non_finite.NonFiniteLossGuard(torch.device("cpu"))
    seen = [guard.update(torch.tensor(value), batch) for batch, value in
            enumerate([1.0, 2.0, float("inf"), 1.0, float("nan")])]
    assert seen == [False, False, True, True, True]
    assert guard.first_bad() == 2


def test_training_stops_at_the_first_non_finite_loss(tiny_data, tmp_path, monkeypatch):
    forward, calls = BalPoEForImageClassification.forward, []

    def diverging(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # the third batch of the first epoch
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(BalPoEForImageClassification, "forward", diverging)
    with pytest.raises(TrainingError) as error:
        training.train(tiny_recipe(tiny_data, lr=0.2), tmp_path / "run")
    lr = 0.2 * 0.5 * (1 + math.cos(math.pi * 2 / 21))  # cosine over 3 x 7 steps, at the third (step 2)
    assert str(error.value).startswith(
        f"the training loss is not finite (NaN or inf) at epoch 1, batch 3 (optimizer step 3, lr {lr:.4g}); "
        "training stopped there and no checkpoint was saved.")
    assert "lower --lr, set --max-grad-norm" in str(error.value)
    assert len(calls) == 3  # stopped at once, not at the end of the epoch
    assert checkpoints.completed_checkpoints(tmp_path / "run") == []


@pytest.mark.usefixtures("data_load_refused")
def test_backbone_kwargs_the_backbone_refuses_stop_before_the_data_load(tiny_data, tmp_path, capsys):
    argv = ["--train-file", str(tiny_data[0]), "--test-file", str(tiny_data[1]), "--image-column", "picture",
            "--label-column", "target", "--backbone", "resnet20_cifar", "--output-dir", str(tmp_path / "run")]
    for kwargs, message in [('{"foo": 1}', "unexpected keyword argument 'foo'"),
                            ('{"depth": 56}', "multiple values for keyword argument 'depth'")]:
        assert cli.train_main([*argv, "--backbone-kwargs", kwargs]) == 2
        err = capsys.readouterr().err
        assert "cannot build the backbone resnet20_cifar with backbone_kwargs" in err and message in err
        assert "takes and does not set itself (--backbone-kwargs), or none." in err
    assert cli.train_main([*argv, "--backbone-kwargs", '{"in_chans": 1}']) == 2
    assert "backbone_kwargs sets in_chans=1, but training feeds RGB images" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_pretrained_backbone_offline_is_explained(tiny_data, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    recipe = tiny_recipe(tiny_data, backbone="resnet18", backbone_pretrained=True)
    stub = SimpleNamespace(class_counts=TRAIN_COUNTS, class_names=CLASS_NAMES)
    with pytest.raises(TrainingError, match=r"cannot build the model: could not load pretrained timm"):
        training.build_model(recipe, stub)
