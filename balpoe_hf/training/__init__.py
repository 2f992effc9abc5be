"""Training: the Accelerate loop (``train``), a run's checkpoints and resume checks, and the speed options."""

from .loop import TrainOutput, train

__all__ = ["TrainOutput", "train"]
