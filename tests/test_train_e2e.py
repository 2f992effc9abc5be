"""End-to-end runs of scripts/train.py through the real ``accelerate launch``, on a tiny long-tailed dataset.

Two CPU (gloo) processes, whose saved model is loaded back with the transformers auto classes and compared
with the tiny run trained in this process (tests/conftest.py ``tiny_run``). A launch that asks for processes
it does not start is refused by the check that test_train.py's test_world_size_check tests. The data fit in
memory, so the run takes the default device pipeline (balpoe_hf.data.loaders); tests/test_loaders.py trains
with the worker pipeline and resumes inside an epoch. The launch costs several seconds of start-up, so it
starts with the test session, beside the other tests (``background``, tests/processes.py), and the tests read
what it left.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
from helpers import TINY, flags, metrics_from_scratch
from processes import start
from train_synthetic import TEST_PER_CLASS, TRAIN_COUNTS, write_parquet

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train.py"
# `accelerate launch` as `python -m`: the same parser and launch code, without the other subcommands of the
# `accelerate` command, whose imports (timm, transformers: its memory estimator) cost 3 of 5 s of start-up.
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
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
    # The tiny run's recipe, with an evaluation batch of 5 that 2 processes do not divide the test set by.
    args = ["--train-file", str(train), "--test-file", str(test), *flags({**TINY, "eval_batch_size": 5})]
    return {"root": root, "train": train, "test": test, "env": env, "args": args}


def background(root: Path, environ: dict[str, str]) -> dict:
    """The launch, started with the session (tests/processes.py): a two-process run."""
    data = _data(root, environ)
    # Half the per-process batch: the same global batch of 8 as the tiny run in one process.
    two = start([*ACCELERATE, "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                 str(_free_port()), str(SCRIPT), *data["args"], "--batch-size", "4", "--output-dir",
                 str(root / "two")], {**data["env"], "ACCELERATE_USE_CPU": "1"}, REPO, root / "two-launch")
    return {"data": data, "two": two.finish(check=False)}


@pytest.fixture(scope="module")
def data(background) -> dict:
    return background["data"]


@pytest.fixture(scope="module")
def reference(tiny_run) -> Path:
    """The tiny run in this process (the Python API, one thread as the launches): what the launch matches."""
    return tiny_run


@pytest.fixture(scope="module")
def two_process_run(background) -> dict:
    result = background["two"]
    # A process's own error line first: the other process's traceback (its peer gone) fills the tail.
    errors = "\n".join(line for line in result.stderr.splitlines() if line.startswith("error:"))
    assert result.returncode == 0, (f"{errors}\nstdout:\n{result.stdout[-3000:]}\n"
                                    f"stderr:\n{result.stderr[-5000:]}")
    return {"dir": background["data"]["root"] / "two", "stdout": result.stdout, "stderr": result.stderr}


def _results(run_dir: Path) -> tuple[dict, dict]:
    return (json.loads((run_dir / "train_results.json").read_text()),
            json.loads((run_dir / "eval_results.json").read_text()))


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
    metrics = metrics_from_scratch(two_process_run["dir"], data["test"])
    assert eval_results["eval_accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-9)
    assert eval_results["eval_balanced_accuracy"] == pytest.approx(metrics["balanced_accuracy"], abs=1e-9)
    # Same data order, global batch and batch-norm statistics (tests/test_sync_batchnorm.py); mixup acts per
    # process and sums are rounded in another order, so close, not equal.
    _, single = _results(reference)
    assert abs(eval_results["eval_balanced_accuracy"] - single["eval_balanced_accuracy"]) <= 0.15
