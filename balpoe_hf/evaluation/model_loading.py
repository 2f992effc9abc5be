"""Loading a saved model for evaluation, with the checks that keep a report from describing a model that does
not exist: a folder settled after an interrupted save, safetensors weights only, weights that fit the config
and are finite, and an image processor that produces what the model was trained on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from safetensors import SafetensorError

from ..data.loading import TrainingData, align_labels, load_training_data, offline_mode
from ..errors import EvaluationError, TrainingError, short_list
from ..models.balpoe.modeling_balpoe import BalPoEForImageClassification
from ..recipes import Recipe, load_recipe
from ..recipes.recipe import FEW_SHOT_THRESHOLD, MANY_SHOT_THRESHOLD
from ..run_folder import settle
from .predictions import predict


def resolve_device(device: str | None) -> str:
    """``device``, checked to exist here (default: ``cuda`` when available, else ``cpu``)."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise EvaluationError(f"unknown device {device!r}; use cpu, cuda or cuda:N.") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"--device {device}, but torch sees no CUDA GPU here "
                              "(torch.cuda.is_available() is False); use --device cpu.")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise EvaluationError(f"--device {device}, but MPS is not available here; use --device cpu.")
    return device


def load_model(model_id: str | Path, device: str = "cpu") -> tuple[BalPoEForImageClassification, Any]:
    """The BalPoE model (in eval mode, on ``device``) and the image processor saved with it.

    A local folder is first brought back to one state if a kill interrupted a save into it
    (``run_folder.settle``). Refuses (``EvaluationError``) a folder without ``config.json``, a
    ``config.json`` that ``BalPoEConfig`` refuses, pickle weights (only safetensors are loaded: unpickling
    can run code), weights that do not fit the config (missing tensors, other shapes: transformers would
    initialise the missing layers at random and the report would be of a model that does not exist),
    weights holding NaN or infinite values, and an image processor that does not produce the input the
    config describes (its size, scaling and normalisation: ``check_processor``).
    """
    from transformers import AutoImageProcessor
    from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
    from transformers.utils import logging as transformers_logging

    folder = Path(model_id)
    if folder.is_dir():
        try:
            settle(folder, "balpoe-evaluate")
        except TrainingError as error:
            raise EvaluationError(str(error)) from None
    if folder.is_dir() and not (folder / CONFIG_NAME).is_file():
        raise EvaluationError(f"{model_id} has no {CONFIG_NAME}: a BalPoE model folder holds its config "
                              "beside the weights; pass the folder that balpoe-train or save_pretrained "
                              "wrote.")
    if folder.is_dir() and not any((folder / name).is_file() for name in (SAFE_WEIGHTS_NAME,
                                                                          SAFE_WEIGHTS_INDEX_NAME)):
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        raise EvaluationError(f"{model_id} has no {SAFE_WEIGHTS_NAME}" + (
            f", only the pickle weights {pickled}, which balpoe-hf does not load (unpickling a file can run "
            "code): if you trust where they come from, load them yourself and save the model again with "
            "save_pretrained (safetensors)." if pickled else ": save the model with save_pretrained."))
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its table of missing weights: refused below, in one message
    try:
        model, info = BalPoEForImageClassification.from_pretrained(model_id, output_loading_info=True,
                                                                   use_safetensors=True)
        processor = AutoImageProcessor.from_pretrained(model_id)
    except SafetensorError as error:
        raise EvaluationError(f"the weights in {str(model_id)!r} cannot be read ({error}): the file is "
                              "truncated or damaged; save the model again (or copy it again).") from None
    except OSError as error:
        hint = ("it is offline (HF_HUB_OFFLINE=1), so pass a local directory written by balpoe-train or "
                "save_pretrained" if offline_mode() and not Path(model_id).exists()
                else "pass a directory holding config.json, the safetensors weights and "
                     "preprocessor_config.json")
        raise EvaluationError(f"cannot load a BalPoE model and its image processor from {str(model_id)!r}: "
                              f"{error}\nHint: {hint}.") from None
    except ValueError as error:  # BalPoEConfig's checks of the values in config.json
        raise EvaluationError(f"the {CONFIG_NAME} of {model_id} is not a valid BalPoE config: {error} Fix "
                              "it, or save the model again with save_pretrained.") from None
    except RuntimeError:  # transformers: weights whose shapes do not fit the config
        raise EvaluationError(_weights_mismatch(model_id, "have other shapes than")) from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    if info["missing_keys"] or info["mismatched_keys"] or info["unexpected_keys"]:
        raise EvaluationError(_weights_mismatch(model_id, "do not fit", model.config))
    if not model.config.class_counts:
        raise EvaluationError(f"{model_id} has no class_counts in its config: the training prior is needed "
                              "for the shot groups. Set BalPoEConfig.class_counts when training.")
    not_finite = [name for name, tensor in model.state_dict().items()
                  if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if not_finite:
        raise EvaluationError(f"the weights in {model_id} hold NaN or infinite values (in "
                              f"{short_list(not_finite, 'tensors')}): the training diverged or the file was "
                              "damaged; use an earlier checkpoint or train again.")
    check_processor(processor, model.config, model_id)
    return model.to(device).eval(), processor


@dataclass
class LoadedRun:
    """A finished training run: its recipe, its model (in eval mode) with its image processor, and its data as
    it trained on it (the same files, imbalance, selection and held-out part)."""

    recipe: Recipe
    model: BalPoEForImageClassification
    processor: Any
    data: TrainingData

    @property
    def class_names(self) -> list[str]:
        """The model's class names, in the order of its logits."""
        return [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    @property
    def train_counts(self) -> list[int]:
        """The training split's images per class (``config.class_counts``)."""
        return [int(c) for c in self.model.config.class_counts]

    def predict(self, ds: datasets.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Uniform-prior logits ``(N, C)`` and expert logits ``(N, E, C)`` of ``ds``, one pass."""
        return predict(self.model, self.processor, ds, self.recipe.image_column, self.recipe.eval_batch_size)

    def labels(self, ds: datasets.Dataset) -> np.ndarray:
        """The class indices of ``ds`` in the model's order of class names."""
        return align_labels(ds, self.recipe.label_column, self.class_names)


def load_run(run_dir: str | Path, device: str = "cpu") -> LoadedRun:
    """The run in ``run_dir`` (``load_model`` and the data its ``recipe.yaml`` names); an ``EvaluationError``
    for a folder without ``recipe.yaml`` (a model folder alone does not say what it trained on)."""
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise EvaluationError(f"{run_dir} holds no recipe.yaml: give the folder of a training run "
                              "(balpoe-train or balpoe-compare OUTPUT/METHOD), whose recipe names the data "
                              "it trained on.")
    recipe = load_recipe(config=run_dir / "recipe.yaml")
    model, processor = load_model(run_dir, device)
    return LoadedRun(recipe, model, processor, load_training_data(recipe))


def check_processor(processor: Any, config: Any, model_id: str | Path = "the model") -> None:
    """Refuse an image processor that does not produce what the model was trained on: it is run on a
    plain-coloured 37 x 53 image, whose output must be ``image_size`` square and equal ``(v / 255 - mean) /
    std`` per channel with the config's mean and std (a hand-edited ``preprocessor_config.json`` that turns
    normalisation off or changes the size would otherwise give wrong answers without a word)."""
    from PIL import Image

    colour = (200, 120, 40)
    try:
        pixels = processor(images=Image.new("RGB", (37, 53), colour), return_tensors="pt")["pixel_values"]
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise EvaluationError(f"the image processor of {model_id} (preprocessor_config.json) cannot process "
                              f"an image: {error}") from None
    side = config.image_size
    problems = []
    if tuple(pixels.shape[-2:]) != (side, side):
        problems.append(f"it makes {tuple(pixels.shape[-2:])} images, the config's image_size is {side}")
    mean, std = config.image_mean or [], config.image_std or []
    if len(mean) == len(std) == pixels.shape[1]:
        expected = torch.tensor([(v / 255 - m) / s for v, m, s in zip(colour, mean, std, strict=True)])
        got = pixels[0].flatten(1).mean(1).double()
        if not torch.allclose(got, expected.double(), atol=1e-3):
            shown = [round(v, 3) for v in got.tolist()]
            problems.append(f"it scales and normalises pixels otherwise than the config's image_mean {mean} "
                            f"and image_std {std} (a pixel {colour} gives {shown}, not "
                            f"{[round(v, 3) for v in expected.tolist()]})")
    if problems:
        raise EvaluationError(f"the image processor of {model_id} (preprocessor_config.json) does not fit "
                              f"its config.json: {'; '.join(problems)}. Put the preprocessor_config.json "
                              "saved with the model back, or rebuild it with "
                              "balpoe_hf.build_image_processor(config).save_pretrained(folder).")


def _weights_mismatch(model_id: str | Path, how: str, config: Any = None) -> str:
    setting = "" if config is None else (f" (num_experts {config.num_experts}, {config.num_labels} classes, "
                                         f"backbone {config.backbone})")
    return (f"the weights in {model_id} {how} the model its config.json describes{setting}: they are of "
            "another model, whose layers would be initialised at random or left out. Put the config.json "
            "saved with these weights back, or save the model again with save_pretrained.")


def run_shot_thresholds(model: BalPoEForImageClassification) -> tuple[int, int]:
    """The many- and few-shot thresholds of the run that trained ``model``: those of the ``recipe.yaml`` saved
    beside it (in the folder or Hub repository it was loaded from), else the package's defaults (100, 20)."""
    import yaml
    from transformers.utils import cached_file

    recipe: dict[str, Any] = {}
    if model.name_or_path:
        try:
            path = cached_file(model.name_or_path, "recipe.yaml", _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
        except OSError:  # not a folder nor a reachable repository: the model was built in memory
            path = None
        if path is not None:
            recipe = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    return (int(recipe.get("many_threshold", MANY_SHOT_THRESHOLD)),
            int(recipe.get("few_threshold", FEW_SHOT_THRESHOLD)))
