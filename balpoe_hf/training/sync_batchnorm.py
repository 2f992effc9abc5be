"""Batch norm over the global batch of several training processes, on GPUs and on CPUs.

In training mode a ``BatchNorm`` layer normalises with the mean and variance of the batch it sees. Under
several processes each sees only its own part of the global batch (``batch_size`` images), so ``N``
processes train another model than one process with the same global batch: every layer normalises with
noisier statistics, and the running statistics that the saved model evaluates with are those of process
0's batches only (DDP broadcasts its buffers before each forward). With small per-process batches the
difference can decide the result: 4 images of a long-tailed set are often all of one class, and their
batch statistics then remove what tells the classes apart.

``convert_sync_batchnorm`` makes every ``BatchNorm`` layer normalise with the statistics of the global
batch in training, as one process would:

- on GPUs (and the other devices of torch's ``nn.SyncBatchNorm``), timm's conversion
  (``timm.layers.convert_sync_batchnorm``, which also handles its ``BatchNormAct2d``) to ``nn.SyncBatchNorm``;
- on CPUs, the layers keep their class's code but for the training forward, which gathers the statistics
  with one differentiable all-reduce per layer. Written by hand because torch's ``nn.SyncBatchNorm`` has
  GPU kernels only (and ``DistributedDataParallel`` refuses it in a CPU model), and neither timm nor
  accelerate has a CPU version.

Either way the layers keep their parameter and buffer names, so checkpoints and saved models are those of
plain ``BatchNorm`` layers. In evaluation mode, and in a single process, nothing changes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from timm import layers as timm_layers
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """``dist.all_reduce`` (sum) with its gradient: every process's loss depends on every process's
    input through the sum, so the gradient of an input is the sum of the output's gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


def _syncs(module: _BatchNorm) -> bool:
    """Whether a call is a training forward with other processes to share the batch statistics with."""
    return (module.training and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1)


def global_batch_norm(module: _BatchNorm, input: torch.Tensor) -> torch.Tensor:
    """``module``'s training-mode batch norm of ``input`` with the statistics of all processes' inputs
    (``torch.distributed``'s default group); updates its running statistics as ``nn.BatchNorm`` does."""
    module._check_input_dim(input)
    channels = input.shape[1]
    dims = [0, *range(2, input.dim())]
    # Sums in float64, so that the variance E[x^2] - E[x]^2 keeps float32's precision: one collective.
    x = input.double()
    local = torch.cat([x.sum(dims), x.square().sum(dims), x.new_tensor([input.numel() // channels])])
    total = _AllReduceSum.apply(local)
    count = total[-1]
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{list(input.shape)} in every process")
    mean = total[:channels] / count
    var = (total[channels:-1] / count - mean.square()).clamp_min(0)
    if module.track_running_stats:
        module.num_batches_tracked.add_(1)
        factor = 1.0 / float(module.num_batches_tracked) if module.momentum is None else module.momentum
        with torch.no_grad():  # the unbiased variance, as nn.BatchNorm keeps
            unbiased = var * count / (count - 1)
            module.running_mean.mul_(1 - factor).add_(factor * mean.to(module.running_mean.dtype))
            module.running_var.mul_(1 - factor).add_(factor * unbiased.to(module.running_var.dtype))
    shape = (1, channels) + (1,) * (input.dim() - 2)
    dtype = torch.promote_types(input.dtype, torch.float32)  # at least float32, as nn.BatchNorm computes
    scale = torch.rsqrt(var + module.eps).to(dtype).view(shape)
    out = (input.to(dtype) - mean.to(dtype).view(shape)) * scale
    if module.affine:
        out = out * module.weight.to(dtype).view(shape) + module.bias.to(dtype).view(shape)
    return out.to(input.dtype)  # the input's dtype, as nn.BatchNorm returns under autocast


class _CPUSync:
    """Mixin before a batch-norm class: its training forward over all processes (``global_batch_norm``)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if _syncs(self):
            return self._after_norm(global_batch_norm(self, input))
        return super().forward(input)

    def _after_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x


class CPUSyncBatchNorm1d(_CPUSync, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose training forward normalises over all processes."""


class CPUSyncBatchNorm2d(_CPUSync, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training forward normalises over all processes."""


class CPUSyncBatchNorm3d(_CPUSync, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` whose training forward normalises over all processes."""


class CPUSyncBatchNormAct2d(_CPUSync, timm_layers.BatchNormAct2d):
    """timm's ``BatchNormAct2d`` (batch norm, dropout, activation) whose training forward normalises over
    all processes."""

    def _after_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


_CPU_CLASSES = {nn.BatchNorm1d: CPUSyncBatchNorm1d, nn.BatchNorm2d: CPUSyncBatchNorm2d,
                nn.BatchNorm3d: CPUSyncBatchNorm3d, timm_layers.BatchNormAct2d: CPUSyncBatchNormAct2d}


def convert_sync_batchnorm(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``model`` with every ``BatchNorm`` layer normalising over all processes in training, for training
    on ``device``; returns it (the same module on CPUs).

    Call it before ``accelerator.prepare`` (DDP) and ``torch.compile``. Raises ``TypeError`` on CPUs for a
    batch-norm class that has no CPU version here.
    """
    if torch.device(device).type != "cpu":
        return timm_layers.convert_sync_batchnorm(model)
    for module in model.modules():
        if isinstance(module, _BatchNorm) and not isinstance(module, _CPUSync):
            cpu_class = _CPU_CLASSES.get(type(module))
            if cpu_class is None:
                raise TypeError(f"{type(module).__name__} layers cannot normalise over several CPU processes "
                                "(no CPU version of them); train with --no-sync-batchnorm.")
            # The subclasses add a forward and no state: the layer keeps its parameters, buffers and names.
            module.__class__ = cpu_class
    return model
