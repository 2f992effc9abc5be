"""The checks of a model folder before it is published: what it must hold (weights as safetensors, a BalPoE
config with its class counts and lambdas, the remote-code files, the image processor, the card), the report it
publishes (balpoe-evaluate's, of these weights) and that nothing uploaded names a path of this machine."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import huggingface_hub
import yaml
from transformers.dynamic_module_utils import get_imports, get_relative_imports
from transformers.utils import (
    CONFIG_NAME,
    IMAGE_PROCESSOR_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
)

from ..data.loading import local_name
from ..errors import HubFolderError, TrainingError
from ..run_folder import (
    check_writable,
    weights_fingerprint,
    written_by_package,
)
from .card import CARD_NAME, IMAGES_DIR, missing_settings
from .run_description import RECIPE_NAME

EVAL_RESULTS_NAME = "eval_results.json"
# Where the docs tell balpoe-evaluate to write its report (--output), relative to the run directory.
DEFAULT_EVAL_REPORT = "eval/report.json"
# Run artefacts of scripts/train.py published next to the model when present.
OPTIONAL_FILES = (EVAL_RESULTS_NAME, "train_results.json", RECIPE_NAME)
# Recipe fields that name paths on the machine that trained: the published recipe.yaml has their file names.
LOCAL_PATH_FIELDS = ("data_dir", "train_file", "test_file", "train_list", "test_list", "data_root")
# Published files read as text when looking for local paths (the others are weights and pictures).
TEXT_SUFFIXES = (".json", ".yaml", ".md", ".py", ".txt")
# Pickled weights can run code when loaded; this project publishes safetensors only.
PICKLE_WEIGHT_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")


def read_json(path: Path, what: str = "file") -> dict[str, Any] | None:
    """The JSON object in ``path`` (``None`` if there is no such file); ``HubFolderError`` naming ``what``
    for anything else (malformed JSON, a binary file, a list)."""
    if not path.is_file():
        return None
    try:
        with path.open(encoding="utf-8") as handle:
            values = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        problem = f"is not valid JSON ({error})"
    else:
        if isinstance(values, dict):
            return values
        problem = f"holds a JSON {type(values).__name__}, not an object"
    raise HubFolderError(f"the {what} {path} {problem}: give the file balpoe-hf wrote, or write it again. "
                         "Nothing was written.")


def check_repo_id(repo_id: str) -> None:
    """Refuse a Hub repository id the Hub would refuse, before anything is written (it goes into the card)."""
    try:
        huggingface_hub.utils.validate_repo_id(repo_id)
    except huggingface_hub.utils.HFValidationError as error:
        raise HubFolderError(f"{repo_id!r} is not a Hub repository id ({error}); write it as NAME or "
                             "USER/NAME, e.g. me/balpoe-cifar10-lt. Nothing was written.") from None


def check_folder_writable(folder: Path, names: Sequence[str]) -> None:
    """Refuse a model folder that cannot take the card and its pictures (a read-only copy, say)."""
    try:
        check_writable(folder, "the model card into")
    except TrainingError as error:
        raise HubFolderError(f"{error} Nothing was written.") from None
    read_only = [name for name in names if (folder / name).exists() and not os.access(folder / name, os.W_OK)]
    if read_only:
        raise HubFolderError(f"cannot write the model card into {folder}: {read_only} are read-only; make "
                             "them writable or move them away. Nothing was written.")


def _weight_files(folder: Path, problems: list[str]) -> list[str]:
    """The safetensors weight files of ``folder`` (one file, or the shards of an index)."""
    pickled = sorted({p.name for pattern in PICKLE_WEIGHT_PATTERNS for p in folder.glob(pattern)})
    if pickled:
        problems.append(f"pickle weights {pickled}: this project publishes safetensors only. Load the model "
                        "and re-save it with model.save_pretrained(dir) (safetensors is the default), then "
                        "move the pickle files out of the folder.")
    index = read_json(folder / SAFE_WEIGHTS_INDEX_NAME, "weights index")
    if index is not None:
        shards = sorted(set(index.get("weight_map", {}).values()))
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing:
            problems.append(f"{SAFE_WEIGHTS_INDEX_NAME} names missing shards {missing}: copy them in "
                            "or re-save the model.")
        return [SAFE_WEIGHTS_INDEX_NAME, *shards]
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        return [SAFE_WEIGHTS_NAME]
    problems.append(f"no weights ({SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}): save the model with "
                    "model.save_pretrained(dir).")
    return []


def _code_files(folder: Path, config: Mapping[str, Any], problems: list[str]) -> list[str]:
    """The remote-code files that ``config.json``'s ``auto_map`` needs, following ``from .x import`` links."""
    auto_map = config.get("auto_map") or {}
    if not auto_map:
        problems.append("config.json has no auto_map, so trust_remote_code=True cannot load the model "
                        "without balpoe_hf: save it with a balpoe_hf BalPoEForImageClassification.")
        return []
    # auto_map values look like "modeling_balpoe.BalPoEForImageClassification" (or "repo--module.Class"),
    # as do the pipelines' "impl".
    pipelines = config.get("custom_pipelines") or {}
    refs = [ref for ref in auto_map.values() if isinstance(ref, str)]
    refs += [task["impl"] for task in pipelines.values()
             if isinstance(task, Mapping) and isinstance(task.get("impl"), str)]
    queue = sorted({ref.split("--")[-1].rsplit(".", 1)[0] for ref in refs})
    seen: list[str] = []
    while queue:
        module = queue.pop()
        if module in seen:
            continue
        seen.append(module)
        path = folder / f"{module}.py"
        if not path.is_file():
            problems.append(f"code file {module}.py (needed by auto_map or a relative import) is missing: "
                            "re-save the model with save_pretrained, which copies the code files.")
            continue
        if "balpoe_hf" in get_imports(path):
            problems.append(f"code file {module}.py imports balpoe_hf, which a user loading with "
                            "trust_remote_code=True may not have: use flat relative imports "
                            "(from .x import Y).")
        queue.extend(get_relative_imports(path))
    return sorted(f"{module}.py" for module in seen if (folder / f"{module}.py").is_file())


