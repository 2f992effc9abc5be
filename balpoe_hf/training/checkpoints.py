"""A run's checkpoints: where they go, what they hold, and saving and loading them.

Each holds the model (``model.safetensors``), the optimizer's and the learning-rate schedule's state (JSON,
with the optimizer's tensors in safetensors), each process's random-number states (JSON) and
``trainer_state.json`` (progress, statistics and the settings that define the model): no pickle, so that
loading a checkpoint never runs code. Those of the previous release (accelerate's ``save_state``, pickles)
are read with ``torch.load(weights_only=True)``, which loads tensors and numbers only. A checkpoint is written
under a temporary name (``<name>.tmp``) and renamed once all of its files are on disk, so a folder with a
final name is complete; a crash or a full disk while saving leaves a ``.tmp`` folder that resume ignores and
the next save removes. ``epoch-0003`` is the state after three epochs, ``epoch-0003-step-000050`` the state
50 batches into the fourth (``Recipe.checkpoint_every_steps``). ``resume`` picks the one to load.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import TrainingFailure
from ..run_folder import (
    PARTIAL_SUFFIX,
    save_failure,
    sync_files,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_NAME = re.compile(r"epoch-(\d+)(?:-step-(\d+))?")




def checkpoint_dir(output_dir: str | Path, epoch: int, step: int = 0) -> Path:
    """``epoch-EEEE`` after ``epoch`` epochs, ``epoch-EEEE-step-SSSSSS`` ``step`` batches into the next."""
    name = f"epoch-{epoch:04d}" + (f"-step-{step:06d}" if step else "")
    return Path(output_dir) / CHECKPOINTS_DIR / name


def checkpoint_progress(path: Path) -> tuple[int, int] | None:
    match = _CHECKPOINT_NAME.fullmatch(path.name)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def completed_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (final name and trainer state), from the oldest to the latest."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    found = [p for p in root.iterdir() if checkpoint_progress(p) and (p / TRAINER_STATE).is_file()] \
        if root.is_dir() else []
    return sorted(found, key=checkpoint_progress)


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` latest complete checkpoints, and anything a crash left half-written."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    complete = completed_checkpoints(output_dir)
    leftovers = [p for p in root.iterdir() if p not in complete] if root.is_dir() else []
    for path in complete[:-keep] + leftovers:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class TrainingObjects:
    """What a checkpoint holds besides the trainer state: the prepared model, optimizer and lr schedule."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any


# Nested Python values with tensors as JSON (``_encode``) and a safetensors file of the tensors: what a
# checkpoint needs of the optimizer's and the schedule's state_dict, which torch.save would pickle.
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
STATE_FORMAT = "balpoe-hf training state"


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if torch.is_tensor(value):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().contiguous().cpu()
        return {_TENSOR: key}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(item, tensors) for item in value]}
    if isinstance(value, list):
        return [_encode(item, tensors) for item in value]
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value) and not {_TENSOR, _TUPLE, _ITEMS} & set(value):
            return {key: _encode(item, tensors) for key, item in value.items()}
        return {_ITEMS: [[_encode(key, tensors), _encode(item, tensors)] for key, item in value.items()]}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"a checkpoint holds tensors, numbers, strings and containers of them, not "
                    f"{type(value).__name__}")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {_TENSOR}:
        return tensors[value[_TENSOR]]
    if set(value) == {_TUPLE}:
        return tuple(_decode(item, tensors) for item in value[_TUPLE])
    if set(value) == {_ITEMS}:
        return {_decode(key, tensors): _decode(item, tensors) for key, item in value[_ITEMS]}
    return {key: _decode(item, tensors) for key, item in value.items()}


