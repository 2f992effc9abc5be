"""Choosing a model's label-shift estimator on its held-out split alone.

No single estimator is safe on every model: EM on raw posteriors is right when a model is calibrated and far
off when it is not; BBSE needs no calibration but is noisy on small held-out splits.
``choose_shift_estimator`` cross-fits on the held-out split: it calibrates on one half, draws label-shifted
sets from the other half (the shifts of the evaluation protocol, at a test-set size and at a small
deployment batch), scores every candidate estimator by its accuracy gain over the uniform prior, and picks
by safety first (the worst simulated shift, within the simulation's error), then by an order of preference.
The choice goes into ``config.shift_estimator``, which the prior mode ``auto`` runs
(``label_shift.estimate_unknown_prior``), so a model loaded from the Hub adapts the same way.

    from balpoe_hf.shift_selection import choose_shift_estimator

    model.config.shift_estimator = choose_shift_estimator(holdout_logits, holdout_labels, train_counts)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .calibration import validate_logits
from .data import rank_by_count
from .label_shift import (
    HOLDOUT_BIAS_STD,
    UNKNOWN_PRIOR_METHODS,
    UnknownPriorMethod,
    estimate_unknown_prior,
    holdout_calibration,
)

ALL_SHIFTS = ("forward50", "forward25", "forward10", "forward5", "forward2", "uniform",
              "backward2", "backward5", "backward10", "backward25", "backward50")
SHIFT_KINDS = ("forward", "backward")

# The estimators the choice weighs, each with the gain guard (which falls back to uniform when an estimate's
# gain is not larger than its uncertainty), in order of preference: EM on BCTS-calibrated posteriors
# (Alexandari et al., 2020: "hard to beat" at label shift), RLLS (made for small held-out splits), BBSE, and
# EM on raw posteriors (right only for a calibrated model, which nothing checks).
CANDIDATES: dict[str, UnknownPriorMethod] = {
    f"{name}-gain": dataclasses.replace(UNKNOWN_PRIOR_METHODS[name], guard="gain")
    for name in ("em-bcts", "rlls", "bbse", "em")}
# Simulated set sizes: a test set, and a small deployment batch.
SIMULATION_SIZES = (1000, 300)
# The rule (choose_from_summary). The simulation resolves harm only coarsely: its shifted sets resample the
# handful of held-out images of each tail class, so that even the true prior can lose points on simulated
# tail-heavy sets that it gains on real ones. Harm differences smaller than the oracle's own worst simulated
# loss (at least MIN_HARM_TOLERANCE) are within that error: the candidates that close to the least harm are
# safe. A candidate is useful when it recovers at least USEFUL_SHARE of the oracle's simulated gain on the
# strongest shifts (an estimator that never adapts is safe and useless). The first safe and useful candidate
# in CANDIDATES' order is chosen; when no useful candidate is safe, the safest one.
USEFUL_SHARE = 0.1
MIN_HARM_TOLERANCE = 0.005


def shift_prior(train_counts: Sequence[int], shift: str) -> torch.Tensor:
    """The class proportions of a shifted test set before rounding: the class of training rank ``k``
    (``rank_by_count``) gets ``ratio ** (-k / (C - 1))`` (forward) or the reverse (backward), normalised."""
    kind, ratio = split_shift(shift)
    num_classes = len(train_counts)
    ranks = torch.empty(num_classes, dtype=torch.float64)
    ranks[rank_by_count(train_counts)] = torch.arange(num_classes, dtype=torch.float64)
    if kind == "backward":
        ranks = num_classes - 1 - ranks
    weights = float(ratio) ** (-ranks / max(1, num_classes - 1))
    return weights / weights.sum()


def split_shift(name: str) -> tuple[str, float]:
    """``"forward50"`` -> ``("forward", 50.0)``; ``"uniform"`` -> ``("uniform", 1.0)``."""
    if name == "uniform":
        return "uniform", 1.0
    for kind in SHIFT_KINDS:
        if name.startswith(kind):
            try:
                ratio = float(name[len(kind):])
            except ValueError:
                break
            if ratio >= 1:
                return kind, ratio
    raise ValueError(f"unknown shift {name!r}: use 'uniform', 'forwardR' or 'backwardR' with a ratio R >= 1 "
                     "(e.g. forward50).")


def _uniform_accuracy_gain(scores: torch.Tensor, truth: torch.Tensor, prior: torch.Tensor) -> float:
    """Top-1 accuracy of ``scores + log prior`` minus that of ``scores`` (the uniform prior)."""
    adjusted = scores + prior.clamp_min(torch.finfo(torch.float64).tiny).log()
    return float((adjusted.argmax(1) == truth).double().mean() - (scores.argmax(1) == truth).double().mean())


def simulate_holdout_shifts(logits: torch.Tensor, labels: torch.Tensor | np.ndarray,
                            train_counts: Sequence[int], methods: Mapping[str, str | UnknownPriorMethod],
                            shifts: Sequence[str] = ALL_SHIFTS, *, sizes: Sequence[int] = SIMULATION_SIZES,
                            repeats: int = 2, seed: int = 0,
                            bias_std: float | None = HOLDOUT_BIAS_STD
                            ) -> dict[str, dict[str, dict[int, float]]]:
    """Label shifts simulated from held-out data, to judge estimators without the test set.

    ``logits`` ``(N, C)`` are a model's uniform-prior logits on its held-out split and ``labels`` ``(N,)``
    their classes. Each of ``repeats`` rounds halves the held-out data per class; each half in turn fits a
    calibration (``holdout_calibration`` with ``bias_std``), and the other half is resampled with
    replacement into a set of each of ``sizes`` per shift, with class proportions ``shift_prior``. The
    calibration never sees the images it is judged on, as for a real test set. Tail classes with a handful
    of held-out images make the resampled sets repetitive and each calibration sees half the held-out data,
    so read the results as a comparison of estimators, not as test accuracies.

    ``methods`` maps a row name to a prior mode or an ``UnknownPriorMethod`` (``estimate_unknown_prior``);
    the row ``oracle`` (the drawn set's class proportions) is added. Returns row -> shift -> size -> mean
    top-1 gain over the uniform prior (fractions; negative means harm). Every class needs two held-out images.
    """
    scores, targets = validate_logits(logits), torch.as_tensor(np.asarray(labels)).long()
    num_classes = scores.shape[1]
    per_class = torch.bincount(targets, minlength=num_classes)
    if int(per_class.min()) < 2:
        few = torch.nonzero(per_class < 2).flatten().tolist()
        raise ValueError(f"classes {few[:20]} have fewer than 2 held-out images; the simulation calibrates "
                         "on one half and tests on the other. Hold out more (holdout_fraction).")
    rng = np.random.default_rng(seed)
    gains: dict[str, dict[str, dict[int, list[float]]]] = {
        name: {shift: {size: [] for size in sizes} for shift in shifts} for name in ["oracle", *methods]}
    for _ in range(repeats):
        half = torch.zeros(len(targets), dtype=torch.bool)
        for cls in range(num_classes):
            rows = rng.permutation(np.flatnonzero(targets.numpy() == cls))
            half[torch.from_numpy(rows[: len(rows) // 2])] = True
        for fit in (half, ~half):
            calibration = holdout_calibration(scores[fit], targets[fit], bias_std=bias_std)
            pools = [np.flatnonzero(((targets == cls) & ~fit).numpy()) for cls in range(num_classes)]
            for shift in shifts:
                for size in sizes:
                    drawn = rng.multinomial(size, shift_prior(train_counts, shift).numpy())
                    rows = np.concatenate([rng.choice(pool, n) for pool, n in zip(pools, drawn, strict=True)])
                    sample, truth = scores[rows], targets[rows]
                    gains["oracle"][shift][size].append(
                        _uniform_accuracy_gain(sample, truth, torch.from_numpy(drawn / size)))
                    for name, method in methods.items():
                        prior = estimate_unknown_prior(sample, calibration, method).prior
                        gains[name][shift][size].append(_uniform_accuracy_gain(sample, truth, prior))
    return {name: {shift: {size: float(np.mean(values)) for size, values in by_size.items()}
                   for shift, by_size in row.items()} for name, row in gains.items()}


def summarize_simulation(simulation: Mapping[str, Mapping[str, Mapping[int, float]]]
                         ) -> dict[str, dict[str, float]]:
    """Per row: ``harm``, ``worst`` and ``mean`` over every simulated shift and size, and ``recovered``.

    ``worst`` and ``mean`` are of the gain over the uniform prior. ``harm`` is the worst of ``gain -
    min(0, oracle gain)``: where even the true prior loses in the simulation (a handful of held-out tail
    images, resampled into a set, make tail-heavy sets unlike a real one), that loss is the simulation's,
    not the estimator's. ``recovered`` is the share of the oracle's gain summed over the forward50 and
    backward50 sets (where the oracle gains most).
    """
    oracle = simulation["oracle"]
    extremes = [shift for shift in ("forward50", "backward50") if shift in oracle]
    oracle_gain = sum(oracle[s][size] for s in extremes for size in oracle[s])
    summary = {}
    for name, row in simulation.items():
        cells = [(gain, oracle[shift][size]) for shift, by_size in row.items()
                 for size, gain in by_size.items()]
        gain = sum(row[s][size] for s in extremes for size in row[s])
        summary[name] = {"harm": min(g - min(0.0, o) for g, o in cells), "worst": min(g for g, _ in cells),
                         "mean": float(np.mean([g for g, _ in cells])),
                         "recovered": gain / oracle_gain if oracle_gain > 0 else float("nan")}
    return summary


def choose_from_summary(summary: Mapping[str, Mapping[str, float]], candidates: Sequence[str]) -> str:
    """Safety first, within what the simulation can resolve: the candidates whose ``harm`` is within the
    tolerance (the oracle's worst simulated loss, at least ``MIN_HARM_TOLERANCE``) of the least harm of any
    candidate are safe; of the safe ones that are useful (``recovered >= USEFUL_SHARE``), the first in
    ``candidates``' order of preference; when no useful one is safe, the safest candidate."""
    least_harm = max(summary[name]["harm"] for name in candidates)
    tolerance = max(MIN_HARM_TOLERANCE, -summary["oracle"]["worst"])
    safe = [name for name in candidates if summary[name]["harm"] >= least_harm - tolerance]
    useful = [name for name in safe if summary[name]["recovered"] >= USEFUL_SHARE]
    if useful:
        return useful[0]
    return max(safe, key=lambda name: (summary[name]["harm"], summary[name]["mean"]))


def choose_shift_estimator(logits: torch.Tensor, labels: torch.Tensor | np.ndarray,
                           train_counts: Sequence[int], *,
                           candidates: Mapping[str, UnknownPriorMethod] | None = None,
                           sizes: Sequence[int] = SIMULATION_SIZES, repeats: int = 2,
                           seed: int = 0) -> dict[str, Any]:
    """``config.shift_estimator`` for a model, from its uniform-prior logits on its held-out split.

    Simulates ``CANDIDATES`` (or ``candidates``) on every shift of the evaluation protocol at each of
    ``sizes``, none larger than the held-out split (``simulate_holdout_shifts``), and chooses with
    ``choose_from_summary``. Returns ``{"name", "settings", "rule", "simulation", "holdout_samples"}``: the
    chosen candidate, its ``UnknownPriorMethod`` settings, the rule and every candidate's summary
    (``summarize_simulation``), plain JSON.
    """
    pool = dict(CANDIDATES if candidates is None else candidates)
    if not pool:
        raise ValueError("candidates is empty; give at least one estimator to choose from.")
    # A simulated set larger than the held-out split it resamples adds repeats, not information.
    sizes = sorted({min(size, len(labels)) for size in sizes}, reverse=True)
    simulation = simulate_holdout_shifts(logits, labels, train_counts, pool, sizes=sizes, repeats=repeats,
                                         seed=seed)
    summary = summarize_simulation(simulation)
    name = choose_from_summary(summary, list(pool))
    return {
        "name": name,
        "settings": pool[name].to_dict(),
        "rule": ("harm within the simulation's error of the least; then the first to recover >= "
                 f"{USEFUL_SHARE:g} of the oracle's simulated gain in the order " + ", ".join(pool)
                 + "; else the safest"),
        "simulation": {row: {k: round(v, 5) for k, v in values.items()} for row, values in summary.items()},
        "holdout_samples": len(labels),
    }
