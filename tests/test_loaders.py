"""Fast training: the choice of data pipeline, the device loaders of a run (sharding, evaluation, resume),
and the step-level speed options (channels_last, compile, fused SGD).

The device pipeline's augmentation itself is compared with torchvision's PIL pipeline in
tests/test_device_data.py; the real multi-process launch is in tests/test_train_e2e.py. CPU only; a real
inductor compilation takes over a minute here and runs only with RUN_SLOW=1.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from helpers import assert_same_weights, tiny_recipe
from train_synthetic import CLASS_NAMES, TEST_PER_CLASS, TRAIN_COUNTS

from balpoe_hf import recipes, run_folder
from balpoe_hf.cli.arguments import parse_args
from balpoe_hf.data.device_data import DeviceLoader
from balpoe_hf.data.loaders import (
    DEVICE_DATA_LIMIT_BYTES,
    build_loaders,
    choose_pipeline,
    device_loaders,
)
from balpoe_hf.data.loading import load_training_data
from balpoe_hf.data.transforms import build_processor
from balpoe_hf.errors import TrainingError
from balpoe_hf.models.balpoe.configuration_balpoe import BalPoEConfig
from balpoe_hf.models.balpoe.modeling_balpoe import BalPoEForImageClassification
from balpoe_hf.recipes import make_recipe
from balpoe_hf.training import checkpoints, speed
from balpoe_hf.training import loop as training
from balpoe_hf.training.loop import train

NUM_TRAIN, NUM_TEST = sum(TRAIN_COUNTS), TEST_PER_CLASS * len(CLASS_NAMES)  # 60, 32


pytestmark = pytest.mark.usefixtures("one_thread")


# The tiny recipe (tests/helpers.py) for one epoch at a constant lr, with rotation, and an evaluation batch
# that does not divide the 32 test images.
LOADER_SETTINGS = {"epochs": 1, "lr": 0.02, "lr_schedule": "constant", "rotation": 10.0, "eval_batch_size": 5}


def loader_recipe(data, **overrides):
    return tiny_recipe(data, **{**LOADER_SETTINGS, **overrides})


# --------------------------------------------------------------------------- choosing the pipeline


def test_auto_keeps_in_memory_data_on_the_device():
    recipe = make_recipe({"dataset": "x"})  # CIFAR defaults: 'cifar' augmentation, crop_pct 1, 32x32
    choice = choose_pipeline(recipe, 12_406, 10_000)  # CIFAR-10-LT IR100 and its test set
    assert choice.name == "device"
    # 22,406 images x (3 x 32 x 32 bytes + an 8-byte label) = 69,010,480 bytes.
    assert choice.reason == "auto: 22,406 images at 32x32 take 0.07 GB as uint8"
    assert DEVICE_DATA_LIMIT_BYTES == 4 * 2**30


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"augment": "imagenet"}, "auto: no device version (the 'imagenet' augmentation"),
    ({"crop_pct": 0.875}, "auto: no device version (evaluation with crop_pct 0.875 < 1"),
    ({"auto_augment": "cifar10", "cutout": 16},
     "auto: no device version (the augmentation policies auto_augment=cifar10, cutout=16 have none)"),
])
def test_auto_falls_back_to_workers_without_a_device_version(overrides, reason):
    choice = choose_pipeline(make_recipe({"dataset": "x", **overrides}), 1000, 1000)
    assert choice.name == "workers" and choice.reason.startswith(reason)


def test_auto_falls_back_to_workers_over_the_memory_limit():
    recipe = make_recipe({"dataset": "x", "image_size": 224})
    # ImageNet-LT's 115,846 + 50,000 images at 224x224: 165,846 x 150,536 bytes = 24,965,793,456 bytes.
    choice = choose_pipeline(recipe, 115_846, 50_000)
    assert choice.name == "workers"
    assert ("165,846 images at 224x224 take 24.97 GB as uint8, over the device pipeline's limit of 4 GiB"
            in choice.reason)
    # Forcing the device pipeline ignores the limit; a smaller limit applies to auto.
    assert choose_pipeline(make_recipe({"dataset": "x", "image_size": 224, "data_pipeline": "device"}),
                           115_846, 50_000).name == "device"
    assert choose_pipeline(make_recipe({"dataset": "x"}), 100, 100, limit_bytes=200 * 3080).name == "device"
    assert choose_pipeline(make_recipe({"dataset": "x"}), 100, 101, limit_bytes=200 * 3080).name == "workers"


def test_forced_pipelines():
    def choose(**overrides):
        return choose_pipeline(make_recipe({"dataset": "x", **overrides}), 10, 10)

    assert choose(data_pipeline="workers").name == "workers"
    with pytest.raises(TrainingError, match=r"--data-pipeline device cannot run this recipe: the 'imagenet' "
                                            r"augmentation .* Use --data-pipeline workers"):
        choose(augment="imagenet", data_pipeline="device")
    with pytest.raises(TrainingError, match=r"crop_pct 0\.9 < 1"):
        choose(crop_pct=0.9, data_pipeline="device")
    with pytest.raises(TrainingError, match=r"rand_augment=rand-m9-n2 have none"):
        choose(rand_augment="rand-m9-n2", data_pipeline="device")


def test_command_line_flags_of_the_speed_options():
    _, recipe = parse_args(["--dataset", "x", "--data-pipeline", "workers", "--channels-last", "--compile",
                            "--compile-mode", "reduce-overhead", "--no-fused-optimizer"])
    assert (recipe.data_pipeline, recipe.channels_last, recipe.compile, recipe.compile_mode,
            recipe.fused_optimizer) == ("workers", True, True, "reduce-overhead", False)
    _, recipe = parse_args(["--dataset", "x"])
    assert (recipe.data_pipeline, recipe.channels_last, recipe.compile, recipe.fused_optimizer) == (
        "auto", False, False, True)
    with pytest.raises(TrainingError, match=r"data_pipeline must be one of \['auto', 'device', 'workers'\]"):
        make_recipe({"dataset": "x", "data_pipeline": "gpu"})


def test_the_cifar_and_fashion_mnist_recipes_train_channels_last_and_a_flag_turns_it_off():
    # The small ResNets were measured faster in NHWC on the CPU; the ImageNet-LT and iNaturalist recipes were
    # not, and keep the default layout.
    shipped = {name: recipes.load_recipe(name).channels_last for name in recipes.available_recipes()}
    assert {name for name, on in shipped.items() if on} == {
        name for name in shipped if name.startswith(("cifar10-lt-", "cifar100-lt-", "fashion-mnist-lt-"))}
    _, recipe = parse_args(["--recipe", "cifar10-lt-local", "--channels-last", "False"])
    assert recipe.channels_last is False


# --------------------------------------------------------------------------- the device loaders of a run


def test_two_processes_draw_disjoint_halves_of_the_one_process_batches(tiny_data):
    recipe = loader_recipe(tiny_data)
    data = load_training_data(recipe)
    one, _ = device_loaders(make_recipe({**recipe.to_dict(), "batch_size": 8}), data, device="cpu")
    halves = [device_loaders(make_recipe({**recipe.to_dict(), "batch_size": 4}), data, device="cpu",
                             num_processes=2, process_index=p)[0] for p in (0, 1)]
    for epoch in (0, 3):
        for loader in (one, *halves):
            loader.set_epoch(epoch)
        assert len(one) == len(halves[0]) == len(halves[1]) == NUM_TRAIN // 8
        for whole, first, second in zip(one, *halves, strict=True):
            # Each step's global batch is the one-process batch: process 0 its first half, process 1 the rest
            # (the same images with the same augmentation), so the two draw disjoint parts of the epoch.
            torch.testing.assert_close(torch.cat([first["pixel_values"], second["pixel_values"]]),
                                       whole["pixel_values"], rtol=0, atol=0)
            assert torch.equal(torch.cat([first["labels"], second["labels"]]), whole["labels"])


def test_device_evaluation_over_two_processes_matches_the_saved_processor(tiny_data):
    recipe = loader_recipe(tiny_data)
    data = load_training_data(recipe)
    shards = [device_loaders(recipe, data, device="cpu", num_processes=2, process_index=p)[1] for p in (0, 1)]
    # 32 test images in batches of 5 over 2 processes: 4 rounds of 10, the last completed with 8 repeats.
    rounds = [torch.cat([a["pixel_values"], b["pixel_values"]]) for a, b in zip(*shards, strict=True)]
    gathered = torch.cat(rounds)  # what accelerator.gather returns, round by round
    assert len(gathered) == 40 and shards[0].num_padded == 8
    processor = build_processor(recipe)
    expected = processor(images=[image.convert("RGB") for image in data.test["picture"]],
                         return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(gathered[:NUM_TEST], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(gathered[NUM_TEST:], expected[:8], rtol=0, atol=1e-6)


def test_build_loaders_follows_the_recipe_and_reseeds_each_epoch(tiny_data):
    accelerator = Accelerator(cpu=True)
    processor = build_processor(loader_recipe(tiny_data))
    for pipeline, kind in (("device", DeviceLoader), ("workers", torch.utils.data.DataLoader)):
        recipe = loader_recipe(tiny_data, data_pipeline=pipeline, channels_last=True)
        loaders = build_loaders(recipe, load_training_data(recipe), processor, accelerator)
        assert loaders.pipeline.name == pipeline and isinstance(loaders.train, kind)

        def labels(epoch, loaders=loaders):
            loaders.set_epoch(epoch)
            return torch.cat([batch["labels"] for batch in loaders.train]).tolist()

        assert labels(2) == labels(2) != labels(3)
        if pipeline == "device":
            assert next(iter(loaders.train))["pixel_values"].is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(TrainingError, match="60 training images make no full batch of 64 x 1 processes"):
        recipe = loader_recipe(tiny_data, batch_size=64)
        build_loaders(recipe, load_training_data(recipe), processor, accelerator)


@pytest.mark.parametrize(("pipeline", "channels_last"),
                         [("device", False), ("workers", False), ("device", True)])
def test_training_resumed_inside_an_epoch_ends_with_the_uninterrupted_weights(tiny_data, tmp_path, pipeline,
                                                                              channels_last, capsys):
    # 7 batches an epoch, a step checkpoint every 3; num_workers=1: the worker pipeline loads in a worker.
    # channels_last: the checkpoint holds the momentum buffers in the default layout (safetensors), the
    # resumed model's weights are NHWC, and fused SGD reads a buffer as laid out like its weight.
    recipe = loader_recipe(tiny_data, epochs=2, data_pipeline=pipeline, num_workers=1, eval_every=1,
                           checkpoint_every_steps=3, checkpoints_total_limit=10, channels_last=channels_last)
    whole = train(recipe, tmp_path / "whole")
    assert whole.train_results["data_pipeline"] == pipeline
    assert len(whole.train_results["epoch_images_per_second"]) == 2
    # The run directory as a kill 2 batches into the second epoch (global step 9) would leave it.
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    for name in ("recipe.yaml", run_folder.MANIFEST):
        shutil.copy(tmp_path / "whole" / name, killed / name)
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "epoch-0001-step-000002",
                    killed / "checkpoints" / "epoch-0001-step-000002")
    capsys.readouterr()
    resumed = train(recipe, killed, resume=True)  # the loader starts at batch 2 of epoch 1
    assert "epoch-0001-step-000002 (epoch 1 of 2, 2 batches into the next)" in capsys.readouterr().out
    assert_same_weights(killed, tmp_path / "whole")
    assert resumed.eval_report == whole.eval_report
    # The evaluation after the first epoch comes back from the checkpoint too.
    assert [h["epoch"] for h in resumed.train_results["eval_history"]] == [1, 2]
    assert resumed.train_results["eval_history"] == whole.train_results["eval_history"]
    # The partial epoch's loss sums (the whole loss and each expert's) come back from the step checkpoint.
    for key in ("train_loss", "train_expert_losses"):
        assert resumed.train_results[key] == whole.train_results[key]
    assert len(resumed.train_results["epoch_images_per_second"]) == 1  # the one epoch run after resuming


# --------------------------------------------------------------------------- step-level speed options


def tiny_model(seed: int = 0) -> BalPoEForImageClassification:
    torch.manual_seed(seed)
    config = BalPoEConfig(backbone="test_resnet", num_experts=2, lambdas=[1.0, -1.0], class_counts=[8, 4, 2],
                          image_size=16)
    return BalPoEForImageClassification(config)


def one_step(model, optimizer, seed: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(4, 3, 16, 16, generator=generator)
    targets = torch.softmax(torch.randn(4, 3, generator=generator), -1)  # soft targets, as with mixup
    loss = model(pixel_values=pixels, labels=targets).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach(), {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_two_steps(channels_last: bool, fused: bool) -> list[tuple[torch.Tensor, dict]]:
    recipe = make_recipe({"dataset": "x", "channels_last": channels_last, "fused_optimizer": fused})
    model = speed.prepare_model(tiny_model(), recipe)
    optimizer = speed.build_optimizer(recipe, model.parameters(), torch.device("cpu"))
    assert optimizer.defaults["fused"] is (True if fused else None)  # None: torch's default foreach update
    assert (optimizer.defaults["nesterov"], optimizer.defaults["weight_decay"]) == (True, 5e-4)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert all(p.is_contiguous(memory_format=layout) for p in model.parameters() if p.ndim == 4)
    return [one_step(model, optimizer, step) for step in range(2)]


def assert_same_steps(steps: list, expected: list, loss_tol: tuple[float, float],
                      state_tol: tuple[float, float]) -> None:
    """Each step's loss and state agree with ``expected``'s within (rtol, atol)."""
    for (loss, state), (expected_loss, expected_state) in zip(steps, expected, strict=True):
        torch.testing.assert_close(loss, expected_loss, rtol=loss_tol[0], atol=loss_tol[1])
        for name, tensor in expected_state.items():
            torch.testing.assert_close(state[name], tensor, rtol=state_tol[0], atol=state_tol[1], msg=name)


def test_fused_sgd_makes_the_same_update():
    # The same arithmetic in one kernel (bitwise equal on the development machine; vector widths may round
    # the last bit differently elsewhere).
    assert_same_steps(train_two_steps(False, True), train_two_steps(False, False), loss_tol=(1e-6, 1e-7),
                      state_tol=(1e-6, 1e-7))


def test_momentum_loaded_from_a_checkpoint_is_laid_out_as_its_nhwc_weight():
    # A checkpoint's buffers come back contiguous; torch's fused SGD would read one beside an NHWC weight in
    # the weight's element order. The foreach kernel follows each tensor's strides: the expected update.
    def resumed_step(fused: bool) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(4, 3, 3, 3, generator=generator).to(memory_format=torch.channels_last)
        weight.requires_grad_()
        optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9, nesterov=True, fused=fused or None)
        saved = {"state": {0: {"momentum_buffer": torch.randn(4, 3, 3, 3, generator=generator)}},
                 "param_groups": [{**optimizer.state_dict()["param_groups"][0]}]}
        optimizer.load_state_dict(saved)
        checkpoints.match_parameter_layout(optimizer)
        gradient = torch.randn(4, 3, 3, 3, generator=generator)
        weight.grad = gradient.contiguous(memory_format=torch.channels_last)
        optimizer.step()
        return weight.detach()

    torch.testing.assert_close(resumed_step(fused=True), resumed_step(fused=False), rtol=1e-6, atol=1e-7)


def test_channels_last_trains_as_the_default_layout_up_to_rounding():
    # Other convolution kernels sum in another order; with batch norm over 4 images and lr 0.1 the weights
    # move by about 1e-5 after two steps.
    assert_same_steps(train_two_steps(True, True), train_two_steps(False, False), loss_tol=(1e-4, 1e-5),
                      state_tol=(1e-3, 3e-4))
    model = speed.prepare_model(tiny_model(), make_recipe({"dataset": "x", "channels_last": True}))
    assert all(p.is_contiguous() for p in speed.to_contiguous_format(model).parameters())


def test_fused_sgd_only_where_torch_has_a_kernel():
    assert speed.fused_sgd_available(torch.device("cpu")) is True  # torch >= 2.4
    assert speed.fused_sgd_available(torch.device("meta")) is False
    optimizer = speed.build_optimizer(make_recipe({"dataset": "x"}), tiny_model().parameters(),
                                      torch.device("meta"))
    assert optimizer.defaults["fused"] is None  # the default (foreach) update


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file() or platform.machine() != "x86_64",
                    reason="reads the x86 CPU flags Linux lists")
def test_native_bf16_is_what_the_cpu_flags_say():
    # Linux lists the ISA extensions it found by CPUID: AVX-512 BF16 or AMX's bf16 tiles compute bf16.
    flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    assert speed.cpu_has_native_bf16() is bool(flags & {"avx512_bf16", "amx_bf16"})


def test_compiled_model_keeps_parameter_names_and_trains_as_eager():
    eager, compiled = tiny_model(), tiny_model()
    # The "eager" backend traces with dynamo without generating kernels: seconds instead of minutes.
    speed.prepare_model(compiled, make_recipe({"dataset": "x", "compile": True}), backend="eager")
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints resume either way
    recipe = make_recipe({"dataset": "x", "fused_optimizer": False})
    eager_sgd, compiled_sgd = (speed.build_optimizer(recipe, m.parameters(), torch.device("cpu"))
                               for m in (eager, compiled))
    for step in range(2):
        loss, state = one_step(eager, eager_sgd, step)
        compiled_loss, compiled_state = one_step(compiled, compiled_sgd, step)
        torch.testing.assert_close(compiled_loss, loss, rtol=0, atol=0)
        for name, tensor in state.items():
            torch.testing.assert_close(compiled_state[name], tensor, rtol=0, atol=0, msg=name)
    eager.load_state_dict(compiled.state_dict())  # and back


@pytest.mark.skipif(not os.environ.get("RUN_SLOW"), reason="inductor compiles for over a minute on 2 CPU "
                                                           "cores; RUN_SLOW=1 runs it")
def test_inductor_compiled_step_matches_eager():
    eager, compiled = tiny_model(), tiny_model()
    speed.prepare_model(compiled, make_recipe({"dataset": "x", "compile": True, "channels_last": True}))
    recipe = make_recipe({"dataset": "x"})
    eager_sgd, compiled_sgd = (speed.build_optimizer(recipe, m.parameters(), torch.device("cpu"))
                               for m in (eager, compiled))
    start = time.perf_counter()
    for step in range(2):
        loss, state = one_step(eager, eager_sgd, step)
        compiled_loss, compiled_state = one_step(compiled, compiled_sgd, step)
        torch.testing.assert_close(compiled_loss, loss, rtol=1e-4, atol=1e-5)
        for name, tensor in state.items():
            torch.testing.assert_close(compiled_state[name], tensor, rtol=1e-3, atol=1e-4, msg=name)
    print(f"inductor: two compiled steps in {time.perf_counter() - start:.0f} s")


@pytest.mark.parametrize("batch_size,accumulation,steps", [(24, 4, 1), (8, 2, 4)])
def test_device_pipeline_steps_on_the_last_partial_accumulation(tiny_data, tmp_path, capsys, batch_size,
                                                                 accumulation, steps):
    # 60 training images: 2 batches of 24 with 4 accumulation steps, or 7 batches of 8 with 2: one and four
    # optimizer steps (the last accumulation partial), as a hand count and the worker pipeline give.
    recipe = tiny_recipe(tiny_data, epochs=1, batch_size=batch_size, gradient_accumulation_steps=accumulation,
                     data_pipeline="device")
    training.train(recipe, tmp_path / "run")
    assert f"training 1 epochs of {steps} steps" in capsys.readouterr().out
    checkpoint = tmp_path / "run" / "checkpoints" / "epoch-0001"
    # The lr scheduler, saved in every checkpoint, steps once per optimizer step.
    assert checkpoints.read_state(checkpoint, "scheduler")["last_epoch"] == steps
    assert len(checkpoints.read_state(checkpoint, "optimizer")["state"]) > 0  # momentum: it did step
