"""Training checkpoints, in one place: the format of one checkpoint, the store that commits and retains them, and
the Partial FC class-range files.

- :mod:`facescale.checkpoint.format` -- what one checkpoint holds (backbone, classifier, optimizers, progress, RNG,
  loader positions) and which files each rank reads on resume (:class:`TrainCheckpoint`).
- :mod:`facescale.checkpoint.store` -- where checkpoints live (a run root, local or ``s3://``, through
  ``facescale.storage``), committed only with every rank's receipt, retained by ``keep_last``
  (:class:`CheckpointStore`).
- :mod:`facescale.checkpoint.committed` -- reading them: whether one is committed, the newest committed one, a
  verified local copy (:func:`verify_checkpoint`, :func:`resolve_checkpoint`, :func:`local_copy`).
- :mod:`facescale.checkpoint.partial_fc` -- the sharded classifier's centers and optimizer state by class range, so
  a checkpoint written on W ranks loads onto any W'.
"""

from facescale.checkpoint.committed import (
    MANIFEST_NAME,
    IncompleteCheckpointError,
    checkpoint_name,
    local_copy,
    resolve_checkpoint,
    verify_checkpoint,
)
from facescale.checkpoint.format import (
    TrainCheckpoint,
    TrainProgress,
    is_sharded,
    load_backbone_state,
    unwrap,
)
from facescale.checkpoint.partial_fc import load_partial_fc, read_manifest, save_partial_fc
from facescale.checkpoint.store import CheckpointStore

__all__ = ["MANIFEST_NAME", "CheckpointStore", "IncompleteCheckpointError", "TrainCheckpoint", "TrainProgress",
           "checkpoint_name", "is_sharded", "load_backbone_state", "load_partial_fc", "local_copy", "read_manifest",
           "resolve_checkpoint", "save_partial_fc", "unwrap", "verify_checkpoint"]
