"""Processes the tests launch, and work that starts with the session (not collected: no test_ prefix).

A test module that launches processes of its own (console scripts, ``accelerate launch``) defines
``background(root, environ) -> dict``; tests/conftest.py runs it in a thread from the start of the session,
in a fresh folder ``root`` and with the environment as it was then (tests change ``os.environ`` meanwhile),
when one of the module's tests is selected, and the module fixture ``background`` waits for its result.
Those processes spend most of their time importing torch and the package: CPU work that the machine's
second core does beside the in-process tests instead of after them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

STARTED: list[subprocess.Popen] = []  # stopped at the end of the session if still running


class Started:
    """A process started now, its output going to files (no pipe fills up while nobody reads it)."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: Path, folder: Path):
        folder.mkdir(parents=True)
        self.command, self.stdout, self.stderr = command, folder / "stdout.txt", folder / "stderr.txt"
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            # A session of its own: stop() reaches the processes a launcher starts too.
            self.process = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=err,
                                            start_new_session=True)
        STARTED.append(self.process)

    def finish(self, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        """Wait for the process; with ``check``, raise ``AssertionError`` (with its output) if it failed."""
        self.process.wait(timeout=timeout)
        result = subprocess.CompletedProcess(self.command, self.process.returncode, self.stdout.read_text(),
                                             self.stderr.read_text())
        if check and result.returncode != 0:
            raise AssertionError(f"{self.command} exited {result.returncode}\nstdout:\n"
                                 f"{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}")
        return result

    def kill(self) -> None:
        """SIGKILL the process and every process it started."""
        _kill(self.process)


def start(command: list[str], env: dict[str, str], cwd: Path, folder: Path) -> Started:
    """Start ``command`` in ``cwd`` now; its standard output and error go to files in ``folder``."""
    return Started(command, env, cwd, folder)


def _kill(process: subprocess.Popen) -> None:
    """SIGKILL ``process`` and every process it started (its session), if it is still running."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def stop_all() -> None:
    """SIGKILL every started process still running (and the processes it started)."""
    for process in STARTED:
        _kill(process)


class BackgroundJob:
    """``work(root, environ)`` in a thread; ``result()`` waits and returns its value or raises its error."""

    def __init__(self, work: Callable[[Path, dict[str, str]], Any], root: Path, environ: dict[str, str]):
        self.root, self._value, self._error = root, None, None
        self._thread = threading.Thread(target=self._run, args=(work, environ), daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[Path, dict[str, str]], Any], environ: dict[str, str]) -> None:
        try:
            self._value = work(self.root, environ)
        except BaseException as error:  # raised again in the tests that ask for the result
            self._error = error

    def result(self, timeout: float = 900) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the background work in {self.root} did not finish in {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def hold_lock(folder: Path) -> subprocess.Popen:
    """A process holding ``folder``'s writer lock as balpoe-hf does (an flock on .balpoe.lock, the owner in
    it: balpoe-train, pid, host node7), until killed; without the package, so that it starts at once."""
    code = ("import fcntl, json, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, json.dumps({'pid': os.getpid(), 'host': 'node7', 'command': 'balpoe-train', "
            "'since': '2025-01-01 10:00:00'}).encode())\n"
            "print('locked', flush=True)\n"
            "time.sleep(120)\n")
    folder.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder / ".balpoe.lock")],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    STARTED.append(holder)
    assert holder.stdout.readline().strip() == "locked"
    return holder
