"""``balpoe-evaluate``: a saved model on a balanced test set and on label-shifted versions
(``balpoe_hf.evaluation``), printed, and with --output written as a report; --upgrade first."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import (
    EvaluationError,
    EvaluationFailure,
)
from ..models.balpoe.label_shift import PRIOR_ESTIMATORS
from ..recipes.recipe import FEW_SHOT_THRESHOLD, MANY_SHOT_THRESHOLD
from ..run_folder import save_failure
from .parsing import ArgumentParser, option, run_command

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
(LADE/SADE): the table then has one column per file, and --shifts, --deployment-sizes and --stream are not
used (the last two are refused).

    balpoe-evaluate --model runs/imagenet-lt-resnext50 --data-root /data/imagenet \
        --test-list ImageNet_LT_forward50.txt ImageNet_LT_uniform.txt ImageNet_LT_backward50.txt
"""


@dataclass
class EvaluateArguments:
    """``balpoe-evaluate``'s options; those left unset come from the run's ``recipe.yaml`` if it has one."""

    model: str = field(metadata=option("A saved BalPoE model: a training run's directory or a Hub id."))
    dataset: str | None = field(default=None, metadata=option(
        "'fashion-mnist' (Debian's dataset-fashion-mnist files) or a Hub dataset id; default: the test data "
        "of the run's recipe.yaml."))
    dataset_config: str | None = field(default=None, metadata=option("Hub dataset configuration name."))
    split: str | None = field(default=None, metadata=option("The balanced test split (default: test)."))
    data_dir: str | None = field(default=None, metadata=option("Where the Fashion-MNIST files are."))
    test_file: list[str] | None = field(default=None, metadata=option(
        "Local test data: parquet file(s) (glob patterns allowed) or one imagefolder directory."))
    test_list: list[str] | None = field(default=None, metadata=option(
        "Split-list file(s) ('relative/path label' lines, e.g. ImageNet_LT_test.txt) read with --data-root; "
        "several files are evaluated each as its own test set."))
    data_root: str | None = field(default=None, metadata=option(
        "Folder the --test-list paths are relative to (default: the recipe's data_root)."))
    image_column: str | None = field(default=None, metadata=option("Column of the images (default: image)."))
    label_column: str | None = field(default=None, metadata=option(
        "Column of the class labels (default: label)."))
    shifts: str = field(default="all", metadata=option(
        "'all' (forward50 ... uniform ... backward50) or a comma list of shift names."))
    prior: str | None = field(default=None, metadata=option(
        "Comma list of prior modes, or 'all': " + ", ".join(("none", "oracle", *PRIOR_ESTIMATORS))
        + " (default: none,oracle,auto)."))
    upgrade: bool = field(default=False, metadata=option(
        "First give the model folder today's estimator settings (a model saved by an earlier release): "
        "calibrate it again on its run's held-out split where it has one, drop an earlier release's "
        "estimator choice, save today's code files; in place when the folder holds only balpoe-hf's files."))
    upgrade_into: str | None = field(default=None, metadata=option(
        "With --upgrade: write the upgraded model into this new folder instead (and evaluate that one)."))
    deployment_sizes: str | None = field(default=None, metadata=option(
        "Comma list of small batch sizes, e.g. 100,300,1000: also adapt on batches of these sizes drawn "
        "from each shifted set, as a deployment would (mean and worst gain over --deployment-draws)."))
    deployment_draws: int = field(default=10, metadata=option("Batches drawn per size and shift."))
    stream: int | None = field(default=None, metadata=option(
        "Batch size of a stream, e.g. 300: also adapt on a stream of --stream-batches batches from each "
        "shifted set, the evidence of all of them together, and on a drifting stream (forward50, then "
        "backward50) with --drift-forgetting; the gain over none after each batch (JSON key 'stream')."))
    stream_batches: int = field(default=10, metadata=option("Batches per stream."))
    stream_draws: int = field(default=10, metadata=option("Streams drawn per shift."))
    drift_forgetting: float = field(default=0.5, metadata=option(
        "The drifting stream's forgetting factor: an image k batches old weighs forgetting**k."))
    output: str | None = field(default=None, metadata=option(
        "Write the JSON report here, and the PNG plots beside it."))
    batch_size: int = field(default=256, metadata=option("Inference batch size."))
    device: str | None = field(default=None, metadata=option("Device (default: cuda when available)."))
    n_bins: int = field(default=15, metadata=option("Confidence bins of ECE / MCE."))
    many: int | None = field(default=None, metadata=option(
        f"Many-shot: more training images than this (default: the recipe's, else {MANY_SHOT_THRESHOLD})."))
    few: int | None = field(default=None, metadata=option(
        f"Few-shot: fewer training images than this (default: the recipe's, else {FEW_SHOT_THRESHOLD})."))
    seed: int = field(default=0, metadata=option("Seed of the shifted test sets' subsampling."))


# Settings read from a run directory's recipe.yaml when not given (argument -> recipe field), else the
# recipe field's default.
RECIPE_SETTINGS = {"dataset": "dataset", "dataset_config": "dataset_config", "data_dir": "data_dir",
                   "test_file": "test_file", "test_list": "test_list", "data_root": "data_root",
                   "split": "test_split", "image_column": "image_column", "label_column": "label_column",
                   "many": "many_threshold", "few": "few_threshold"}


def parse_evaluate_args(argv: Sequence[str] | None = None) -> EvaluateArguments:
    """``EvaluateArguments`` from the command line, completed from ``MODEL/recipe.yaml`` where it exists."""
    from ..recipes import read_recipe_file, recipe_defaults

    (args,) = ArgumentParser([EvaluateArguments], EVALUATE_DESCRIPTION).parse(argv)
    recipe_file = Path(args.model) / "recipe.yaml"
    # A malformed file is a TrainingError naming it; read_recipe_file drops the run's overridden_fields.
    recipe = read_recipe_file(recipe_file) if recipe_file.is_file() else {}
    # The recipe names one data source; a data source on the command line replaces it as a whole.
    if args.dataset is not None or args.test_file is not None or args.test_list is not None:
        recipe = {k: v for k, v in recipe.items() if k not in ("dataset", "dataset_config", "test_file",
                                                                "test_list")}
    defaults = recipe_defaults()
    for name, key in RECIPE_SETTINGS.items():
        if getattr(args, name) is None:
            value = recipe.get(key)
            if value is None and name in ("many", "few") and not recipe_file.is_file():
                continue  # a Hub id: evaluate_model reads the thresholds of the recipe.yaml published with it
            setattr(args, name, defaults[key] if value is None else value)
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

    def body() -> int:
        with contextlib.ExitStack() as exit_stack:  # --output: the lock of the folder it writes into
            return _evaluate(parse_evaluate_args(argv), exit_stack, upgraded)

    return run_command(body, lambda: f"the upgraded model is saved in {upgraded[0]}; no report was written."
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
    if args.prior is not None:
        parse_priors(args.prior)  # the names, checked before the inference; "all" depends on the model
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
    if several_lists and (args.deployment_sizes is not None or args.stream is not None):
        # They draw batches from the shifted sets of one test set; several lists are each taken as is.
        raise EvaluationError("--deployment-sizes and --stream draw batches from the shifted sets of one "
                              "test set, and several --test-list files are each evaluated as they are: give "
                              "one --test-list (or --test-file) for them, or leave them out.")
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
    priors = default_priors() if args.prior is None else parse_priors(args.prior, model.config.calibration)
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
