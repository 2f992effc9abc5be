"""Publish a trained BalPoE run to the Hugging Face Hub.

    python scripts/push_to_hub.py runs/fashion-mnist-lt-quick me/balpoe-fashion-mnist-lt [--private]
    python scripts/push_to_hub.py runs/fashion-mnist-lt-quick me/balpoe-fashion-mnist-lt --dry-run

Renders the model card (README.md + images/) into MODEL_DIR, checks that the folder holds safetensors
weights, config, code files and the image processor config, and uploads those files in one commit.
``--dry-run`` stops before the upload and lists what would be uploaded (works offline).
"""

import argparse
import sys

from balpoe_hf.hub import HubFolderError, HubPublishError, prepare_hub_folder, push_to_hub


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a saved BalPoE run (scripts/train.py output)")
    parser.add_argument("repo_id", metavar="REPO_ID", help="the Hub repository, e.g. me/balpoe-cifar10-lt")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--token", default=None,
                        help="Hub token (default: HF_TOKEN or the token saved by `hf auth login`)")
    parser.add_argument("--commit-message", default="Upload BalPoE model with balpoe-hf")
    parser.add_argument("--eval-report", default=None, metavar="REPORT.json",
                        help="scripts/evaluate.py report for the card's shift table and reliability diagram "
                             "(default: MODEL_DIR/eval/report.json when it exists)")
    parser.add_argument("--dataset-id", default=None,
                        help="Hub dataset id for the card's metadata (default: from the run's recipe)")
    parser.add_argument("--dataset-name", default=None, help="readable dataset name for the card")
    parser.add_argument("--license", default="apache-2.0", help="license id for the card metadata")
    parser.add_argument("--dry-run", action="store_true",
                        help="render and check the folder, list the files, upload nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    card_options = {"eval_report": args.eval_report, "dataset_id": args.dataset_id,
                    "dataset_name": args.dataset_name, "license": args.license}
    try:
        if args.dry_run:
            folder = prepare_hub_folder(args.model_dir, args.repo_id, **card_options)
            print(f"{folder.path} is ready for {args.repo_id}; these files would be uploaded:")
            print("\n".join(f"  {name}" for name in folder.files))
            return 0
        url = push_to_hub(args.model_dir, args.repo_id, private=args.private, token=args.token,
                          commit_message=args.commit_message, **card_options)
    except (HubFolderError, HubPublishError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"published {args.model_dir} to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
