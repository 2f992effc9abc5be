"""End-to-end runs of scripts/train.py through the real ``accelerate launch``, on a tiny long-tailed dataset.

One process (a run killed with SIGKILL inside an epoch and launched again with --resume, which must end with
the weights of the same run trained in this process) and two CPU (gloo) processes, the saved model loaded
back with the transformers auto classes, and a launch that asks for processes it does not start. The data
fit in memory, so every run takes the default device pipeline (balpoe_hf.data.loaders); tests/test_loaders.py
trains with the worker pipeline. Each launch costs several seconds of start-up, so they start with the test
session, beside the other tests (``background``, tests/processes.py), and the tests read what they left.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from processes import start
from safetensors.torch import load_file
from train_synthetic import TEST_PER_CLASS, TRAIN_COUNTS, write_parquet

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train.py"
ACCELERATE = [str(Path(sys.executable).with_name("accelerate")), "launch"]  # the real CLI
LAUNCH_ONE = [*ACCELERATE, "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1"]
NUM_TEST = TEST_PER_CLASS * len(TRAIN_COUNTS)  # 32, not a multiple of 2 processes x eval batch 5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _data(root: Path, environ: dict[str, str]) -> dict:
    train, test = write_parquet(root / "data")
    env = {**environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(root / "hf_datasets_cache"), "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    args = ["--train-file", str(train), "--test-file", str(test), "--image-column", "picture",
            "--label-column", "target", "--backbone", "resnet20_cifar", "--image-size", "16",
            "--epochs", "6", "--lr", "0.02", "--warmup-epochs", "0", "--lr-schedule", "cosine",
            "--mixup-alpha", "0.2", "--rotation", "0", "--many-threshold", "20", "--few-threshold", "6",
            "--eval-batch-size", "5", "--eval-every", "2", "--logging-steps", "1"]
    return {"root": root, "train": train, "test": test, "env": env, "args": args}


def _killed_and_resumed(data: dict) -> subprocess.CompletedProcess:
    """A launched run killed with SIGKILL right after its first step checkpoint inside the second epoch, and
    launched again with --resume."""
    # Step checkpoints every 2 optimizer steps: 7 batches an epoch, so the second epoch's first one is
    # epoch-0001-step-000001 and the resume starts inside an epoch (the device pipeline's
    # DeviceLoader.batches(start); tests/test_loaders.py resumes both pipelines in-process).
    out = data["root"] / "single"
    command = [*LAUNCH_ONE, str(SCRIPT), *data["args"], "--batch-size", "8", "--output-dir", str(out),
               "--checkpoint-every-steps", "2", "--report-to", "tensorboard"]
    killed = start(command, data["env"], REPO, data["root"] / "killed-launch")
    step = out / "checkpoints" / "epoch-0001-step-000001" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not step.is_file() and killed.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert killed.process.poll() is None, "the run ended before it was killed"
    killed.kill()
    assert step.is_file(), "the run never wrote its step checkpoint"
    assert not (out / "model.safetensors").exists(), "the run finished before it was killed"
    return start([*command, "--resume"], data["env"], REPO, data["root"] / "resumed-launch").finish()


def _interrupted(data: dict) -> subprocess.CompletedProcess:
    """scripts/train.py (balpoe-train) stopped with Ctrl-C, SIGINT to its process group as a terminal sends
    it, once its first epoch checkpoint is on disk."""
    out = data["root"] / "interrupted"
    run = start([sys.executable, str(SCRIPT), *data["args"], "--batch-size", "8", "--output-dir", str(out)],
                data["env"], REPO, data["root"] / "interrupted-run")
    checkpoint = out / "checkpoints" / "epoch-0001" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not checkpoint.is_file() and run.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(run.process.pid, signal.SIGINT)
    return run.finish(check=False)


def background(root: Path, environ: dict[str, str]) -> dict:
    """The launches, started with the session (tests/processes.py): a two-process run and a launch that asks
    for processes it does not start, and meanwhile the single-process run killed and resumed, then a run
    stopped with Ctrl-C."""
    data = _data(root, environ)
    # Half the per-process batch: the same global batch of 8 as the single-process run.
    two = start([*ACCELERATE, "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                 str(_free_port()), str(SCRIPT), *data["args"], "--batch-size", "4", "--output-dir",
                 str(root / "two")], {**data["env"], "ACCELERATE_USE_CPU": "1"}, REPO, root / "two-launch")
    # `accelerate launch --cpu --num_processes 2` starts a single process: the script must say so and stop.
    # With --quiet the launcher adds no traceback of its own (balpoe-train --help says so).
    wrong = start([*ACCELERATE, "--quiet", "--cpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), *data["args"],
                   "--output-dir", str(root / "wrong-launch")], data["env"], REPO, root / "wrong")
    try:
        single = _killed_and_resumed(data)
    except AssertionError as error:  # for the tests of the single-process run; the others go on
        single = error
    return {"data": data, "single": single, "two": two.finish(check=False),
            "wrong": wrong.finish(check=False), "interrupted": _interrupted(data)}


@pytest.fixture(scope="module")
def data(background) -> dict:
    return background["data"]


@pytest.fixture(scope="module")
def reference(data) -> Path:
    """The run in this process (the Python API, one thread as the launches): what every launch must match."""
    from balpoe_hf.cli.arguments import parse_args
    from balpoe_hf.training.loop import train

    _, recipe = parse_args([*data["args"], "--batch-size", "8"])
    out = data["root"] / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(recipe, out)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def single_run(background) -> dict:
    """The launched run killed inside an epoch and resumed: the run every single-process test reads."""
    if isinstance(background["single"], BaseException):
        raise background["single"]
    result = background["single"]
    return {"dir": background["data"]["root"] / "single", "stdout": result.stdout, "stderr": result.stderr}


@pytest.fixture(scope="module")
def two_process_run(background) -> dict:
    result = background["two"]
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    return {"dir": background["data"]["root"] / "two", "stdout": result.stdout, "stderr": result.stderr}


def _results(run_dir: Path) -> tuple[dict, dict]:
    return (json.loads((run_dir / "train_results.json").read_text()),
            json.loads((run_dir / "eval_results.json").read_text()))


def _reference_metrics(run_dir: Path, test_file: Path) -> dict:
    """Accuracy and balanced accuracy of the saved model on the test set, computed here from scratch."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    import balpoe_hf  # noqa: F401  (registers "balpoe" with the auto classes)

    model = AutoModelForImageClassification.from_pretrained(run_dir).eval()
    processor = AutoImageProcessor.from_pretrained(run_dir)
    test = datasets.load_dataset("parquet", data_files=str(test_file), split="train")
    with torch.no_grad():
        pixels = processor(images=[im.convert("RGB") for im in test["picture"]], return_tensors="pt")
        predictions = model(**pixels).logits.argmax(-1).numpy()
    labels = np.asarray(test["target"])
    per_class = [np.mean(predictions[labels == c] == c) for c in range(len(TRAIN_COUNTS))]
    return {"accuracy": float(np.mean(predictions == labels)), "balanced_accuracy": float(np.mean(per_class)),
            "config": model.config}


