"""User-facing error types that the command line reports as one message (no torch import here).

Every mistake a user can fix derives from `UserError`: the command line prints its message on one line and
exits with status 2, without a traceback (diffmic.cli.common). A new kind of user error only has to derive
from it. Each also keeps the built-in base its callers catch (ValueError, RuntimeError).
"""


class UserError(Exception):
    """A mistake the user can fix: printed as one message, exit status 2, no traceback."""


# What the command line reports as one line: user errors, and a path that does not exist.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError)


class PretrainedWeightsError(UserError, ValueError):
    """A pretrained-weights file named in the config is missing or holds another architecture."""


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, incomplete, corrupt or belongs to another configuration."""


class EvalSettingsError(UserError, ValueError):
    """A sampling setting asked for on the command line (--steps, --sampler, --n-samples) is out of range."""


class UnreadableImageError(UserError, ValueError):
    """An image file given to `diffmic predict` cannot be decoded."""


class SlurmError(UserError, RuntimeError):
    """Slurm is missing, a job could not be submitted, or a submitted job failed."""


class LaunchError(UserError, RuntimeError):
    """Local processes cannot start as asked (more GPUs than the machine has), or one of them failed."""


class NonFiniteLossError(UserError, RuntimeError):
    """The training loss became NaN or infinite; the message names the step and the last good checkpoint."""


class DiskFullError(UserError, RuntimeError):
    """A save ran out of disk space; the message gives the space needed and the space free."""


class RunLockError(UserError, RuntimeError):
    """Another process is training into the same run folder; the message names it."""
