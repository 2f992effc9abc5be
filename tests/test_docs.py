"""Docs that cannot rot: every code block of README.md and docs/*.md runs here, offline, on tiny data.

How a Markdown code block is treated:

- ```python: run. The blocks of one document run in order in one namespace (like a notebook), in a fresh
  working directory (below).
- ```bash: run. Each command (a line; ``\\`` continues it, ``#`` starts a comment) must be one of the
  package's console scripts (``balpoe-train``, ``balpoe-evaluate``, ... from ``pyproject.toml``) or
  ``python -m balpoe_hf.train``; it is run in-process through its entry function and must exit with 0.
- any other language (text, yaml, bibtex): shown, not run.

An HTML comment on the line before the block (blank lines between are allowed) changes that:

- ``<!-- no-test: gpu: why -->``, ``<!-- no-test: network: why -->``, ``<!-- no-test: long: why -->``: the
  block is not run, because it needs a GPU, the network, or minutes of training on real data;
  ``<!-- no-test: elsewhere: TEST -->``: the named test runs it (e.g. a check that needs Chromium);
- ``<!-- test: exit N -->``: every command of the bash block must exit with status N (documented errors);
- ``<!-- file: NAME -->``: the block's text is written to NAME in the working directory (for later blocks).

The working directory of every document holds ``data/cifar10/train.parquet`` and ``test.parquet``: a tiny
stand-in for what ``balpoe-prepare-data cifar10 --output-dir data/cifar10`` writes (the same columns ``img``
and ``label`` and class names; 200 training and 50 test images per class, 32x32, one noisy colour per
class). Every document also finds ``runs/cifar10-lt``: the README's training example (one epoch of ResNet-20
on the stand-in, a tenth held out), run once for the session, where the README's own test skips it.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib
import io
import json
import re
import shlex
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NO_TEST_REASONS = ("gpu", "network", "long", "elsewhere")
MARKER = re.compile(r"<!--\s*(no-test|test|file):\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Block:
    language: str
    code: str
    line: int  # of the opening fence, 1-based
    marker: tuple[str, str] | None  # ("no-test", "long: why"), ("test", "exit 2"), ("file", "my.yaml")


def code_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text with the marker comment just before each."""
    lines = text.splitlines()
    blocks, index = [], 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        start = index
        end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
        previous = next((lines[i] for i in range(start - 1, -1, -1) if lines[i].strip()), "")
        marker = MARKER.fullmatch(previous.strip())
        blocks.append(Block(match.group(1), "\n".join(lines[start + 1:end]) + "\n", start + 1,
                            (marker.group(1), marker.group(2)) if marker else None))
        index = end + 1
    return blocks


def commands(code: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    joined = code.replace("\\\n", " ")
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def _entry_points() -> dict[str, str]:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return {**scripts, "python -m balpoe_hf.train": scripts["balpoe-train"]}


def run_command(words: list[str]) -> int:
    """A documented command, in-process: the entry function of its console script with its arguments."""
    entry_points = _entry_points()
    for name, target in entry_points.items():
        prefix = name.split()
        if words[:len(prefix)] == prefix:
            module, function = target.split(":")
            main = getattr(importlib.import_module(module), function)
            try:
                return main(words[len(prefix):])
            except SystemExit as stop:  # argparse: --help, usage errors
                return stop.code if isinstance(stop.code, int) else 1
    raise AssertionError(f"{shlex.join(words)!r} is not a command the harness runs "
                         f"({', '.join(entry_points)}): mark its block <!-- no-test: REASON: why -->.")


# --------------------------------------------------------------------------- the working directory


def write_stand_in(folder: Path) -> None:
    """Tiny CIFAR-10 stand-in parquet files with the Hub's columns (see the module docstring)."""
    folder.mkdir(parents=True)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CIFAR10_NAMES)})
    colours = np.random.default_rng(0).integers(0, 256, (10, 3))
    for split, per_class, seed in (("train", 200, 1), ("test", 50, 2)):
        rng = np.random.default_rng(seed)
        labels = np.tile(np.arange(10), per_class)
        images = [Image.fromarray(np.clip(colours[label] + rng.normal(0, 40, (32, 32, 3)), 0, 255)
                                  .astype(np.uint8)) for label in labels]
        datasets.Dataset.from_dict({"img": images, "label": labels}, features=features).to_parquet(
            str(folder / f"{split}.parquet"))


