"""The evaluation pictures: PNG files written, non-empty, with the expected content drawn."""

import matplotlib.image
import numpy as np
import pytest

from balpoe_hf.evaluation.plots import class_count_histogram, per_class_accuracy_plot, reliability_diagram

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COUNTS = [500, 300, 180, 107, 64, 38, 23, 13, 8, 5]


def _assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.05  # something is drawn, not a blank canvas


@pytest.mark.parametrize("from_probs", [None, True, False])
def test_reliability_diagram_from_logits_or_probabilities(tmp_path, from_probs):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 400)
    logits = rng.normal(size=(400, 10))
    logits[np.arange(400), labels] += 2.0
    scores = logits
    if from_probs is not False:
        scores = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    path = reliability_diagram(scores, labels, tmp_path / "sub" / "reliability.png", n_bins=10,
                               from_probs=from_probs)
    assert path == tmp_path / "sub" / "reliability.png"
    _assert_png(path)


def test_per_class_accuracy_plot_skips_classes_without_test_samples(tmp_path):
    accuracy = [0.9, 0.85, 0.8, 0.7, None, 0.6, 0.5, 0.4, 0.3, 0.2]
    _assert_png(per_class_accuracy_plot(accuracy, COUNTS, tmp_path / "per_class.png"))
    with pytest.raises(ValueError, match="one of each per class"):
        per_class_accuracy_plot(accuracy[:3], COUNTS, tmp_path / "bad.png")


def test_class_count_histogram_with_and_without_names(tmp_path):
    names = [f"class {i}" for i in range(10)]
    _assert_png(class_count_histogram(COUNTS, tmp_path / "named.png", class_names=names))
    _assert_png(class_count_histogram(list(range(1, 61)), tmp_path / "many_classes.png"))
    with pytest.raises(ValueError, match="one name per class"):
        class_count_histogram(COUNTS, tmp_path / "bad.png", class_names=names[:2])


def test_plots_leave_the_matplotlib_backend_alone(tmp_path):
    backend = matplotlib.get_backend()
    class_count_histogram(COUNTS, tmp_path / "counts.png")
    assert matplotlib.get_backend() == backend
