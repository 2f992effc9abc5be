"""Train several methods at the same budget and compare them, as Tables 2 / 9 / 10 of the BalPoE paper do.

    from balpoe_hf.compare import budget_recipe, compare, format_method_table

    base = budget_recipe("quick")
    result = compare(base, ["ce", "bs", "balpoe"], "runs/compare-quick")
    print(format_method_table(result.summaries))

Every method (``balpoe_hf.recipes.methods``) is the same base recipe (data, split, seed, backbone, schedule)
with the method's preset on top, trained by ``balpoe_hf.training.train`` into its own output directory
``OUTPUT_DIR/METHOD`` exactly as ``scripts/train.py --method METHOD`` would, so that each is an ordinary,
resumable run (loadable, evaluable, publishable). The trainings run one after the other in this process: one
import of torch and the data per comparison, training errors arrive as exceptions, one deadline
(``--time-limit``) covers all of them, and ``accelerate launch scripts/compare_methods.py`` distributes every
training as it would a single run. Methods whose training is identical (``ce`` and ``ce-la`` differ only in
how they predict) are trained once: the others get a copy of the weights with their own prediction setting.

A rerun with the same settings skips the finished methods and resumes the unfinished ones from their last
epoch checkpoint. Each finished method is evaluated with ``balpoe_hf.evaluation.evaluate_model`` (balanced
test set, shifted test sets under every prior mode); its report is kept in ``OUTPUT_DIR/METHOD/eval``.
The comparison goes to ``OUTPUT_DIR/comparison.json``, ``comparison.md`` and ``comparison.png``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import TrainingError
from ..metrics import calibration_bins, calibration_errors
from ..models.balpoe.configuration_balpoe import PREDICTION_SETTINGS
from ..recipes import CONFIG_FIELDS, Recipe, recipe_differences
from ..recipes.methods import METHOD_DESCRIPTIONS, parse_methods
from ..run_folder import lock_on_main_process
from .budgets import method_recipe
from .tables import write_comparison

# Recipe fields that change how a trained model predicts, not how it is trained (the config's).
PREDICTION_FIELDS = tuple(name for name in PREDICTION_SETTINGS if name in CONFIG_FIELDS)
# Fields that change neither the trained weights nor the comparison's evaluation: a run may differ in them.
LOOP_FIELDS = ("description", "checkpoints_total_limit", "checkpoint_every_steps", "num_workers",
               "logging_steps", "eval_every", "eval_batch_size")
# Seconds kept free before --time-limit for evaluating a method that has just finished training.
EVALUATION_RESERVE = 60.0
EVAL_DIR = "eval"


def _training_signature(recipe: Recipe) -> str:
    return json.dumps({k: v for k, v in recipe.to_dict().items()
                       if k not in ("name", "description", *PREDICTION_FIELDS)}, sort_keys=True)


RunState = Literal["new", "unfinished", "finished"]


def run_state(run_dir: Path, recipe: Recipe) -> RunState:
    """Where a method's run stands; refuses a directory that holds something else than this run."""
    from ..run_folder import is_control_file

    # The lock and what a killed save left (finished or discarded when the run is next written) aside.
    if not run_dir.is_dir() or not any(not is_control_file(entry.name) for entry in run_dir.iterdir()):
        return "new"
    saved = run_dir / "recipe.yaml"
    if not saved.is_file():
        raise TrainingError(f"{run_dir} is not empty and holds no recipe.yaml: it is not a run of this "
                            "comparison. Choose another --output-dir or empty it.")
    changed = {k: v for k, v in recipe_differences(recipe, saved).items() if k not in LOOP_FIELDS}
    if changed:
        listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise TrainingError(f"{run_dir} holds a run with other settings ({listed}); rerun with the settings "
                            "it was started with, or use another --output-dir.")
    finished = (run_dir / "eval_results.json").is_file() and (run_dir / "config.json").is_file()
    return "finished" if finished else "unfinished"


