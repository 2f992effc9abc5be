"""The command lines: ``balpoe-train``, ``balpoe-evaluate``, ``balpoe-push``, ``balpoe-demo``,
``balpoe-describe-split``, ``balpoe-compare`` and ``balpoe-prepare-data``.

Installed as console scripts with the package; ``python -m balpoe_hf.train`` (for ``accelerate launch -m``)
and the repository's ``scripts/*.py`` call the same functions. Each parses its arguments, calls the library
(``balpoe_hf.training``, ``balpoe_hf.evaluation``, ``balpoe_hf.hub``, ``balpoe_hf.demo``, ``balpoe_hf.data``,
``balpoe_hf.compare``, ``balpoe_hf.prepare_data``) and turns the library's user errors
(``balpoe_hf.errors``) into a one-line message and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from ..compare.budgets import BUDGETS, DEFAULT_METHODS, Budget, budget_values
from ..compare.runs import EVALUATION_RESERVE, compare, seed_dir, seed_summaries
from ..compare.tables import format_comparison, format_seed_table
from ..errors import (
    DataError,
    EvaluationError,
    EvaluationFailure,
    HubFolderError,
    HubPublishError,
    TrainingError,
)
from ..models.balpoe.label_shift import PRIOR_ESTIMATORS
from ..recipes import SEED_LIMIT, Recipe, make_recipe
from ..recipes.methods import EVERY_METHOD_FIELDS, METHOD_DESCRIPTIONS, METHODS, parse_methods
from ..run_folder import save_failure
from ..training.resume import resume_hint
from .arguments import build_parser, parse_args, parse_recipe_flags

TRAIN_DESCRIPTION = """Train a BalPoE model (Balanced Product of Calibrated Experts) with Accelerate.

    balpoe-train --list-recipes                 # the shipped recipes, one line each
    accelerate launch -m balpoe_hf.train --recipe fashion-mnist-lt-quick --output-dir runs/fmnist
    accelerate launch -m balpoe_hf.train --recipe cifar10-lt-local \\
        --train-file data/cifar10/train.parquet --test-file data/cifar10/test.parquet
    accelerate launch --multi_gpu --num_processes 4 -m balpoe_hf.train --recipe cifar100-lt-ir100 --epochs 5
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m balpoe_hf.train --config my.yaml

Every recipe field has a flag (--lambdas 1 0 -1 --mixup-alpha 0.4 ...); after --recipe/--config, --help shows
the resolved values. The output directory gets the model (save_pretrained, loadable with
AutoModelForImageClassification) with its image processor, recipe.yaml, train_results.json, eval_results.json
(the balanced test set) and one checkpoint per epoch (--checkpoint-every-steps N adds some inside epochs;
the last few are kept) for --resume.

