"""The training checkpoint: everything that must survive a restart, saved and restored through one object.

Layout of one checkpoint directory (each rank writes its own files; :mod:`facescale.checkpoint.store` gathers them
into one checkpoint and commits it only with every rank's receipt):

    progress.json          step, epoch, step in epoch, world size at save, format version (rank 0)
    model.pt               backbone state dict (+ replicated classifier state dict, + ``arch``: backbone name and
                           embedding size, so a checkpoint path alone can rebuild the backbone) (rank 0)
    optimizer.pt           optimizer(s) of replicated parameters, and under ``"engine"`` the backbone engine's optimizer
                           state keyed by parameter name, gathered from every rank (world-size independent) (rank 0)
    rng_rank{r}.pt         torch / numpy / python RNG state and data-loader position of rank r (every rank)
    partial_fc*            Partial FC class-range files and their manifest (every rank; checkpoint/partial_fc.py)

Files sit flat in the directory: ranks upload concurrently, and a sub-directory that several ranks create at
the same moment was seen to lose one rank's file.

Where the checkpoint goes, and how it is committed so that a half-written one is never used, is the job of
:mod:`facescale.checkpoint.store`; this module only writes and reads the files of one checkpoint directory.

The sharded classifier (Partial FC) is saved by class range (:mod:`facescale.checkpoint.partial_fc`, every rank);
everything else is replicated and saved once by rank 0. On resume a rank reads only its share
(:meth:`TrainCheckpoint.files_for_rank`): the replicated files, its own ``rng_rank{r}.pt`` and the class-range files
that overlap its class range, so per-rank resume I/O grows with N / W, not N.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from facescale.checkpoint.committed import IncompleteCheckpointError
from facescale.checkpoint.partial_fc import file_class_range, load_partial_fc, ranges_overlap, save_partial_fc
from facescale.parallel.partial_fc import PartialFC

FORMAT_VERSION = 1
_RANK_FILE_RE = re.compile(r"^rng_rank(\d+)\.pt$")


@dataclass
class TrainProgress:
    """Where the run is: counts of optimizer steps and the data position."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    world_size: int = 1
    nonfinite_skipped: int = 0  # optimizer steps skipped for a NaN/inf loss or gradient (train.nonfinite: skip)
    resumes: int = 0  # how many times this run was resumed from a checkpoint (restarts after failures included)
    # This rank's loader position after the last batch it yielded (``FaceLoader.local_position()``: epoch, step,
    # raw-sample cursors). Cursors differ by rank, so it is saved in ``rng_rank{r}.pt``, not in progress.json.
    local_loader_position: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RankFiles:
    """Which files of a checkpoint one rank reads on load, as a filter on relative names (``local_copy(wanted=)``).

    Args:
        rank: The rank: of the per-rank files ``rng_rank{r}.pt`` only its own is wanted.
        classes: Its classifier's class range ``[start, end)``: only the Partial FC class-range files that overlap it
            are wanted; None wants every range file (a sharded classifier that does not say its range).
    """

    rank: int
    classes: tuple[int, int] | None = None

    def __call__(self, name: str) -> bool:
        if match := _RANK_FILE_RE.match(name):
            return int(match[1]) == self.rank
        if (saved := file_class_range(name)) is not None:
            return self.classes is None or ranges_overlap(saved, self.classes)
        return True  # replicated: model.pt, optimizer.pt, progress.json, partial_fc.json, ...

    def __str__(self) -> str:
        classes = "" if self.classes is None else f", classes [{self.classes[0]}, {self.classes[1]})"
        return f"the files of rank {self.rank}{classes}"


def is_sharded(classifier: nn.Module) -> bool:
    """Whether the classifier is sharded by class (Partial FC): every rank saves its range, no rank 0 copy."""
    return isinstance(unwrap(classifier), PartialFC)


def unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def load_backbone_state(directory: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The backbone state dict and ``arch`` record (empty for checkpoints that predate it) of a checkpoint."""
    path = Path(directory) / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a training checkpoint: no model.pt")
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state["backbone"], dict(state.get("arch") or {})


class TrainCheckpoint:
    """Saves and restores backbone, classifier, optimizers, progress and RNG as one checkpoint.

    Args:
        backbone: Backbone (possibly DDP-wrapped).
        classifier: Classifier (possibly DDP-wrapped, or Partial FC: sharded, saved by class range).
        optimizers: Named optimizers of replicated parameters (saved by rank 0).
        progress: Mutable progress record of the loop.
        arch: ``{"backbone": name, "embedding_size": n}`` written beside the weights (read by ``load_arch``).
        engine: The backbone engine (``facescale.train.engine``), when it owns the backbone's optimizer. Its state
            is gathered collectively, so with an engine every rank must call :meth:`save` and :meth:`load`.
    """

    def __init__(self, backbone: nn.Module, classifier: nn.Module, optimizers: dict[str, Any],
                 progress: TrainProgress, arch: dict[str, Any] | None = None, engine: Any = None) -> None:
        self.arch = dict(arch or {})
        self.engine = engine
        self.backbone = backbone
        self.classifier = classifier
        self.optimizers = optimizers
        self.progress = progress

    @property
    def _sharded(self) -> bool:
        return is_sharded(self.classifier)

    def files_for_rank(self, rank: int) -> RankFiles:
        """The files this rank reads in :meth:`load`, for ``local_copy(uri, wanted=...)``: the replicated files, its
        own ``rng_rank{rank}.pt``, and the Partial FC class-range files overlapping its class range in this run."""
        classifier = unwrap(self.classifier)
        start, num_local = getattr(classifier, "class_start", None), getattr(classifier, "num_local", None)
        return RankFiles(rank, None if start is None or num_local is None else (start, start + num_local))

    def save(self, directory: str | Path, rank: int) -> Path:
        """Writes this rank's part of the checkpoint into ``directory``; returns it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({**_rng_state(), "loader_position": self.progress.local_loader_position},
                   directory / f"rng_rank{rank}.pt")
        if self._sharded:
            head = unwrap(self.classifier)
            save_partial_fc(head, head.attached_optimizer, directory, rank)
        engine_state = self.engine.state_dict() if self.engine is not None else None  # collective
        if rank == 0:
            backbone_state = engine_state["backbone"] if engine_state else unwrap(self.backbone).state_dict()
            model_state: dict[str, Any] = {"backbone": backbone_state, "arch": self.arch}
            if not self._sharded:
                model_state["classifier"] = unwrap(self.classifier).state_dict()
            torch.save(model_state, directory / "model.pt")
            opt_state = {k: opt.state_dict() for k, opt in self.optimizers.items()}
            if engine_state:
                opt_state["engine"] = engine_state["optimizer"]
            torch.save(opt_state, directory / "optimizer.pt")
            shared = {k: v for k, v in asdict(self.progress).items() if not k.startswith("local_")}  # per rank
            (directory / "progress.json").write_text(json.dumps({"format_version": FORMAT_VERSION, **shared}, indent=2))
        return directory

    def load(self, directory: str | Path, rank: int) -> TrainProgress:
        """Restores from ``directory`` (saved on any world size); returns the restored progress.

        Raises:
            IncompleteCheckpointError: If ``rank`` existed when the checkpoint was saved but its ``rng_rank{rank}.pt``
                is missing (checked before anything is restored). A rank beyond the saved world size (an elastic
                resume onto more ranks) keeps its fresh seed.
        """
        directory = Path(directory)
        meta_path = directory / "progress.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"checkpoint {directory} has no progress.json: incomplete or not a checkpoint")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"checkpoint {directory}: format_version {meta.get('format_version')} "
                             f"!= supported {FORMAT_VERSION}")
        rng_file = directory / f"rng_rank{rank}.pt"
        if not rng_file.is_file() and rank < int(meta["world_size"]):
            raise IncompleteCheckpointError(f"checkpoint {directory}: {rng_file.name} is missing, but rank {rank} "
                                            f"was one of the {meta['world_size']} ranks that saved it: refusing to "
                                            f"resume rank {rank} without its RNG state and data position",
                                            str(directory), rng_file.name)  # fmt: skip
        model_state = torch.load(directory / "model.pt", map_location="cpu", weights_only=False)
        opt_state = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=False)
        if self.engine is not None:
            if "engine" not in opt_state:
                raise ValueError(f"checkpoint {directory} has no backbone optimizer state under 'engine' "
                                 "(written before engines existed): start from it with train.init_from instead")
            self.engine.load_state_dict({"backbone": model_state["backbone"], "optimizer": opt_state["engine"]})
        else:
            unwrap(self.backbone).load_state_dict(model_state["backbone"])
        if self._sharded:
            head = unwrap(self.classifier)
            load_partial_fc(head, head.attached_optimizer, directory)
        else:
            unwrap(self.classifier).load_state_dict(model_state["classifier"])
        for name, opt in self.optimizers.items():
            if name not in opt_state:
                raise ValueError(f"checkpoint {directory}: optimizer.pt has no state for optimizer {name!r} "
                                 f"(it holds {sorted(opt_state)})")
            opt.load_state_dict(opt_state[name])
        self.progress.local_loader_position = {}
        if rng_file.is_file():  # a rank that did not exist at save time keeps its fresh seed
            rank_state = torch.load(rng_file, weights_only=False)
            _set_rng_state(rank_state)
            self.progress.local_loader_position = dict(rank_state.get("loader_position") or {})  # absent: older
        for key in ("step", "epoch", "step_in_epoch", "world_size"):
            setattr(self.progress, key, int(meta[key]))
        for key in ("nonfinite_skipped", "resumes"):  # absent in checkpoints that predate them
            setattr(self.progress, key, int(meta.get(key, 0)))
        return self.progress
