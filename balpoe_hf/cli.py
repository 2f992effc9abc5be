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

from .arguments import build_parser, parse_args, parse_recipe_flags
from .compare import (
    BUDGETS,
    DEFAULT_METHODS,
    EVALUATION_RESERVE,
    Budget,
    budget_values,
    compare,
    format_comparison,
    format_seed_table,
    seed_dir,
    seed_summaries,
)
from .errors import DataError, EvaluationError, HubFolderError, HubPublishError, TrainingError
from .label_shift import UNKNOWN_PRIOR_MODES
from .methods import EVERY_METHOD_FIELDS, METHOD_DESCRIPTIONS, METHODS, parse_methods
from .recipes import Recipe, make_recipe

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


# --------------------------------------------------------------------------- balpoe-train


def list_recipes() -> str:
    """The shipped recipes, one ``name  description`` line each (``balpoe-train --list-recipes``)."""
    from .recipes import available_recipes, recipe_values

    names = available_recipes()
    width = max(len(name) for name in names)
    return "\n".join(f"{name:<{width}}  {recipe_values(name).get('description', '')}" for name in names)


def train_main(argv: Sequence[str] | None = None) -> int:
    """``balpoe-train``: parse the run options and the recipe, then ``balpoe_hf.training.train``."""
    from .training import train

    if "--list-recipes" in (sys.argv[1:] if argv is None else argv):
        print(list_recipes())
        return 0
    start = time.time()
    try:
        run, recipe = parse_args(argv, description=TRAIN_DESCRIPTION)
        deadline = None if run.time_limit is None else start + run.time_limit
        train(recipe, run.output_dir, resume=run.resume, overwrite=run.overwrite, report_to=run.report_to,
              push_to_hub=run.push_to_hub, hub_model_id=run.hub_model_id, deadline=deadline)
    except TrainingError as error:
        return _fail(error)
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
the model's logits on the unlabelled shifted set: em (EM on the raw posteriors), em-ts and em-bcts (EM after
temperature scaling / BCTS), bbse (from the held-out confusion matrix), em-bcts-lrt (em-bcts with a
likelihood-ratio guard), em-bcts-map (em-bcts shrunk towards uniform) and auto, the default (see
docs/evaluation.md). All but em need a model trained with --holdout-fraction (its config.calibration). With
--output it writes the JSON report and, beside it, a reliability diagram and a per-class accuracy plot of the
balanced set.

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
        "Comma list of prior modes, or 'all': " + ", ".join(("none", "oracle", *UNKNOWN_PRIOR_MODES))
        + " (default: none,oracle,auto; "
        "none,oracle,em for a model trained without --holdout-fraction). auto runs the estimator chosen for "
        "the model on its held-out split.")})
    fit_shift_estimator: bool = field(default=False, metadata={"help": (
        "First choose the model's label-shift estimator on its held-out split, as training does (for runs "
        "saved before the choice existed; needs the run's folder and data), and save it with the model.")})
    deployment_sizes: str | None = field(default=None, metadata={"help": (
        "Comma list of small batch sizes, e.g. 100,300,1000: also adapt on batches of these sizes drawn "
        "from each shifted set, as a deployment would (mean and worst gain over --deployment-draws).")})
    deployment_draws: int = field(default=10, metadata={"help": "Batches drawn per size and shift."})
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

    from .recipes import read_recipe_file

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


def _list_name(path: str) -> str:
    """A test list's column in the table: its file name without the extension (ImageNet_LT_forward50)."""
    return Path(path).stem


def _evaluate_lists(model, processor, args: EvaluateArguments, priors: list[str]) -> dict:
    """Each ``--test-list`` file evaluated as it is (no shifts drawn from it), under every prior mode.

    The ``uniform`` shift of ``evaluate_model`` is the set unchanged, so its ``oracle`` mode uses the file's
    own label distribution and ``em`` estimates it, as for a shifted set drawn from a balanced one.
    """
    from .evaluation import evaluate_model
    from .loading import load_list

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
        results[name].report = {"dataset": path, **results[name].report}
    return results


