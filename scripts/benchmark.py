"""Parameters and CPU throughput of BalPoE models next to the plain timm backbone.

    python scripts/benchmark.py                      # the default table (a few minutes on 2 CPU cores)
    python scripts/benchmark.py --batch-size 32 --steps 5 --threads 2 --rows resnet32_cifar

For each backbone it times the plain timm classifier and BalPoE with 1 and 3 experts (default split):
inference throughput (eval mode, no autograd) and training throughput (forward, backward and an SGD step
with the BalPoE loss, or cross-entropy for the plain model), in images per second (batch size over the
fastest step), on random 32x32 inputs.
It prints a Markdown table. The numbers depend on the machine; docs/benchmarks.md lists a measured table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import timm

from balpoe_hf import BalPoEConfig, BalPoEForImageClassification

NUM_CLASSES = 100
IMAGE_SIZE = 32
# Small members of other families, shaped for 32x32 inputs.
BACKBONES = {
    "resnet32_cifar": {},
    "resnet18": {},
    "convnext_atto": {},
    "vit_tiny_patch16_224": {"img_size": IMAGE_SIZE, "patch_size": 4},
}


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def throughput(step, batch_size: int, steps: int, warmup: int = 3) -> float:
    """Images per second of ``step()``: the batch size over the fastest of ``steps`` timed calls.

    The first calls of a fresh model pay for allocator growth and kernel selection and are not timed; the
    fastest call (as ``timeit`` reports) is the one least disturbed by other processes.
    """
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return batch_size / min(times)


def measure(model: torch.nn.Module, balpoe: bool, batch_size: int, steps: int) -> tuple[float, float]:
    images = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,))

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    @torch.inference_mode()
    def infer() -> None:
        model(images)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = model(images, labels=labels).loss if balpoe else F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()

    model.eval()
    inference = throughput(infer, batch_size, steps)
    model.train()
    training = throughput(train_step, batch_size, steps)
    return inference, training


def rows(backbones: list[str]):
    counts = [int(500 * 100 ** (-i / (NUM_CLASSES - 1))) for i in range(NUM_CLASSES)]  # CIFAR-100-LT IR100
    for name in backbones:
        kwargs = BACKBONES.get(name, {})
        yield name, "timm (plain)", False, lambda n=name, k=kwargs: timm.create_model(
            n, num_classes=NUM_CLASSES, **k)
        for experts in (1, 3):
            def build(n=name, k=kwargs, e=experts):
                config = BalPoEConfig(backbone=n, backbone_kwargs=k, num_experts=e, class_counts=counts)
                return BalPoEForImageClassification(config)
            yield name, f"BalPoE, {experts} expert{'s' if experts > 1 else ''}", True, build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(BACKBONES), help="timm backbones to benchmark")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=7, help="timed iterations per measurement (best)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(f"CPU: {platform.processor() or platform.machine()}, {args.threads} torch threads, torch "
          f"{torch.__version__}, timm {timm.__version__}; batch {args.batch_size}, {IMAGE_SIZE}x{IMAGE_SIZE} "
          f"inputs, {NUM_CLASSES} classes\n")
    table = list(rows(args.rows))
    # The first model run in a process is slower for a while (allocator, thread pool, CPU caches): warm the
    # process up on it before anything is timed.
    measure(table[0][3](), table[0][2], args.batch_size, args.steps)

    print("| backbone | model | shared stages | parameters | inference img/s | train step img/s |")
    print("|---|---|---:|---:|---:|---:|")
    for name, label, balpoe, build in table:
        model = build()
        shared = str(model.config.shared_stages) if balpoe else "-"
        inference, training = measure(model, balpoe, args.batch_size, args.steps)
        print(f"| {name} | {label} | {shared} | {count_parameters(model):,} | {inference:,.0f} | "
              f"{training:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