def derive_run(source_dir: Path, run_dir: Path, recipe: Recipe, holdout=None) -> None:
    """A finished run of ``recipe`` from the weights of a run whose training was identical.

    Only the prediction settings (``PREDICTION_FIELDS``) change, and a held-out calibration
    (``config.calibration``, fitted to the source's logits) is fitted again on ``holdout`` for the new
    logits. ``train_results.json`` names the source. ``eval_results.json`` (the finished marker) is
    written after the evaluation.
    """
    from ..evaluation.calibrate import calibrate_and_save, holdout_logits
    from ..evaluation.model_loading import load_model, resolve_device
    from ..recipes import save_recipe
    from ..run_folder import output_lock
    from ..training.resume import RUN_FOLDERS, clear_run_outputs

    with output_lock(run_dir, "balpoe-compare"):
        model, processor = load_model(source_dir, resolve_device(None))
        for name in PREDICTION_FIELDS:
            setattr(model.config, name, getattr(recipe, name))
        logits = None
        if model.config.calibration is not None:
            if holdout is None:
                raise TrainingError(f"{source_dir} has a held-out calibration but no held-out split was "
                                    "given to fit it again for the derived run.")
            logits = holdout_logits(model, processor, holdout, recipe.image_column, recipe.label_column,
                                    recipe.eval_batch_size)
        train_results = json.loads((source_dir / "train_results.json").read_text())
        train_results["weights_from"] = str(source_dir)
        clear_run_outputs(run_dir)  # an earlier derivation, never evaluated (what balpoe-hf wrote only)
        # The whole run in one staged save, listed in its manifest, so that a later --resume, balpoe-evaluate
        # --upgrade or balpoe-push knows these files are the run's own; a kill leaves all or none.
        calibrate_and_save(model, run_dir, processor=processor, holdout=logits, folders=RUN_FOLDERS,
                           files={"recipe.yaml": lambda path: save_recipe(recipe, path),
                                  "train_results.json": json.dumps(train_results, indent=2)})


def balanced_validation_report(logits: torch.Tensor, labels: Sequence[int], num_classes: int,
                               n_bins: int = 15) -> dict[str, float]:
    """Balanced accuracy, ECE and NLL of uniform-prior logits ``(N, C)`` on a long-tailed held-out split, as
    if it were balanced: every image is weighted by one over its class's count in the split.

    This estimates the balanced test set's figures from training-distribution data (the weighting turns an
    average over ``p_train(y)`` into one over the uniform prior), so methods can be compared and settings
    chosen without the test set. The ECE is ``metrics.calibration_bins``'s, with these weights.
    """
    targets = torch.as_tensor(labels, dtype=torch.long)
    log_probs = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1)
    counts = torch.bincount(targets, minlength=num_classes).double()
    present = counts > 0
    weights = 1.0 / counts[targets]
    weights = weights / weights.sum()
    confidence, prediction = log_probs.exp().max(dim=1)
    correct = (prediction == targets).double()
    per_class = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, targets, correct) / counts
    ece, _ = calibration_errors(calibration_bins(confidence, correct, n_bins, weights=weights))
    nll = -(weights * log_probs.gather(1, targets[:, None]).squeeze(1)).sum()
    return {"balanced_accuracy": float(per_class[present].mean()), "ece": ece, "nll": float(nll),
            "samples": len(targets)}


