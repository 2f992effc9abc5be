"""A comparison as tables (Markdown) and files: the method table, the validation and label-shift rows, several
seeds, and ``comparison.json`` / ``comparison.md`` / ``comparison.png``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..metrics import percent
from ..recipes import Recipe
from .budgets import Budget

if TYPE_CHECKING:
    from .runs import Comparison


def format_method_table(summaries: Mapping[str, Mapping[str, Any]],
                        paper: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """Markdown table like the paper's Tables 2 / 9: balanced-test-set metrics per method, in percent.

    With ``paper`` (method -> published values in percent), columns with the published accuracy and ECE.
    """
    header = "| method | balanced acc. | many | medium | few | ECE | MCE | NLL | train time |"
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    if paper:
        header += " paper acc. | paper ECE |"
        rule += "---:|---:|"
    rows = [header, rule]
    for method, summary in summaries.items():
        b = summary["balanced"]
        runtime = summary.get("train_runtime")
        if summary.get("weights_from"):
            time_cell = f"(weights of {Path(summary['weights_from']).name})"
        else:
            time_cell = "n/a" if runtime is None else f"{runtime / 60:.1f} min"
        cells = [percent(b[key]) for key in ("balanced_accuracy", "many", "medium", "few", "ece", "mce")]
        row = f"| {method} | {' | '.join(cells)} | {b['nll']:.3f} | {time_cell} |"
        if paper:
            published = paper.get(method, {})
            row += "".join(f" {published[k]:.1f} |" if k in published else " - |"
                           for k in ("balanced_accuracy", "ece"))
        rows.append(row)
    return "\n".join(rows)


def format_validation_table(summaries: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Markdown table of the held-out split's class-balanced figures per method (``None`` without one)."""
    rows = [(m, s["validation"]) for m, s in summaries.items() if s.get("validation")]
    if not rows:
        return None
    lines = ["| method | balanced acc. | ECE | NLL |", "|---|---:|---:|---:|"]
    lines += [f"| {m} | {percent(v['balanced_accuracy'])} | {percent(v['ece'])} | {v['nll']:.3f} |"
              for m, v in rows]
    return "\n".join(lines)


def format_shift_rows(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table like the paper's Table 10: per method and prior mode, top-1 accuracy on each shift."""
    first = next(iter(summaries.values()))
    shifts = list(next(iter(first["shift_accuracy"].values())))
    rows = ["| method | prior | " + " | ".join(shifts) + " |", "|---|---|" + "---:|" * len(shifts)]
    for method, summary in summaries.items():
        for mode, accuracy in summary["shift_accuracy"].items():
            rows.append(f"| {method} | {mode} | " + " | ".join(percent(accuracy[s], 1) for s in shifts)
                        + " |")
    return "\n".join(rows)


# How the caption of the shift table names each prior mode.
PRIOR_CAPTIONS = {"none": "none = uniform target", "oracle": "oracle = the shifted set's true prior",
                  "auto": "auto = estimated from its unlabeled images by the default estimator",
                  "em": "em = estimated from its unlabeled images by EM on the raw posteriors"}


def prior_caption(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """What the prior modes of the shift table mean, for the modes it has (in their order)."""
    modes = dict.fromkeys(mode for summary in summaries.values() for mode in summary["shift_accuracy"])
    return ", ".join(PRIOR_CAPTIONS.get(mode, f"{mode} = estimated from its unlabeled images")
                     for mode in modes)


def format_comparison(comparison: Comparison, base: Recipe, budget: Budget | None = None) -> str:
    """The printed result: the settings, both tables, and what is left to do."""
    lines = [f"Methods on {base.name}: {base.backbone}, {base.epochs} epochs ({base.lr_schedule} lr "
             f"{base.lr:g}), batch {base.batch_size}, seed {base.seed}, balanced test set"]
    if comparison.summaries:
        lines += ["", format_method_table(comparison.summaries, budget.paper if budget else None)]
        if budget and budget.paper:
            lines.append("paper: CIFAR-10-LT IR100, ResNet-32, 200 epochs (Sanchez Aimar et al., Tables 8-9)")
        validation = format_validation_table(comparison.summaries)
        if validation:
            lines += ["", "Held-out validation split (part of the training data, never trained on; each "
                      "image weighted by 1 / its class count, as if balanced):", "", validation]
        lines += ["", f"Top-1 accuracy (%) on label-shifted test sets (prior: "
                  f"{prior_caption(comparison.summaries)}):", "", format_shift_rows(comparison.summaries)]
    if comparison.pending:
        lines += ["", f"not done yet: {', '.join(comparison.pending)} (rerun the same command to continue)"]
    return "\n".join(lines)


def write_comparison(comparison: Comparison, base: Recipe, output_dir: Path) -> dict[str, str]:
    """Write ``comparison.json``, ``.md`` and ``.png`` into ``output_dir``; returns their paths."""
    from ..evaluation.plots import method_comparison_plot

    output_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": str(output_dir / "comparison.json"), "markdown": str(output_dir / "comparison.md"),
             "png": str(output_dir / "comparison.png")}
    payload = {"base_recipe": base.to_dict(), "complete": comparison.complete, "pending": comparison.pending,
               "train_counts": comparison.train_counts, "methods": comparison.summaries}
    Path(files["json"]).write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    tables = [format_method_table(comparison.summaries), format_shift_rows(comparison.summaries),
              format_validation_table(comparison.summaries)]
    Path(files["markdown"]).write_text("\n\n".join(t for t in tables if t) + "\n")
    method_comparison_plot(
        {m: {"reliability": s["reliability"], "per_class_accuracy": s["balanced"]["per_class_accuracy"]}
         for m, s in comparison.summaries.items()},
        comparison.train_counts, files["png"], many=base.many_threshold, few=base.few_threshold)
    return files


def format_seed_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: per method, the mean over its seeds with the range in brackets, in percent."""
    columns = (("balanced_accuracy", "balanced acc."), ("many", "many"), ("medium", "medium"), ("few", "few"),
               ("ece", "ECE"))
    rows = ["| method | seeds | " + " | ".join(label for _, label in columns) + " |",
            "|---|---|" + "---:|" * len(columns)]
    for method, summary in summaries.items():
        cells = [f"{percent(summary[k]['mean'])} ({percent(summary[k]['min'])}-{percent(summary[k]['max'])})"
                 if len(summary["seeds"]) > 1 else percent(summary[k]["mean"]) for k, _ in columns]
        rows.append(f"| {method} | {','.join(map(str, summary['seeds']))} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