def test_single_process_run_writes_model_results_and_logs(single_run):
    out = single_run["dir"]
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "recipe.yaml",
                 "train_results.json", "eval_results.json"):
        assert (out / name).is_file(), name
    train_results, eval_results = _results(out)
    assert train_results["class_counts"] == TRAIN_COUNTS
    assert train_results["train_samples"] == sum(TRAIN_COUNTS)
    assert eval_results["eval_samples"] == NUM_TEST
    assert [h["epoch"] for h in train_results["eval_history"]] == [2, 4, 6]  # --eval-every 2, over the resume
    # The last two checkpoints (checkpoints_total_limit 2) and TensorBoard event files.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0005-step-000005", "epoch-0006"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((out / "logs").rglob("events.out.tfevents.*"))  # one per launch
    tags = {tag for path in events for tag in EventAccumulator(str(path)).Reload().Tags()["scalars"]}
    # Each expert's loss at every logging step and per epoch, beside the ensemble's.
    assert {f"train/{kind}loss_expert_{e}" for kind in ("", "epoch_") for e in range(3)} <= tags
    assert {"train/loss", "train/epoch_loss", "eval/balanced_accuracy"} <= tags
    assert "resumed from" in single_run["stdout"] and "batches into the next)" in single_run["stdout"]
    assert "images/s" in single_run["stdout"] and "balanced accuracy" in single_run["stdout"]
    assert "data pipeline: device (auto: 92 images at 16x16" in single_run["stdout"]
    # The five epochs run after the resume (the second one from its step checkpoint on).
    assert train_results["data_pipeline"] == "device" and len(train_results["epoch_images_per_second"]) == 5