def evaluate_run(run_dir: Path, recipe: Recipe, test, shifts: Sequence[str], priors: Sequence[str] | None,
                 holdout=None) -> dict[str, Any]:
    """The ``evaluate_model`` report of a finished run, cached in ``run_dir/eval/report.json``.

    The report gets the balanced set's reliability bins (for the comparison picture) too, and with a
    ``holdout`` split the ``balanced_validation_report`` of it under ``validation``. A derived run (no
    ``eval_results.json`` yet) gets that file written from the balanced-set report. ``priors=None``: the
    model's default prior modes (``evaluation.default_priors``).
    """
    from ..evaluation.calibrate import holdout_logits
    from ..evaluation.evaluate import evaluate_model
    from ..evaluation.model_loading import load_model, resolve_device
    from ..evaluation.reports import report_files, write_report
    from ..metrics import reliability_bins
    from ..run_folder import output_lock, staged_save, weights_fingerprint

    path = run_dir / EVAL_DIR / "report.json"
    settings = {"shifts": list(shifts), "priors": None if priors is None else list(priors),
                "validation": holdout is not None}
    with output_lock(run_dir, "balpoe-compare"):
        cached = _cached_report(path, run_dir / "model.safetensors", settings)
        if cached is not None:
            return cached
        model, processor = load_model(run_dir, resolve_device(None))
        result = evaluate_model(model, processor, test, image_column=recipe.image_column,
                                label_column=recipe.label_column, shifts=shifts, priors=priors,
                                batch_size=recipe.eval_batch_size, many=recipe.many_threshold,
                                few=recipe.few_threshold)
        n_bins = result.report["settings"]["n_bins"]
        result.report["reliability"] = reliability_bins(result.logits, result.labels, n_bins=n_bins)
        result.report["comparison_settings"] = settings
        result.report["model_sha256"] = weights_fingerprint(run_dir)
        if holdout is not None:
            logits, labels = holdout_logits(model, processor, holdout, recipe.image_column,
                                            recipe.label_column, recipe.eval_batch_size)
            result.report["validation"] = balanced_validation_report(logits, labels, model.config.num_labels)
        reports = [file.relative_to(run_dir).as_posix() for file in report_files(path)]
        # The report, its pictures and (for a derived run) eval_results.json, the finished marker, at once.
        with staged_save(run_dir, reports=reports) as stage:
            write_report(result, stage / reports[0])
            if not (run_dir / "eval_results.json").is_file():
                balanced = {f"eval_{k}": v for k, v in result.report["balanced"].items()}
                eval_results = {"epoch": recipe.epochs, "eval_samples": result.report["num_test_samples"],
                                **balanced}
                (stage / "eval_results.json").write_text(json.dumps(eval_results, indent=2))
    return json.loads(path.read_text())


