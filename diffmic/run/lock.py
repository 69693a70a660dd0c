"""One writer per run folder: RUN/.lock, taken by rank 0 before anything is written, released on every exit; and
one `diffmic sweep` per sweep folder: SWEEP/.lock, the same lock.

The lock file names its holder (host, pid and the pid's start time, the Slurm job and its restart count), sealed
with its checksum (diffmic.fileio). A lock is stale, and taken over, when its holder is a dead process on this host
or a Slurm job that ended; a requeued Slurm job keeps its job id, so a higher restart count of the same job also
marks the old lock as its own previous run. Anything else is a live writer, and the second `diffmic train` (or
`diffmic sweep`) stops with one line naming it. A lock file that is not one diffmic wrote (damaged, edited, a pid
no system has) is refused by name: only the user can know that no run uses the folder. `eval` and `predict` only
read, and take no lock.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

from ..errors import RunFileError, RunLockError
from ..fileio import read_sealed_json, sealed
from .folder import RunFolder

# squeue states of a job that still runs or will run again.
LIVE_JOB_STATES = {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                   "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}
PID_LIMIT = 1 << 22  # Linux's PID_MAX_LIMIT: no process id is larger


def process_start(pid: int) -> str | None:
    """When `pid` started (clock ticks since boot, from /proc): tells a reused pid from the holder."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, started: str | None) -> bool:
    if not 0 < pid <= PID_LIMIT:  # os.kill would overflow or signal a process group: no such process exists
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return started is None or process_start(pid) in (None, started)


def slurm_job_alive(job_id: str) -> bool | None:
    """True or False from squeue; None when Slurm cannot be asked from here."""
    try:
        result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                                timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return False if "Invalid job id" in result.stderr else None
    return bool(set(result.stdout.split()) & LIVE_JOB_STATES)


def this_holder(token: str) -> dict:
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": process_start(os.getpid()),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": token}
    if os.environ.get("SLURM_JOB_ID"):
        holder.update({"slurm_job_id": os.environ["SLURM_JOB_ID"],
                       "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)})
    return holder


def describe(holder: dict) -> str:
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}, since {holder.get('started')}"


def is_stale(holder: dict, me: dict) -> bool:
    job = holder.get("slurm_job_id")
    same_job = bool(job) and job == me.get("slurm_job_id")
    # The same job id again with a higher restart count: a requeued run of this job, whose earlier run held it.
    if same_job and int(holder.get("slurm_restart_count", 0)) < int(me.get("slurm_restart_count", 0)):
        return True
    on_this_host = holder.get("host") == me["host"] and isinstance(holder.get("pid"), int)
    if on_this_host and not pid_alive(holder["pid"], holder.get("pid_started")):
        return True
    return bool(job) and not same_job and slurm_job_alive(job) is False


class RunLock:
    """The lock of a run folder (what = "diffmic train") or of a sweep folder (what = "diffmic sweep")."""

    def __init__(self, folder: str | Path, what: str = "diffmic train"):
        self.path = RunFolder(folder).lock_file  # a sweep folder's lock has the same name
        self.what = what
        self.token = uuid.uuid4().hex
        self.held = False

    def acquire(self) -> None:
        """Takes the lock or raises RunLockError naming the holder (or the lock file that cannot be written)."""
        me = this_holder(self.token)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for _ in range(5):
                if self._create(me):
                    self.held = True
                    return
                holder = self._read()
                if holder is None:
                    continue  # released (or taken over) meanwhile: try again
                if not is_stale(holder, me):
                    raise RunLockError(f"{self.path.parent} is in use by another {self.what} ({describe(holder)}); "
                                       f"wait for it to finish or use another folder. If nothing is using the "
                                       f"folder, delete {self.path}")
                self._remove_stale(holder)
        except OSError as error:
            raise RunLockError(f"cannot take the lock {self.path} ({error.strerror or error}): {self.what} writes "
                               f"into {self.path.parent}, which must be writable; make it writable or use another "
                               f"folder") from None
        raise RunLockError(f"could not take {self.path}: other processes keep replacing it")

    def _create(self, me: dict) -> bool:
        """Atomic: the lock appears with its whole content, or not at all if one exists already."""
        temporary = self.path.with_name(f"{self.path.name}.{self.token}.tmp")
        temporary.write_text(json.dumps(sealed(me), indent=2))
        try:
            os.link(temporary, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            temporary.unlink(missing_ok=True)

    def _read(self) -> dict | None:
        """The holder named by the lock file; None once it is gone; RunLockError for a file diffmic did not write."""
        fix = f"if nothing is using {self.path.parent}, delete it"
        try:
            holder = read_sealed_json(self.path, fix)
        except FileNotFoundError:
            return None
        except (RunFileError, OSError) as error:
            raise RunLockError(f"{self.path} is not a lock diffmic wrote ({error}); {fix}") from None
        pid = holder.get("pid")
        if not isinstance(holder.get("host"), str) or not isinstance(pid, int) or not 0 < pid <= PID_LIMIT:
            raise RunLockError(f"{self.path} is not a lock diffmic wrote (no host, or a pid no process can have: "
                               f"{pid!r}); {fix}")
        return holder

    def _remove_stale(self, holder: dict) -> None:
        """Moves the stale lock aside first, so two processes recovering at once cannot both win."""
        aside = self.path.with_name(f"{self.path.name}.stale.{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if self._parsed(aside) != holder:  # someone replaced it between our read and the rename: put theirs back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        """Removes the lock if it is still ours (a stale takeover may have replaced it)."""
        if not self.held:
            return
        self.held = False
        holder = self._parsed(self.path)
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    @staticmethod
    def _parsed(path: Path) -> dict | None:
        """A lock file's holder, None when it is gone or unreadable (the quiet read of release and takeover)."""
        try:
            return read_sealed_json(path, "")
        except (OSError, RunFileError):
            return None
