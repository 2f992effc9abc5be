"""Whole training epochs, data included, for both data pipelines and the step-level speed options.

    # 2-core CPU, a few minutes: 2,048 training and 1,000 test images of the main job's data, 2 epochs
    python scripts/benchmark_training.py --recipe fashion-mnist-lt-quick \\
        --train-images 2048 --test-images 1000
    # a GPU: the whole CIFAR-10-LT split, 3 epochs per configuration
    python scripts/benchmark_training.py --recipe cifar10-lt-local --epochs 3 \\
        --train-file data/cifar10/train.parquet --test-file data/cifar10/test.parquet   # balpoe-prepare-data

Every configuration is a real training run (``python -m balpoe_hf.train``, each in its own process so that
compilation caches, memory and accelerate's state start afresh) of the given recipe for ``--epochs``
epochs, with the recipe flags given here (any ``balpoe-train`` flag) and the configuration's options. A
configuration is a ``+``-joined list: the pipeline (``workers`` or ``device``) and any of ``channels_last``,
``fused`` (fused SGD), ``bf16`` (autocast) and ``compile``; what it does not name is off. The first, by
default ``workers`` (PIL in DataLoader workers, fp32, eager: how the package trained before the device
pipeline), is the reference of the ratios.

For each it prints the training images/s of the epochs after the first (the median; the first pays for
start-up, cuDNN's search and compilation, and is shown apart), the ratio to the reference, the wall time of
the whole run (start-up, data, training, evaluation, saving) and the balanced accuracy and ECE it reached,
with the machine. ``--train-images`` / ``--test-images`` train on a random subset (every class kept), written
once to parquet files, so that a CPU finishes in minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from balpoe_hf.cli.arguments import parse_args
from balpoe_hf.data.loading import load_training_data
from balpoe_hf.data.splits import labels_array
from balpoe_hf.training.speed import cpu_has_native_bf16

REPO = Path(__file__).resolve().parents[1]

OPTIONS = ("channels_last", "fused", "bf16", "compile")
PIPELINES = ("workers", "device")
REFERENCE = "workers"


def default_configs() -> list[str]:
    """The reference, the device pipeline alone, the step options added one by one, and the step options
    with the worker pipeline (what they give without the device pipeline)."""
    if torch.cuda.is_available():
        fast = "channels_last+fused" + ("+bf16" if torch.cuda.is_bf16_supported() else "")
        return [REFERENCE, "device", f"device+{fast}", f"device+{fast}+compile", f"workers+{fast}"]
    # bf16 on CPU only where the CPU computes it natively: emulated, bf16 autocast is slower than fp32. No
    # compile on CPU by default: inductor compiles for minutes on a few cores (--configs device+compile).
    configs = [REFERENCE, "device", "device+channels_last", "device+channels_last+fused"]
    if cpu_has_native_bf16():
        configs.append("device+channels_last+fused+bf16")
    return [*configs, "workers+channels_last+fused"]


def config_flags(config: str) -> list[str]:
    """The ``balpoe-train`` flags of a configuration such as ``device+channels_last+bf16``."""
    parts = config.split("+")
    pipelines = [p for p in parts if p in PIPELINES]
    unknown = [p for p in parts if p not in PIPELINES + OPTIONS]
    if len(pipelines) != 1 or unknown:
        raise SystemExit(f"configuration {config!r}: name one pipeline of {PIPELINES} and options of "
                         f"{OPTIONS} joined by '+', e.g. device+channels_last+fused")
    return ["--data-pipeline", pipelines[0], "--channels-last", str("channels_last" in parts),
            "--fused-optimizer", str("fused" in parts),
            "--mixed-precision", "bf16" if "bf16" in parts else "no", "--compile", str("compile" in parts)]


def machine(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = f"{torch.cuda.get_device_name()}, " if torch.cuda.is_available() else "no GPU, "
    return (f"{gpu}CPU {cpu} ({cores} cores available, the runs use {threads} torch threads), "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def subset(ds, label_column: str, size: int | None, seed: int = 0):
    """``size`` random rows of ``ds`` (all if ``None``), one of every class among them."""
    if size is None or size >= len(ds):
        return ds
    labels = labels_array(ds, label_column)
    order = np.random.default_rng(seed).permutation(len(ds))
    _, first = np.unique(labels[order], return_index=True)  # each class's first row in the random order
    if size < len(first):
        raise SystemExit(f"--train-images / --test-images {size} cannot hold one image of each of the "
                         f"{len(first)} classes.")
    firsts = set(order[first].tolist())
    keep = [*firsts, *(i for i in order.tolist() if i not in firsts)][:size]
    return ds.select(sorted(keep))


def write_subsets(recipe_args: list[str], train_images: int | None, test_images: int | None,
                  directory: Path) -> list[str]:
    """Write the subsets as parquet files; returns the flags that train on them instead."""
    _, recipe = parse_args(recipe_args)
    data = load_training_data(recipe)
    paths = []
    for split, ds, size in (("train", data.train, train_images), ("test", data.test, test_images)):
        path = directory / f"{split}.parquet"
        subset(ds, recipe.label_column, size).to_parquet(path)
        paths.append(str(path))
    print(f"data: {train_images or len(data.train)} of {len(data.train):,} training and "
          f"{test_images or len(data.test)} of {len(data.test):,} test images of {recipe.name}, in "
          f"{directory}")
    # Already long-tailed: --imbalance-ratio none keeps the subset as it is.
    return ["--train-file", paths[0], "--test-file", paths[1], "--imbalance-ratio", "none"]


def run(config: str, recipe_args: list[str], epochs: int, directory: Path, threads: int) -> dict:
    """One training run of ``config``; its throughput, wall time and results (or the error's tail)."""
    output = directory / config.replace("+", "_")
    command = [sys.executable, "-m", "balpoe_hf.train", *recipe_args, *config_flags(config),
               "--epochs", str(epochs), "--eval-every", "0", "--checkpoints-total-limit", "1",
               "--output-dir", str(output), "--overwrite"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        return {"config": config, "error": (result.stderr or result.stdout).strip().splitlines()[-1:]}
    train_results = json.loads((output / "train_results.json").read_text())
    eval_results = json.loads((output / "eval_results.json").read_text())
    per_epoch = train_results["epoch_images_per_second"]
    return {"config": config, "pipeline": train_results["data_pipeline"], "first": per_epoch[0],
            "steady": statistics.median(per_epoch[1:] or per_epoch), "wall": wall,
            "balanced_accuracy": eval_results["eval_balanced_accuracy"], "ece": eval_results["eval_ece"]}


def print_row(row: dict, reference: dict | None) -> None:
    if "error" in row:
        print(f"| {row['config']} | failed: {' '.join(row['error'])} | | | | | |", flush=True)
        return
    ratio = f"{row['steady'] / reference['steady']:.2f}x" if reference and "steady" in reference else "-"
    print(f"| {row['config']} | {row['steady']:,.0f} | {ratio} | {row['first']:,.0f} | {row['wall']:.0f} | "
          f"{100 * row['balanced_accuracy']:.2f} | {100 * row['ece']:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [options] RECIPE FLAGS (--recipe NAME, --train-file ...)")
    parser.add_argument("--configs", nargs="+", default=None,
                        help=f"configurations to run, the first being the reference (default: {REFERENCE} "
                             "and the device pipeline with the options one by one)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per configuration (default 2)")
    parser.add_argument("--train-images", type=int, default=None, help="train on a random subset this size")
    parser.add_argument("--test-images", type=int, default=None, help="evaluate on a random subset this size")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch CPU threads of each run (default: all cores; on a machine shared with "
                             "other jobs, fewer threads than cores avoid oversubscribing OpenMP)")
    parser.add_argument("--work-dir", default=None, help="where the runs go (default: a temporary directory)")
    args, recipe_args = parser.parse_known_args()
    configs = args.configs or default_configs()
    for config in configs:
        config_flags(config)  # check them all before the first run

    with tempfile.TemporaryDirectory(prefix="balpoe-benchmark-") as temporary:
        directory = Path(args.work_dir or temporary)
        directory.mkdir(parents=True, exist_ok=True)
        if args.train_images or args.test_images:
            recipe_args = [*recipe_args, *write_subsets(recipe_args, args.train_images, args.test_images,
                                                        directory)]
        print(f"{machine(args.threads)}\n{args.epochs} epochs per configuration; recipe flags: "
              f"{' '.join(recipe_args)}\n")
        print("| configuration | train images/s | vs first | first epoch images/s | run wall s | "
              "balanced acc. % | ECE % |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        reference = None
        for config in configs:
            row = run(config, recipe_args, args.epochs, directory, args.threads)
            reference = reference or row
            print_row(row, reference)


if __name__ == "__main__":
    main()
