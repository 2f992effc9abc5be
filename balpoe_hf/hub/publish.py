"""Publishing a run: ``prepare_hub_folder`` renders the card and its pictures into the folder after the
checks, ``push_to_hub`` uploads the publishable files with ``huggingface_hub.HfApi`` (``create_repo`` +
``create_commit``). Nothing uploaded names a path of the machine that trained: the run's ``recipe.yaml``
goes up with file names only, and a file that still names the run's folder, the home directory or a data
path stops the upload."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from huggingface_hub import constants as hub_constants
from transformers.utils import CONFIG_NAME

from ..errors import HubFolderError, HubFolderWriteError, HubPublishError, TrainingError
from ..recipes import read_recipe_file
from ..run_folder import (
    finish_interrupted_save,
    output_lock,
    save_failure,
    staged_save,
    written_by_package,
)
from .card import CARD_NAME, IMAGES_DIR, class_counts_of, render_model_card
from .folder import (
    DEFAULT_EVAL_REPORT,
    EVAL_RESULTS_NAME,
    check_folder_writable,
    check_hub_folder,
    check_no_local_paths,
    check_repo_id,
    check_report_is_the_models,
    published_files,
    read_json,
    report_pictures,
)
from .run_description import RECIPE_NAME, as_config, label_names


@dataclass
class HubFolder:
    """A model directory ready to upload: the rendered card and the files that would be uploaded."""

    path: Path
    files: list[str]  # paths relative to ``path``, POSIX separators, sorted
    card: ModelCard
    # What is uploaded instead of the local file, for the files of ``files`` that name local paths (the
    # run's ``recipe.yaml`` keeps its data paths for --resume and balpoe-evaluate; the Hub gets file names).
    published: dict[str, bytes] = field(default_factory=dict)

    def content(self, name: str) -> bytes:
        """The bytes ``push_to_hub`` uploads as ``name``."""
        return self.published[name] if name in self.published else (self.path / name).read_bytes()


def _require_card_packages() -> None:
    missing = [name for name in ("matplotlib", "jinja2") if importlib.util.find_spec(name) is None]
    if missing:
        raise HubFolderError(f"rendering the model card needs {' and '.join(missing)}: pip install "
                             "'balpoe-hf[hub]'. Nothing was written.")


def prepare_hub_folder(
    model_dir: str | Path,
    repo_id: str | None = None,
    *,
    eval_report: str | Path | None = None,
    dataset_id: str | None = None,
    dataset_name: str | None = None,
    license: str | None = "apache-2.0",
    also_upload: Sequence[str] = (),
) -> HubFolder:
    """Render the model card and its pictures into ``model_dir`` and check it; everything but the upload.

    Reads ``config.json`` (class counts, lambdas, labels), ``eval_results.json`` and ``recipe.yaml`` (from
    ``scripts/train.py``) and the ``scripts/evaluate.py`` report ``eval_report`` (default
    ``MODEL_DIR/eval/report.json`` when it exists: its balanced-set metrics, label-shift table and
    reliability diagram). Checks the folder first and writes nothing when it is not publishable; then writes
    ``README.md`` and ``images/`` and lists them in the folder's manifest (``balpoe_hf.run_folder``). A
    ``README.md`` or picture that the package did not write there (or that was edited since) is never
    replaced: ``HubFolderError`` asks to move it away. Returns the card and the files that ``push_to_hub``
    would upload, so that the folder can be inspected first. ``repo_id`` is used in the card's usage
    snippet (default: the folder name); ``dataset_id`` and ``dataset_name`` override what the recipe says.

    The report must be balpoe-evaluate's, unedited, of this folder's weights (``check_report_is_the_models``)
    and its pictures PNG files beside it. The card and its pictures are written in one
    ``run_folder.staged_save`` under the folder's lock: a kill or a full disk leaves the old ones.
    ``also_upload``: more files of the folder to upload (paths relative to it; the Space files of
    ``balpoe-push --demo``).
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise HubFolderError(f"model directory {folder} does not exist.")
    try:
        with output_lock(folder, "balpoe-push"):
            finish_interrupted_save(folder)  # a save a kill interrupted there: finished or undone first
            return _prepare_hub_folder(folder, repo_id, eval_report=eval_report, dataset_id=dataset_id,
                                       dataset_name=dataset_name, license=license, also_upload=also_upload)
    except TrainingError as error:  # the lock held elsewhere, a read-only folder, a damaged save journal
        raise HubFolderError(f"{error} Nothing was written.") from None


