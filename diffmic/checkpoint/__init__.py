"""Model checkpoints: the one owner of their names, files, record, saving, loading and pruning.

The trainer resumes and saves through `CheckpointManager` (with `CheckpointPolicy` saying when); evaluation
and prediction read a checkpoint with `find_checkpoint` and `build_model_from_checkpoint`; anyone with a
model's weights writes a checkpoint `diffmic eval` reads and `diffmic train` fine-tunes from with
`write_weights_checkpoint`. Every file is safetensors or JSON (DeepSpeed's own files load weights-only).
"""

from .files import load_tensors, load_weights_only
from .manager import CheckpointManager, Start, choose_start, load_for_fine_tuning
from .policy import CheckpointPolicy
from .record import (
    BEST_FILE,
    MARKER,
    MODEL_FILE,
    Checkpoint,
    best_record,
    best_step,
    build_model_from_checkpoint,
    checkpoint_root,
    complete_checkpoints,
    find_checkpoint,
    load_weights,
    read_checkpoint,
    remove_partials,
    verify,
    without_pretrained,
    write_best_checkpoint,
    write_weights_checkpoint,
)

__all__ = ["BEST_FILE", "MARKER", "MODEL_FILE", "Checkpoint", "CheckpointManager", "CheckpointPolicy", "Start",
           "best_record", "best_step", "build_model_from_checkpoint", "checkpoint_root", "choose_start",
           "complete_checkpoints", "find_checkpoint", "load_for_fine_tuning", "load_tensors", "load_weights",
           "load_weights_only", "read_checkpoint", "remove_partials", "verify", "without_pretrained",
           "write_best_checkpoint", "write_weights_checkpoint"]
