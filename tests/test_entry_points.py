"""The package without the repository: the wheel's contents, its console scripts and ``python -m``, and the
Python API that the command lines are thin layers over.

The wheel is built from this checkout and installed (without dependencies) into a folder that is put first on
``PYTHONPATH``; the commands then run from a directory outside the checkout, so nothing in ``scripts/`` or the
source tree can be reached.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from train_synthetic import CLASS_NAMES, TEST_PER_CLASS, TRAIN_COUNTS, write_parquet

from balpoe_hf.recipes import available_recipes, load_recipe
from balpoe_hf.training import train

REPO = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPTS = ("balpoe-train", "balpoe-evaluate", "balpoe-push", "balpoe-describe-split",
                   "balpoe-compare", "balpoe-prepare-data")
TINY = ["--image-column", "picture", "--label-column", "target", "--backbone", "resnet20_cifar",
        "--image-size", "16", "--epochs", "1", "--batch-size", "8", "--warmup-epochs", "0", "--rotation", "0",
        "--many-threshold", "20", "--few-threshold", "6", "--num-workers", "0", "--eval-batch-size", "16"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out),
                    str(REPO)], check=True, capture_output=True, cwd=REPO)
    subprocess.run(["rm", "-rf", str(REPO / "build")], check=True)
    (path,) = out.glob("balpoe_hf-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> dict:
    """The wheel installed into a folder; commands run from an empty directory with it first on the path."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    cwd = tmp_path_factory.mktemp("elsewhere")
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(cwd / "hf_cache"), "OMP_NUM_THREADS": "1"}
    return {"target": target, "bin": target / "bin", "cwd": cwd, "env": env}


def _run(command: list[str], installed: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=installed["cwd"], env=installed["env"], capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_wheel_holds_the_package_its_data_and_the_console_scripts(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("recipes/__init__", "training", "evaluation", "loading", "transforms", "checkpoints",
                   "cli", "train", "modeling_balpoe", "configuration_balpoe"):
        assert f"balpoe_hf/{module}.py" in names, module
    assert {f"balpoe_hf/recipes/{name}.yaml" for name in available_recipes()} <= names
    assert "balpoe_hf/model_cards/modelcard_template.md" in names
    assert "balpoe_hf/evaluate_modules/long_tail/long_tail.py" in names
    assert not any(name.startswith(("scripts/", "tests/")) for name in names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in CONSOLE_SCRIPTS:
        assert f"{script} = balpoe_hf." in text
    (license_file,) = [n for n in names if n.endswith("LICENSE")]
    assert "Apache License" in zipfile.ZipFile(wheel).read(license_file).decode()[:200]


def test_installed_package_is_the_one_imported(installed):
    result = _run([sys.executable, "-c", "import balpoe_hf; print(balpoe_hf.__file__)"], installed)
    assert result.stdout.strip().startswith(str(installed["target"]))


@pytest.mark.parametrize("script", CONSOLE_SCRIPTS)
def test_console_scripts_answer_help(installed, script):
    result = _run([str(installed["bin"] / script), "--help"], installed)
    assert "usage:" in result.stdout


def test_python_m_train_shows_every_recipe_field_with_its_resolved_value(installed):
    result = _run([sys.executable, "-m", "balpoe_hf.train", "--recipe", "fashion-mnist-lt-quick", "--help"],
                  installed)
    assert "--mixup-alpha" in result.stdout and "--lambdas" in result.stdout
    # After --recipe, --help shows the recipe's value as the default (4 epochs, not the built-in 200).
    options = result.stdout.split("\n  --")
    (epochs_help,) = [option for option in options if option.startswith("epochs ")]
    assert "(default: 4)" in " ".join(epochs_help.split())


def test_abbreviated_flags_are_refused(installed):
    result = subprocess.run([str(installed["bin"] / "balpoe-train"), "--recipe", "fashion-mnist-lt-quick",
                             "--epoch", "1"], cwd=installed["cwd"], env=installed["env"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "unrecognized arguments: --epoch" in result.stderr


def test_installed_entry_points_train_evaluate_and_publish(installed, tmp_path):
    train_file, test_file = write_parquet(tmp_path / "data")
    run = tmp_path / "run"
    _run([str(installed["bin"] / "balpoe-train"), "--train-file", str(train_file), "--test-file",
          str(test_file), *TINY, "--output-dir", str(run)], installed)
    assert (run / "model.safetensors").is_file() and (run / "preprocessor_config.json").is_file()
    report_file = tmp_path / "eval" / "report.json"
    result = _run([str(installed["bin"] / "balpoe-evaluate"), "--model", str(run), "--shifts",
                   "forward2,uniform", "--output", str(report_file)], installed)
    assert "| none |" in result.stdout
    report = json.loads(report_file.read_text())
    assert report["num_test_samples"] == TEST_PER_CLASS * len(CLASS_NAMES)
    result = _run([str(installed["bin"] / "balpoe-push"), str(run), "me/tiny", "--eval-report",
                   str(report_file), "--dry-run"], installed)
    assert "model.safetensors" in result.stdout and "README.md" in result.stdout


def test_python_api_trains_what_the_command_line_trains(tmp_path):
    train_file, test_file = write_parquet(tmp_path / "data")
    recipe = load_recipe(train_file=[str(train_file)], test_file=[str(test_file)], image_column="picture",
                         label_column="target", backbone="resnet20_cifar", image_size=16, epochs=1,
                         batch_size=8, warmup_epochs=0, rotation=0.0, many_threshold=20, few_threshold=6,
                         num_workers=0)
    output = train(recipe, tmp_path / "run")
    assert output.train_results["class_counts"] == TRAIN_COUNTS
    saved = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert saved["eval_balanced_accuracy"] == output.eval_report["balanced_accuracy"]
    assert 0.0 <= output.eval_report["balanced_accuracy"] <= 1.0
