"""Training: the loop, optimisers and schedules, losses, dead features, checkpoints."""

from dictlens.train.config import TrainConfig
from dictlens.train.trainer import Trainer, train

__all__ = ["TrainConfig", "Trainer", "train"]
