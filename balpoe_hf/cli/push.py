"""``balpoe-push``: the model card, the folder checks and the upload (``balpoe_hf.hub``)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .parsing import ArgumentParser, option, run_command

PUSH_DESCRIPTION = """Publish a trained BalPoE run to the Hugging Face Hub.

    balpoe-push runs/fashion-mnist-lt-quick me/balpoe-fashion-mnist-lt [--private]
    balpoe-push runs/fashion-mnist-lt-quick me/balpoe-fashion-mnist-lt --dry-run

Renders the model card (README.md + images/) into MODEL_DIR, checks that the folder holds safetensors weights,
config, code files and the image processor config, and uploads those files in one commit. --dry-run stops
before the upload and lists what would be uploaded (works offline). --demo also writes a Space's app.py and
requirements.txt into MODEL_DIR and uploads them with the model: a Gradio Space holding these two files runs
the demo of REPO_ID (balpoe-demo, loaded from the Hub with trust_remote_code=True).
"""


@dataclass
class PushArguments:
    """``balpoe-push``'s options."""

    model_dir: str = field(metadata=option("a saved BalPoE run (balpoe-train output)", positional=True,
                                           metavar="MODEL_DIR"))
    repo_id: str = field(metadata=option("the Hub repository, e.g. me/balpoe-cifar10-lt", positional=True,
                                         metavar="REPO_ID"))
    private: bool = field(default=False, metadata=option("create the repository as private"))
    token: str | None = field(default=None, metadata=option(
        "Hub token (default: HF_TOKEN or the token saved by `hf auth login`)"))
    commit_message: str = field(default="Upload BalPoE model with balpoe-hf", metadata=option(
        "the commit message of the upload"))
    eval_report: str | None = field(default=None, metadata=option(
        "balpoe-evaluate report for the card's shift table and reliability diagram (default: "
        "MODEL_DIR/eval/report.json when it exists)", metavar="REPORT.json"))
    dataset_id: str | None = field(default=None, metadata=option(
        "Hub dataset id for the card's metadata (default: from the run's recipe)"))
    dataset_name: str | None = field(default=None, metadata=option("readable dataset name for the card"))
    license: str = field(default="apache-2.0", metadata=option("license id for the card metadata"))
    dry_run: bool = field(default=False, metadata=option(
        "render and check the folder, list the files, upload nothing"))
    demo: bool = field(default=False, metadata=option(
        "also write and upload a Space's app.py and requirements.txt (the balpoe-demo app for REPO_ID)"))


def push_main(argv: Sequence[str] | None = None) -> int:
    """``balpoe-push``: render the card, check the folder and upload it (or only list it with --dry-run)."""
    (args,) = ArgumentParser([PushArguments], PUSH_DESCRIPTION).parse(argv)
    return run_command(lambda: _push(args), "the model card is written in one piece or not at all: rerun to "
                                            "publish.")


def _push(args: PushArguments) -> None:
    from ..demo.space import space_files_for_push
    from ..hub.folder import DEFAULT_EVAL_REPORT
    from ..hub.publish import prepare_hub_folder, push_to_hub

    card_options = {"eval_report": args.eval_report, "dataset_id": args.dataset_id,
                    "dataset_name": args.dataset_name, "license": args.license}
    # Without a report (a given --eval-report that is missing is an error of prepare_hub_folder's).
    report = Path(args.model_dir) / DEFAULT_EVAL_REPORT
    if args.eval_report is None and Path(args.model_dir).is_dir() and not report.is_file():
        print(f"warning: no evaluation report, so the card has no label-shift table, reliability diagram or "
              f"per-class plot; add them with: balpoe-evaluate --model {args.model_dir} --shifts all "
              f"--output {report}", file=sys.stderr)
    with contextlib.ExitStack() as space:
        if args.demo:  # a Space's app.py and requirements.txt, taken back if the push fails
            card_options["also_upload"] = space.enter_context(
                space_files_for_push(args.model_dir, args.repo_id))
        if args.dry_run:
            folder = prepare_hub_folder(args.model_dir, args.repo_id, **card_options)
            print(f"{folder.path} is ready for {args.repo_id}; these files would be uploaded:")
            print("\n".join(f"  {name}" + ("  (its data paths as file names)" if name in folder.published
                                             else "") for name in folder.files))
            return
        url = push_to_hub(args.model_dir, args.repo_id, private=args.private, token=args.token,
                          commit_message=args.commit_message, **card_options)
    print(f"published {args.model_dir} to {url}")
