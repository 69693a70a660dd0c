"""User-facing error types that the command line reports as one message (no torch import here).

Every mistake a user can fix derives from `UserError`: the command line prints its message on one line and
exits with status 2, without a traceback (diffmic.cli.common). A new kind of user error only has to derive
from it. Each also keeps the built-in base its callers catch (ValueError, RuntimeError).
"""

import errno


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
    """Another process is training into the same run folder (or running the same sweep); the message names it."""


class RunFileError(UserError, ValueError):
    """A file of a run or sweep folder is damaged, was changed since diffmic wrote it, cannot be written, or is a
    link that would make diffmic write outside the folder; the message names the file and the fix."""


# What the file system says when it refuses a write, and what the user can do about it.
_FILE_SYSTEM_FIXES = {
    errno.EROFS: "the file system is read-only: write somewhere else (--out, --run-dir) or make it writable",
    errno.EACCES: "permission denied: write somewhere else (--out, --run-dir) or make it writable",
    errno.EPERM: "the operation is not permitted: write somewhere else (--out, --run-dir) or make it writable",
    errno.EBUSY: "it is busy (a mount point, or in use by another program): write somewhere else",
    errno.ENOSPC: "the disk is full: free some space and run the command again",
    errno.EDQUOT: "the disk quota is exceeded: free some space and run the command again",
}


def file_system_error(error: OSError) -> UserError | None:
    """The one-line user error of a file system refusal that names its file (read-only, permissions, a full disk,
    a folder where a file belongs); None for an OSError without a file, which is not the user's to fix."""
    if not error.filename:
        return None
    fix = _FILE_SYSTEM_FIXES.get(error.errno, "check that path")
    target = f" -> {error.filename2}" if error.filename2 else ""
    return RunFileError(f"cannot use {error.filename}{target}: {error.strerror or type(error).__name__}; {fix}")
