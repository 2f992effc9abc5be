"""Evaluation of a saved model: loading it, the balanced and label-shifted evaluation, reports and printing,
plots, learning curves and the label-shift summary of several reports."""

from .evaluate import EvaluationResult, evaluate_model
from .model_loading import load_model
from .reports import save_report
from .shifts import parse_priors, parse_shifts
from .upgrade import upgrade_model

__all__ = [
    "EvaluationResult",
    "evaluate_model",
    "load_model",
    "parse_priors",
    "parse_shifts",
    "save_report",
    "upgrade_model",
]
