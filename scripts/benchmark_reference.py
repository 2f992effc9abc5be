"""This package's training step against the official BalPoE code's, side by side in one process.

    git clone https://github.com/emasa/BalPoE-CalibratedLT /tmp/balpoe-official
    python scripts/benchmark_reference.py --reference-dir /tmp/balpoe-official    # about 4 min on 2 CPU cores

Both train the same network on the same batch of random images: the paper's CIFAR-LT IR100 setting
(3-expert ResNet-32 with cosine classifiers of scale 30, lambdas 1 / 0 / -1, mixup 0.8, SGD with Nesterov
momentum 0.9, weight decay 5e-4, batch 128, fp32), with CIFAR-10's classes or, with ``--num-classes 100``,
CIFAR-100's. A step is what each code's training loop does for one batch, data loading left out (both read
a batch already in memory):

- ``reference``: the official code's own objects, imported from the clone: ``ResNet32Model`` (its
  ``configs/mixup/standard_training/config_cifar10_ir100_bs-experts.json`` arguments), ``BSExpertLoss``,
  ``Combiner.mixup`` (mixed images, the loss for both targets, the batch accuracy), ``loss.backward()``,
  ``torch.optim.SGD.step()`` and the ``loss.item()`` its trainer logs every step.
- ``package``: ``BalPoEForImageClassification`` of the ``cifar10-lt-local`` recipe in the default
  (contiguous) layout, the official code's, timm's ``Mixup`` (soft targets), ``output.loss.backward()`` and
  the recipe's optimizer (``training.speed.build_optimizer``: fused SGD where torch has it), as
  ``balpoe_hf.training`` runs them; ``package+OPTION+...`` adds speed options: ``channels_last`` (weights and
  batch in NHWC: ``package+channels_last`` is the step as the recipe ships, ``channels_last: true``),
  ``bf16`` (autocast of the forward, as ``--mixed-precision bf16`` has accelerate do) and ``compile``
  (``torch.compile`` of the model). By default ``package`` and ``package+channels_last``;
  ``package+channels_last+bf16`` too on a GPU or a CPU that computes bf16 natively
  (``training.speed.cpu_has_native_bf16``), and on a GPU ``package+channels_last+bf16+compile``; ``--configs``
  names others.

Before timing, the script loads the official model's weights into the package's (``package_state``, by
name) and prints, on the same batch in training mode without mixup, the largest difference of the two
codes' expert logits and both losses: the two compute the same function, not only networks of one size.

The configurations take turns for ``--rounds`` rounds of ``--steps`` timed steps each (after warm-up
steps), each round starting with the next one, so that a slow spell of the machine falls on all of them.
The table gives each one's median time a step over the rounds, its images per second and its speed
relative to the reference. It also prints the models' parameter counts, which must agree for the
comparison to be of the same network.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from timm.data import Mixup

from balpoe_hf import BalPoEForImageClassification
from balpoe_hf.data.splits import long_tailed_counts
from balpoe_hf.recipes import load_recipe
from balpoe_hf.training.model import parameter_groups
from balpoe_hf.training.speed import build_optimizer, cpu_has_native_bf16, prepare_model

RECIPE = "cifar10-lt-local"
# The official config's "tau_list": its tau is the package's 1 - lambda.
REFERENCE_TAUS = (0.0, 1.0, 2.0)


def is_official_clone(folder: Path) -> bool:
    return (folder / "utils" / "combiner.py").is_file() and (folder / "model" / "loss.py").is_file()


def not_a_clone(folder: Path) -> str:
    return (f"{folder} is not a clone of emasa/BalPoE-CalibratedLT (no utils/combiner.py and model/loss.py): "
            "git clone https://github.com/emasa/BalPoE-CalibratedLT DIR and pass --reference-dir DIR")


def reference_step(reference_dir: Path, counts: list[int], images: torch.Tensor,
                   labels: torch.Tensor) -> tuple[Callable[[], None], torch.nn.Module, torch.nn.Module]:
    """One training step of the official code on ``images`` / ``labels``, its model and its loss."""
    if not is_official_clone(reference_dir):
        raise FileNotFoundError(not_a_clone(reference_dir))
    sys.path.insert(0, str(reference_dir))
    from model.loss import BSExpertLoss
    from model.model import ResNet32Model
    from utils.combiner import Combiner

    config = {"trainer": {"epochs": 200}, "combiner": {"mode": "mixup", "mixup": {"alpha": 0.8}},
              "add_extra_info": True, "arch": {"args": {"num_experts": 3}}, "loss": {}}
    with contextlib.redirect_stdout(io.StringIO()):  # the combiner prints its settings
        combiner = Combiner(config)
    combiner.update(1)
    model = ResNet32Model(num_classes=len(counts), reduce_dimension=False, use_norm=True, returns_feat=True,
                          num_experts=3).to(images.device)
    criterion = BSExpertLoss(cls_num_list=counts, tau_list=REFERENCE_TAUS).to(images.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    model.train()

    def step() -> None:
        optimizer.zero_grad()
        _, losses, _ = combiner.forward(model, criterion, images, labels)
        losses["loss"].backward()
        optimizer.step()
        losses["loss"].item()  # the trainer logs the loss of every step

    return step, model, criterion


# The official ResNet_s's module names -> the package's: the shared stem and first stage are the trunk, each
# expert's second and third stage and classifier an expert (the blocks inside are named alike).
OFFICIAL_PREFIXES = ((r"^backbone\.(conv1|bn1|layer1)\.", r"balpoe.trunk.\1."),
                     (r"^backbone\.layer([23])s\.(\d+)\.", r"balpoe.experts.\2.backbone.layer\1."),
                     (r"^backbone\.linears\.(\d+)\.weight", r"balpoe.experts.\1.classifier.weight"))


def package_state(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official model's state dict under the package's names; the official cosine classifier keeps its
    weight as (features, classes), the package's as (classes, features)."""
    state = {}
    for name, value in official.items():
        for pattern, replacement in OFFICIAL_PREFIXES:
            renamed, found = re.subn(pattern, replacement, name)
            if found:
                state[renamed] = value.t() if renamed.endswith("classifier.weight") else value
                break
        else:
            raise KeyError(f"the official model's {name} has no counterpart in the package's")
    return state


