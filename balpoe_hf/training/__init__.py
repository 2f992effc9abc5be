"""Training: the Accelerate loop (``train``), a run's checkpoints and resume checks, and the speed options."""

from .loop import train
from .state import TrainOutput

__all__ = ["TrainOutput", "train"]
