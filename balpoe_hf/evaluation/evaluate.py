"""Evaluate a BalPoE model on a balanced test set and on label-shifted versions of it, as a Python API.

    from balpoe_hf.evaluation.evaluate import evaluate_model, load_model
    from balpoe_hf.data.loading import load_split

    model, processor = load_model("runs/fashion-mnist-lt-quick")
    test, _ = load_split(dataset="fashion-mnist")
    result = evaluate_model(model, processor, test, shifts="all", priors=["none", "oracle", "em"])

The model runs once per balanced test image, with a uniform target prior; every shifted set (the LADE/SADE
protocol of ``make_shifted_test``: forward50 ... uniform ... backward50) is a selection of those cached
logits, and every prior mode adds ``log(C * pi_t)`` to them, which is exactly what
``model.set_target_prior(pi_t)`` does inside the model. Prior modes: ``none`` (uniform target prior),
``oracle`` (the shifted set's true label distribution), and the estimators of
``balpoe_hf.label_shift.PRIOR_ESTIMATORS``, which estimate that distribution from the model's logits on the
unlabelled shifted set (``label_shift.estimate_prior``, as ``model.adapt_to_unlabeled`` does): ``auto`` (the
default), ``em``, ``em-bcts``, ``bbse`` and ``rlls``. ``em-bcts``, ``bbse`` and ``rlls`` need the held-out
calibration that a run trained with ``holdout_fraction > 0`` saves in ``config.calibration``. Beside the
full shifted sets, ``deployment_batches`` adapts on small batches drawn from them and ``stream_batches`` on
a stream of batches (``label_shift.PriorStream``), as deployments do.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from safetensors import SafetensorError

from ..data.loading import align_labels, offline_mode
from ..data.splits import ALL_SHIFTS, make_shifted_test, short_list, split_shift
from ..data.transforms import to_rgb
from ..errors import EvaluationError, TrainingError
from ..metrics import accuracy_report, calibration_report, long_tail_report, percent
from ..models.balpoe.calibration import apply_calibration
from ..models.balpoe.holdout_statistics import holdout_calibration
from ..models.balpoe.label_shift import (
    NEEDS_CALIBRATION,
    PRIOR_ESTIMATORS,
    PriorEstimate,
    PriorStream,
    describe_auto,
    estimate_prior,
    is_legacy_choice,
    resolve_estimator,
)
from ..models.balpoe.modeling_balpoe import BalPoEForImageClassification
from ..models.balpoe.priors import adjust_logits
from ..run_folder import (
    check_writable,
    model_weight_files,
    output_lock,
    read_manifest,
    run_output_files,
    save_failure,
    settle,
    staged_save,
    written_by_package,
)

PRIOR_MODES = ("none", "oracle", *PRIOR_ESTIMATORS)


def parse_shifts(shifts: str | Sequence[str]) -> list[str]:
    """``"all"``, a comma list like ``"forward50,uniform,backward10"`` or a list of names -> shift names."""
    if isinstance(shifts, str):
        if shifts.strip() == "all":
            return list(ALL_SHIFTS)
        shifts = shifts.split(",")
    names = [name.strip() for name in shifts if name.strip()]
    bad = []
    for name in names:
        try:
            split_shift(name)
        except ValueError:
            bad.append(name)
    if bad or not names:
        raise EvaluationError(f"unknown shifts {bad or shifts!r}; use 'all' or names like forward50, "
                              "uniform, backward10 (forward/backward followed by an imbalance ratio >= 1).")
    return names


def parse_priors(priors: str | Sequence[str]) -> list[str]:
    """A comma list (or a list) of prior modes out of ``PRIOR_MODES``; ``"all"`` is every one of them."""
    if isinstance(priors, str) and priors.strip() == "all":
        return list(PRIOR_MODES)
    if isinstance(priors, str):
        priors = priors.split(",")
    modes = [mode.strip() for mode in priors if mode.strip()]
    bad = [mode for mode in modes if mode not in PRIOR_MODES]
    if bad or not modes:
        raise EvaluationError(f"unknown prior modes {bad or priors!r}; choose from {', '.join(PRIOR_MODES)}.")
    return modes


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


def report_files(output: str | Path, list_names: Sequence[str] = ()) -> list[Path]:
    """The files a report at ``output`` writes: the JSON and its two pictures, and for several test lists
    (``list_names``) each list's report and pictures beside it."""
    output = Path(output)
    reports = [output, *(output.with_name(f"{output.stem}_{name}.json") for name in list_names)]
    return [path for report in reports for path in (report, *_picture_paths(report).values())]


def report_owner(output: str | Path, model_dir: str | Path | None = None) -> Path:
    """The folder whose manifest lists the report at ``output``: the model's run folder when the report goes
    inside a run, else the report's own folder."""
    output = Path(output).resolve()
    inside = model_dir is not None and Path(model_dir).is_dir() and output.is_relative_to(
        Path(model_dir).resolve())
    if inside:
        try:
            if read_manifest(model_dir) is not None:
                return Path(model_dir)
        except TrainingError:
            pass  # a damaged manifest of the model's folder: the report keeps its own list
    return output.parent


