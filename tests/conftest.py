"""Fixtures shared by several test modules, and the launched processes that start with the session
(tests/processes.py). Plain helper functions are in tests/helpers.py.

The tiny data set and the trained tiny run are made once per session: under pytest-xdist the first worker
that asks makes them in the session's shared temporary folder (a file lock keeps the others waiting), and
every worker reads the same files. Tests read them only; a test that changes a run copies it first.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock
from processes import BackgroundJob, stop_all

# torch, the package and the test helpers that import them are imported where they are used: under
# pytest-xdist this file is also loaded by the controlling process, which runs no test and would spend
# 5 s importing them before it starts the workers.

_JOBS: dict[str, BackgroundJob] = {}

# The garbage collector took 17 s of CPU over the two workers' runs (of about 190 s): torch, transformers,
# timm, datasets and the package make millions of Python objects, which its collections went through again
# and again. Collections of young objects every 50,000 allocations instead of 700, the rarer older ones
# rarer still, and what the imports and the collection of the tests made frozen (pytest_collection_finish):
# 3 s of collections instead, and `make test` in 84-94 s (six runs) instead of 96 s on the idle 2-core CPU.
gc.set_threshold(50_000, 20, 100)


@pytest.fixture
def one_thread():
    """Torch on one intra-op thread for the test: tiny models on a shared 2-core CPU gain nothing from a
    second thread, only contention. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

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
        from helpers import copy_run

        target = copy_run(self.folder, self.root / f"{len(self.snapshots):02d}-before-{name}")
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
def data_load_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's data load fails the test: for checks that must stop a run before its data are read."""
    from balpoe_hf.training import loop

    def load(recipe):
        raise AssertionError("the data were loaded")

    monkeypatch.setattr(loop, "load_training_data", load)


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
    worker, not a head start, is what runs it beside other tests (``pytest_xdist_make_scheduler`` hands those
    modules out first).
    """
    # What the collection imported lives until the end: out of the garbage collector's way (gc.freeze).
    gc.freeze()
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


# The modules that take longest on the 2-core development machine (10 to 24 s each), longest first.
LONGEST_MODULES = ("test_docs.py", "test_hub_card.py", "test_demo.py", "test_evaluate_script.py",
                   "test_checkpoints.py")


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: no error where it is not installed
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadfile`` with the modules that launch ``background`` work first: a worker then waits for
    those processes while the other one runs in-process tests, instead of both waiting for them at the end;
    then ``LONGEST_MODULES``, so that the short modules even out the workers' ends (xdist otherwise hands out
    the modules with the most tests first, and a 24 s module handed out last kept one worker busy for 13 s
    after the other had finished)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    tests = Path(__file__).parent
    background = [path for path in sorted(tests.glob("test_*.py"))
                  if "\ndef background(" in path.read_text(encoding="utf-8")]
    first = [path.relative_to(config.rootpath).as_posix()
             for path in (*background, *(tests / name for name in LONGEST_MODULES))]

    class BackgroundFirst(LoadFileScheduling):
        def _assign_work_unit(self, node: Any) -> None:
            for scope in reversed([scope for scope in first if scope in self.workqueue]):
                self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    return BackgroundFirst(config, log)


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


def _made_once(tmp_path_factory: pytest.TempPathFactory, name: str, make) -> Path:
    """``root / name`` made by ``make(path)`` once for the whole session: the folder every xdist worker of
    this session shares (a fresh one per session), else this process's temporary folder."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (root / f"{name}.done").exists():
            shutil.rmtree(path, ignore_errors=True)
            make(path)
            (root / f"{name}.done").touch()
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    """The train and test parquet files of train_synthetic.py (32/16/8/4 and 8 per class, 16x16)."""
    from train_synthetic import write_parquet

    folder = _made_once(tmp_path_factory, "tiny_data", write_parquet)
    return folder / "train.parquet", folder / "test.parquet"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data) -> Path:
    """The tiny recipe trained on ``tiny_data`` (tests/helpers.py ``TINY_RUN``: 3 epochs, evaluated after
    each, a step checkpoint every 3 optimizer steps, all of them kept, TensorBoard logs, one torch thread),
    once for the session; what it printed is beside it (``tiny_run_output``). Read only: copy it to change
    it."""
    import torch
    from helpers import TINY_RUN, tiny_recipe

    from balpoe_hf.training.loop import train

    def make(path: Path) -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the runs that resume from it and are compared bit for bit use one too
        try:
            with open(f"{path}.out", "w") as out, contextlib.redirect_stdout(out):
                train(tiny_recipe(tiny_data, **TINY_RUN), path, report_to="tensorboard")
        finally:
            torch.set_num_threads(threads)

    return _made_once(tmp_path_factory, "tiny_run", make)


@pytest.fixture(scope="session")
def tiny_run_output(tiny_run) -> str:
    """What training ``tiny_run`` printed."""
    return Path(f"{tiny_run}.out").read_text()


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> tuple[Path, Any]:
    """A tiny untrained BalPoE run as training and balpoe-evaluate leave it (tests/hub_helpers.py), and its
    model. Read only: copy it to change it."""
    from hub_helpers import make_saved_run

    return make_saved_run(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def hub_snapshot(saved_run, tmp_path_factory) -> dict:
    """``saved_run`` pushed with the Hub mocked, and what would be uploaded as a fresh 'Hub repo' folder."""
    from hub_helpers import push_mocked

    return push_mocked(saved_run[0], "me/tiny-balpoe", tmp_path_factory.mktemp("hub") / "tiny-balpoe")
