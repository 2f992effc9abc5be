"""The report files of ``balpoe-evaluate --output``: where they go, which folder's manifest lists them, the
checks before any inference, and the writing (the JSON, a reliability diagram and a per-class plot) in one
staged save."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import EvaluationError, TrainingError, short_list
from ..run_folder import (
    check_writable,
    output_lock,
    read_manifest,
    staged_save,
    written_by_package,
)
from .evaluate import EvaluationResult


def report_files(output: str | Path, list_names: Sequence[str] = ()) -> list[Path]:
    """The files a report at ``output`` writes: the JSON and its two pictures, and for several test lists
    (``list_names``) each list's report and pictures beside it."""
    output = Path(output)
    reports = [output, *(output.with_name(f"{output.stem}_{name}.json") for name in list_names)]
    return [path for report in reports for path in (report, *_picture_paths(report).values())]


def report_owner(output: str | Path, model_dir: str | Path | None = None) -> Path:
    """The folder whose manifest lists the report at ``output``: the model's run folder when the report goes
    inside a run, else the report's own folder."""
    output = Path(output).resolve()
    inside = model_dir is not None and Path(model_dir).is_dir() and output.is_relative_to(
        Path(model_dir).resolve())
    if inside:
        try:
            if read_manifest(model_dir) is not None:
                return Path(model_dir)
        except TrainingError:
            pass  # a damaged manifest of the model's folder: the report keeps its own list
    return output.parent


@contextlib.contextmanager
def staged_report(output: str | Path, model_dir: str | Path | None = None) -> Iterator[Path]:
    """Where to write the report at ``output`` (and the files beside it): the same place in a staging folder
    of ``report_owner``; when the block ends the files replace their namesakes at once and are listed as
    ``balpoe-evaluate``'s in its manifest (``run_folder.staged_save``), under its lock."""
    output = Path(output)
    owner = report_owner(output, model_dir)
    with output_lock(owner, "balpoe-evaluate --output"), staged_save(owner, reports=True) as stage:
        yield stage / output.resolve().relative_to(owner.resolve())


def check_output(output: str | Path, model_dir: str | Path | None = None,
                 list_names: Sequence[str] = ()) -> None:
    """Check that the report and its pictures can be written at ``output``, before any inference.

    The nearest existing folder on the way to ``output`` must take a new file (tried with a temporary
    file, which is removed), and matplotlib must be installed for the pictures. A file the report would
    replace must be one an earlier ``balpoe-evaluate`` wrote, unchanged since (listed in the manifest of
    ``report_owner``): never a model's weights or config, nor a file of the user's.
    """
    output = Path(output)
    if output.is_dir():
        raise EvaluationError(f"--output {output} is a directory; give a file name, e.g. "
                              f"{output / 'report.json'}.")
    check_writable(output.parent, "--output into", EvaluationError)
    files = report_files(output, list_names)
    for path in files:
        if path.exists() and not os.access(path, os.W_OK):
            raise EvaluationError(f"cannot write --output {output}: {path} exists and is read-only.")
    owner = report_owner(output, model_dir)
    try:
        foreign = [path for path in files if path.exists() and not written_by_package(
            owner, path.resolve().relative_to(owner.resolve()).as_posix(), report=True)]
    except TrainingError as error:  # a damaged manifest
        raise EvaluationError(f"cannot write --output {output}: {error}") from None
    if foreign:
        listed = short_list([str(path) for path in foreign], "files")
        raise EvaluationError(f"--output {output} would replace {listed}, which balpoe-evaluate did not "
                              "write (or which were changed since): choose another --output (e.g. "
                              "RUN_DIR/eval/report.json), or move those files away.")
    if importlib.util.find_spec("matplotlib") is None:
        raise EvaluationError("--output also draws a reliability diagram and a per-class plot, which need "
                              "matplotlib: pip install 'balpoe-hf[plots]'.")


def save_report(result: EvaluationResult, output: str | Path, model_dir: str | Path | None = None
                ) -> dict[str, str]:
    """Write the report as ``balpoe-evaluate --output`` does: ``write_report`` in one ``staged_report``
    (listed as balpoe-evaluate's, under the folder's lock), with the SHA-256 of the weights of ``model_dir``
    (the folder the model was loaded from) as ``model_sha256``, by which ``balpoe-push`` publishes the
    report with that model only. Returns the names of the two PNG files."""
    from ..run_folder import weights_fingerprint

    result.report["model_sha256"] = None if model_dir is None else weights_fingerprint(model_dir)
    with staged_report(output, model_dir) as staged:
        return write_report(result, staged)


def _picture_paths(output: Path) -> dict[str, Path]:
    return {"reliability_diagram": output.with_name(f"{output.stem}_reliability.png"),
            "per_class_accuracy": output.with_name(f"{output.stem}_per_class_accuracy.png")}


def write_report(result: EvaluationResult, output: str | Path) -> dict[str, str]:
    """Write ``result.report`` as JSON to ``output``, and beside it a reliability diagram and per-class plot.

    Returns the names of the two PNG files (also recorded in the JSON under ``images``). ``save_report``
    writes it in one staged save, so that a kill or a full disk never leaves half a report.
    """
    from .plots import per_class_accuracy_plot, reliability_diagram

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    report = result.report
    settings = report["settings"]
    images = {name: path.name for name, path in _picture_paths(output).items()}
    reliability_diagram(result.logits, result.labels, output.parent / images["reliability_diagram"],
                        n_bins=settings["n_bins"], from_probs=False, title="Balanced test set")
    per_class_accuracy_plot(report["balanced"]["per_class_accuracy"], report["train_counts"],
                            output.parent / images["per_class_accuracy"], many=settings["many"],
                            few=settings["few"])
    output.write_text(json.dumps({**report, "images": images}, indent=2, allow_nan=False) + "\n",
                      encoding="utf-8")
    return images