def test_launched_run_killed_inside_an_epoch_resumes_to_the_weights_of_the_uninterrupted_run(single_run,
                                                                                             reference):
    # Neither the launcher, the kill, the step checkpoints nor the resume change a bit of the weights.
    expected = load_file(reference / "model.safetensors")
    got = load_file(single_run["dir"] / "model.safetensors")
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)
    assert _results(single_run["dir"])[1] == _results(reference)[1]


def test_saved_model_loads_with_auto_classes_and_reproduces_the_reported_metrics(single_run, data):
    reference = _reference_metrics(single_run["dir"], data["test"])
    _, eval_results = _results(single_run["dir"])
    assert reference["config"].class_counts == TRAIN_COUNTS  # the long-tailed split's counts are the prior
    assert reference["config"].lambdas == [1.0, 0.0, -1.0]
    assert eval_results["eval_accuracy"] == pytest.approx(reference["accuracy"], abs=1e-9)
    assert eval_results["eval_balanced_accuracy"] == pytest.approx(reference["balanced_accuracy"], abs=1e-9)
    # A colour per class is easy: the run learns it (chance is 0.25).
    assert eval_results["eval_balanced_accuracy"] >= 0.75


def test_two_cpu_processes_evaluate_every_test_image_once_and_match_one_process(two_process_run, reference,
                                                                                 data):
    assert "2 process(es)" in two_process_run["stdout"]
    train_results, eval_results = _results(two_process_run["dir"])
    assert train_results["num_processes"] == 2 and train_results["global_batch_size"] == 8
    # Each process draws its own half of every global batch from the device-resident copy (which halves, and
    # that they make up the one-process batches: tests/test_loaders.py).
    assert train_results["data_pipeline"] == "device"
    # 32 test images over 2 processes x batches of 5 pad the last round with 8 repeats, which are dropped.
    assert eval_results["eval_samples"] == NUM_TEST
    metrics = _reference_metrics(two_process_run["dir"], data["test"])
    assert eval_results["eval_accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-9)
    assert eval_results["eval_balanced_accuracy"] == pytest.approx(metrics["balanced_accuracy"], abs=1e-9)
    # Same data order, global batch and batch-norm statistics (tests/test_sync_batchnorm.py); mixup acts per
    # process and sums are rounded in another order, so close, not equal.
    _, single = _results(reference)
    assert abs(eval_results["eval_balanced_accuracy"] - single["eval_balanced_accuracy"]) <= 0.15


def test_launcher_asked_for_two_processes_but_started_one_is_stopped(background):
    result, data = background["wrong"], background["data"]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "CalledProcessError" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: the launcher asked for more than one process but this run sees 1")
    assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N" in result.stderr
    assert not (data["root"] / "wrong-launch").exists()


def test_ctrl_c_stops_a_run_with_one_line_and_keeps_its_checkpoint(background):
    result, out = background["interrupted"], background["data"]["root"] / "interrupted"
    assert result.returncode == 130, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted; rerun with --resume to continue from its checkpoint after epoch ")
    from balpoe_hf.run_folder import LOCK
    from balpoe_hf.training.checkpoints import completed_checkpoints

    assert str(completed_checkpoints(out)[-1]) in last and not (out / LOCK).exists()
