"""Fixtures shared by several test modules, and the launched processes that start with the session
(tests/processes.py)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from processes import BackgroundJob, stop_all

_JOBS: dict[str, BackgroundJob] = {}


@pytest.fixture
def one_thread():
    """Torch on one intra-op thread for the test: tiny models on a shared 2-core CPU gain nothing from a
    second thread, only contention. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class KillPoints:
    """Copies of a folder as a ``kill -9`` would leave it at each step of a save into it.

    ``watch(folder)`` makes every later ``os.replace`` whose target lies in ``folder`` first copy the folder
    (its ``checkpoints/`` as hard links: checkpoint files are never changed in place) into
    ``snapshots``: the moment just before that rename. The rename of a save's journal (its commit) also
    leaves a copy whose staged files are cut in half: a kill while they were being written.
    """

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        self.root, self.snapshots, self.folder = root, [], None
        real_replace = os.replace

        def replace(source, target, *args, **kwargs):
            if self.folder is not None and Path(target).resolve().is_relative_to(self.folder):
                self._snapshot(Path(target).name)
            return real_replace(source, target, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)

    def watch(self, folder: Path) -> list[Path]:
        self.folder = Path(folder).resolve()
        return self.snapshots

    def _copy(self, name: str) -> Path:
        target = self.root / f"{len(self.snapshots):02d}-before-{name}"
        shutil.copytree(self.folder, target, ignore=shutil.ignore_patterns("checkpoints"))
        if (self.folder / "checkpoints").is_dir():
            shutil.copytree(self.folder / "checkpoints", target / "checkpoints", copy_function=os.link)
        self.snapshots.append(target)
        return target

    def _snapshot(self, name: str) -> None:
        self._copy(name)
        if name == ".balpoe-save.json":  # the commit: also the same moment with half-written staged files
            cut = self._copy("staging-cut")
            for path in cut.glob(".balpoe-staging-*/**/*"):
                if path.is_file():
                    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            (cut / ".balpoe-save.json.tmp").unlink(missing_ok=True)


@pytest.fixture
def kill_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KillPoints:
    """``KillPoints`` for the test: ``kill_points.watch(folder)`` then run the save."""
    root = tmp_path / "kill-points"
    root.mkdir()
    return KillPoints(root, monkeypatch)


def _start(module: Any) -> None:
    root = Path(tempfile.mkdtemp(prefix=f"{module.__name__}-"))
    _JOBS[module.__name__] = BackgroundJob(module.background, root, dict(os.environ))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the ``background`` work of every module with a selected test (tests/processes.py).

    Under pytest-xdist (``make test`` runs ``-n 2 --dist loadfile``) every worker collects every test but
    runs only some modules: there a module's work starts when its first test asks for it, and the second
    worker, not a head start, is what runs it beside other tests.
    """
    if hasattr(session.config, "workerinput"):
        return
    modules = {item.module for item in session.items if callable(getattr(item.module, "background", None))}
    for module in sorted(modules, key=lambda m: m.__name__):
        _start(module)


def pytest_sessionfinish(session: pytest.Session) -> None:
    stop_all()
    for job in _JOBS.values():
        job.join(60)
        shutil.rmtree(job.root, ignore_errors=True)


@pytest.fixture(scope="module")
def background(request: pytest.FixtureRequest) -> Any:
    """What the module's ``background`` function returned (started with the session, or now)."""
    if request.module.__name__ not in _JOBS:
        _start(request.module)
    return _JOBS[request.module.__name__].result()


@pytest.fixture(scope="session")
def remote_code_cache(tmp_path_factory):
    """trust_remote_code copies a model's code files into transformers' module cache: a temporary one here,
    so that the examples and tests leave nothing in the user's cache."""
    from transformers import dynamic_module_utils

    cache = tmp_path_factory.mktemp("hf_modules")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(cache))
        mp.setattr(sys, "path", list(sys.path))
        modules = dict(sys.modules)
        yield cache
    for name in [name for name in sys.modules if name not in modules]:
        if name.startswith("transformers_modules"):
            del sys.modules[name]
