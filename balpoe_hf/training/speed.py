"""Step-level speed options of a training run, each a recipe field that can be switched off.

- ``channels_last``: the model's 4-D weights (and the device pipeline's batches) in NHWC, the layout of the
  fast convolution kernels of oneDNN on CPUs and of cuDNN on tensor cores.
- ``compile`` / ``compile_mode``: ``torch.compile`` of the model's call, in place (``nn.Module.compile``), so
  the module, its parameter names and therefore its checkpoints stay those of the eager model: a run can be
  resumed with or without ``--compile``, and ``save_pretrained`` needs no unwrapping.
- ``fused_optimizer``: ``torch.optim.SGD(fused=True)``, one kernel for the whole update, where torch has it
  for the device.
- ``mixed_precision`` (bf16 / fp16 autocast) is the ``Accelerator``'s and needs nothing here.

``prepare_model`` and ``build_optimizer`` are called before ``accelerator.prepare``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.optimizer import ParamsT

from ..recipes import Recipe


def prepare_model(model: nn.Module, recipe: Recipe, backend: str = "inductor") -> nn.Module:
    """Apply the recipe's ``channels_last`` and ``compile`` to ``model`` in place; returns it.

    ``backend``: ``torch.compile``'s (``"eager"`` only traces, a quick check that the model compiles).
    """
    if recipe.channels_last:
        model.to(memory_format=torch.channels_last)
    if recipe.compile:
        options = {"mode": recipe.compile_mode} if backend == "inductor" else {}
        model.compile(backend=backend, **options)
    return model


def to_contiguous_format(model: nn.Module) -> nn.Module:
    """``model`` with its weights back in the default memory format (for a saved model's users)."""
    return model.to(memory_format=torch.contiguous_format)


def fused_sgd_available(device: torch.device) -> bool:
    """Whether torch has a fused SGD kernel for ``device``'s type."""
    # torch exposes the list only privately; it checks the same one at the optimizer's first step.
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return device.type in _get_fused_kernels_supported_devices()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), where oneDNN's bf16 convolutions are
    faster than fp32 ones; without it bf16 autocast is emulated and slower."""
    # torch exposes the ISA checks only privately. Not torch.ops.mkldnn._is_mkldnn_bf16_supported(), which is
    # true on any AVX-512 CPU, also those (Skylake) that emulate bf16 at a fraction of fp32's speed.
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def build_optimizer(recipe: Recipe, params: ParamsT, device: torch.device) -> torch.optim.SGD:
    """The recipe's SGD over ``params`` (parameters or parameter groups, as ``torch.optim`` takes them),
    which will train on ``device``.

    With ``recipe.fused_optimizer``, torch's fused kernel where it has one for the device (CUDA, CPU and
    others in recent versions; the same update in one kernel), else the multi-tensor (foreach) one.
    """
    fused = recipe.fused_optimizer and fused_sgd_available(device)
    # fused=None, not False: an explicit False would also switch off the default foreach kernel.
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                           nesterov=recipe.nesterov, weight_decay=recipe.weight_decay, fused=fused or None)


def enable_fast_kernels(device: torch.device) -> None:
    """Let cuDNN time its convolution algorithms once per input shape and keep the fastest (CUDA only).

    Shapes are fixed in training (full batches), so the search pays once; it makes GPU runs no less
    reproducible than cuDNN's non-deterministic backward kernels already do.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
