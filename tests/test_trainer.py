"""transformers.Trainer with a BalPoE model: training steps, evaluation metrics on the ensemble logits."""

import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageClassification, Trainer, TrainingArguments

from balpoe_hf import BalPoEConfig, BalPoEForImageClassification
from balpoe_hf.metrics import long_tail_compute_metrics

# many-shot > 100: class 0; medium 20..100: class 1; few < 20: classes 2, 3.
COUNTS = [150, 60, 10, 5]


class RandomImages(torch.utils.data.Dataset):
    """Random 32x32 images with labels cycling through the classes, as Trainer-ready dicts."""

    def __init__(self, size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.pixel_values = torch.randn(size, 3, 32, 32, generator=generator)
        self.labels = torch.arange(size) % len(COUNTS)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


def test_trainer_trains_and_evaluates_on_the_ensemble_logits(tmp_path):
    torch.manual_seed(0)
    config = BalPoEConfig(backbone="resnet20_cifar", num_experts=2, class_counts=COUNTS)
    model = BalPoEForImageClassification(config)
    before = model.balpoe.experts[0].classifier.weight.detach().clone()
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=3, per_device_train_batch_size=16,
        per_device_eval_batch_size=16, learning_rate=0.05, logging_steps=1, save_strategy="no",
        disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=RandomImages(64, seed=1),
                      eval_dataset=RandomImages(40, seed=2),
                      compute_metrics=long_tail_compute_metrics(COUNTS))
    result = trainer.train()
    assert result.global_step == 3 and np.isfinite(result.training_loss)
    assert sum("loss" in entry for entry in trainer.state.log_history) == 3
    assert not torch.equal(model.balpoe.experts[0].classifier.weight, before)

    metrics = trainer.evaluate()
    prediction = trainer.predict(trainer.eval_dataset)
    # keys_to_ignore_at_inference: one (N, C) array of ensemble logits, not a tuple with the expert outputs.
    logits = prediction.predictions
    assert isinstance(logits, np.ndarray) and logits.shape == (40, 4)
    dataset = trainer.eval_dataset
    model.eval()
    with torch.no_grad():
        expected = model(dataset.pixel_values).logits
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-5)

    # Balanced accuracy by hand from predict's logits: the mean over classes of the per-class hit rate.
    labels = dataset.labels.numpy()
    predicted = logits.argmax(1)
    recalls = [np.mean(predicted[labels == c] == c) for c in range(4)]
    assert metrics["eval_balanced_accuracy"] == pytest.approx(sum(recalls) / 4)
    assert metrics["eval_many"] == pytest.approx(recalls[0])
    assert metrics["eval_few"] == pytest.approx((recalls[2] + recalls[3]) / 2)
    shifted = logits - logits.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    assert metrics["eval_nll"] == pytest.approx(-log_probs[np.arange(40), labels].mean(), rel=1e-5)
    assert np.isfinite(metrics["eval_loss"])
    assert prediction.metrics["test_accuracy"] == metrics["eval_accuracy"]

    # Trainer.save_model leaves a folder that loads and runs as the trained model, with its processor and
    # its code (tests/test_hub_card.py does the same where balpoe_hf cannot be imported).
    trainer.save_model(str(tmp_path / "saved"))
    files = set(os.listdir(tmp_path / "saved"))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "modeling_balpoe.py",
            "pipeline_balpoe.py"} <= files
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        assert torch.equal(loaded(dataset.pixel_values).logits, expected)