def _cached_report(path: Path, weights: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The report ``evaluate_run`` cached at ``path`` when it is newer than the weights and made with these
    ``settings``; ``None`` when it must be made (again), e.g. when it cannot be read."""
    if not path.is_file() or (weights.is_file() and path.stat().st_mtime < weights.stat().st_mtime):
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):  # damaged outside balpoe-hf, which writes it in one staged save
        return None
    return report if isinstance(report, dict) and report.get("comparison_settings") == settings else None


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Comparison:
    """``compare``'s result: a summary per evaluated method, the methods still to do, and the files."""

    summaries: dict[str, dict[str, Any]]
    pending: list[str]
    train_counts: list[int]
    files: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.pending


def summarize(method: str, report: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
    """What the comparison keeps of a method's evaluation report (and its training time)."""
    train_results = json.loads((run_dir / "train_results.json").read_text())
    return {
        "method": method,
        "description": METHOD_DESCRIPTIONS[method],
        "run_dir": str(run_dir),
        "weights_from": train_results.get("weights_from"),
        "train_runtime": train_results.get("train_runtime"),
        "balanced": report["balanced"],
        "experts": report["experts"],
        "shift_accuracy": report["shift_accuracy"],
        "reliability": report["reliability"],
        "validation": report.get("validation"),
    }


def compare(base: Recipe, methods: str | Sequence[str], output_dir: str | Path, *,
            shifts: str | Sequence[str] = "all", priors: str | Sequence[str] | None = None,
            deadline: float | None = None) -> Comparison:
    """Train (or resume, or skip) every method on ``base`` and evaluate it; see the module docstring.

    Args:
        base: the shared recipe; its ``method`` must be unset (each method sets its own).
        methods: method names (``balpoe_hf.recipes.methods.METHODS``), or a comma list of them.
        output_dir: the comparison's directory; method ``m`` trains into ``output_dir/m``.
        shifts, priors: the shifted test sets and prior modes of ``evaluate_model`` (``priors=None``: its
            default, ``none``, ``oracle`` and ``auto`` or, without a held-out calibration, ``em``).
        deadline: a ``time.time()`` value; trainings stop after the epoch checkpoint that would otherwise
            end later than ``EVALUATION_RESERVE`` seconds before it, no new work starts after it. The
            methods left are listed in ``Comparison.pending``; call again to continue.
    """
    from accelerate import PartialState

    from ..evaluation.shifts import parse_priors, parse_shifts

    if base.method is not None:
        raise TrainingError(f"the base recipe of a comparison sets method={base.method!r}; leave it unset "
                            "(each method sets its own) and list the methods instead.")
    try:
        methods = parse_methods(methods)
    except ValueError as error:
        raise TrainingError(str(error)) from None
    shifts = parse_shifts(shifts)
    priors = None if priors is None else parse_priors(priors)
    output_dir = Path(output_dir)
    state = PartialState()
    with contextlib.ExitStack() as exit_stack:
        lock_on_main_process(state, output_dir, "balpoe-compare", exit_stack)
        return _compare(base, methods, output_dir, shifts, priors, deadline, state)


def _compare(base: Recipe, methods: list[str], output_dir: Path, shifts: list[str], priors: list[str] | None,
             deadline: float | None, state: Any) -> Comparison:
    """``compare`` holding the comparison folder's lock (``state``: accelerate's ``PartialState``)."""
    from ..data.loading import load_training_data
    from ..training.loop import train

    recipes = {method: method_recipe(base, method) for method in methods}
    # A run in output_dir that contradicts its method's recipe fails here, before any training.
    states = {method: run_state(output_dir / method, recipe) for method, recipe in recipes.items()}
    # Training signature -> the method whose run trains those weights: the most advanced run, then the first.
    progress = {"finished": 0, "unfinished": 1, "new": 2}
    trained_by: dict[str, str] = {}
    for method in sorted(methods, key=lambda m: progress[states[m]]):
        trained_by.setdefault(_training_signature(recipes[method]), method)
    data = load_training_data(base) if state.is_main_process else None
    train_counts = data.class_counts if data is not None else []
    summaries: dict[str, dict[str, Any]] = {}
    pending: list[str] = []
    train_deadline = None if deadline is None else deadline - EVALUATION_RESERVE

    def out_of_time() -> bool:
        return deadline is not None and time.time() >= deadline - EVALUATION_RESERVE

    # The methods whose runs others copy go first.
    order = sorted(methods, key=lambda m: trained_by[_training_signature(recipes[m])] != m)
    for method in order:
        recipe, run_dir = recipes[method], output_dir / method
        source = trained_by[_training_signature(recipe)]
        if states[method] != "finished":
            if out_of_time() or (source != method and source in pending):
                pending.append(method)
                continue
            if source != method:
                if state.is_main_process:
                    derive_run(output_dir / source, run_dir, recipe, data.holdout)
                state.wait_for_everyone()
            else:
                state.print(f"\n=== {method} ({METHOD_DESCRIPTIONS[method]}): "
                            f"{'resuming' if states[method] == 'unfinished' else 'training'} in {run_dir}")
                outcome = train(recipe, run_dir, resume=True, deadline=train_deadline)
                _release_memory()
                if not outcome.finished:
                    pending.append(method)
                    continue
        if state.is_main_process:
            if deadline is not None and time.time() >= deadline:
                pending.append(method)
                continue
            report = evaluate_run(run_dir, recipe, data.test, shifts, priors, data.holdout)
            summaries[method] = summarize(method, report, run_dir)
            _release_memory()
        state.wait_for_everyone()
    comparison = Comparison(summaries={m: summaries[m] for m in methods if m in summaries},
                            pending=[m for m in methods if m in pending], train_counts=train_counts)
    if state.is_main_process and comparison.summaries:
        comparison.files = write_comparison(comparison, base, output_dir)
    return comparison


# --------------------------------------------------------------------------- several seeds


def seed_dir(output_dir: str | Path, seed: int) -> Path:
    """Where the comparison of one seed of a several-seed comparison goes."""
    return Path(output_dir) / f"seed-{seed}"


def seed_summaries(output_dir: str | Path, methods: Sequence[str], seeds: Sequence[int]
                   ) -> dict[str, dict[str, Any]]:
    """Per method, the balanced-set metrics of every finished seed (``OUTPUT_DIR/seed-S/METHOD``, the
    report ``evaluate_run`` cached) with their mean, minimum and maximum, in the order of ``methods``."""
    keys = ("balanced_accuracy", "many", "medium", "few", "ece")
    summaries: dict[str, dict[str, Any]] = {}
    for method in methods:
        per_seed = {}
        for seed in seeds:
            path = seed_dir(output_dir, seed) / method / EVAL_DIR / "report.json"
            if path.is_file():
                per_seed[seed] = {k: json.loads(path.read_text())["balanced"][k] for k in keys}
        if per_seed:
            summaries[method] = {"seeds": per_seed, **{
                k: {"mean": sum(v[k] for v in per_seed.values()) / len(per_seed),
                    "min": min(v[k] for v in per_seed.values()), "max": max(v[k] for v in per_seed.values())}
                for k in keys}}
    return summaries