@pytest.fixture(scope="session")
def stand_in(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("docs_data")
    write_stand_in(root / "data" / "cifar10")
    return root


def readme_training_block() -> Block:
    """The README's Python training example."""
    readme = code_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    return next(block for block in readme if block.language == "python" and "train(recipe" in block.code)


@pytest.fixture(scope="session")
def trained_run(stand_in, tmp_path_factory) -> Path:
    """The README's training example, run once (here, not again in the README's test): ``runs/cifar10-lt``
    for every document."""
    root = tmp_path_factory.mktemp("docs_run")
    (root / "data").symlink_to(stand_in / "data")
    training = readme_training_block()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.chdir(root), contextlib.redirect_stdout(io.StringIO()):
            exec(compile(training.code, "README.md", "exec"), {})
    finally:
        torch.set_num_threads(threads)
    return root / "runs" / "cifar10-lt"


_PREDICTIONS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


@pytest.fixture
def predictions_once(monkeypatch):
    """The documents evaluate the same model on the same test images again and again (``runs/cifar10-lt`` on
    the stand-in, a copy in every working directory): the model runs once on them for the session, and every
    later call gets those logits (inference is deterministic: the same weights, config, processor and
    images give the same tensors)."""
    from balpoe_hf.evaluation import calibrate, evaluate, predictions

    def predict(model, processor, ds, image_column="image", batch_size=256):
        if image_column not in ds.column_names or not isinstance(ds.features[image_column], datasets.Image):
            return predictions.predict(model, processor, ds, image_column, batch_size)
        key = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            key.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
        config = {k: v for k, v in model.config.to_diff_dict().items() if k != "_name_or_path"}
        key.update(json.dumps([config, processor.to_dict(), model.training], sort_keys=True,
                              default=str).encode())
        for image in ds.with_format("arrow")[image_column].to_pylist():
            key.update(image["bytes"] or image["path"].encode())
        key = key.hexdigest()
        if key not in _PREDICTIONS:
            _PREDICTIONS[key] = predictions.predict(model, processor, ds, image_column, batch_size)
        return tuple(tensor.clone() for tensor in _PREDICTIONS[key])

    for module in (evaluate, calibrate):
        monkeypatch.setattr(module, "predict", predict)


def run_document(path: Path, workdir: Path, done: Block | None = None) -> None:
    """Every block of ``path`` as its marker says, in ``workdir``, but ``done`` (a block whose outcome is in
    ``workdir`` already); a failure names the file and line."""
    namespace: dict = {"__name__": f"docs:{path.name}"}
    for block in code_blocks(path.read_text(encoding="utf-8")):
        where = f"{path.relative_to(ROOT)}:{block.line}"
        if block == done:
            continue
        kind, value = block.marker or ("", "")
        if kind == "no-test":
            assert value.split(":")[0].strip() in NO_TEST_REASONS, \
                f"{where}: a no-test marker needs a reason out of {NO_TEST_REASONS}, got {value!r}"
            continue
        if kind == "file":
            (workdir / value).write_text(block.code, encoding="utf-8")
            continue
        if block.language == "python":
            assert kind == "", f"{where}: a python block takes no <!-- test: ... --> marker"
            exec(compile(block.code, where, "exec"), namespace)
        elif block.language in ("bash", "sh"):
            expected = int(value.removeprefix("exit").strip()) if kind == "test" else 0
            for words in commands(block.code):
                status = run_command(words)
                assert status == expected, f"{where}: {shlex.join(words)} exited {status}, not {expected}"


@pytest.mark.parametrize("path", DOCUMENTS, ids=[str(p.relative_to(ROOT)) for p in DOCUMENTS])
def test_document_runs(path, stand_in, trained_run, remote_code_cache, predictions_once, tmp_path,
                       monkeypatch):
    from huggingface_hub import constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    shutil.copytree(stand_in / "data", tmp_path / "data")
    shutil.copytree(trained_run, tmp_path / "runs" / "cifar10-lt", symlinks=True)
    monkeypatch.chdir(tmp_path)
    # The README's training example made trained_run: run as written, once.
    run_document(path, tmp_path, done=readme_training_block() if path.name == "README.md" else None)


def test_markers_and_blocks_are_understood():
    text = "\n".join(["<!-- no-test: gpu: needs CUDA -->", "", "```bash", "balpoe-train --x \\",
                      "  --y 1  # c", "", "```", "```python", "x = 1", "```", "<!-- test: exit 2 -->",
                      "```bash", "a", "```"])
    blocks = code_blocks(text)
    assert [(b.language, b.line, b.marker) for b in blocks] == [
        ("bash", 3, ("no-test", "gpu: needs CUDA")), ("python", 8, None), ("bash", 12, ("test", "exit 2"))]
    assert commands(blocks[0].code) == [["balpoe-train", "--x", "--y", "1"]]
    with pytest.raises(AssertionError, match="not a command the harness runs"):
        run_command(["make", "train"])


PACKAGE = ROOT / "balpoe_hf"


def _package_files() -> list[Path]:
    """The modules of the package, but the evaluate modules (scripts that ``evaluate.load`` reads)."""
    return [path for path in PACKAGE.rglob("*.py")
            if "__pycache__" not in path.parts and "evaluate_modules" not in path.parts]


def test_module_map_lists_every_module_and_folder_once():
    table = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    listed = re.findall(r"^\| `([\w/.]+)` \|", table, flags=re.MULTILINE)
    modules = [path.relative_to(PACKAGE).as_posix() for path in _package_files()
               if path.name != "__init__.py"]
    folders = [f"{path.parent.relative_to(PACKAGE).as_posix()}/" for path in _package_files()
               if path.name == "__init__.py" and path.parent != PACKAGE] + ["evaluate_modules/"]
    assert sorted(listed) == sorted(modules + folders)


def test_no_import_runs_upward_in_the_module_map():
    """Each top-level folder or module of the package imports only those listed before it in
    docs/architecture.md (the compatibility paths and ``__init__`` re-export the ones below them)."""
    table = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    order = list(dict.fromkeys(re.sub(r"[/.].*", "", name)
                               for name in re.findall(r"^\| `([\w/.]+)` \|", table, flags=re.MULTILINE)))
    upward = []
    for path in _package_files():
        parts = path.relative_to(ROOT).with_suffix("").parts  # ("balpoe_hf", "data", "loading")
        if len(parts) == 2 and parts[1] == "__init__":
            continue  # the package's own __init__ exports from every layer
        layer = parts[1]
        package = parts[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or not (node.level or (node.module or "").startswith(
                    "balpoe_hf.")):
                continue
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            targets = [".".join([*base, node.module])] if node.module else [
                ".".join([*base, alias.name]) for alias in node.names]
            for target in targets:
                other = target.split(".")[1]
                if other != layer and order.index(other) > order.index(layer):
                    upward.append(f"{'.'.join(parts)} imports {target}")
    assert not upward, upward
