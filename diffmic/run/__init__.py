"""Run folders: `RunFolder` names every path in one and makes new run names (folder.py); beside it the run's
log (log.py: metrics.jsonl and the trackers), its one writer's lock (lock.py), and the import of a model trained
with the authors' code as a run folder (authors.py, which reads checkpoints and so imports torch on first use).
"""

from .folder import RunFolder, git_commit, provenance
from .lock import RunLock
from .log import MetricsLog, read_metrics, tracker_parameters

__all__ = ["MetricsLog", "RunFolder", "RunLock", "git_commit", "provenance", "read_metrics", "tracker_parameters"]