def same_function(official: torch.nn.Module, criterion: torch.nn.Module, package: torch.nn.Module,
                  images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float]:
    """With the official weights in a copy of the package's model: the largest absolute difference of the
    expert logits on ``images`` (training mode, no mixup) and the official and the package's loss."""
    official, package = copy.deepcopy(official).train(), copy.deepcopy(package).train()
    package.load_state_dict(package_state(official.state_dict()))  # strict: every tensor, both ways
    with torch.no_grad():
        logits = official(images)["logits"]  # (B, E, C)
        official_loss = criterion(None, labels, extra_info={"logits": logits.transpose(0, 1)})
        output = package(pixel_values=images, labels=labels)
    return (output.expert_logits - logits).abs().max().item(), official_loss.item(), output.loss.item()


OPTIONS = ("channels_last", "bf16", "compile")


def package_options(config: str) -> set[str]:
    """The speed options of a configuration name ``package[+OPTION...]``; ``ValueError`` for others."""
    name, *options = config.split("+")
    unknown = sorted(set(options) - set(OPTIONS))
    if name != "package" or unknown:
        raise ValueError(f"{config!r} is not a configuration: write 'package' and any of "
                         f"{', '.join(OPTIONS)} joined by '+', e.g. package+channels_last+bf16")
    return set(options)