A refused setting or input stops the run with a short message and exit status 2, before any work where it
can be seen up front. accelerate's launcher follows a failed run with its own traceback: `accelerate launch
--quiet` (-q) leaves the message alone.
"""


def _fail(error: Exception) -> int:
    print(f"error: {error}", file=sys.stderr)
    return 2


def _interrupted(what_now: str) -> int:
    """Ctrl-C: one line (what was kept and how to go on) and the shell's status for SIGINT, 130."""
    print(f"\ninterrupted; {what_now}".rstrip("; "), file=sys.stderr)
    return 130


# --------------------------------------------------------------------------- balpoe-train


def list_recipes() -> str:
    """The shipped recipes, one ``name  description`` line each (``balpoe-train --list-recipes``)."""
    from ..recipes import available_recipes, recipe_values

    names = available_recipes()
    width = max(len(name) for name in names)
    return "\n".join(f"{name:<{width}}  {recipe_values(name).get('description', '')}" for name in names)


def train_main(argv: Sequence[str] | None = None) -> int:
    """``balpoe-train``: parse the run options and the recipe, then ``balpoe_hf.training.train``."""
    from ..training.loop import train

    if "--list-recipes" in (sys.argv[1:] if argv is None else argv):
        print(list_recipes())
        return 0
    start, output_dir = time.time(), None
    try:
        run, recipe = parse_args(argv, description=TRAIN_DESCRIPTION)
        output_dir = Path(run.output_dir)
        deadline = None if run.time_limit is None else start + run.time_limit
        train(recipe, output_dir, resume=run.resume, overwrite=run.overwrite, report_to=run.report_to,
              push_to_hub=run.push_to_hub, hub_model_id=run.hub_model_id, deadline=deadline)
    except TrainingError as error:
        return _fail(error)
    except KeyboardInterrupt:
        return _interrupted("" if output_dir is None else resume_hint(output_dir))
    return 0


# --------------------------------------------------------------------------- balpoe-evaluate


EVALUATE_DESCRIPTION = """Evaluate a saved BalPoE model on a balanced test set and on label-shifted versions.

    balpoe-evaluate --model runs/fashion-mnist-lt-quick --shifts all \\
        --output runs/fashion-mnist-lt-quick/eval/report.json
    balpoe-evaluate --model runs/main-holdout --shifts all --prior all   # trained with --holdout-fraction

Prints the balanced-test-set report (accuracy, balanced and many/medium/few accuracy, ECE, MCE, NLL, Brier),
then a table shaped like Table 10 of the BalPoE paper: one row per prior mode, one column per test
distribution (forward50 ... uniform ... backward50), top-1 accuracy in the cells. Prior modes: none (uniform
target prior), oracle (the shifted set's true label distribution), and estimators of that distribution from
the model's logits on the unlabelled shifted set: auto, the default (EM shrunk towards uniform by as much as
its errors are large; see docs/evaluation.md), and the literature's estimators as published: em (EM on the
raw posteriors), em-bcts (EM after BCTS), bbse and rlls (from the held-out confusion matrix); these last three
need a model trained with --holdout-fraction (its config.calibration). With --output it writes the JSON
report and, beside it, a reliability diagram and a per-class accuracy plot of the balanced set.

Test data: by default the test set of the run's recipe.yaml; else --dataset fashion-mnist (the Debian package
dataset-fashion-mnist), --test-file with parquet files or an imagefolder directory, --test-list with
split-list files and --data-root, or --dataset HUB_ID when online. Images are preprocessed by the image
processor saved with the model, as at inference.

Several --test-list files are evaluated each as its own test set, the protocol of the published shifted lists
(LADE/SADE): the table then has one column per file and --shifts is not used.

    balpoe-evaluate --model runs/imagenet-lt-resnext50 --data-root /data/imagenet \
        --test-list ImageNet_LT_forward50.txt ImageNet_LT_uniform.txt ImageNet_LT_backward50.txt
"""


@dataclass
class EvaluateArguments:
    """``balpoe-evaluate``'s options; those left unset come from the run's ``recipe.yaml`` if it has one."""

    model: str = field(metadata={"help": "A saved BalPoE model: a training run's directory or a Hub id."})
    dataset: str | None = field(default=None, metadata={"help": (
        "'fashion-mnist' (Debian's dataset-fashion-mnist files) or a Hub dataset id; default: the test data "
        "of the run's recipe.yaml.")})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    split: str | None = field(default=None, metadata={"help": "The balanced test split (default: test)."})
    data_dir: str | None = field(default=None, metadata={"help": "Where the Fashion-MNIST files are."})
    test_file: list[str] | None = field(default=None, metadata={"help": (
        "Local test data: parquet file(s) (glob patterns allowed) or one imagefolder directory.")})
    test_list: list[str] | None = field(default=None, metadata={"help": (
        "Split-list file(s) ('relative/path label' lines, e.g. ImageNet_LT_test.txt) read with --data-root; "
        "several files are evaluated each as its own test set.")})
    data_root: str | None = field(default=None, metadata={"help": (
        "Folder the --test-list paths are relative to (default: the recipe's data_root).")})
    image_column: str | None = field(default=None, metadata={
        "help": "Column of the images (default: image)."})
    label_column: str | None = field(default=None, metadata={
        "help": "Column of the class labels (default: label)."})
    shifts: str = field(default="all", metadata={"help": (
        "'all' (forward50 ... uniform ... backward50) or a comma list of shift names.")})
    prior: str | None = field(default=None, metadata={"help": (
        "Comma list of prior modes, or 'all': " + ", ".join(("none", "oracle", *PRIOR_ESTIMATORS))
        + " (default: none,oracle,auto).")})
    upgrade: bool = field(default=False, metadata={"help": (
        "First give the model folder today's estimator settings (a model saved by an earlier release): "
        "calibrate it again on its run's held-out split where it has one, drop an earlier release's "
        "estimator choice, save today's code files; in place when the folder holds only balpoe-hf's files.")})
    upgrade_into: str | None = field(default=None, metadata={"help": (
        "With --upgrade: write the upgraded model into this new folder instead (and evaluate that one).")})
    deployment_sizes: str | None = field(default=None, metadata={"help": (
        "Comma list of small batch sizes, e.g. 100,300,1000: also adapt on batches of these sizes drawn "
        "from each shifted set, as a deployment would (mean and worst gain over --deployment-draws).")})
    deployment_draws: int = field(default=10, metadata={"help": "Batches drawn per size and shift."})
    stream: int | None = field(default=None, metadata={"help": (
        "Batch size of a stream, e.g. 300: also adapt on a stream of --stream-batches batches from each "
        "shifted set, the evidence of all of them together, and on a drifting stream (forward50, then "
        "backward50) with --drift-forgetting; the gain over none after each batch (JSON key 'stream').")})
    stream_batches: int = field(default=10, metadata={"help": "Batches per stream."})
    stream_draws: int = field(default=10, metadata={"help": "Streams drawn per shift."})
    drift_forgetting: float = field(default=0.5, metadata={"help": (
        "The drifting stream's forgetting factor: an image k batches old weighs forgetting**k.")})
    output: str | None = field(default=None, metadata={
        "help": "Write the JSON report here, and the PNG plots beside it."})
    batch_size: int = field(default=256, metadata={"help": "Inference batch size."})
    device: str | None = field(default=None, metadata={"help": "Device (default: cuda when available)."})
    n_bins: int = field(default=15, metadata={"help": "Confidence bins of ECE / MCE."})
    many: int | None = field(default=None, metadata={
        "help": "Many-shot: more training images than this (default: the recipe's, else 100)."})
    few: int | None = field(default=None, metadata={
        "help": "Few-shot: fewer training images than this (default: the recipe's, else 20)."})
    seed: int = field(default=0, metadata={"help": "Seed of the shifted test sets' subsampling."})


# Settings read from a run directory's recipe.yaml when not given: argument -> (recipe key, fallback).
RECIPE_SETTINGS = {
    "dataset": ("dataset", None),
    "dataset_config": ("dataset_config", None),
    "data_dir": ("data_dir", None),
    "test_file": ("test_file", None),
    "test_list": ("test_list", None),
    "data_root": ("data_root", None),
    "split": ("test_split", "test"),
    "image_column": ("image_column", "image"),
    "label_column": ("label_column", "label"),
    "many": ("many_threshold", 100),
    "few": ("few_threshold", 20),
}


def parse_evaluate_args(argv: Sequence[str] | None = None) -> EvaluateArguments:
    """``EvaluateArguments`` from the command line, completed from ``MODEL/recipe.yaml`` where it exists."""
    from transformers import HfArgumentParser

    from ..recipes import read_recipe_file

    parser = HfArgumentParser(EvaluateArguments, description=EVALUATE_DESCRIPTION, allow_abbrev=False,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    # argparse's own parse_args: an unknown flag is a usage error (exit 2), not a ValueError traceback.
    args = EvaluateArguments(**vars(parser.parse_args(argv)))
    recipe_file = Path(args.model) / "recipe.yaml"
    # A malformed file is a TrainingError naming it; read_recipe_file drops the run's overridden_fields.
    recipe = read_recipe_file(recipe_file) if recipe_file.is_file() else {}
    # The recipe names one data source; a data source on the command line replaces it as a whole.
    if args.dataset is not None or args.test_file is not None or args.test_list is not None:
        recipe = {k: v for k, v in recipe.items() if k not in ("dataset", "dataset_config", "test_file",
                                                                "test_list")}
    for name, (key, default) in RECIPE_SETTINGS.items():
        if getattr(args, name) is None:
            value = recipe.get(key)
            setattr(args, name, default if value is None else value)
    if isinstance(args.test_list, str):  # a recipe names one test list
        args.test_list = [args.test_list]
    return args


def report_model_name(model: str) -> str:
    """The model as a report names it, which may be published: a folder by its own name (never where it
    lies on this machine), a Hub id as it is."""
    return Path(model).resolve().name if Path(model).is_dir() else model


def _list_name(path: str) -> str:
    """A test list's column in the table: its file name without the extension (ImageNet_LT_forward50)."""
    return Path(path).stem


def _evaluate_lists(model, processor, args: EvaluateArguments, priors: list[str]) -> dict:
    """Each ``--test-list`` file evaluated as it is (no shifts drawn from it), under every prior mode.

    The ``uniform`` shift of ``evaluate_model`` is the set unchanged, so its ``oracle`` mode uses the file's
    own label distribution and ``em`` estimates it, as for a shifted set drawn from a balanced one.
    """
    from ..data.loading import load_list, local_name
    from ..evaluation.evaluate import evaluate_model

    names = [_list_name(path) for path in args.test_list]
    if len(set(names)) != len(names):
        raise EvaluationError(f"the --test-list files must have different names, got {names}.")
    results = {}
    for name, path in zip(names, args.test_list, strict=True):
        ds = load_list(path, args.data_root, model.config.num_labels, args.image_column, args.label_column)
        results[name] = evaluate_model(model, processor, ds, image_column=args.image_column,
                                       label_column=args.label_column, shifts=["uniform"], priors=priors,
                                       batch_size=args.batch_size, n_bins=args.n_bins, many=args.many,
                                       few=args.few, seed=args.seed)
        results[name].report = {"dataset": local_name(path), **results[name].report}
    return results


def _report_lists(results: dict, args: EvaluateArguments, priors: list[str]) -> None:
    """Print one line per test list and the prior-mode table; with --output write each list's report too."""
    from ..evaluation.printing import format_shift_table
    from ..evaluation.reports import staged_report, write_report
    from ..run_folder import weights_fingerprint

    table = {mode: {name: result.report["shift_accuracy"][mode]["uniform"]
                    for name, result in results.items()} for mode in priors}
    for name, result in results.items():
        print(f"{name}: {result.report['num_test_samples']} images")
    print("\nTop-1 accuracy (%) on each test list (rows: prior mode, columns: test list):")
    print(format_shift_table(table, list(results)))
    if args.output:
        output = Path(args.output)
        files = {name: f"{output.stem}_{name}.json" for name in results}  # beside the summary
        summary = {"model": report_model_name(args.model), "model_sha256": weights_fingerprint(args.model),
                   "shift_accuracy": table, "reports": files}
        with staged_report(output, args.model) as staged:
            for name, result in results.items():
                result.report["model_sha256"] = summary["model_sha256"]
                write_report(result, staged.with_name(files[name]))
            staged.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.output} and one report per test list beside it")


def _parse_sizes(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise EvaluationError(f"--deployment-sizes must be a comma list of positive batch sizes, e.g. "
                              f"100,300,1000; got {text!r}.")
    return sizes


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """``balpoe-evaluate``: evaluate as the command line says, print the report, write it with --output."""
    upgraded: list[str] = []  # the folder --upgrade saved, once it is saved
    try:
        with contextlib.ExitStack() as exit_stack:  # --output: the lock of the folder it writes into
            return _evaluate(parse_evaluate_args(argv), exit_stack, upgraded)
    except (EvaluationError, TrainingError) as error:  # TrainingError: DataError, a malformed recipe.yaml
        return _fail(error)
    except KeyboardInterrupt:
        return _interrupted(f"the upgraded model is saved in {upgraded[0]}; no report was written."
                            if upgraded else "nothing was written.")


def _evaluate(args: EvaluateArguments, exit_stack: contextlib.ExitStack, upgraded: list[str]) -> int:
    from ..data.loading import load_list, load_split, local_name
    from ..evaluation.evaluate import evaluate_model
    from ..evaluation.model_loading import load_model, resolve_device
    from ..evaluation.printing import (
        absent_classes_warning,
        format_balanced,
        format_deployment_table,
        format_shift_table,
        format_stream_table,
    )
    from ..evaluation.reports import check_output, report_owner, save_report
    from ..evaluation.shifts import (
        check_calibration_for,
        check_deployment_sizes,
        default_priors,
        parse_priors,
        parse_shifts,
    )
    from ..evaluation.upgrade import upgrade_model
    from ..run_folder import output_lock

    # Everything that can be checked before the inference is checked first.
    shifts = parse_shifts(args.shifts)
    priors = None if args.prior is None else parse_priors(args.prior)
    if args.batch_size < 1 or args.n_bins < 1:
        raise EvaluationError(f"--batch-size and --n-bins must be at least 1, got {args.batch_size} and "
                              f"{args.n_bins}.")
    if not 0 <= args.seed < 2**32:
        raise EvaluationError(f"--seed must be in [0, 2**32) (numpy's seeds), got {args.seed}.")
    device = resolve_device(args.device)
    several_lists = bool(args.test_list) and len(args.test_list) > 1
    list_names = [_list_name(path) for path in args.test_list] if several_lists else []
    if args.upgrade_into and not args.upgrade:
        raise EvaluationError("--upgrade-into names where --upgrade writes; add --upgrade.")
    into = args.upgrade_into if args.upgrade else None
    if args.output:
        check_output(args.output, into or args.model, list_names)
        if into is None:
            # Held from here to the written report: no other command writes into that folder meanwhile.
            exit_stack.enter_context(output_lock(report_owner(args.output, args.model),
                                                 "balpoe-evaluate --output"))
    sizes = _parse_sizes(args.deployment_sizes)
    if args.stream is not None and min(args.stream, args.stream_batches, args.stream_draws) < 1:
        raise EvaluationError(f"--stream, --stream-batches and --stream-draws must be positive, got "
                              f"{args.stream}, {args.stream_batches} and {args.stream_draws}.")
    if not 0 < args.drift_forgetting <= 1:
        raise EvaluationError(f"--drift-forgetting must lie in (0, 1], got {args.drift_forgetting}.")
    if args.upgrade:
        done = upgrade_model(args.model, into, device)
        upgraded.append(done["folder"])
        print(f"upgraded {done['folder']}: "
              + ("calibrated again on its held-out split" if done["recalibrated"] else
                 "calibration kept (no held-out split to rebuild)")
              + (f"; the earlier release's choice {done['dropped_choice']!r} dropped"
                 if done["dropped_choice"] else "") + f"; {done['auto']}")
        args.model = done["folder"]
        if args.output and into is not None:
            # The report may go into the new folder, whose manifest now lists the model's files.
            check_output(args.output, args.model, list_names)
            exit_stack.enter_context(output_lock(report_owner(args.output, args.model),
                                                 "balpoe-evaluate --output"))
    model, processor = load_model(args.model, device)
    check_deployment_sizes(sizes, args.deployment_draws, model.config.num_labels)
    priors = priors or default_priors()
    check_calibration_for(priors, model.config.calibration, args.model)
    if several_lists:
        _report_lists(_evaluate_lists(model, processor, args, priors), args, priors)
        return 0
    if args.test_list:
        ds, source = load_list(args.test_list[0], args.data_root, model.config.num_labels,
                               args.image_column, args.label_column), local_name(args.test_list[0])
    else:
        ds, source = load_split(files=args.test_file, dataset=args.dataset,
                                dataset_config=args.dataset_config, split=args.split,
                                data_dir=args.data_dir)
    result = evaluate_model(model, processor, ds, image_column=args.image_column,
                            label_column=args.label_column, shifts=shifts, priors=priors,
                            batch_size=args.batch_size, n_bins=args.n_bins, many=args.many, few=args.few,
                            seed=args.seed, deployment_sizes=sizes, deployment_draws=args.deployment_draws,
                            stream_size=args.stream, stream_length=args.stream_batches,
                            stream_draws=args.stream_draws, drift_forgetting=args.drift_forgetting)
    result.report = {"model": report_model_name(args.model), "dataset": source, **result.report}
    if result.report["classes_without_test_images"]:
        print(absent_classes_warning(result.report["classes_without_test_images"], model.config.num_labels),
              file=sys.stderr)
    title = f"Balanced test set ({result.report['num_test_samples']} images, uniform target prior):"
    print(format_balanced(result.report["balanced"], title))
    print("\nTop-1 accuracy (%) on label-shifted test sets (rows: prior mode, columns: test distribution):")
    print(format_shift_table(result.report["shift_accuracy"], shifts))
    if result.report["shift_estimator"]:
        print(f"({result.report['shift_estimator']})")
    if sizes:
        print("\nGain over none (points) adapting on small batches drawn from each shifted set, mean over "
              f"{args.deployment_draws} draws (worst draw in brackets):")
        print(format_deployment_table(result.report["deployment_batches"], shifts))
    if args.stream is not None:
        print()
        print(format_stream_table(result.report["stream"]))
    if args.output:
        output = Path(args.output)
        try:
            # In one staged save, listed as balpoe-evaluate's (in the run's manifest when inside a run, so
            # that --overwrite removes a stale report; else beside it): a later report may replace it, and
            # only it.
            images = save_report(result, output, args.model)
        except OSError as error:
            raise EvaluationFailure(f"could not write the report {output}: "
                                  f"{save_failure(error, output.parent)} Nothing was replaced.") from None
        print(f"\nwrote {args.output} and {', '.join(images.values())} beside it")
    return 0


# --------------------------------------------------------------------------- balpoe-push


PUSH_DESCRIPTION = """Publish a trained BalPoE run to the Hugging Face Hub.

    balpoe-push runs/fashion-mnist-lt-quick me/balpoe-fashion-mnist-lt [--private]
    balpoe-push runs/fashion-mnist-lt-quick me/balpoe-fashion-mnist-lt --dry-run

Renders the model card (README.md + images/) into MODEL_DIR, checks that the folder holds safetensors weights,
config, code files and the image processor config, and uploads those files in one commit. --dry-run stops
before the upload and lists what would be uploaded (works offline). --demo also writes a Space's app.py and
requirements.txt into MODEL_DIR and uploads them with the model: a Gradio Space holding these two files runs
the demo of REPO_ID (balpoe-demo, loaded from the Hub with trust_remote_code=True).
"""


def push_main(argv: Sequence[str] | None = None) -> int:
    """``balpoe-push``: render the card, check the folder and upload it (or only list it with --dry-run)."""
    from ..hub.folder import DEFAULT_EVAL_REPORT
    from ..hub.publish import prepare_hub_folder, push_to_hub

    parser = argparse.ArgumentParser(description=PUSH_DESCRIPTION, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a saved BalPoE run (balpoe-train output)")
    parser.add_argument("repo_id", metavar="REPO_ID", help="the Hub repository, e.g. me/balpoe-cifar10-lt")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--token", default=None,
                        help="Hub token (default: HF_TOKEN or the token saved by `hf auth login`)")
    parser.add_argument("--commit-message", default="Upload BalPoE model with balpoe-hf")
    parser.add_argument("--eval-report", default=None, metavar="REPORT.json",
                        help="balpoe-evaluate report for the card's shift table and reliability diagram "
                             "(default: MODEL_DIR/eval/report.json when it exists)")
    parser.add_argument("--dataset-id", default=None,
                        help="Hub dataset id for the card's metadata (default: from the run's recipe)")
    parser.add_argument("--dataset-name", default=None, help="readable dataset name for the card")
    parser.add_argument("--license", default="apache-2.0", help="license id for the card metadata")
    parser.add_argument("--dry-run", action="store_true",
                        help="render and check the folder, list the files, upload nothing")
    parser.add_argument("--demo", action="store_true",
                        help="also write and upload a Space's app.py and requirements.txt (the balpoe-demo "
                             "app for REPO_ID)")
    args = parser.parse_args(argv)
    card_options = {"eval_report": args.eval_report, "dataset_id": args.dataset_id,
                    "dataset_name": args.dataset_name, "license": args.license}
    # Without a report (a given --eval-report that is missing is an error of prepare_hub_folder's).
    report = Path(args.model_dir) / DEFAULT_EVAL_REPORT
    if args.eval_report is None and Path(args.model_dir).is_dir() and not report.is_file():
        print(f"warning: no evaluation report, so the card has no label-shift table, reliability diagram or "
              f"per-class plot; add them with: balpoe-evaluate --model {args.model_dir} --shifts all "
              f"--output {report}", file=sys.stderr)
    try:
        with contextlib.ExitStack() as space:
            if args.demo:  # a Space's app.py and requirements.txt, taken back if the push fails
                from ..demo.space import space_files_for_push

                card_options["also_upload"] = space.enter_context(
                    space_files_for_push(args.model_dir, args.repo_id))
            if args.dry_run:
                folder = prepare_hub_folder(args.model_dir, args.repo_id, **card_options)
                print(f"{folder.path} is ready for {args.repo_id}; these files would be uploaded:")
                print("\n".join(f"  {name}" + ("  (its data paths as file names)" if name in folder.published
                                                 else "") for name in folder.files))
                return 0
            url = push_to_hub(args.model_dir, args.repo_id, private=args.private, token=args.token,
                              commit_message=args.commit_message, **card_options)
    except (HubFolderError, HubPublishError, TrainingError) as error:  # TrainingError: a damaged manifest
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return _interrupted("the model card is written in one piece or not at all: rerun to publish.")
    print(f"published {args.model_dir} to {url}")
    return 0


# --------------------------------------------------------------------------- balpoe-demo


DEMO_DESCRIPTION = """Serve a Gradio demo of a saved BalPoE model in the browser.

    balpoe-demo runs/cifar10-lt                  # then open http://127.0.0.1:7860
    balpoe-demo me/balpoe-cifar10-lt --server-port 8000

Upload images (one or a batch) and see each one's top-5 classes under a target prior: uniform (a balanced test
set), training (distributed like the training set), per-class sliders, or estimated from the uploaded images
(adapt_to_unlabeled; with fewer images than classes it keeps the uniform prior and says so). A bar plot shows
the prior in use. Needs gradio: pip install 'balpoe-hf[demo]'. Stop it with Ctrl+C.
"""


def demo_main(argv: Sequence[str] | None = None) -> int:
    """``balpoe-demo``: load the model (``balpoe_hf.demo.load_demo_model``), build the app and serve it."""
    from ..demo import build_demo, load_demo_model, require_gradio

    parser = argparse.ArgumentParser(description=DEMO_DESCRIPTION, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="RUN_OR_REPO_ID",
                        help="a saved BalPoE model: a training run's directory or a Hub id")
    parser.add_argument("--server-name", default="127.0.0.1",
                        help="address to listen on (default: this machine only; 0.0.0.0 for the network)")
    parser.add_argument("--server-port", type=int, default=None,
                        help="port (default: 7860, or the next free one)")
    parser.add_argument("--device", default=None, help="device (default: cuda when available)")
    args = parser.parse_args(argv)
    try:
        require_gradio()
        model, processor = load_demo_model(args.model, args.device)
    except (ImportError, EvaluationError) as error:
        return _fail(error)
    name = Path(args.model).name if Path(args.model).exists() else args.model
    build_demo(model, processor, name=name).launch(server_name=args.server_name, server_port=args.server_port)
    return 0


# --------------------------------------------------------------------------- balpoe-describe-split


DESCRIBE_DESCRIPTION = """Print a long-tailed split: class counts, imbalance ratio and shot groups.

    balpoe-describe-split                       # Fashion-MNIST-LT, imbalance 100
    balpoe-describe-split --train-file train.parquet --label-column label --imbalance-ratio 50
"""


def describe_split_main(argv: Sequence[str] | None = None) -> int:
    """``balpoe-describe-split``: ``make_long_tailed`` of a training split, class by class."""
    import datasets

    from ..data.loading import load_fashion_mnist, load_split
    from ..data.splits import class_counts, imbalance_ratio, make_long_tailed, shot_groups

    parser = argparse.ArgumentParser(description=DESCRIBE_DESCRIPTION, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-file", nargs="+",
                        help="parquet file(s) or an imagefolder directory of the balanced training split "
                             "(default: Fashion-MNIST)")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--imbalance-ratio", type=float, default=100.0)
    parser.add_argument("--profile", default="exponential", choices=["exponential", "step"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--many", type=int, default=100, help="many-shot: more training images than this")
    parser.add_argument("--few", type=int, default=20, help="few-shot: fewer training images than this")
    args = parser.parse_args(argv)
    try:
        if args.train_file:
            train, name = load_split(files=args.train_file, split="train")
        else:
            train, name = load_fashion_mnist()["train"], "Fashion-MNIST"
        split = make_long_tailed(train, args.imbalance_ratio, args.label_column, args.seed, args.profile)
        counts = class_counts(split, args.label_column)
    except (DataError, ValueError, FileNotFoundError) as error:
        return _fail(error)
    feature = split.features[args.label_column]
    is_class_label = isinstance(feature, datasets.ClassLabel)
    names = feature.names if is_class_label else [str(i) for i in range(len(counts))]
    groups = shot_groups(counts, args.many, args.few)

    print(f"{name}-LT ({args.profile}, requested ratio {args.imbalance_ratio:g}, seed {args.seed}): "
          f"{len(split):,} of {len(train):,} training images")
    width = max(len(n) for n in names)
    for cls, (label, count) in enumerate(zip(names, counts, strict=True)):
        group = next(g for g, members in groups.items() if cls in members)
        print(f"  {cls:>3}  {label:<{width}}  {count:>6}  {group}")
    print(f"imbalance ratio {imbalance_ratio(counts):g}; many/medium/few = "
          + "/".join(str(len(groups[g])) for g in ("many", "medium", "few")))
    return 0


# --------------------------------------------------------------------------- balpoe-compare


COMPARE_DESCRIPTION = f"""Train several methods at the same budget and compare them (balanced accuracy,
many/medium/few, ECE, MCE, NLL; accuracy on label-shifted test sets under each prior mode).

    balpoe-compare --budget quick
    balpoe-compare --budget cpu --train-file D/train.parquet --test-file D/test.parquet
    balpoe-compare --budget paper --train-file ... --test-file ... --time-limit 540

Methods: {', '.join(f'{m} ({METHOD_DESCRIPTIONS[m]})' for m in METHODS)}.
Budgets: {'; '.join(f'{name}: {b.description}' for name, b in BUDGETS.items())}.
Every recipe flag changes the shared base recipe (e.g. --epochs 8 --mixup-alpha 0.4; the mixup of the
'balpoe' method is the base recipe's). Each method trains into OUTPUT_DIR/METHOD as an ordinary resumable run;
a rerun skips finished methods and resumes the others, so a long budget can be run in several jobs with
--time-limit. Results: OUTPUT_DIR/comparison.json, comparison.md and comparison.png.
"""


@dataclass
class CompareArguments:
    """The options of ``balpoe-compare`` that are not recipe fields."""

    _argument_group_name = "comparison"

    budget: Literal["quick", "cpu", "cpu-long", "paper"] = field(default="quick", metadata={"help": (
        "The base recipe: " + "; ".join(f"{name}: {b.description}" for name, b in BUDGETS.items()) + ".")})
    methods: str = field(default=",".join(DEFAULT_METHODS), metadata={"help": (
        f"Comma list of methods out of {', '.join(METHODS)}.")})
    output_dir: str | None = field(default=None, metadata={"help": (
        "Where every method's run and the comparison go (default: runs/compare-BUDGET).")})
    time_limit: float | None = field(default=None, metadata={"help": (
        "Wall-clock limit in seconds for this invocation: trainings stop cleanly after an epoch checkpoint "
        f"(keeping {EVALUATION_RESERVE:.0f} s for evaluation); rerun to continue.")})
    prior: str | None = field(default=None, metadata={"help": (
        "Comma list of prior modes to evaluate, or 'all' (default: none, oracle and auto; em instead of auto "
        "without --holdout-fraction).")})
    shifts: str = field(default="all", metadata={"help": "'all' or a comma list of shifted test sets."})
    seeds: str | None = field(default=None, metadata={"help": (
        "Comma list of seeds, e.g. 0,1: the comparison once per seed, into OUTPUT_DIR/seed-S, then the mean "
        "and range of each method over the seeds finished so far (replaces --seed).")})


def parse_compare_args(argv: Sequence[str] | None = None) -> tuple[CompareArguments, Recipe, Budget]:
    """The options, the base recipe (budget < command-line flags) and the budget."""
    parser = build_parser(COMPARE_DESCRIPTION, CompareArguments,
                          "%(prog)s [--budget NAME] [--methods LIST] [--FIELD VALUE ...]")
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    first.add_argument("--budget", default="quick", choices=list(BUDGETS))
    known, _ = first.parse_known_args(argv)
    namespace, settings, given = parse_recipe_flags(parser, argv, budget_values(known.budget))
    args = CompareArguments(**{f.name: getattr(namespace, f.name) for f in fields(CompareArguments)})
    try:
        parse_methods(args.methods)
    except ValueError as error:
        raise TrainingError(f"--methods: {error}") from None
    per_method = [name for name in ("method", *EVERY_METHOD_FIELDS) if name in given]
    if per_method:
        flags = ", ".join("--" + name.replace("_", "-") for name in per_method)
        raise TrainingError(f"{flags}: every method sets these itself; choose the methods with --methods.")
    budget = BUDGETS[args.budget]
    base = make_recipe(settings)
    if budget.needs_files and base.train_file is None:
        raise TrainingError(f"the {args.budget} budget reads CIFAR-10 from local parquet files: pass "
                            "--train-file PATH/train.parquet --test-file PATH/test.parquet (the Hub layout, "
                            "columns img/label).")
    if args.time_limit is not None and args.time_limit <= EVALUATION_RESERVE:
        raise TrainingError(f"--time-limit must exceed {EVALUATION_RESERVE:.0f} s (the time kept for "
                            f"evaluation), got {args.time_limit}.")
    if args.seeds is not None:
        if "seed" in given:
            raise TrainingError("--seed and --seeds: give one of them (--seeds 0,1 runs each seed).")
        parse_seeds(args.seeds)
    if args.output_dir is None:
        args.output_dir = str(Path("runs") / f"compare-{args.budget}")
    return args, base, budget


def parse_seeds(text: str) -> list[int]:
    """``"0,1"`` -> ``[0, 1]``; a ``TrainingError`` for anything but distinct integers in ``[0, 2**32)``
    (``recipes.SEED_LIMIT``, numpy's seeds)."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or max(seeds) >= SEED_LIMIT or len(set(seeds)) != len(seeds):
        raise TrainingError(f"--seeds must be a comma list of distinct integers from 0 to 2**32 - 1 (numpy's "
                            f"seeds), e.g. 0,1; got {text!r}.")
    return seeds


def compare_main(argv: Sequence[str] | None = None) -> int:
    """``balpoe-compare``: parse, compare (``balpoe_hf.compare.compare``), print the tables."""
    from accelerate import PartialState

    start = time.time()
    try:
        args, base, budget = parse_compare_args(argv)
        deadline = None if args.time_limit is None else start + args.time_limit
        seeds = [base.seed] if args.seeds is None else parse_seeds(args.seeds)
        for seed in seeds:
            recipe = base if args.seeds is None else make_recipe({**base.to_dict(), "seed": seed})
            output_dir = args.output_dir if args.seeds is None else seed_dir(args.output_dir, seed)
            comparison = compare(recipe, args.methods, output_dir, shifts=args.shifts, priors=args.prior,
                                 deadline=deadline)
            if PartialState().is_main_process:
                print("\n" + format_comparison(comparison, recipe, budget))
                if comparison.files:
                    print(f"\nwrote {', '.join(comparison.files.values())}")
    except (TrainingError, EvaluationError) as error:
        return _fail(error)
    except KeyboardInterrupt:
        return _interrupted("the finished methods and every run's checkpoints are kept: rerun the same "
                            "command to continue.")
    if args.seeds is not None and PartialState().is_main_process:
        summaries = seed_summaries(args.output_dir, parse_methods(args.methods), seeds)
        print(f"\nBalanced test set over seeds {args.seeds} (mean, range in brackets; seeds finished so "
              "far):\n")
        print(format_seed_table(summaries))
    return 0


# --------------------------------------------------------------------------- balpoe-prepare-data


PREPARE_DESCRIPTION = """Write a dataset as train.parquet and test.parquet in the Hub's layout (--train-file).

    balpoe-prepare-data cifar10 --source ~/data/cifar-10-batches-py --output-dir data/cifar10   # offline
    balpoe-prepare-data cifar10 --output-dir data/cifar10                                      # from the Hub
    balpoe-prepare-data fashion-mnist --output-dir data/fashion-mnist     # Debian's dataset-fashion-mnist

Then: balpoe-train --recipe cifar10-lt-local --train-file data/cifar10/train.parquet \\
          --test-file data/cifar10/test.parquet
"""


def prepare_data_main(argv: Sequence[str] | None = None) -> int:
    """``balpoe-prepare-data``: ``balpoe_hf.prepare_data.prepare_data`` from the command line."""
    from ..data.prepare import DATASETS, prepare_data

    parser = argparse.ArgumentParser(description=PREPARE_DESCRIPTION, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=DATASETS)
    parser.add_argument("--output-dir", required=True, help="folder for train.parquet and test.parquet")
    parser.add_argument("--source", default=None, help=(
        "folder of the original files (CIFAR-10: the unpacked python archive, cifar-10-batches-py; "
        "Fashion-MNIST: the four IDX files), or 'hub' (online). Default: Debian's Fashion-MNIST folder, "
        "the Hub for CIFAR-10."))
    parser.add_argument("--overwrite", action="store_true", help="replace existing parquet files")
    args = parser.parse_args(argv)
    try:
        files = prepare_data(args.dataset, args.output_dir, args.source, overwrite=args.overwrite)
    except DataError as error:
        return _fail(error)
    print("wrote " + " and ".join(str(path) for path in files.values()))
    return 0
