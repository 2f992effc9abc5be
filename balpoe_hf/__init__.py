"""balpoe-hf: Balanced Product of Calibrated Experts (BalPoE, CVPR 2023) for transformers and timm."""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .data.splits import class_counts, make_long_tailed, make_shifted_test, shot_groups
from .models.balpoe.configuration_balpoe import BalPoEConfig
from .models.balpoe.label_shift import PriorStream, ShiftEstimator, estimate_prior
from .models.balpoe.losses import BalPoELoss, logit_adjusted_cross_entropy
from .models.balpoe.modeling_balpoe import BalPoEForImageClassification, BalPoEModel
from .models.balpoe.pipeline_balpoe import BalPoEImageClassificationPipeline
from .models.balpoe.priors import adjust_logits, class_prior, log_class_prior, validate_prior
from .models.balpoe.processing import build_image_processor

# `import balpoe_hf` makes "balpoe" checkpoints load through the transformers auto classes and pipelines.
AutoConfig.register(BalPoEConfig.model_type, BalPoEConfig, exist_ok=True)
AutoModel.register(BalPoEConfig, BalPoEModel, exist_ok=True)
AutoModelForImageClassification.register(BalPoEConfig, BalPoEForImageClassification, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "BalPoEConfig",
    "BalPoEForImageClassification",
    "BalPoEImageClassificationPipeline",
    "BalPoELoss",
    "BalPoEModel",
    "PriorStream",
    "ShiftEstimator",
    "adjust_logits",
    "build_image_processor",
    "class_counts",
    "class_prior",
    "estimate_prior",
    "log_class_prior",
    "logit_adjusted_cross_entropy",
    "make_long_tailed",
    "make_shifted_test",
    "shot_groups",
    "validate_prior",
]
