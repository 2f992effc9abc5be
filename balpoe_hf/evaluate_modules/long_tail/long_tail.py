"""Long-tail accuracy metrics as a local ``evaluate`` module (offline, load by path).

    import evaluate
    from balpoe_hf.metrics import module_path
    metric = evaluate.load(module_path("long_tail"), train_counts=[5000, 2997, 1796, ...])
    metric.compute(predictions=logits, references=labels)

Combine it with the ``calibration`` module through ``evaluate.combine`` for the full
``balpoe_hf.metrics.long_tail_report``. evaluate parses this file's imports line by line: keep one
import per line.
"""

import datasets
import evaluate
import numpy as np

from balpoe_hf.metrics import accuracy_report
from balpoe_hf.recipes.recipe import FEW_SHOT_THRESHOLD, MANY_SHOT_THRESHOLD

LABEL = datasets.Value("int64")

_DESCRIPTION = """
Top-1 accuracy, balanced accuracy (mean per-class recall), per-class accuracy and many / medium / few-shot
accuracy (classes with more than `many`, between `few` and `many`, fewer than `few` training samples; the
mean per-class accuracy over the group). Values are fractions; undefined ones (an empty shot group, a class
without test samples) are None.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: scores per sample, a list of C logits or probabilities (the arg-max is the prediction),
        or a class index per sample.
    references: the true class index per sample.
Load-time arguments (evaluate.load(path, ...)):
    train_counts: training samples per class, in label-index order (required).
    many, few: shot-group thresholds (default balpoe_hf's: 100 and 20).
Returns:
    accuracy, balanced_accuracy, per_class_accuracy, many, medium, few.
"""

_CITATION = """
@inproceedings{sanchez2023balpoe,
  title={Balanced Product of Calibrated Experts for Long-Tailed Recognition},
  author={Sanchez Aimar, Emanuel and Jonnarth, Arvi and Felsberg, Michael and Kuhlmann, Marco},
  booktitle={CVPR},
  year={2023}
}
"""


class LongTail(evaluate.Metric):
    """Accuracy metrics of long-tailed recognition, with shot groups from the training class counts."""

    def __init__(self, train_counts=None, many=MANY_SHOT_THRESHOLD, few=FEW_SHOT_THRESHOLD, **kwargs):
        if train_counts is None:
            raise ValueError(
                "the long_tail metric needs the training class counts: "
                "evaluate.load(module_path('long_tail'), train_counts=[...])."
            )
        self.train_counts = [int(c) for c in train_counts]
        self.many = many
        self.few = few
        super().__init__(**kwargs)

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {"predictions": datasets.Sequence(datasets.Value("float64")), "references": LABEL}
                ),
                datasets.Features({"predictions": datasets.Value("int64"), "references": LABEL}),
            ],
        )

    def _compute(self, predictions, references):
        predictions = np.asarray(predictions)
        classes = predictions.argmax(axis=1) if predictions.ndim == 2 else predictions
        references = np.asarray(references)
        return accuracy_report(classes, references, self.train_counts, many=self.many, few=self.few)
