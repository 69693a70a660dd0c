"""The training engine: Accelerate (DDP or DeepSpeed), mixed precision, exact resume, one writer per run.

`train` is imported on first use, so importing a module of diffmic.engine pulls in no trainer.
"""

__all__ = ["NonFiniteLossError", "TrainResult", "train"]


def __getattr__(name: str):
    if name in __all__:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'diffmic.engine' has no attribute {name!r}")
