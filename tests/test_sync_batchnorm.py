"""Batch norm under two CPU (gloo) processes: training equals plain batch norm on the whole batch, and
evaluation uses process 0's statistics.

The reference is torch's own ``nn.BatchNorm1d/2d`` and timm's ``BatchNormAct2d`` in one process on all 8
images: two processes with 4 images each, the layers converted and the model wrapped in DDP, must reproduce
its outputs, its gradients (DDP's average) and its running statistics. In float64, so that the comparison is
tight enough to catch a missing term of the gradient. The processes are forked (they start in milliseconds
instead of importing torch again).
"""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timm.layers import BatchNormAct2d
from torch import nn

from balpoe_hf.training.eval_loop import gather_logits
from balpoe_hf.training.sync_batchnorm import CPUSyncBatchNorm2d, convert_sync_batchnorm

BATCH = 8


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3),
                          BatchNormAct2d(5), nn.Flatten(), nn.Linear(5 * 4 * 4, 3), nn.BatchNorm1d(3))
    for module in model.modules():  # affine parameters away from 1 and 0, so that their gradients matter
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.5, 0.5)
    return model.double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    # Channels with means far from 0: a variance computed as E[x^2] - E[x]^2 must not lose them.
    images = torch.randn(BATCH, 3, 8, 8, generator=generator, dtype=torch.float64) * 2 + 30
    return images, torch.randint(0, 3, (BATCH,), generator=generator)


def _step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Two training forwards (the second after the running statistics moved) and one backward."""
    model(images)
    out = model(images)
    nn.functional.cross_entropy(out, labels).backward()
    result = {name: p.grad for name, p in model.named_parameters()} | dict(model.named_buffers())
    model.eval()
    result |= {"train_output": out.detach(), "eval_output": model(images).detach()}
    return {name.removeprefix("module."): value for name, value in result.items()}


class _Classifier(nn.Module):
    """The ``model(pixel_values=...).logits`` interface of ``gather_logits``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.model(pixel_values))


class _TwoProcesses:
    """The two methods of ``accelerate.Accelerator`` that ``gather_logits`` calls, over the gloo group."""

    num_processes = 2

    def gather_for_metrics(self, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        def gather(tensor):
            parts = [torch.empty_like(tensor) for _ in range(2)]
            dist.all_gather(parts, tensor)
            return torch.cat(parts)
        return tuple(gather(tensor) for tensor in tensors)


def _worker(rank: int, port: int, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        images, labels = _data()
        half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
        trained = _step(nn.parallel.DistributedDataParallel(convert_sync_batchnorm(_model(), "cpu")),
                        images[half], labels[half])
        # Per-process statistics (training without SyncBatchNorm): process 1's differ from process 0's.
        model = _Classifier(_model())
        model.model.train()(images[half] + rank)
        batches = [{"pixel_values": images[half], "labels": labels[half]}]
        logits, gathered_labels = gather_logits(model, batches, _TwoProcesses(), BATCH)
        torch.save({"trained": trained, "logits": logits, "labels": gathered_labels}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("sync_batchnorm")
    mp.start_processes(_worker, args=(_free_port(), out), nprocs=2, start_method="fork")
    return {rank: torch.load(out / f"rank{rank}.pt") for rank in range(2)}


def test_two_processes_train_as_one_process_on_the_whole_batch(two_processes):
    reference = _step(_model(), *_data())
    for rank, result in two_processes.items():
        trained = result["trained"]
        assert trained.keys() == reference.keys()
        for name, expected in reference.items():
            if name.endswith("_output"):  # each process has its half of the images
                expected = expected[rank * BATCH // 2:(rank + 1) * BATCH // 2]
            torch.testing.assert_close(trained[name], expected, rtol=1e-10, atol=1e-12,
                                       msg=f"{name} on rank {rank}")


def test_every_process_evaluates_with_the_statistics_of_process_0(two_processes):
    images, labels = _data()
    model = _model()
    model.train()(images[:BATCH // 2])  # process 0's statistics: those of the saved model
    expected = model.eval()(images)
    for result in two_processes.values():
        torch.testing.assert_close(result["logits"], expected.float(), rtol=1e-6, atol=1e-6)
        assert result["labels"].tolist() == labels.tolist()


def test_conversion_keeps_the_layers_and_their_names_and_refuses_unknown_norms():
    model = _model()
    names = dict(model.named_parameters()) | dict(model.named_buffers())
    converted = convert_sync_batchnorm(model, "cpu")
    assert converted is model and isinstance(model[1], CPUSyncBatchNorm2d)
    assert isinstance(model[4], BatchNormAct2d) and isinstance(model[7], nn.BatchNorm1d)
    assert dict(model.named_parameters()) | dict(model.named_buffers()) == names
    # Outside a process group (one process) a converted layer is the plain one.
    images, _ = _data()
    torch.testing.assert_close(model(images), _model()(images), rtol=0, atol=0)

    class OwnNorm(nn.BatchNorm2d):
        pass

    with pytest.raises(TypeError, match="OwnNorm layers cannot normalise over several CPU processes"):
        convert_sync_batchnorm(nn.Sequential(OwnNorm(3)), "cpu")