@contextlib.contextmanager
def staged_report(output: str | Path, model_dir: str | Path | None = None) -> Iterator[Path]:
    """Where to write the report at ``output`` (and the files beside it): the same place in a staging folder
    of ``report_owner``; when the block ends the files replace their namesakes at once and are listed as
    ``balpoe-evaluate``'s in its manifest (``checkpoints.staged_save``), under its lock."""
    output = Path(output)
    owner = report_owner(output, model_dir)
    with output_lock(owner, "balpoe-evaluate --output"), staged_save(owner, reports=True) as stage:
        yield stage / output.resolve().relative_to(owner.resolve())


def check_output(output: str | Path, model_dir: str | Path | None = None,
                 list_names: Sequence[str] = ()) -> None:
    """Check that the report and its pictures can be written at ``output``, before any inference.

    The nearest existing folder on the way to ``output`` must take a new file (tried with a temporary
    file, which is removed), and matplotlib must be installed for the pictures. A file the report would
    replace must be one an earlier ``balpoe-evaluate`` wrote, unchanged since (listed in the manifest of
    ``report_owner``): never a model's weights or config, nor a file of the user's.
    """
    output = Path(output)
    if output.is_dir():
        raise EvaluationError(f"--output {output} is a directory; give a file name, e.g. "
                              f"{output / 'report.json'}.")
    check_writable(output.parent, "--output into", EvaluationError)
    files = report_files(output, list_names)
    for path in files:
        if path.exists() and not os.access(path, os.W_OK):
            raise EvaluationError(f"cannot write --output {output}: {path} exists and is read-only.")
    owner = report_owner(output, model_dir)
    try:
        foreign = [path for path in files if path.exists() and not written_by_package(
            owner, path.resolve().relative_to(owner.resolve()).as_posix(), report=True)]
    except TrainingError as error:  # a damaged manifest
        raise EvaluationError(f"cannot write --output {output}: {error}") from None
    if foreign:
        listed = short_list([str(path) for path in foreign], "files")
        raise EvaluationError(f"--output {output} would replace {listed}, which balpoe-evaluate did not "
                              "write (or which were changed since): choose another --output (e.g. "
                              "RUN_DIR/eval/report.json), or move those files away.")
    if importlib.util.find_spec("matplotlib") is None:
        raise EvaluationError("--output also draws a reliability diagram and a per-class plot, which need "
                              "matplotlib: pip install 'balpoe-hf[plots]'.")


def check_shifts(labels: np.ndarray, train_counts: list[int], shifts: list[str], seed: int = 0) -> None:
    """Build every shifted test set from the labels alone, so that a test set too small for a shift is
    refused before the inference (``shifted_rows`` reads no image)."""
    for shift in shifts:
        shifted_rows(labels, train_counts, shift, seed)


# --------------------------------------------------------------------------- model and predictions


def load_model(model_id: str | Path, device: str = "cpu") -> tuple[BalPoEForImageClassification, Any]:
    """The BalPoE model (in eval mode, on ``device``) and the image processor saved with it.

    A local folder is first brought back to one state if a kill interrupted a save into it
    (``checkpoints.settle``). Refuses (``EvaluationError``) a folder without ``config.json``, a
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


@torch.inference_mode()
def predict(model: BalPoEForImageClassification, processor: Any, ds: datasets.Dataset,
            image_column: str = "image", batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits with a uniform target prior ``(N, C)`` and expert logits ``(N, E, C)``, one pass over ``ds``."""
    if image_column not in ds.column_names:
        raise EvaluationError(f"the test set has no image column {image_column!r}; its columns are "
                              f"{ds.column_names}. Name it with --image-column.")
    if not isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image())
    images = ds.select_columns([image_column])
    device = next(model.parameters()).device
    logits, expert_logits = [], []
    for start in range(0, len(images), batch_size):
        batch = [to_rgb(image) for image in images[start:start + batch_size][image_column]]
        pixel_values = processor(images=batch, return_tensors="pt")["pixel_values"].to(device)
        out = model(pixel_values=pixel_values, target_prior="uniform")
        logits.append(out.logits.float().cpu())  # (B, C)
        expert_logits.append(out.expert_logits.float().cpu())  # (B, E, C)
    return torch.cat(logits), torch.cat(expert_logits)


# --------------------------------------------------------------------------- shifts and priors


def shifted_rows(labels: np.ndarray, train_counts: list[int], shift: str, seed: int = 0) -> np.ndarray:
    """Row indices of the balanced test set that make up one shifted test set."""
    kind, ratio = split_shift(shift)
    # make_shifted_test reads only the label column: give it the labels and a row number, no images.
    table = datasets.Dataset.from_dict({"label": labels, "row": np.arange(len(labels))})
    try:
        shifted = make_shifted_test(table, train_counts, kind, ratio, label_column="label", seed=seed)
    except ValueError as error:
        raise EvaluationError(f"cannot build the {shift} test set: {error}") from None
    return np.asarray(shifted["row"], dtype=np.int64)


