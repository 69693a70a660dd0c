"""The training engine: Accelerate (DDP or DeepSpeed), mixed precision, checkpoints, exact resume."""

from .trainer import NonFiniteLossError, TrainResult, train

__all__ = ["NonFiniteLossError", "TrainResult", "train"]