def _prepare_hub_folder(folder: Path, repo_id: str | None, *, eval_report: str | Path | None,
                        dataset_id: str | None, dataset_name: str | None, license: str | None,
                        also_upload: Sequence[str]) -> HubFolder:
    """``prepare_hub_folder`` holding the folder's lock."""

    _require_card_packages()
    if repo_id is not None:
        check_repo_id(repo_id)
    if not folder.is_dir():
        raise HubFolderError(f"model directory {folder} does not exist.")
    config = read_json(folder / CONFIG_NAME, "model config")
    if config is None:
        raise HubFolderError(f"no {CONFIG_NAME} in {folder}: save the model with model.save_pretrained(dir).")
    counts = class_counts_of(config, str(folder / CONFIG_NAME))
    config = as_config(config)  # read through its class: the defaults and checks of BalPoEConfig
    recipe_path = folder / RECIPE_NAME
    recipe: dict[str, Any] = {}
    if recipe_path.is_file():
        try:
            recipe = read_recipe_file(recipe_path)
        except TrainingError as error:
            raise HubFolderError(f"{error} Nothing was written.") from None

    metrics = read_json(folder / EVAL_RESULTS_NAME, "evaluation results")
    report_path = Path(eval_report) if eval_report is not None else folder / DEFAULT_EVAL_REPORT
    report = read_json(report_path, "evaluation report")
    if report is not None and not isinstance(report.get("shift_accuracy", {}), dict):
        raise HubFolderError(f"{report_path} is not a balpoe-evaluate report (its shift_accuracy is not a "
                             "table): write it with balpoe-evaluate --output. Nothing was written.")
    if eval_report is not None and report is None:
        raise HubFolderError(f"evaluation report {report_path} does not exist: write it with "
                             f"scripts/evaluate.py --model {folder} --output {report_path}.")
    extra_files = []
    pictures: dict[str, Path] = {}
    if report is not None:
        check_report_is_the_models(report, report_path, folder)
        # The report's metrics and its reliability diagram come from the same evaluation: keep them together.
        metrics = report.get("balanced") or metrics
        pictures = report_pictures(report, report_path, folder)
        if report_path.resolve().is_relative_to(folder.resolve()):
            extra_files.append(report_path.resolve().relative_to(folder.resolve()).as_posix())

    # Check first, then write: the folder must be publishable but for the card, nothing of the user's may be
    # replaced, and nothing uploaded may name a path of this machine.
    upload_files = [*extra_files, *also_upload]
    files = check_hub_folder(folder, require_card=False, extra_files=upload_files)
    published, named = published_files(folder, files)
    histogram = f"{IMAGES_DIR}/class_counts.png"
    targets = [CARD_NAME, histogram, *pictures]
    is_source = {name for name, source in pictures.items() if source.resolve() == (folder / name).resolve()}
    foreign = [name for name in targets if (folder / name).exists() and name not in is_source
               and not written_by_package(folder, name)]
    if foreign:
        raise HubFolderError(f"{folder} holds {foreign}, which balpoe-hf did not write there (or which were "
                             "edited since): move them out of the folder to let it write the model card and "
                             "its pictures. Nothing was written.")
    check_folder_writable(folder, [*targets, IMAGES_DIR])
    images = {"class_counts": histogram, **{Path(name).stem: name for name in pictures}}
    card = render_model_card(config, metrics, report, repo_id=repo_id or folder.resolve().name, images=images,
                             recipe=recipe, dataset_id=dataset_id, dataset_name=dataset_name,
                             report_file=extra_files[0] if extra_files else None, license=license)
    check_no_local_paths(folder, files, published, extra={CARD_NAME: str(card)}, named=named)

    from ..evaluation.plots import class_count_histogram

    try:
        with staged_save(folder) as stage:
            (stage / IMAGES_DIR).mkdir()
            class_count_histogram(counts, stage / histogram, class_names=label_names(config, len(counts)))
            for name, source in pictures.items():
                shutil.copyfile(source, stage / name)
            card.save(stage / CARD_NAME)
    except OSError as error:
        raise HubFolderWriteError(f"could not write the model card into {folder}: "
                                  f"{save_failure(error, folder)} Nothing there was replaced.") from None
    return HubFolder(path=folder, files=check_hub_folder(folder, extra_files=upload_files), card=card,
                     published=published)


def push_to_hub(
    model_dir: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload BalPoE model with balpoe-hf",
    **card_options: Any,
) -> str:
    """Publish a saved BalPoE run to the Hub as ``repo_id`` and return the repository URL.

    Renders the card (see ``prepare_hub_folder``; ``card_options`` go to it), checks the folder, creates
    the repository if needed (``HfApi.create_repo``) and uploads the publishable files in one commit
    (``HfApi.create_commit``): each as it is, but ``recipe.yaml`` and a ``config.json`` naming local
    weights, whose published copies name files only (``published_files``). In offline mode
    (``HF_HUB_OFFLINE=1``) or without a token it raises ``HubPublishError`` before touching the folder or
    the network.
    """
    if hub_constants.is_offline_mode():
        raise HubPublishError("cannot push to the Hub in offline mode (HF_HUB_OFFLINE=1 or "
                              "TRANSFORMERS_OFFLINE=1 is set): unset it to publish, or run "
                              "balpoe_hf.hub.prepare_hub_folder(model_dir) to render and check the folder "
                              "without uploading. Nothing was uploaded.")
    check_repo_id(repo_id)
    token = token or huggingface_hub.get_token()
    if not token:
        raise HubPublishError("no Hugging Face token: log in with `hf auth login`, set HF_TOKEN, or pass "
                              "token=... (--token on the command line). Nothing was uploaded.")
    hub_folder = prepare_hub_folder(model_dir, repo_id, **card_options)
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=hub_folder.published.get(
        name, str(hub_folder.path / name))) for name in hub_folder.files]
    api.create_commit(repo_id=repo_url.repo_id, operations=operations, commit_message=commit_message,
                      repo_type="model")
    return str(repo_url)
