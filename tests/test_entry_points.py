"""The package without the repository: the wheel's contents, one run of each console script, ``python -m``,
and the Python API that the command lines are thin layers over.

The wheel is built from this checkout and installed (without dependencies) into a folder that is put first on
``PYTHONPATH``; the commands then run from a directory outside the checkout, so nothing in ``scripts/`` or the
source tree can be reached. The installed script file of every console script runs once, one after the other
in one process (its imports take seconds), with the test session, beside the other tests (``background``,
tests/processes.py); what they parse and print is tested in-process elsewhere (tests/test_cli_fuzz.py,
tests/test_docs.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import runpy
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import TINY, assert_same_weights, flags, tiny_recipe
from processes import start
from train_synthetic import CLASS_NAMES, TEST_PER_CLASS, TRAIN_COUNTS, write_parquet

from balpoe_hf import hub
from balpoe_hf.errors import EvaluationError, HubFolderError, TrainingError
from balpoe_hf.evaluation import reports
from balpoe_hf.recipes import available_recipes, load_recipe
from balpoe_hf.training import loop as training
from balpoe_hf.training.loop import train

REPO = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPTS = ("balpoe-train", "balpoe-evaluate", "balpoe-push", "balpoe-demo", "balpoe-describe-split",
                   "balpoe-compare", "balpoe-prepare-data")
ONE_EPOCH = {**TINY, "epochs": 1}
# The installed script files of the console scripts, one after the other in one process, each as the
# launcher runs it (as __main__, with its own argv); what each printed goes to a JSON file.
RUN_SCRIPTS = """import contextlib, io, json, runpy, sys

commands, output, printed = json.loads(sys.argv[1]), sys.argv[2], {}
for path, *args in commands:
    sys.argv, out = [path, *args], io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as stop:
            assert stop.code in (0, None), (path, stop.code)
    printed[path.rsplit("/", 1)[-1]] = out.getvalue()
with open(output, "w") as file:
    json.dump(printed, file)
"""
# Every process started here records which balpoe_hf it imported (Python runs sitecustomize at start-up).
SITECUSTOMIZE = """import atexit, os, sys

def _record():
    module = sys.modules.get("balpoe_hf")
    if module is not None:
        with open(os.environ["BALPOE_IMPORTS"], "a") as log:
            log.write(module.__file__ + "\\n")

