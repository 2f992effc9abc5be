"""A folder the package writes into (a run, a report's folder, an upgraded model): what it wrote there, saves
that replace its files all at once, and one writer at a time.

**Manifest.** ``balpoe_outputs.json`` lists the files the package wrote into a run directory, each with its
SHA-256, and the folders the run owns whole (``checkpoints/``, ``logs/``). ``--overwrite`` deletes only
those, and refuses when one of them was changed since; no command replaces a file that is not listed with
its current content: a run's outputs (``run_output_files``), ``balpoe_hf.hub``'s card, and
``balpoe-evaluate``'s reports, which are listed under ``reports`` as well (in the run's manifest, or in one
beside them), so that a report never replaces a model file.

**Atomic saves.** Every save that replaces what a folder holds (a finished model, a report, a model card)
goes through ``staged_save``: the files are written into a staging folder beside them, then a journal naming
them and the new manifest is written in one rename (the commit), then the files are renamed into place and
the manifest last. A kill or a full disk before the commit leaves the old files (the staging folder is
discarded); after it, ``settle`` (run by every command before it reads or writes the folder) finishes the
renames. So the folder holds the old files or the new ones, with a manifest that lists them.

**One writer.** ``output_lock`` holds ``.balpoe.lock`` (the owner's pid, host and command) in a folder while
a command writes there; a second writer is refused, naming the owner. The lock is an ``flock`` on that file,
which the system releases when its process ends, however it ends: a lock left by a killed process is stale
and is taken over.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import TrainingError

MANIFEST = "balpoe_outputs.json"
PARTIAL_SUFFIX = ".tmp"
LOCK = ".balpoe.lock"
JOURNAL = ".balpoe-save.json"  # modeling_balpoe.SAVE_JOURNAL, which from_pretrained refuses
STAGING_PREFIX = ".balpoe-staging-"
# check_writable's test file: bookkeeping, so that another process's test file, seen while it exists (the
# processes of a multi-process run all check the output directory), does not make a folder count as not empty.
PROBE_PREFIX = ".balpoe-probe-"


# --------------------------------------------------------------------------- the manifest


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def read_manifest(run_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of ``run_dir`` (``{"files": {path: sha256}, "folders": [...], "reports": [...]}``),
    ``None`` if none."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TrainingError(f"{path} is damaged ({error}); delete the files of the run yourself, or use "
                            "another output directory.") from None
    if not isinstance(manifest, dict):
        raise TrainingError(f"{path} is damaged (not a JSON object); delete the files of the run yourself, "
                            "or use another output directory.")
    manifest.setdefault("files", {})
    manifest.setdefault("folders", [])
    manifest.setdefault("reports", [])
    return manifest


def _updated_manifest(run_dir: Path, digests: dict[str, str], folders: Iterable[str] = (),
                      reports: Iterable[str] = (), removed: Iterable[str] = ()) -> dict[str, Any]:
    """The manifest of ``run_dir`` with the files of ``digests`` (name -> SHA-256), ``folders`` and
    ``reports`` added and the ``removed`` files left out."""
    manifest = read_manifest(run_dir) or {"written_by": "balpoe-hf", "files": {}, "folders": [],
                                          "reports": []}
    removed = set(removed)
    manifest["files"] = {name: digest for name, digest in {**manifest["files"], **digests}.items()
                         if name not in removed}
    manifest["folders"] = sorted(set(manifest["folders"]) | set(folders))
    manifest["reports"] = sorted((set(manifest["reports"]) - removed) | set(reports))
    return manifest


def record_outputs(run_dir: str | Path, files: Iterable[str | Path] = (), folders: Iterable[str] = (),
                   *, reports: bool = False) -> None:
    """Add ``files`` (paths in ``run_dir``, with their current content) and ``folders`` to its manifest;
    ``reports``: the files are ``balpoe-evaluate`` reports (listed under ``reports`` too). For files
    written by other means than ``staged_save``, which lists what it writes itself."""
    run_dir = Path(run_dir)
    root = run_dir.resolve()
    digests = {Path(file).resolve().relative_to(root).as_posix(): _sha256(Path(file)) for file in files}
    manifest = _updated_manifest(run_dir, digests, folders, digests if reports else ())
    _write_json_atomic(run_dir / MANIFEST, manifest)


def _write_json_atomic(path: Path, value: Any) -> None:
    """``value`` as JSON at ``path``, written beside it and renamed over it once on disk."""
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    with partial.open("w", encoding="utf-8") as handle:
        handle.write(json.dumps(value, indent=2, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def is_control_file(name: str) -> bool:
    """Whether ``name`` is one of the package's own bookkeeping files (lock, journal, staging, partial,
    write test)."""
    return name in (LOCK, JOURNAL, MANIFEST + PARTIAL_SUFFIX, JOURNAL + PARTIAL_SUFFIX) or name.startswith(
        (STAGING_PREFIX, PROBE_PREFIX))


def _relative_name(name: Any) -> str:
    """A journal's file name, checked to stay inside its folder (the journal is data read back from disk)."""
    path = Path(name) if isinstance(name, str) else None
    if path is None or path.is_absolute() or ".." in path.parts or not path.parts:
        raise TrainingError(f"the save journal names {name!r}, which is not a file inside the folder; it is "
                            "damaged: delete it and the folders named .balpoe-staging-* beside it.")
    return path.as_posix()


