"""Calibration metrics (ECE, MCE, NLL, Brier) as a local ``evaluate`` module (offline, load by path).

    import evaluate
    from balpoe_hf.metrics import module_path
    metric = evaluate.load(module_path("calibration"), n_bins=15)
    metric.compute(predictions=logits, references=labels)

evaluate parses this file's imports line by line: keep one import per line.
"""

import datasets
import evaluate
import numpy as np

from balpoe_hf.metrics import calibration_report

LABEL = datasets.Value("int64")

_DESCRIPTION = """
Expected and maximum calibration error over equal-width confidence bins (a confidence p falls in the bin with
lower < p <= upper), negative log-likelihood and the multi-class Brier score (sum over classes, mean over
samples). Values are fractions.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: a list of C logits per sample (or probabilities with from_probs=True at load time).
    references: the true class index per sample.
Load-time arguments (evaluate.load(path, ...)):
    n_bins: number of confidence bins (default 15).
    from_probs: whether predictions are probabilities rather than logits (default False).
Returns:
    ece, mce, nll, brier.
"""

_CITATION = """
@inproceedings{guo2017calibration,
  title={On Calibration of Modern Neural Networks},
  author={Guo, Chuan and Pleiss, Geoff and Sun, Yu and Weinberger, Kilian Q.},
  booktitle={ICML},
  year={2017}
}
"""


class Calibration(evaluate.Metric):
    """ECE, MCE, NLL and Brier score of a classifier's probabilities."""

    def __init__(self, n_bins=15, from_probs=False, **kwargs):
        self.n_bins = n_bins
        self.from_probs = from_probs
        super().__init__(**kwargs)

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": LABEL}
            ),
        )

    def _compute(self, predictions, references):
        return calibration_report(
            np.asarray(predictions), np.asarray(references), n_bins=self.n_bins, from_probs=self.from_probs
        )