atexit.register(_record)
"""


def _installed(root: Path, environ: dict[str, str]) -> dict:
    """The wheel built from this checkout and installed into a folder; the commands run from an empty
    directory with it first on the path."""
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
                    str(root / "wheel"), str(REPO)], check=True, capture_output=True, cwd=REPO, env=environ)
    subprocess.run(["rm", "-rf", str(REPO / "build")], check=True, cwd=root)
    (wheel,) = (root / "wheel").glob("balpoe_hf-*.whl")
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, cwd=root, env=environ)
    (root / "probe").mkdir()
    (root / "probe" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (root / "elsewhere").mkdir()
    env = {**environ, "PYTHONPATH": f"{target}{os.pathsep}{root / 'probe'}", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(root / "hf_cache"), "OMP_NUM_THREADS": "1",
           "BALPOE_IMPORTS": str(root / "probe" / "imports.txt")}
    return {"wheel": wheel, "target": target, "env": env}


def background(root: Path, environ: dict[str, str]) -> dict:
    """Started with the session (tests/processes.py): the wheel, then every console script of the installed
    wheel in one process: balpoe-train, balpoe-evaluate and balpoe-push --dry-run on the tiny data, and the
    others (their --help, or a quick look at a data file)."""
    installed = _installed(root, environ)
    train_file, test_file = write_parquet(root / "data")
    run, report_file = root / "run", root / "eval" / "report.json"
    commands = {
        "balpoe-train": ["--train-file", str(train_file), "--test-file", str(test_file), *flags(ONE_EPOCH),
                         "--output-dir", str(run)],
        "balpoe-evaluate": ["--model", str(run), "--shifts", "forward2,uniform", "--output",
                            str(report_file)],
        "balpoe-push": [str(run), "me/tiny", "--eval-report", str(report_file), "--dry-run"],
        "balpoe-describe-split": ["--train-file", str(train_file), "--label-column", "target",
                                  "--imbalance-ratio", "2"],
        "balpoe-compare": ["--help"], "balpoe-demo": ["--help"], "balpoe-prepare-data": ["--help"]}
    assert sorted(commands) == sorted(CONSOLE_SCRIPTS)
    scripts = [[str(installed["target"] / "bin" / script), *args] for script, args in commands.items()]
    start([sys.executable, "-c", RUN_SCRIPTS, json.dumps(scripts), str(root / "printed.json")],
          installed["env"], root / "elsewhere", root / "logs").finish()
    printed = json.loads((root / "printed.json").read_text())
    return {**installed, "root": root, "run": run, "report": json.loads(report_file.read_text()),
            "evaluated": printed["balpoe-evaluate"], "pushed": printed["balpoe-push"],
            "data": (train_file, test_file), "others": printed}


def test_wheel_holds_the_package_its_data_and_the_console_scripts(background):
    wheel = background["wheel"]
    names = set(zipfile.ZipFile(wheel).namelist())
    # Every module of the source tree, in every subpackage (pyproject.toml lists the packages one by one).
    modules = {path.relative_to(REPO).as_posix() for path in (REPO / "balpoe_hf").rglob("*.py")}
    assert modules - names == set()
    for module in ("train", "cli/__init__", "training/loop", "run_folder", "demo/app",
                   "models/balpoe/modeling_balpoe", "models/balpoe/configuration_balpoe",
                   "models/balpoe/pipeline_balpoe", "models/balpoe/label_shift", "models/balpoe/shrinkage"):
        assert f"balpoe_hf/{module}.py" in names, module
    assert {f"balpoe_hf/recipes/{name}.yaml" for name in available_recipes()} <= names
    assert "balpoe_hf/model_cards/modelcard_template.md" in names
    assert "balpoe_hf/evaluate_modules/long_tail/long_tail.py" in names
    assert not any(name.startswith(("scripts/", "tests/")) for name in names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert sorted(line.split(" = ")[1] for line in text.splitlines() if " = " in line) == sorted(
        f"balpoe_hf.cli:{name.removeprefix('balpoe-').replace('-', '_')}_main" for name in CONSOLE_SCRIPTS)
    (license_file,) = [n for n in names if n.endswith("LICENSE")]
    assert "Apache License" in zipfile.ZipFile(wheel).read(license_file).decode()[:200]


def test_installed_train_evaluate_and_push(background):
    assert (background["run"] / "model.safetensors").is_file()
    assert "| none |" in background["evaluated"]
    assert background["report"]["num_test_samples"] == TEST_PER_CLASS * len(CLASS_NAMES)
    assert "model.safetensors" in background["pushed"] and "README.md" in background["pushed"]


def test_python_api_trains_what_the_command_line_trains(background):
    train_file, test_file = background["data"]
    recipe = load_recipe(train_file=[str(train_file)], test_file=[str(test_file)], **ONE_EPOCH)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the command line ran (OMP_NUM_THREADS=1)
    try:
        output = train(recipe, background["root"] / "api")
    finally:
        torch.set_num_threads(threads)
    assert output.train_results["class_counts"] == TRAIN_COUNTS
    assert_same_weights(output.output_dir, background["run"])
    saved = json.loads((background["run"] / "eval_results.json").read_text())
    assert saved["eval_balanced_accuracy"] == output.eval_report["balanced_accuracy"]


def test_every_command_ran_the_installed_package(background):
    # Not the checkout, nor the editable install of it: the processes record what they imported.
    imported = (background["root"] / "probe" / "imports.txt").read_text().split()
    assert len(imported) == 1  # the one process that ran every console script
    assert all(path.startswith(str(background["target"])) for path in imported), imported


def test_the_other_console_scripts_start(background):
    others = background["others"]
    # The 32 ... 4 images of train_synthetic are long-tailed already: a ratio of 2 keeps them all.
    assert "imbalance ratio 8; many/medium/few" in others["balpoe-describe-split"]
    assert "--budget" in others["balpoe-compare"]
    assert "--server-port" in others["balpoe-demo"]
    assert "fashion-mnist" in others["balpoe-prepare-data"]


def test_python_m_train_shows_every_recipe_field_with_its_resolved_value(monkeypatch):
    # What `accelerate launch -m balpoe_hf.train` runs, in-process.
    monkeypatch.setattr(sys, "argv", ["balpoe_hf.train", "--recipe", "fashion-mnist-lt-quick", "--help"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as stop:
        runpy.run_module("balpoe_hf.train", run_name="__main__", alter_sys=True)
    assert stop.value.code == 0
    text = printed.getvalue()
    assert "--mixup-alpha" in text and "--lambdas" in text
    # After --recipe, --help shows the recipe's value as the default (4 epochs, not the built-in 200).
    (epochs_help,) = [option for option in text.split("\n  --") if option.startswith("epochs ")]
    assert "(default: 4)" in " ".join(epochs_help.split())


def test_optional_packages_are_extras_and_each_feature_names_its_extra(tiny_data, tmp_path, monkeypatch):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    required = " ".join(project["dependencies"])
    extras = project["optional-dependencies"]
    for package, extra in (("tensorboard", "train"), ("matplotlib", "plots"), ("matplotlib", "hub"),
                           ("jinja2", "hub")):
        assert package not in required and any(r.startswith(package) for r in extras[extra])
    find_spec = importlib.util.find_spec
    missing = {"tensorboard", "matplotlib"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing
                        else find_spec(name, *a))
    with pytest.raises(TrainingError, match=r"--report-to tensorboard needs .*'balpoe-hf\[train\]'"):
        training.train(tiny_recipe(tiny_data), tmp_path / "run", report_to="tensorboard")
    with pytest.raises(EvaluationError, match=r"need matplotlib: .*'balpoe-hf\[plots\]'"):
        reports.check_output(tmp_path / "report.json")
    with pytest.raises(HubFolderError, match=r"needs matplotlib: pip install 'balpoe-hf\[hub\]'"):
        hub.prepare_hub_folder(tmp_path)
    assert not (tmp_path / "run").exists()