def package_step(counts: list[int], images: torch.Tensor, labels: torch.Tensor,
                 options: Collection[str] = ()) -> tuple[Callable[[], None], torch.nn.Module]:
    """One training step of this package with the speed ``options`` (of ``OPTIONS``), as
    ``balpoe_hf.training`` runs it, and its model."""
    channels_last = "channels_last" in options
    recipe = load_recipe(RECIPE, channels_last=channels_last, compile="compile" in options)
    model = BalPoEForImageClassification(recipe.model_config(counts))
    model = prepare_model(model.to(images.device), recipe)
    optimizer = build_optimizer(recipe, parameter_groups(model, recipe), images.device)
    mixup = Mixup(mixup_alpha=recipe.mixup_alpha, cutmix_alpha=0.0, label_smoothing=0.0,
                  num_classes=len(counts))
    batch = images.contiguous(memory_format=torch.channels_last) if channels_last else images
    model.train()

    def step() -> None:
        pixel_values, targets = mixup(batch.clone(), labels)  # timm mixes the batch in place
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled="bf16" in options):
            loss = model(pixel_values=pixel_values, labels=targets).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step, model


def seconds_per_step(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-dir", type=Path, required=True,
                        help="a clone of https://github.com/emasa/BalPoE-CalibratedLT")
    parser.add_argument("--num-classes", type=int, choices=(10, 100), default=10,
                        help="CIFAR-10-LT or CIFAR-100-LT, imbalance ratio 100")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration and round")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of all configurations, in turn")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each timing")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", help="comma-separated package configurations (default: see above)")
    args = parser.parse_args()
    if not is_official_clone(args.reference_dir):
        parser.error(not_a_clone(args.reference_dir))
    gpu = args.device.startswith("cuda")
    chosen = (args.configs.split(",") if args.configs else
              ["package", "package+channels_last"]
              + (["package+channels_last+bf16"] if gpu or cpu_has_native_bf16() else [])
              + (["package+channels_last+bf16+compile"] if gpu else []))
    try:
        options = {name: package_options(name) for name in chosen}
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    np.random.seed(0)  # the official mixup draws its lambda from numpy
    device = torch.device(args.device)

    counts = long_tailed_counts(50_000 // args.num_classes, args.num_classes, 100)  # CIFAR-LT IR100
    prior = torch.tensor(counts, dtype=torch.float) / sum(counts)
    images = torch.randn(args.batch_size, 3, 32, 32, device=device)
    labels = torch.multinomial(prior, args.batch_size, replacement=True).to(device)

    reference, reference_model, criterion = reference_step(args.reference_dir, counts, images, labels)
    configs = {"reference": (reference, reference_model),
               **{name: package_step(counts, images, labels, named) for name, named in options.items()}}
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU {platform.processor() or platform.machine()}, {args.threads} torch threads")
    print(f"{where}, torch {torch.__version__}; {args.num_classes} classes, batch {args.batch_size}, "
          f"{args.rounds} rounds of {args.steps} steps")
    print("parameters: " + ", ".join(f"{name} {sum(p.numel() for p in model.parameters()):,}"
                                     for name, (_, model) in configs.items()))
    plain = package_step(counts, images, labels)[1]  # fp32, eager: the official code's arithmetic
    difference, official_loss, package_loss = same_function(reference_model, criterion, plain, images, labels)
    print(f"the official weights in the package's model: expert logits within {difference:.1e}, loss "
          f"{official_loss:.6f} (official) and {package_loss:.6f} (package)\n")

    times: dict[str, list[float]] = {name: [] for name in configs}
    names = list(configs)
    for round_index in range(args.rounds):
        # Each round starts with another configuration: none is always the one after a given other.
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:
            times[name].append(seconds_per_step(configs[name][0], args.steps, args.warmup, device))

    official = statistics.median(times["reference"])
    print("| configuration | s / step (median) | range over rounds | images/s | vs reference |")
    print("|---|---:|---:|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {min(values):.3f}-{max(values):.3f} | "
              f"{args.batch_size / median:,.0f} | {official / median:.2f}x |")


if __name__ == "__main__":
    main()