def write_state(folder: Path, name: str, value: Any) -> None:
    """``value`` (nested containers of tensors, numbers and strings, e.g. an optimizer's ``state_dict``) as
    ``name.json`` in ``folder``, its tensors (if any) in ``name.safetensors``: no pickle."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(value, tensors)
    if tensors:
        save_file(tensors, folder / f"{name}.safetensors")
    document = {"format": STATE_FORMAT, "tensors": bool(tensors), "state": encoded}
    (folder / f"{name}.json").write_text(json.dumps(document), encoding="utf-8")


def read_state(folder: Path, name: str) -> Any:
    """What ``write_state(folder, name, value)`` wrote: ``value`` (e.g. a checkpoint's ``"optimizer"``)."""
    document = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
    if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
        raise ValueError(f"{name}.json is not a balpoe-hf training state")
    tensors = load_file(folder / f"{name}.safetensors") if document["tensors"] else {}
    return _decode(document["state"], tensors)


def _rng_state(accelerator: Accelerator) -> dict[str, Any]:
    """This process's random-number states (Python, numpy, torch, the device's) and accelerate's step
    counter, as JSON values: what accelerate's ``save_state`` pickles."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"step": accelerator.step, "python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), pos, has_gauss, cached], "torch": torch.get_rng_state().tolist()}
    device = accelerator.device.type
    if device != "cpu":
        module = torch.get_device_module(device)
        states = (module.get_rng_state_all() if hasattr(module, "get_rng_state_all")
                  else [module.get_rng_state()])
        state["device"] = {"type": device, "states": [s.tolist() for s in states]}
    return state


def _set_rng_state(accelerator: Accelerator, state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    device = state.get("device")
    if device is not None and device["type"] == accelerator.device.type:
        module = torch.get_device_module(device["type"])
        states = [torch.as_tensor(s, dtype=torch.uint8) for s in device["states"]]
        if hasattr(module, "set_rng_state_all"):
            module.set_rng_state_all(states)
        else:
            module.set_rng_state(states[0])
    accelerator.step = state["step"]


MODEL_STATE = "model.safetensors"


def save_training_state(accelerator: Accelerator, folder: Path, objects: TrainingObjects) -> None:
    """Write the model (safetensors), the optimizer's, schedule's and gradient scaler's state (JSON and
    safetensors) and every process's random-number states (JSON) into ``folder``: no pickle."""
    folder.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        weights = accelerator.unwrap_model(objects.model).state_dict()
        save_file({name: tensor.detach().contiguous().cpu() for name, tensor in weights.items()},
                  folder / MODEL_STATE, metadata={"format": "pt"})
        write_state(folder, "optimizer", objects.optimizer.state_dict())
        write_state(folder, "scheduler", objects.scheduler.state_dict())
        if accelerator.scaler is not None:
            write_state(folder, "scaler", accelerator.scaler.state_dict())
    write_state(folder, f"rng_state_{accelerator.process_index}", _rng_state(accelerator))


class RefusedPickleError(ValueError):
    """A checkpoint file holds pickled objects other than tensors and numbers."""


def _load_pickle(path: Path) -> Any:
    """A file of a checkpoint of the previous release, read with ``torch.load(weights_only=True)`` (through
    accelerate's ``load``, which also allows numpy arrays): tensors, numbers and containers only."""
    from accelerate.utils import load

    try:
        return load(path, map_location="cpu")
    except pickle.UnpicklingError:
        raise RefusedPickleError(f"{path.name} holds Python objects other than tensors and numbers, which "
                                 "are never loaded (unpickling them could run code)") from None