def _roll_forward(folder: Path, journal: dict[str, Any]) -> None:
    """Finish a committed save: rename its staged files into place, drop the obsolete ones, write the
    manifest, remove the journal and the staging folder. Safe to repeat after a kill at any point."""
    stage = folder / _relative_name(journal.get("staging"))
    for name in map(_relative_name, journal.get("files", [])):
        if (stage / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / name, folder / name)
    for name in map(_relative_name, journal.get("remove", [])):
        (folder / name).unlink(missing_ok=True)
    _write_json_atomic(folder / MANIFEST, journal["manifest"])
    (folder / JOURNAL).unlink(missing_ok=True)
    shutil.rmtree(stage, ignore_errors=True)


def finish_interrupted_save(folder: str | Path) -> str | None:
    """Bring ``folder`` back to one state after a save that was killed: a committed save is finished
    (``"finished"``), an uncommitted one's staging folder is removed (``"discarded"``); ``None`` if there was
    none. Call it holding the folder's ``output_lock`` (``settle`` does)."""
    folder = Path(folder)
    journal_path = folder / JOURNAL
    outcome = None
    if journal_path.is_file():
        try:
            journal = json.loads(journal_path.read_text(encoding="utf-8"))
            if not isinstance(journal, dict) or not isinstance(journal.get("manifest"), dict):
                raise ValueError("not a journal")
        except (ValueError, UnicodeDecodeError) as error:
            raise TrainingError(f"{journal_path} is damaged ({error}); delete it and the folders named "
                                f"{STAGING_PREFIX}* beside it (the files of the folder are then those of "
                                "the save before).") from None
        _roll_forward(folder, journal)
        outcome = "finished"
    for path in folder.glob(STAGING_PREFIX + "*") if folder.is_dir() else ():
        shutil.rmtree(path, ignore_errors=True)
        outcome = outcome or "discarded"
    for name in (MANIFEST + PARTIAL_SUFFIX, JOURNAL + PARTIAL_SUFFIX):
        (folder / name).unlink(missing_ok=True)
    return outcome


def sync_files(folder: Path) -> None:
    """Flush the files of ``folder`` to the disk, so that a rename marks files that are there."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb+") as handle:
                os.fsync(handle.fileno())


@contextlib.contextmanager
def staged_save(folder: str | Path, *, reports: bool | Collection[str] = False, obsolete: Iterable[str] = (),
                folders: Iterable[str] = ()) -> Iterator[Path]:
    """Write files into the staging folder this yields; when the block ends, they replace their namesakes in
    ``folder`` all at once (same relative paths), listed in its manifest.

    ``reports``: the files are ``balpoe-evaluate`` reports (``True``: all of them, or the names of those
    that are); ``obsolete``: files of ``folder`` (listed in its manifest) that the new ones make stale,
    deleted with the swap; ``folders``: folders the manifest lists as the run's. An error or a kill inside
    the block leaves ``folder`` as it was; see the module docstring for the journal that makes the swap
    survive a kill.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
    committed = False
    try:
        yield stage
        files = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
        stale = [name for name in obsolete if name not in files and written_by_package(folder, name)]
        new_reports = set(files) if reports is True else set(reports or ()) & set(files)
        manifest = _updated_manifest(folder, {name: _sha256(stage / name) for name in files}, folders,
                                     new_reports, stale)
        sync_files(stage)
        journal = {"staging": stage.name, "files": files, "remove": stale, "manifest": manifest}
        _write_json_atomic(folder / JOURNAL, journal)  # the commit: from here on the new files win
        committed = True
        _roll_forward(folder, journal)
    except BaseException:
        if not committed:
            shutil.rmtree(stage, ignore_errors=True)
        raise