def check_hub_folder(model_dir: str | Path, require_card: bool = True, extra_files: Sequence[str] = ()
                     ) -> list[str]:
    """Check that ``model_dir`` holds a publishable model and return the files to upload.

    Required: safetensors weights (pickle weights are refused), ``config.json`` of a BalPoE model with
    ``class_counts`` and ``lambdas``, the remote-code files its ``auto_map`` needs, the image processor
    config, and (with ``require_card``) ``README.md`` with every image it links. Optional run artefacts
    (``eval_results.json``, ``train_results.json``, ``recipe.yaml``) and ``extra_files`` (relative paths
    that must exist) are added. Raises ``HubFolderError`` listing every problem.
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise HubFolderError(f"model directory {folder} does not exist.")
    problems: list[str] = []
    config = read_json(folder / CONFIG_NAME, "model config")
    files = [CONFIG_NAME]
    if config is None:
        problems.append(f"no {CONFIG_NAME}: save the model with model.save_pretrained(dir).")
        config = {}
    elif config.get("model_type") != "balpoe":
        problems.append(f"{CONFIG_NAME} has model_type {config.get('model_type')!r}, not 'balpoe'.")
    if config:
        problems += missing_settings(config)
    files += _weight_files(folder, problems)
    files += _code_files(folder, config, problems)
    if config and "image-classification" not in (config.get("custom_pipelines") or {}):
        problems.append(f"{CONFIG_NAME} names no image-classification pipeline (custom_pipelines), so the "
                        "card's pipeline(..., target_prior=...) would fail: the model was saved by an "
                        f"earlier release; upgrade it with this one: balpoe-evaluate --model {folder} "
                        "--upgrade.")
    if (folder / IMAGE_PROCESSOR_NAME).is_file():
        files.append(IMAGE_PROCESSOR_NAME)
    else:
        problems.append(f"no {IMAGE_PROCESSOR_NAME}: save the image processor beside the model "
                        "(balpoe_hf.build_image_processor(config).save_pretrained(dir)) so that "
                        "pipeline('image-classification') works.")
    if require_card:
        card_path = folder / CARD_NAME
        if card_path.is_file():
            files.append(CARD_NAME)
            for link in _linked_images(card_path.read_text(encoding="utf-8")):
                if (folder / link).is_file():
                    files.append(link)
                else:
                    problems.append(f"{CARD_NAME} links the image {link}, which is not in the folder.")
        else:
            problems.append(f"no {CARD_NAME} (model card): run balpoe_hf.hub.prepare_hub_folder(dir).")
    files += [name for name in OPTIONAL_FILES if (folder / name).is_file()]
    for name in extra_files:
        if (folder / name).is_file():
            files.append(Path(name).as_posix())
        else:
            problems.append(f"{name} is not a file in the folder.")
    if problems:
        raise HubFolderError(f"{folder} is not ready for the Hub:\n- " + "\n- ".join(problems))
    return sorted(set(files))


def _linked_images(markdown: str) -> list[str]:
    """Local image paths linked as ``![alt](path)`` in a markdown text (web links are skipped)."""
    links = re.findall(r"!\[[^\]]*\]\(([^)\s]+)", markdown)
    return [link for link in links if "://" not in link]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _report_owner(report_path: Path, folder: Path) -> tuple[Path, str]:
    """The folder whose manifest lists the report as balpoe-evaluate's, and its name there: the model's
    folder, or the nearest folder above the report that lists it (another run's, for a report written into
    it); else where ``evaluation.report_owner`` would have listed it."""
    from ..evaluation.reports import report_owner

    report = report_path.resolve()
    for owner in (folder.resolve(), *report.parents):
        if report.is_relative_to(owner):
            name = report.relative_to(owner).as_posix()
            with contextlib.suppress(TrainingError):  # a damaged manifest lists nothing
                if written_by_package(owner, name, report=True):
                    return owner, name
    owner = report_owner(report_path, folder)
    return owner, report.relative_to(owner.resolve()).as_posix()


def check_report_is_the_models(report: Mapping[str, Any], report_path: Path, folder: Path) -> None:
    """Refuse a report that is not balpoe-evaluate's unedited evaluation of this model's weights: it must be
    listed with its current content in its manifest, and name the SHA-256 of the folder's weights."""
    owner, name = _report_owner(report_path, folder)
    if not written_by_package(owner, name, report=True):
        raise HubFolderError(f"{report_path} is not a report balpoe-evaluate wrote there, or it was edited "
                             f"since: the card publishes its numbers only as written. Write it again with "
                             f"balpoe-evaluate --model {folder} --output {report_path}. Nothing was written.")
    weights = weights_fingerprint(folder)
    if report.get("model_sha256") != weights:
        whose = ("without the fingerprint of the weights it evaluated (an older report)"
                 if report.get("model_sha256") is None else "of other weights" + (
                     f" (the model in {report['model']})" if report.get("model") else ""))
        raise HubFolderError(f"{report_path} is an evaluation {whose}, not of the weights in {folder}: its "
                             "numbers would be published as this model's. Evaluate this model with "
                             f"balpoe-evaluate --model {folder} --output {folder / DEFAULT_EVAL_REPORT} (or "
                             "give that report with --eval-report). Nothing was written.")


