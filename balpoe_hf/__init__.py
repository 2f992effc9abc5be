"""balpoe-hf: Balanced Product of Calibrated Experts (BalPoE, CVPR 2023) for transformers and timm."""

from .data import class_counts, make_long_tailed, make_shifted_test, shot_groups
from .losses import BalPoELoss, logit_adjusted_cross_entropy
from .priors import adjust_logits, class_prior, log_class_prior, validate_prior

__version__ = "0.1.0"

__all__ = [
    "BalPoELoss",
    "adjust_logits",
    "class_counts",
    "class_prior",
    "log_class_prior",
    "logit_adjusted_cross_entropy",
    "make_long_tailed",
    "make_shifted_test",
    "shot_groups",
    "validate_prior",
]