def _read_training_state(accelerator: Accelerator, folder: Path) -> dict[str, Any]:
    """The states of a checkpoint, read without unpickling anything: this release's JSON and safetensors,
    or the previous release's pickles (accelerate's ``save_state``) through ``_load_pickle``."""
    index = accelerator.process_index
    states: dict[str, Any] = {"model": load_file(folder / MODEL_STATE)}
    if (folder / "optimizer.json").is_file():
        states["optimizer"] = read_state(folder, "optimizer")
        states["scheduler"] = read_state(folder, "scheduler")
        # None for a process the saving run did not have (more processes now): an epoch starts from seeds
        # of its own, and resume.check_resume refuses another number of processes inside an epoch.
        rng_file = folder / f"rng_state_{index}.json"
        states["rng"] = read_state(folder, f"rng_state_{index}") if index == 0 or rng_file.is_file() else None
        if accelerator.scaler is not None:
            states["scaler"] = read_state(folder, "scaler")
        return states
    # The previous release: the scheduler was accelerate's custom_checkpoint_0.pkl.
    states["optimizer"] = _load_pickle(folder / "optimizer.bin")
    states["scheduler"] = _load_pickle(folder / "custom_checkpoint_0.pkl")
    legacy = _load_pickle(folder / f"random_states_{index}.pkl")
    device = accelerator.device.type
    states["rng"] = {"step": legacy.get("step", 0), "python": legacy["random_state"],
                     "numpy": legacy["numpy_random_seed"], "torch": legacy["torch_manual_seed"]}
    if f"torch_{device}_manual_seed" in legacy:
        device_states = legacy[f"torch_{device}_manual_seed"]
        states["rng"]["device"] = {"type": device, "states": device_states if isinstance(device_states, list)
                                   else [device_states]}
    if accelerator.scaler is not None:
        states["scaler"] = _load_pickle(folder / "scaler.pt")
    return states


def match_parameter_layout(optimizer: torch.optim.Optimizer) -> None:
    """Lay out each per-parameter state tensor (e.g. SGD's momentum buffer) in memory as its parameter.

    A checkpoint holds tensors in the default layout (safetensors stores contiguous ones), and
    ``Optimizer.load_state_dict`` keeps it; the weights of a ``channels_last`` model are NHWC. torch's fused
    SGD walks the weight, its gradient and its buffer as flat memory without checking that they are laid out
    alike (found on the CPU; the default foreach kernel follows each tensor's layout), so a contiguous
    buffer beside an NHWC weight silently mixed the momentum of other elements into the first update after
    a resume.
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def load_training_state(accelerator: Accelerator, folder: Path, objects: TrainingObjects) -> None:
    """Load a checkpoint's states into the prepared objects, the gradient scaler and the random-number
    generators. Raises (a safetensors, JSON, OS or ``RefusedPickleError``) when a file is unusable."""
    states = _read_training_state(accelerator, folder)
    # Saved from the unwrapped model; a checkpoint of the previous release under several processes has
    # DistributedDataParallel's prefix.
    weights = {name.removeprefix("module."): tensor for name, tensor in states["model"].items()}
    accelerator.unwrap_model(objects.model).load_state_dict(weights)
    objects.optimizer.load_state_dict(states["optimizer"])
    match_parameter_layout(objects.optimizer)
    objects.scheduler.load_state_dict(states["scheduler"])
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(states["scaler"])
    if states["rng"] is not None:
        _set_rng_state(accelerator, states["rng"])


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, state: dict[str, Any], keep: int,
                    objects: TrainingObjects) -> Path:
    """Save the training state of ``objects`` and ``state`` (with ``epoch`` and ``step``) as a complete
    checkpoint.

    The folder is written as ``<name>.tmp`` and renamed when complete; older checkpoints beyond ``keep``
    are pruned after that. A write error (a full disk) removes the partial folder and raises a
    ``TrainingError`` saying so; the previous checkpoints are untouched.
    """
    final = checkpoint_dir(output_dir, state["epoch"], state["step"])
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    try:
        if accelerator.is_main_process and partial.exists():
            shutil.rmtree(partial)
        accelerator.wait_for_everyone()
        save_training_state(accelerator, partial, objects)
        accelerator.wait_for_everyone()  # every process has written its RNG state
        if accelerator.is_main_process:
            (partial / TRAINER_STATE).write_text(json.dumps(state, indent=2), encoding="utf-8")
            sync_files(partial)
            if final.exists():  # one that resume skipped as unusable
                shutil.rmtree(final)
            os.replace(partial, final)
            prune_checkpoints(output_dir, keep)
    except Exception as error:  # torch reports a failed write as a RuntimeError, safetensors its own
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise TrainingFailure(f"could not write the checkpoint {final}: {save_failure(error, output_dir)} "
                              "Its partial files were removed and the earlier checkpoints are intact: fix "
                              "the cause and continue with --resume.") from None
    accelerator.wait_for_everyone()
    return final