def report_pictures(report: Mapping[str, Any], report_path: Path, folder: Path) -> dict[str, Path]:
    """The report's pictures to copy: card-relative target -> source (a missing source is left out).

    A picture is a file balpoe-evaluate wrote beside the report (a plain file name, no link out of the
    report's folder, listed in its manifest) and a PNG: a report naming another file (``/etc/passwd``,
    ``../../secret.txt``) is refused, never copied into the folder to upload.
    """
    report_images = report.get("images") or {}
    if not isinstance(report_images, Mapping):
        raise HubFolderError(f"{report_path} has images {report_images!r}, not a mapping of picture names. "
                             "Nothing was written.")
    owner, _ = _report_owner(report_path, folder)
    pictures = {}
    for name in ("reliability_diagram", "per_class_accuracy"):
        file_name = report_images.get(name)
        if file_name is None:
            continue
        if not isinstance(file_name, str) or Path(file_name).name != file_name or file_name in ("", ".."):
            raise HubFolderError(f"{report_path} names the picture {file_name!r}, which is not a file name "
                                 "beside the report: a report's pictures are the PNG files balpoe-evaluate "
                                 "wrote next to it. Nothing was written.")
        source = report_path.parent / file_name
        if not source.is_file():
            continue
        resolved = source.resolve()
        relative = resolved.relative_to(owner.resolve()).as_posix() if resolved.is_relative_to(
            owner.resolve()) else None
        with source.open("rb") as handle:
            is_png = handle.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
        if resolved.parent != report_path.parent.resolve() or not is_png or relative is None or (
                not written_by_package(owner, relative, report=True)):
            raise HubFolderError(f"{source} is not a picture balpoe-evaluate wrote beside {report_path} (a "
                                 "PNG file listed in its manifest): write the report again with "
                                 "balpoe-evaluate --output. Nothing was written.")
        pictures[f"{IMAGES_DIR}/{name}.png"] = source
    return pictures


