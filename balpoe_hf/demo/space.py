"""The demo in the package: models loaded with the package's checks (``balpoe_hf.evaluation.load_model``),
and a Space's ``app.py`` and ``requirements.txt`` (``balpoe-push --demo``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

from ..errors import HubFolderError

APP_NAME = "app.py"
REQUIREMENTS_NAME = "requirements.txt"
SPACE_FILES = (APP_NAME, REQUIREMENTS_NAME)
# What the Space's app.py and the model's remote code import: the app needs no balpoe-hf.
SPACE_PACKAGES = ("torch", "torchvision", "timm", "transformers", "gradio")


def load_demo_model(model_id: str | Path, device: str | None = None) -> tuple[Any, Any]:
    """A BalPoE model (eval mode) and its image processor, from a run's folder or a Hub id, with the checks
    of ``balpoe_hf.evaluation.load_model`` (an ``EvaluationError`` that names the problem and its fix)."""
    from ..evaluation.model_loading import load_model, resolve_device

    return load_model(model_id, resolve_device(device))


def space_requirements() -> str:
    """A Space's ``requirements.txt``: the packages the app and the model's code import, with the versions
    balpoe-hf itself requires (read from its installed metadata, so they cannot drift apart)."""
    try:
        declared = requires("balpoe-hf") or []
    except PackageNotFoundError:
        declared = []
    pinned: dict[str, str] = {}
    for line in declared:
        requirement = Requirement(line)  # without its marker (gradio's is extra == "demo")
        pinned.setdefault(requirement.name, f"{requirement.name}{requirement.specifier}")
    lines = [pinned.get(name, name) for name in SPACE_PACKAGES]
    return ("# The BalPoE demo Space: the app (gradio) and the model's remote code (torch, timm,\n"
            "# transformers; torchvision for the fast image processor). balpoe-hf itself is not needed.\n"
            + "\n".join(lines) + "\n")


def space_app(repo_id: str) -> str:
    """A Space's ``app.py``: the demo app (``balpoe_hf.demo.app``, as it is) serving the model ``repo_id``,
    loaded from the Hub with its remote code."""
    source = Path(__file__).with_name("app.py").read_text(encoding="utf-8")
    return (f"# A BalPoE demo Space for the model {repo_id}, written by balpoe-push --demo (balpoe-hf).\n"
            + source
            + "\n\n# ------------------------------------------------------------------------- the Space\n\n"
            + f"MODEL_ID = {repo_id!r}\n"
            + "demo = build_demo(MODEL_ID)\n\n"
            + 'if __name__ == "__main__":\n'
            + "    demo.launch()\n")


def write_space_files(model_dir: str | Path, repo_id: str) -> list[Path]:
    """Write a Space's ``app.py`` and ``requirements.txt`` for the model ``repo_id`` into ``model_dir``.

    A Space holding these two files runs the demo of the model published as ``repo_id`` (``balpoe-push
    MODEL_DIR REPO_ID --demo`` publishes them with it). The folder is checked first as the push checks it
    (``hub.check_hub_folder``, without the card), so that a folder the push would refuse gets nothing; an
    ``app.py`` or ``requirements.txt`` that balpoe-hf did not write there (or that was edited since) is never
    replaced: ``HubFolderError`` asks to move it away. Returns the two paths.
    """
    from ..hub.folder import check_hub_folder, check_repo_id
    from ..run_folder import check_writable, record_outputs, written_by_package

    check_repo_id(repo_id)
    folder = Path(model_dir)
    check_hub_folder(folder, require_card=False)
    check_writable(folder, "the Space's files into", HubFolderError)
    foreign = [name for name in SPACE_FILES
               if (folder / name).exists() and not written_by_package(folder, name)]
    if foreign:
        raise HubFolderError(f"{folder} holds {foreign}, which balpoe-hf did not write there (or which were "
                             "edited since): move them out of the folder to let --demo write the Space's "
                             "files. Nothing was written.")
    paths = [folder / APP_NAME, folder / REQUIREMENTS_NAME]
    paths[0].write_text(space_app(repo_id), encoding="utf-8")
    paths[1].write_text(space_requirements(), encoding="utf-8")
    record_outputs(folder, paths)
    return paths


@contextlib.contextmanager
def space_files_for_push(model_dir: str | Path, repo_id: str) -> Iterator[tuple[str, ...]]:
    """``write_space_files`` for a push that follows (``balpoe-push --demo``): yields the names to upload
    (``prepare_hub_folder(..., also_upload=...)``) and, if the push fails (offline, no token, a card
    problem), puts back what the folder held before, so that a refused push leaves the folder as it was."""
    from ..run_folder import record_outputs

    folder = Path(model_dir)
    before = {name: (folder / name).read_bytes() for name in SPACE_FILES if (folder / name).is_file()}
    write_space_files(folder, repo_id)
    try:
        yield SPACE_FILES
    except BaseException:
        for name in SPACE_FILES:
            if name in before:
                (folder / name).write_bytes(before[name])
            else:
                (folder / name).unlink(missing_ok=True)
        record_outputs(folder, [folder / name for name in before])
        raise