def with_target_prior(uniform_logits: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Logits ``(N, C)`` for target prior ``pi_t`` from logits with a uniform target: ``+ log(C * pi_t)``."""
    # A class the prior gives exactly zero (EM can drive one there) would get -inf and an infinite NLL;
    # the smallest positive float keeps it finite.
    floor = torch.finfo(torch.float64).tiny
    # The logits are already adjusted to a uniform target, so no training-prior term is left to remove.
    return adjust_logits(uniform_logits.double(), torch.zeros(()), 0.0, prior.double().clamp_min(floor))


def _estimate_summary(estimate: PriorEstimate, true_prior: torch.Tensor) -> dict[str, Any]:
    return {
        "prior": estimate.prior.tolist(),
        # Total variation distance between the prior used and the truth: how well the estimator did.
        "error": float(0.5 * (estimate.prior - true_prior).abs().sum()),
        "kept_uniform": estimate.kept_uniform,
        "shift_spread": estimate.shift_spread,
    }


def evaluate_shifts(uniform_logits: torch.Tensor, labels: np.ndarray, train_counts: list[int],
                    shifts: list[str], priors: list[str], seed: int = 0,
                    calibration: dict[str, Any] | None = None, shift_estimator: dict[str, Any] | None = None,
                    **report_kwargs: Any) -> dict[str, Any]:
    """Per shift: its size, true prior, each estimator's prior, and a long_tail_report per prior mode.

    ``calibration`` is the model's ``config.calibration`` (``NEEDS_CALIBRATION`` lists the modes that cannot
    do without it) and ``shift_estimator`` its ``config.shift_estimator``.
    """
    num_classes = uniform_logits.shape[1]
    results: dict[str, Any] = {}
    for shift in shifts:
        rows = shifted_rows(labels, train_counts, shift, seed)
        logits, targets = uniform_logits[rows], labels[rows]
        true_prior = torch.from_numpy(np.bincount(targets, minlength=num_classes) / len(targets))
        entry: dict[str, Any] = {"num_samples": len(rows), "test_prior": true_prior.tolist(), "estimates": {},
                                 "reports": {}}
        for mode in priors:
            if mode == "none":
                adjusted = logits
            elif mode == "oracle":
                adjusted = with_target_prior(logits, true_prior)
            else:
                estimate = estimate_prior(logits, calibration, mode, shift_estimator=shift_estimator)
                entry["estimates"][mode] = _estimate_summary(estimate, true_prior)
                adjusted = with_target_prior(logits, estimate.prior)
            entry["reports"][mode] = long_tail_report(adjusted, targets, train_counts, **report_kwargs)
        results[shift] = entry
    return results


def deployment_batches(uniform_logits: torch.Tensor, labels: np.ndarray, train_counts: list[int],
                       shifts: list[str], priors: list[str], sizes: Sequence[int], draws: int = 10,
                       seed: int = 0, calibration: dict[str, Any] | None = None,
                       shift_estimator: dict[str, Any] | None = None) -> dict[str, Any]:
    """Prior modes adapting on small unlabelled batches, as a deployment would: per batch size and shift,
    ``draws`` batches drawn without replacement from the shifted test set, each adapted on its own images and
    scored on them. Returns size -> shift -> mode -> ``{"mean_gain", "worst_gain"}``, the top-1 gain over
    ``none`` (fractions) averaged over the draws and the worst draw. A size larger than a shifted set is
    skipped for that set."""
    num_classes = uniform_logits.shape[1]
    check_deployment_sizes(sizes, draws, num_classes)
    rng = np.random.default_rng(seed)
    modes = [mode for mode in priors if mode != "none"]
    results: dict[str, Any] = {}
    for size in sizes:
        results[str(size)] = {}
        for shift in shifts:
            rows = shifted_rows(labels, train_counts, shift, seed)
            if len(rows) < size:
                continue
            gains: dict[str, list[float]] = {mode: [] for mode in modes}
            for _ in range(draws):
                batch = rng.choice(rows, size, replace=False)
                logits, targets = uniform_logits[batch], labels[batch]
                baseline = float((logits.argmax(1).numpy() == targets).mean())
                for mode in modes:
                    if mode == "oracle":
                        prior = torch.from_numpy(np.bincount(targets, minlength=num_classes) / size)
                    else:
                        prior = estimate_prior(logits, calibration, mode,
                                               shift_estimator=shift_estimator).prior
                    adjusted = with_target_prior(logits, prior)
                    gains[mode].append(float((adjusted.argmax(1).numpy() == targets).mean()) - baseline)
            results[str(size)][shift] = {
                mode: {"mean_gain": float(np.mean(values)), "worst_gain": min(values)}
                for mode, values in gains.items()}
    return results


# The drift scenario of ``stream_batches``: a stream that switches from one shift to its opposite.
DRIFT_SCHEDULE = (("forward50", 5), ("backward50", 10))


def _batch_gain(logits: torch.Tensor, targets: np.ndarray, prior: torch.Tensor) -> float:
    """Top-1 accuracy of ``logits + log(C prior)`` minus that of ``logits`` on one batch."""
    adjusted = with_target_prior(logits, prior)
    before = (logits.argmax(1).numpy() == targets).mean()
    return float((adjusted.argmax(1).numpy() == targets).mean() - before)


def _stream_gains(uniform_logits: torch.Tensor, labels: np.ndarray,
                  schedule: Sequence[tuple[np.ndarray, int]], modes: Sequence[str], batch_size: int,
                  draws: int, forgetting: float, rng: np.random.Generator, calibration: dict[str, Any] | None,
                  shift_estimator: dict[str, Any] | None) -> dict[str, list[float]]:
    """Mean gain over ``none`` per batch of a stream (``schedule``: row pools and how many batches to draw
    from each, in turn), averaged over ``draws`` streams; ``oracle`` predicts with the pool's label
    distribution. Each batch is drawn without replacement from its pool, independently of the others."""
    num_classes = uniform_logits.shape[1]
    total = sum(count for _, count in schedule)
    gains = {mode: np.zeros(total) for mode in modes}
    for _ in range(draws):
        stream, step = PriorStream(forgetting), 0
        for rows, count in schedule:
            truth = torch.from_numpy(np.bincount(labels[rows], minlength=num_classes) / len(rows))
            for _ in range(count):
                batch = rng.choice(rows, batch_size, replace=False)
                logits, targets = uniform_logits[batch], labels[batch]
                stream.add(logits)
                for mode in modes:
                    prior = truth if mode == "oracle" else estimate_prior(
                        stream.logits, calibration, mode, weights=stream.weights,
                        shift_estimator=shift_estimator).prior
                    gains[mode][step] += _batch_gain(logits, targets, prior) / draws
                step += 1
    return {mode: values.tolist() for mode, values in gains.items()}


def stream_batches(uniform_logits: torch.Tensor, labels: np.ndarray, train_counts: list[int],
                   shifts: list[str], priors: list[str], batch_size: int, *, batches: int = 10,
                   draws: int = 10, seed: int = 0, drift_forgetting: float = 0.5,
                   calibration: dict[str, Any] | None = None,
                   shift_estimator: dict[str, Any] | None = None) -> dict[str, Any]:
    """Prior modes adapting on a stream of unlabelled batches, as a deployment that keeps its evidence would.

    Per shift, ``draws`` streams of ``batches`` batches of ``batch_size`` images from the shifted set; after
    each batch every mode estimates the prior from all the batches so far (``label_shift.PriorStream``, no
    forgetting) and predicts that batch. Then the drift scenario (``DRIFT_SCHEDULE``: batches from forward50,
    then from backward50) with ``drift_forgetting``. Returns ``{"batch_size", "batches", "draws",
    "shifts": {shift: {mode: [mean gain over none per batch]}}, "drift": {"schedule", "forgetting",
    "gains"}}`` (fractions); a shift whose set is smaller than a batch is left out."""
    if batch_size < 1 or batches < 1 or draws < 1:
        raise EvaluationError(f"stream batch size, batches and draws must be positive, got {batch_size}, "
                              f"{batches} and {draws}.")
    if not 0 < drift_forgetting <= 1:
        raise EvaluationError(f"the drift scenario's forgetting must lie in (0, 1], got {drift_forgetting}.")
    rng = np.random.default_rng(seed)
    modes = [mode for mode in priors if mode != "none"]
    context = {"modes": modes, "batch_size": batch_size, "draws": draws, "rng": rng,
               "calibration": calibration, "shift_estimator": shift_estimator}
    results: dict[str, Any] = {"batch_size": batch_size, "batches": batches, "draws": draws, "shifts": {}}
    for shift in shifts:
        rows = shifted_rows(labels, train_counts, shift, seed)
        if len(rows) >= batch_size:
            results["shifts"][shift] = _stream_gains(uniform_logits, labels, [(rows, batches)],
                                                     forgetting=1.0, **context)
    pools = [(shifted_rows(labels, train_counts, shift, seed), count) for shift, count in DRIFT_SCHEDULE]
    if all(len(rows) >= batch_size for rows, _ in pools):
        results["drift"] = {"schedule": [list(step) for step in DRIFT_SCHEDULE],
                            "forgetting": drift_forgetting,
                            "gains": _stream_gains(uniform_logits, labels, pools, forgetting=drift_forgetting,
                                                   **context)}
    return results


def check_deployment_sizes(sizes: Sequence[int], draws: int, num_classes: int) -> None:
    """Refuse deployment batches smaller than the number of classes (or no draws): such a batch cannot hold
    every class, and its ``oracle`` prior (the batch's own label counts) all but gives the answers away."""
    small = [size for size in sizes if size < num_classes]
    if draws < 1 or small:
        raise EvaluationError(f"deployment batches must hold at least as many images as the model has "
                              f"classes ({num_classes}), and --deployment-draws must be positive; got sizes "
                              f"{list(sizes)} and {draws} draws. A smaller batch cannot hold every class, "
                              "and its 'oracle' prior (the batch's own labels) would give the answers away.")


def default_priors() -> list[str]:
    """``none``, ``oracle`` and the default unknown-prior mode ``auto`` (which works with or without a
    held-out calibration)."""
    return ["none", "oracle", "auto"]


def check_calibration_for(priors: Sequence[str], calibration: dict[str, Any] | None, model_id: str) -> None:
    """Raise an ``EvaluationError`` when a prior mode needs the held-out calibration the model lacks."""
    needy = [mode for mode in priors if mode in NEEDS_CALIBRATION]
    if needy and calibration is None:
        raise EvaluationError(
            f"prior modes {needy} need the held-out calibration (config.calibration), which {model_id} "
            "lacks: train it with --holdout-fraction 0.1 (balpoe-train), or evaluate with --prior "
            "none,oracle,auto,em.")


def calibration_effect(logits: torch.Tensor, labels: torch.Tensor | np.ndarray, calibration: dict[str, Any],
                       n_bins: int = 15) -> dict[str, float]:
    """ECE and NLL of uniform-prior logits ``(N, C)`` on a balanced set after the held-out calibration.

    ``calibration`` is a model's ``config.calibration``: ``*_temperature_scaling`` use ``softmax(z / T_ts)``,
    ``*_bcts`` use ``softmax(z / T + b)``. The labels must follow a uniform prior (a balanced test set), the
    prior these calibrated probabilities are for.
    """
    scaled = calibration_report(apply_calibration(logits.double(), calibration["ts_temperature"]), labels,
                                n_bins)
    bcts = calibration_report(apply_calibration(logits.double(), calibration["temperature"],
                                                calibration["bias"]), labels, n_bins)
    return {"ece_temperature_scaling": scaled["ece"], "nll_temperature_scaling": scaled["nll"],
            "ece_bcts": bcts["ece"], "nll_bcts": bcts["nll"]}


def absent_classes(labels: np.ndarray, num_classes: int) -> list[int]:
    """The classes without an image among ``labels`` (class indices)."""
    return np.flatnonzero(np.bincount(labels, minlength=num_classes) == 0).tolist()


def absent_classes_warning(absent: Sequence[int], num_classes: int, what: str = "test set") -> str:
    """The warning for a test set without images of some classes: its averages leave those classes out."""
    return (f"warning: the {what} has no image of classes {short_list(absent)}: balanced accuracy and the "
            f"many / medium / few-shot accuracies average over the {num_classes - len(absent)} of "
            f"{num_classes} classes it has.")


def run_shot_thresholds(model: BalPoEForImageClassification) -> tuple[int, int]:
    """The many- and few-shot thresholds of the run that trained ``model``: those of the ``recipe.yaml`` saved
    beside it (in the folder or Hub repository it was loaded from), else CIFAR-100-LT's 100 and 20."""
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
    return int(recipe.get("many_threshold", 100)), int(recipe.get("few_threshold", 20))


@dataclass
class EvaluationResult:
    """``evaluate_model``'s output: the JSON-ready ``report`` and the predictions it was computed from."""

    report: dict[str, Any]
    logits: torch.Tensor  # (N, C), adjusted to a uniform target prior
    expert_logits: torch.Tensor  # (N, E, C), raw
    labels: np.ndarray  # (N,), model class indices


def evaluate_model(model: BalPoEForImageClassification, processor: Any, ds: datasets.Dataset, *,
                   image_column: str = "image", label_column: str = "label",
                   shifts: str | Sequence[str] = "all",
                   priors: str | Sequence[str] | None = None,
                   batch_size: int = 256, n_bins: int = 15, many: int | None = None, few: int | None = None,
                   seed: int = 0, deployment_sizes: Sequence[int] = (),
                   deployment_draws: int = 10, stream_size: int | None = None, stream_length: int = 10,
                   stream_draws: int = 10, drift_forgetting: float = 0.5) -> EvaluationResult:
    """The balanced-test-set report, each expert's accuracy, and the shifted sets under every prior mode.

    ``priors=None``: ``default_priors`` (``none``, ``oracle`` and ``auto``). ``many`` / ``few``: the shot
    thresholds; by default those of the run that trained the model (``run_shot_thresholds``), so that the
    groups are the ones its training printout used.

    The report is a JSON-ready dict: ``balanced`` (``long_tail_report``, plus ``calibration_effect`` when the
    model has a held-out calibration), ``experts`` (raw-logit accuracy of each expert as trained),
    ``shift_accuracy`` (prior mode -> shift -> top-1 accuracy) and ``shifts`` (per shift: its size, true
    prior, each estimator's prior with its error, and a full report per prior mode). ``shift_estimator``
    says what ``auto`` ran. With ``deployment_sizes``, ``deployment_batches`` holds each mode on
    ``deployment_draws`` small batches per shift (``deployment_batches``); with ``stream_size``, ``stream``
    holds each mode on streams of ``stream_length`` batches of that size (``stream_batches``,
    ``stream_draws`` streams per shift, and the drift scenario with ``drift_forgetting``).
    ``classes_without_test_images`` lists the classes the test set lacks, which the averages leave out
    (``absent_classes_warning`` says so).
    """
    calibration = model.config.calibration
    if many is None or few is None:
        run_many, run_few = run_shot_thresholds(model)
        many, few = run_many if many is None else many, run_few if few is None else few
    shifts, priors = parse_shifts(shifts), parse_priors(priors or default_priors())
    shift_estimator = model.config.shift_estimator
    check_calibration_for(priors, calibration, "the model")
    train_counts = [int(c) for c in model.config.class_counts]
    id2label = model.config.id2label
    labels = align_labels(ds, label_column, [id2label[i] for i in range(len(id2label))])
    check_shifts(labels, train_counts, shifts, seed)
    if deployment_sizes:
        check_deployment_sizes(deployment_sizes, deployment_draws, len(train_counts))
    report_kwargs = {"n_bins": n_bins, "many": many, "few": few}

    start = time.perf_counter()
    uniform_logits, expert_logits = predict(model, processor, ds, image_column, batch_size)
    seconds = time.perf_counter() - start
    balanced = long_tail_report(uniform_logits, labels, train_counts, **report_kwargs)
    if calibration is not None:
        balanced.update(calibration_effect(uniform_logits, labels, calibration, n_bins))
    # Each expert as trained (biased towards the head for lambda > 0, the tail for lambda < 0).
    experts = []
    for e in range(expert_logits.shape[1]):
        accuracy = accuracy_report(expert_logits[:, e].argmax(1), labels, train_counts, many, few)
        accuracy.pop("per_class_accuracy")
        experts.append({"lambda": model.config.lambdas[e], **accuracy})
    shift_results = evaluate_shifts(uniform_logits, labels, train_counts, shifts, priors, seed, calibration,
                                    shift_estimator, **report_kwargs)
    shift_accuracy = {mode: {shift: shift_results[shift]["reports"][mode]["accuracy"] for shift in shifts}
                      for mode in priors}
    report = {
        "num_test_samples": len(labels),
        "classes_without_test_images": absent_classes(labels, len(train_counts)),
        "inference_seconds": round(seconds, 2),
        "train_counts": train_counts,
        "settings": {"n_bins": n_bins, "many": many, "few": few, "seed": seed},
        "balanced": balanced,
        "experts": experts,
        "shift_accuracy": shift_accuracy,
        "shift_estimator": describe_estimator(model.config) if "auto" in priors else None,
        "shifts": shift_results,
    }
    if deployment_sizes:
        report["deployment_batches"] = deployment_batches(
            uniform_logits, labels, train_counts, shifts, priors, deployment_sizes, deployment_draws, seed,
            calibration, shift_estimator)
    if stream_size is not None:
        report["stream"] = stream_batches(uniform_logits, labels, train_counts, shifts, priors, stream_size,
                                          batches=stream_length, draws=stream_draws, seed=seed,
                                          drift_forgetting=drift_forgetting,
                                          calibration=calibration, shift_estimator=shift_estimator)
    return EvaluationResult(report, uniform_logits, expert_logits, labels)


def describe_estimator(config: Any) -> str:
    """What ``auto`` runs for a model with this config, in one line."""
    name, _ = resolve_estimator("auto", config.shift_estimator)
    if name != "auto":
        return f"{name}: the settings in config.shift_estimator"
    return describe_auto(config.calibration)



# Code files that releases of balpoe-hf shipped with a model (the remote code), today's and earlier ones': an
# upgraded folder gets today's set, and the ones no longer shipped are removed with it.
SHIPPED_CODE_FILES = ("backbones.py", "calibration.py", "cifar_resnet.py", "configuration_balpoe.py",
                      "holdout_statistics.py", "label_shift.py", "losses.py", "modeling_balpoe.py",
                      "pipeline_balpoe.py", "prior_estimators.py", "priors.py", "processing.py",
                      "shrinkage.py")
# What else a balpoe-hf run folder of any release holds: result files and its working folders.
RUN_EXTRAS = ("README.md", "balpoe_outputs.json", "checkpoints", "eval", "logs", "images")
# The run's files an upgrade keeps as they are (into a new folder: copies), listed in the manifest with it.
KEPT_RUN_FILES = ("recipe.yaml", "train_results.json", "eval_results.json", "holdout_results.json")


def _foreign_entries(model_dir: Path) -> list[str]:
    """The entries of a model folder that a balpoe-hf release did not write there (or changed since)."""
    from ..run_folder import MANIFEST, is_control_file

    known = {*run_output_files(), *SHIPPED_CODE_FILES, *RUN_EXTRAS}
    manifest = read_manifest(model_dir)
    foreign = []
    for entry in sorted(model_dir.iterdir()):
        changed = (manifest is not None and entry.is_file() and entry.name != MANIFEST
                   and entry.name in manifest["files"] and not written_by_package(model_dir, entry.name))
        if (entry.name not in known and not is_control_file(entry.name)) or changed:
            foreign.append(entry.name)
    return foreign


def upgrade_model(model_dir: str | Path, output_dir: str | Path | None = None,
                  device: str | None = None) -> dict[str, Any]:
    """Give a model folder written by an earlier release (or any balpoe-hf model folder) today's estimator
    settings: a fresh held-out calibration, no estimator choice of an earlier release, today's code files.

    When the folder holds the ``recipe.yaml`` of a run with a held-out split, the split is rebuilt (the same
    data, seed and ``holdout_fraction``) and ``config.calibration`` fitted again, so that it records what
    today's ``auto`` reads (the covariance of its biases); otherwise the calibration stays as it is. A
    ``config.shift_estimator`` written by an earlier release's per-model choice is dropped (``auto`` runs
    today's default on every model either way; the folder's own code files would not). The model is saved
    with ``save_pretrained``: config, code files and the unchanged weights, beside its image processor and
    the run's recipe and result files as they are.

    In place (``output_dir=None``) only when every file of the folder is one a balpoe-hf release writes
    (unchanged since, where its manifest lists it); else into ``output_dir``, a new or empty folder. The
    folder written into is held under its lock (``checkpoints.output_lock``), a save a kill interrupted there
    is finished or discarded first, and the files go in in one ``checkpoints.staged_save`` with the manifest
    that lists them: a kill or a full disk leaves the folder as it was or upgraded, never half of each.
    Returns what was done: ``{"folder", "recalibrated", "dropped_choice", "auto"}``.
    """
    from transformers.utils import CONFIG_NAME, IMAGE_PROCESSOR_NAME

    from ..data.loading import load_training_data
    from ..recipes import load_recipe
    from ..run_folder import finish_interrupted_save, is_control_file

    model_dir = Path(model_dir)
    if not (model_dir / CONFIG_NAME).is_file():  # a save replaces it at once: never missing half-way
        raise EvaluationError(f"{model_dir} is not a model folder (no {CONFIG_NAME}): give the folder of a "
                              "balpoe-train run or of save_pretrained.")
    target = model_dir if output_dir is None else Path(output_dir)
    if output_dir is not None and target.resolve() == model_dir.resolve():
        raise EvaluationError("the upgraded copy needs a folder other than the model's own; leave out the "
                              "new folder to upgrade in place.")
    if target.exists() and not target.is_dir():
        raise EvaluationError(f"{target} exists and is not a folder: give a new folder to upgrade into.")
    with output_lock(target, "balpoe-evaluate --upgrade"):
        finished = finish_interrupted_save(target) == "finished"
        if output_dir is None:
            foreign = _foreign_entries(model_dir)
            if foreign:
                raise EvaluationError(f"{model_dir} holds {short_list(foreign, 'entries')}, which balpoe-hf "
                                      "did not write there (or which were changed since): upgrading it in "
                                      "place would mix them with today's files. Upgrade into a new folder "
                                      "instead (balpoe-evaluate --upgrade-into NEW_DIR), or move them away.")
        elif any(not is_control_file(entry.name) for entry in target.iterdir()):
            raise EvaluationError(f"{target} exists and is not an empty folder: give a new folder to upgrade "
                                  "into." + (" (An upgrade into it that was interrupted has just been "
                                             "finished: evaluate it with --model.)" if finished else ""))
        model, processor = load_model(model_dir, resolve_device(device))  # settles an interrupted save too
        recalibrated = False
        recipe_path = model_dir / "recipe.yaml"
        if recipe_path.is_file():
            recipe = load_recipe(config=recipe_path)
            if recipe.holdout_fraction > 0:
                data = load_training_data(recipe)
                logits, _ = predict(model, processor, data.holdout, recipe.image_column,
                                    recipe.eval_batch_size)
                names = [model.config.id2label[i] for i in range(model.config.num_labels)]
                labels = align_labels(data.holdout, recipe.label_column, names)
                try:
                    model.config.calibration = holdout_calibration(logits, labels)
                except ValueError as error:  # a class without a held-out image
                    raise EvaluationError(f"cannot calibrate {model_dir} on its held-out split: "
                                          f"{error}") from None
                recalibrated = True
        dropped = None
        if is_legacy_choice(model.config.shift_estimator):
            dropped, model.config.shift_estimator = model.config.shift_estimator["name"], None
        current = set(run_output_files())
        retired = [name for name in SHIPPED_CODE_FILES if name not in current]
        try:
            # Config, code files, the unchanged weights, the processor and the run's files in one staged save
            # with the manifest listing them: a kill leaves the old folder or the upgraded one, never an
            # empty config.json.
            with staged_save(target, obsolete=[*model_weight_files(target), *retired]) as stage:
                for name in (IMAGE_PROCESSOR_NAME, *KEPT_RUN_FILES):  # as they are, not rebuilt
                    if (model_dir / name).is_file():
                        shutil.copyfile(model_dir / name, stage / name)
                model.save_pretrained(stage)
        except Exception as error:  # OSError, safetensors' errors: a full disk, a read-only folder
            raise EvaluationError(f"could not save the upgraded model into {target}: "
                                  f"{save_failure(error, target)} Nothing there was replaced.") from None
        for name in retired:  # one that a folder without a manifest holds (staged_save removes listed ones)
            (target / name).unlink(missing_ok=True)
    return {"folder": str(target), "recalibrated": recalibrated, "dropped_choice": dropped,
            "auto": describe_estimator(model.config)}


def save_report(result: EvaluationResult, output: str | Path, model_dir: str | Path | None = None
                ) -> dict[str, str]:
    """Write the report as ``balpoe-evaluate --output`` does: ``write_report`` in one ``staged_report``
    (listed as balpoe-evaluate's, under the folder's lock), with the SHA-256 of the weights of ``model_dir``
    (the folder the model was loaded from) as ``model_sha256``, by which ``balpoe-push`` publishes the
    report with that model only. Returns the names of the two PNG files."""
    from ..run_folder import weights_fingerprint

    result.report["model_sha256"] = None if model_dir is None else weights_fingerprint(model_dir)
    with staged_report(output, model_dir) as staged:
        return write_report(result, staged)


def _picture_paths(output: Path) -> dict[str, Path]:
    return {"reliability_diagram": output.with_name(f"{output.stem}_reliability.png"),
            "per_class_accuracy": output.with_name(f"{output.stem}_per_class_accuracy.png")}


def write_report(result: EvaluationResult, output: str | Path) -> dict[str, str]:
    """Write ``result.report`` as JSON to ``output``, and beside it a reliability diagram and per-class plot.

    Returns the names of the two PNG files (also recorded in the JSON under ``images``). ``save_report``
    writes it in one staged save, so that a kill or a full disk never leaves half a report.
    """
    from .plots import per_class_accuracy_plot, reliability_diagram

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    report = result.report
    settings = report["settings"]
    images = {name: path.name for name, path in _picture_paths(output).items()}
    reliability_diagram(result.logits, result.labels, output.parent / images["reliability_diagram"],
                        n_bins=settings["n_bins"], from_probs=False, title="Balanced test set")
    per_class_accuracy_plot(report["balanced"]["per_class_accuracy"], report["train_counts"],
                            output.parent / images["per_class_accuracy"], many=settings["many"],
                            few=settings["few"])
    output.write_text(json.dumps({**report, "images": images}, indent=2, allow_nan=False) + "\n",
                      encoding="utf-8")
    return images


# --------------------------------------------------------------------------- printing


def format_balanced(report: dict[str, Any], title: str, groups: dict[str, list[int]] | None = None) -> str:
    """A ``long_tail_report`` (with ``calibration_effect``'s figures where present) under ``title`` as a few
    aligned lines, in percent; ``groups`` (``data.shot_groups``) adds the number of classes of each group.

    What ``balpoe-train`` prints after its evaluations, and ``balpoe-evaluate`` for the balanced set.
    """
    shots = ("many", "medium", "few")
    sizes = "" if groups is None else f" ({'/'.join(str(len(groups[g])) for g in shots)} classes)"
    rows = [
        ("accuracy", f"{percent(report['accuracy'])} %"),
        ("balanced accuracy", f"{percent(report['balanced_accuracy'])} %"),
        ("many / medium / few" + sizes, " / ".join(percent(report[g]) for g in shots) + " %"),
        ("ECE / MCE", f"{percent(report['ece'])} / {percent(report['mce'])} %"),
        ("NLL / Brier", f"{report['nll']:.4f} / {report['brier']:.4f}"),
    ]
    if "ece_bcts" in report:
        rows.append(("ECE calibrated", f"{percent(report['ece_temperature_scaling'])} (temperature "
                                       f"scaling) / {percent(report['ece_bcts'])} (BCTS) %"))
    width = max(len(name) for name, _ in rows)
    return "\n".join([title, *(f"  {name:<{width}}  {value}" for name, value in rows)])


def format_deployment_table(deployment: dict[str, Any], shifts: list[str]) -> str:
    """Per batch size, the mean (worst) gain over ``none`` in points of each mode on each shift."""
    lines = []
    for size, by_shift in deployment.items():
        measured = [shift for shift in shifts if shift in by_shift]
        if not measured:
            lines.append(f"batches of {size}: larger than every shifted set")
            continue
        modes = list(next(iter(by_shift.values())))
        lines.append(f"batches of {size}:")
        lines.append("| prior | " + " | ".join(measured) + " |")
        lines.append("|---|" + "---:|" * len(measured))
        for mode in modes:
            cells = [f"{100 * by_shift[s][mode]['mean_gain']:+.1f} "
                     f"({100 * by_shift[s][mode]['worst_gain']:+.1f})" for s in measured]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_stream_table(stream: dict[str, Any]) -> str:
    """The stream report (``stream_batches``) as Markdown: per shift and mode, the mean gain over ``none``
    in points after the first, second, fifth and last batch; then the drift scenario batch by batch."""
    last = stream["batches"]
    shown = sorted({1, 2, min(5, last), last})
    lines = [f"streams of {stream['batch_size']}-image batches, mean gain over none (points) after batch "
             f"{', '.join(map(str, shown))} ({stream['draws']} streams a shift):",
             "| shift | prior | " + " | ".join(f"batch {k}" for k in shown) + " |",
             "|---|---|" + "---:|" * len(shown)]
    for shift, by_mode in stream["shifts"].items():
        for mode, gains in by_mode.items():
            cells = " | ".join(f"{100 * gains[k - 1]:+.1f}" for k in shown)
            lines.append(f"| {shift} | {mode} | {cells} |")
    if "drift" in stream:
        drift = stream["drift"]
        schedule = ", then ".join(f"{count} batches of {shift}" for shift, count in drift["schedule"])
        lines += ["", f"drift ({schedule}; forgetting {drift['forgetting']:g}), gain per batch (points):"]
        for mode, gains in drift["gains"].items():
            lines.append(f"| {mode} | " + " | ".join(f"{100 * g:+.1f}" for g in gains) + " |")
    return "\n".join(lines)


def format_shift_table(shift_accuracy: dict[str, dict[str, float]], shifts: list[str]) -> str:
    """A Markdown table: rows are prior modes, columns the test distributions, cells top-1 accuracy (%)."""
    header = "| prior \u2193 / test set \u2192 | " + " | ".join(shifts) + " |"
    rule = "|---|" + "---:|" * len(shifts)
    rows = [f"| {mode} | " + " | ".join(percent(acc.get(s), 1) for s in shifts) + " |"
            for mode, acc in shift_accuracy.items()]
    return "\n".join([header, rule, *rows])