def _published_recipe(text: str) -> tuple[bytes, list[str]]:
    """A run's ``recipe.yaml`` as published, and the local paths it named: each path of
    ``LOCAL_PATH_FIELDS`` reduced to its file name, there and where other values quote it (the
    ``description`` lists command-line overrides)."""
    values = yaml.safe_load(text) or {}
    names: dict[str, str] = {}
    for key in LOCAL_PATH_FIELDS:
        value = values.get(key)
        paths = value if isinstance(value, list) else [value] if isinstance(value, str) else []
        names.update({str(path): local_name(path) for path in paths})
        if paths:
            values[key] = [names[str(path)] for path in paths] if isinstance(value, list) else names[value]
    for key, value in values.items():
        if isinstance(value, str) and key not in LOCAL_PATH_FIELDS:
            for path, name in sorted(names.items(), key=lambda item: -len(item[0])):
                value = value.replace(path, name)
            values[key] = value
    return yaml.safe_dump(values, sort_keys=False, allow_unicode=True).encode(), list(names)


def published_files(folder: str | Path, files: Sequence[str]) -> tuple[dict[str, bytes], list[str]]:
    """What ``push_to_hub`` uploads instead of a local file, and the local paths that the run's files name.

    ``recipe.yaml`` is published with its data paths reduced to file names (``_published_recipe``) and
    ``config.json`` with ``backbone_weights_file`` reduced so (only used to build a model from pretrained
    weights, never to load one); the run keeps both as they are.
    """
    folder = Path(folder)
    published: dict[str, bytes] = {}
    local: list[str] = []
    if RECIPE_NAME in files:
        recipe, local = _published_recipe((folder / RECIPE_NAME).read_text(encoding="utf-8"))
        if local:  # else the file goes up as it is
            published[RECIPE_NAME] = recipe
    config = read_json(folder / CONFIG_NAME, "model config") or {}
    weights_file = config.get("backbone_weights_file")
    if isinstance(weights_file, str) and weights_file != local_name(weights_file):
        local.append(weights_file)
        published[CONFIG_NAME] = (json.dumps({**config, "backbone_weights_file": local_name(weights_file)},
                                             indent=2, sort_keys=True) + "\n").encode()
    return published, local


def _local_paths(folder: Path, named: Sequence[str]) -> list[str]:
    """The strings that would give away where the run lies: the run folder, the home directory, the
    absolute form of each data path its recipe names (and the path as given, when it has a folder)."""
    paths = {str(folder.resolve())}
    home = str(Path.home())
    if home.strip("/"):
        paths.add(home)
    for path in named:
        if "/" in path or os.sep in path:
            paths.update({path, str(Path(path).expanduser().resolve())})
    return sorted(paths, key=len, reverse=True)


def check_no_local_paths(folder: str | Path, files: Sequence[str], published: Mapping[str, bytes],
                         extra: Mapping[str, str] | None = None, named: Sequence[str] = ()) -> None:
    """Refuse to publish a text file that names the run's folder, the home directory or a data path.

    ``files`` are read as uploaded (``published`` replaces a local file), ``extra`` maps names to texts
    not written yet (the card); ``named`` are the data paths of the run (``published_files``).
    """
    folder = Path(folder)
    paths = _local_paths(folder, named)
    texts = {name: published[name].decode("utf-8", "replace") if name in published else
             (folder / name).read_text(encoding="utf-8", errors="replace")
             for name in files if name.endswith(TEXT_SUFFIXES) and name not in (extra or {})}
    texts.update(extra or {})
    leaks = [f"{name} names {path}" for name, text in sorted(texts.items()) for path in paths
             if path in text]
    if leaks:
        raise HubFolderError(f"{folder} would publish paths of this machine: {'; '.join(leaks)}. Write the "
                             "file again with this version of balpoe-hf (an evaluation report: "
                             "balpoe-evaluate --output), or remove the path. Nothing was written.")
