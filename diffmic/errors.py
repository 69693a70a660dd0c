"""User-facing error types that the command line reports as one message (no torch import here)."""


class PretrainedWeightsError(ValueError):
    """A pretrained-weights file named in the config is missing or holds another architecture."""


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or belongs to another configuration."""


class EvalSettingsError(ValueError):
    """A sampling setting asked for on the command line (--steps, --sampler, --n-samples) is out of range."""


class UnreadableImageError(ValueError):
    """An image file given to `diffmic predict` cannot be decoded."""


class SlurmError(RuntimeError):
    """Slurm is missing, a job could not be submitted, or a submitted job failed."""


class LaunchError(RuntimeError):
    """Local processes cannot start as asked (more GPUs than the machine has), or one of them failed."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the step and the last good checkpoint."""


class DiskFullError(RuntimeError):
    """A save ran out of disk space; the message gives the space needed and the space free."""


class RunLockError(RuntimeError):
    """Another process is training into the same run folder; the message names it."""