def _report_lists(results: dict, args: EvaluateArguments, priors: list[str]) -> None:
    """Print one line per test list and the prior-mode table; with --output write each list's report too."""
    from .evaluation import format_shift_table, record_report, report_files, report_owner, write_report

    table = {mode: {name: result.report["shift_accuracy"][mode]["uniform"]
                    for name, result in results.items()} for mode in priors}
    for name, result in results.items():
        print(f"{name}: {result.report['num_test_samples']} images")
    print("\nTop-1 accuracy (%) on each test list (rows: prior mode, columns: test list):")
    print(format_shift_table(table, list(results)))
    if args.output:
        output = Path(args.output)
        files = {}
        for name, result in results.items():
            files[name] = str(output.with_name(f"{output.stem}_{name}.json"))
            write_report(result, files[name])
        summary = {"model": args.model, "data_root": args.data_root, "shift_accuracy": table,
                   "reports": files}
        output.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        record_report(report_files(output, list(results)), report_owner(output, args.model))
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
    from .evaluation import (
        absent_classes_warning,
        check_calibration_for,
        check_output,
        default_priors,
        evaluate_model,
        fit_shift_estimator,
        format_balanced,
        format_deployment_table,
        format_shift_estimator,
        format_shift_table,
        load_model,
        parse_priors,
        parse_shifts,
        record_report,
        report_files,
        report_owner,
        resolve_device,
        write_report,
    )
    from .loading import load_list, load_split

    try:
        args = parse_evaluate_args(argv)
        # Everything that can be checked before the inference is checked first.
        shifts = parse_shifts(args.shifts)
        priors = None if args.prior is None else parse_priors(args.prior)
        if args.batch_size < 1 or args.n_bins < 1:
            raise EvaluationError(f"--batch-size and --n-bins must be at least 1, got {args.batch_size} and "
                                  f"{args.n_bins}.")
        device = resolve_device(args.device)
        several_lists = bool(args.test_list) and len(args.test_list) > 1
        if args.output:
            check_output(args.output, args.model,
                         [_list_name(path) for path in args.test_list] if several_lists else ())
        sizes = _parse_sizes(args.deployment_sizes)
        if args.fit_shift_estimator:
            choice = fit_shift_estimator(args.model, device)
            print(format_shift_estimator(choice))
        model, processor = load_model(args.model, device)
        priors = priors or default_priors(model.config.calibration)
        check_calibration_for(priors, model.config.calibration, args.model, model.config.shift_estimator)
        if several_lists:
            _report_lists(_evaluate_lists(model, processor, args, priors), args, priors)
            return 0
        if args.test_list:
            ds, source = load_list(args.test_list[0], args.data_root, model.config.num_labels,
                                   args.image_column, args.label_column), args.test_list[0]
        else:
            ds, source = load_split(files=args.test_file, dataset=args.dataset,
                                    dataset_config=args.dataset_config, split=args.split,
                                    data_dir=args.data_dir)
        result = evaluate_model(model, processor, ds, image_column=args.image_column,
                                label_column=args.label_column, shifts=shifts, priors=priors,
                                batch_size=args.batch_size, n_bins=args.n_bins, many=args.many, few=args.few,
                                seed=args.seed, deployment_sizes=sizes,
                                deployment_draws=args.deployment_draws)
    except (EvaluationError, TrainingError) as error:  # TrainingError: DataError, a malformed recipe.yaml
        return _fail(error)
    result.report = {"model": args.model, "dataset": source, **result.report}
    if result.report["classes_without_test_images"]:
        print(absent_classes_warning(result.report["classes_without_test_images"], model.config.num_labels),
              file=sys.stderr)
    title = f"Balanced test set ({result.report['num_test_samples']} images, uniform target prior):"
    print(format_balanced(result.report["balanced"], title))
    print("\nTop-1 accuracy (%) on label-shifted test sets (rows: prior mode, columns: test distribution):")
    print(format_shift_table(result.report["shift_accuracy"], shifts))
    if result.report["shift_estimator"]:
        print(f"(auto ran {result.report['shift_estimator']})")
    if sizes:
        print("\nGain over none (points) adapting on small batches drawn from each shifted set, mean over "
              f"{args.deployment_draws} draws (worst draw in brackets):")
        print(format_deployment_table(result.report["deployment_batches"], shifts))
    if args.output:
        output = Path(args.output)
        try:
            images = write_report(result, output)
            # Listed as balpoe-evaluate's (in the run's manifest when inside a run, so that --overwrite
            # removes a stale report; else beside it), so that a later report may replace it, and only it.
            record_report(report_files(output), report_owner(output, args.model))
        except (OSError, TrainingError) as error:
            return _fail(error)
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
    from .hub import prepare_hub_folder, push_to_hub

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
    try:
        with contextlib.ExitStack() as space:
            if args.demo:  # a Space's app.py and requirements.txt, taken back if the push fails
                from .demo import space_files_for_push

                card_options["also_upload"] = space.enter_context(
                    space_files_for_push(args.model_dir, args.repo_id))
            if args.dry_run:
                folder = prepare_hub_folder(args.model_dir, args.repo_id, **card_options)
                print(f"{folder.path} is ready for {args.repo_id}; these files would be uploaded:")
                print("\n".join(f"  {name}" for name in folder.files))
                return 0
            url = push_to_hub(args.model_dir, args.repo_id, private=args.private, token=args.token,
                              commit_message=args.commit_message, **card_options)
    except (HubFolderError, HubPublishError, TrainingError) as error:  # TrainingError: a damaged manifest
        print(f"error: {error}", file=sys.stderr)
        return 1
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
    from .demo import build_demo, load_demo_model, require_gradio

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

    from .data import class_counts, imbalance_ratio, make_long_tailed, shot_groups
    from .loading import load_fashion_mnist, load_split

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
    """``"0,1"`` -> ``[0, 1]``; a ``TrainingError`` for anything but distinct integers >= 0."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise TrainingError(f"--seeds must be a comma list of distinct integers >= 0, e.g. 0,1; got "
                            f"{text!r}.")
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
    from .prepare_data import DATASETS, prepare_data

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