def save_failure(error: BaseException, folder: str | Path) -> str:
    """What went wrong writing into ``folder``, in a sentence: the error's first line, and whether the disk
    is full (``ENOSPC``, or less than a MiB left)."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    existing = next((p for p in (Path(folder), *Path(folder).parents) if p.exists()), Path("."))
    # safetensors reports a full disk inside its message only ("... code: 28, kind: StorageFull ...").
    full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "StorageFull" in reason or (
        "No space left" in reason) or shutil.disk_usage(existing).free < 2**20
    return f"{reason.rstrip('.')}.{' The disk is full.' if full else ''}"


# --------------------------------------------------------------------------- one writer per folder


_HELD: dict[Path, int] = {}  # folders whose lock this process holds -> how many holds (re-entrant)


class LockHeldError(TrainingError):
    """Another process holds the writer lock of the folder."""


def _lock_owner(path: Path) -> str:
    """Who holds the lock at ``path``, as its file says (it may be empty for a moment)."""
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
        return (f"{owner['command']} (pid {owner['pid']} on {owner['host']}, since {owner['since']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another balpoe-hf process"


def _try_lock(path: Path) -> int | None:
    """An open descriptor of ``path`` holding its ``flock``, or ``None`` while another process holds it."""
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            return None
        try:  # the previous owner may have removed the file between our open and our lock: lock the new one
            if os.stat(path).st_ino == os.fstat(handle).st_ino:
                return handle
        except FileNotFoundError:
            pass
        os.close(handle)


@contextlib.contextmanager
def output_lock(folder: str | Path, command: str) -> Iterator[None]:
    """Hold ``folder``'s writer lock (``.balpoe.lock``) for the block; a ``TrainingError`` naming the owner
    when another process holds it. Re-entrant within a process. Creates ``folder`` if needed (and removes it
    again when the block leaves it empty)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise TrainingError(f"{folder} exists and is not a directory.")
    key = folder.resolve()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    created = not folder.exists()
    path = folder / LOCK
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = _try_lock(path)
    except OSError as error:  # a read-only folder, say
        raise TrainingError(f"cannot write into {folder}: {error.strerror or error}; choose a folder you can "
                            "write to.") from None
    if handle is None:
        raise LockHeldError(f"{folder} is being written by {_lock_owner(path)}: one command at a time writes "
                            "into a folder. Wait for it to finish, or stop it (its run resumes with "
                            "--resume), or choose another folder.")
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
             "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(handle, 0)
    os.write(handle, json.dumps(owner).encode())
    _HELD[key] = 1
    try:
        yield
    finally:
        del _HELD[key]
        path.unlink(missing_ok=True)
        os.close(handle)
        if created:
            with contextlib.suppress(OSError):  # not empty: the block wrote something
                folder.rmdir()


def lock_on_main_process(state: Any, folder: str | Path, command: str, exit_stack: contextlib.ExitStack
                         ) -> None:
    """The main process of ``state`` (an ``Accelerator`` or ``PartialState``) takes ``folder``'s writer lock
    until ``exit_stack`` closes and finishes or discards a save that a kill interrupted there; every process
    raises the ``TrainingError`` when the lock is held elsewhere (the others must not wait for it)."""
    from accelerate.utils import broadcast_object_list

    refusal = None
    if state.is_main_process:
        try:
            exit_stack.enter_context(output_lock(folder, command))
            finish_interrupted_save(folder)
        except TrainingError as error:
            refusal = str(error)
    if state.num_processes > 1:
        refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        raise TrainingError(refusal)


def settle(folder: str | Path, command: str) -> None:
    """Finish or discard a save into ``folder`` that a kill interrupted (``finish_interrupted_save``), under
    its lock; nothing to do (and no lock taken) when there is none, or while another process holds the lock
    (its save is in progress, not interrupted). Every command runs it before it reads or writes a run's
    files."""
    folder = Path(folder)
    if not folder.is_dir() or not ((folder / JOURNAL).exists() or any(folder.glob(STAGING_PREFIX + "*"))):
        return
    try:
        with output_lock(folder, command):
            finish_interrupted_save(folder)
    except LockHeldError:
        pass


def written_by_package(run_dir: str | Path, name: str, report: bool = False) -> bool:
    """Whether ``run_dir/name`` is listed in the manifest with exactly its current content (``report``: and
    as a ``balpoe-evaluate`` report)."""
    path = Path(run_dir) / name
    manifest = read_manifest(run_dir)
    key = Path(name).as_posix()
    digest = manifest["files"].get(key) if manifest else None
    if report and (manifest is None or key not in manifest["reports"]):
        return False
    return digest is not None and path.is_file() and _sha256(path) == digest


def run_output_files() -> list[str]:
    """The files a run writes at the top of its directory: the model (``save_pretrained``, with the code files
    of its remote code), the image processor, the recipe and the results."""
    from transformers.dynamic_module_utils import get_relative_import_files
    from transformers.utils import (
        CONFIG_NAME,
        IMAGE_PROCESSOR_NAME,
        SAFE_WEIGHTS_INDEX_NAME,
        SAFE_WEIGHTS_NAME,
    )

    from .models.balpoe import configuration_balpoe, modeling_balpoe

    code = {Path(file).name for module in (modeling_balpoe, configuration_balpoe)
            for file in (module.__file__, *get_relative_import_files(module.__file__))}
    return [CONFIG_NAME, SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, IMAGE_PROCESSOR_NAME, "recipe.yaml",
            "train_results.json", "eval_results.json", "holdout_results.json", *sorted(code)]


def model_weight_files(folder: str | Path) -> list[str]:
    """The weight files of the model saved in ``folder``: ``model.safetensors``, or a weights index and the
    shards it names; a new save lists them as ``staged_save``'s ``obsolete`` (as ``save_pretrained`` removes
    the stale shards of a folder it saves into)."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    folder = Path(folder)
    names = [SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME]
    try:
        index = json.loads((folder / SAFE_WEIGHTS_INDEX_NAME).read_text(encoding="utf-8"))
        names += sorted({name for name in index["weight_map"].values() if isinstance(name, str)})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no index (one weights file), or a damaged one: its shards are not known
    return names


def weights_fingerprint(model_dir: str | Path) -> str | None:
    """The SHA-256 of the model saved in ``model_dir`` (of ``model.safetensors``, or of the SHA-256s of a
    weights index and its shards); ``None`` for a folder without weights, or a Hub id. A report records it,
    so that ``balpoe-push`` publishes a report with the model it evaluated only."""
    folder = Path(model_dir)
    files = [folder / name for name in model_weight_files(folder) if (folder / name).is_file()]
    if not folder.is_dir() or not files:
        return None
    if len(files) == 1:
        return _sha256(files[0])
    return hashlib.sha256("".join(_sha256(path) for path in files).encode()).hexdigest()


def check_writable(folder: str | Path, what: str, error: type[Exception] = TrainingError) -> None:
    """Refuse, with an ``error`` (a ``TrainingError`` by default) naming ``what``, a ``folder`` that cannot
    be created or take a new file (tried with a temporary file in it or its nearest existing parent, which
    is removed)."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise error(f"cannot write {what} {folder}: {existing} is a file, not a folder.")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=PROBE_PREFIX):
            pass
    except OSError as failure:
        raise error(f"cannot write {what} {folder}: {existing} does not take new files "
                    f"({failure.strerror}); choose a folder you can write to.") from None
