"""World-size-independent checkpoints of Partial FC centers and their optimizer state.

Each rank writes its class range as ``partial_fc_classes_<start>_<end>.pt`` (center rows plus every row-indexed
optimizer state tensor) into the trainer's checkpoint directory; rank 0 then writes ``partial_fc.json``, the
manifest: num_classes, embedding_size, dtype, the ranges and their files, the sampler step, scalar optimizer state
and the margin's state (CurricularFace's ``t``, AdaFace's norm EMA). With sub-centers (K rows per class, class-major)
a range file holds its classes' K rows each and their sub-center counts; the manifest records K, which must match
on load. The centers keep their dtype (fp32 or bf16, ``classifier.center_dtype``) in the range files; loading them
into a module of the other dtype converts them explicitly and logs it (fp32 -> bf16 rounds to nearest; bf16 -> fp32
is exact). Hyperparameters (lr, momentum) are recorded for reference but
not restored: the run's config and scheduler own them. Loading reads whichever range files overlap this rank's range,
memory-mapped, so a checkpoint written by W ranks loads onto any W'.

The trainer's checkpoint object calls these two functions; users never handle the files themselves.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from facescale.parallel.dist import barrier, class_range

if TYPE_CHECKING:  # annotations only
    from facescale.parallel.partial_fc import PartialFC

MANIFEST_NAME = "partial_fc.json"
FORMAT_VERSION = 1
_RANGE_FILE_RE = re.compile(r"^partial_fc_classes_(\d+)_(\d+)\.pt$")
log = logging.getLogger("facescale.checkpoint.partial_fc")


def _range_file(start: int, end: int) -> str:
    return f"partial_fc_classes_{start:010d}_{end:010d}.pt"


def file_class_range(name: str) -> tuple[int, int] | None:
    """The classes ``[start, end)`` that a checkpoint file of that name holds; None if it is no class-range file."""
    match = _RANGE_FILE_RE.match(name)
    return (int(match[1]), int(match[2])) if match else None


def ranges_overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether class ranges ``[a0, a1)`` and ``[b0, b1)`` share a class."""
    return max(a[0], b[0]) < min(a[1], b[1])


def _split_state(optimizer: torch.optim.Optimizer | None, pfc: PartialFC) -> tuple[dict, dict]:
    """Optimizer state of the centers split into row-indexed tensors and scalars (identical on every rank)."""
    rows, scalars = {}, {}
    state = optimizer.state.get(pfc.weight, {}) if optimizer is not None else {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == pfc.weight.shape[0]:
            rows[key] = value.detach().cpu()
        elif torch.is_tensor(value) and value.numel() == 1:
            scalars[key] = {"value": value.item(), "dtype": str(value.dtype).removeprefix("torch.")}
        else:
            raise ValueError(f"cannot checkpoint optimizer state {key!r} of the Partial FC centers by class range")
    return rows, scalars


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_partial_fc(pfc: PartialFC, optimizer: torch.optim.Optimizer | None, directory: str | os.PathLike,
                    rank: int | None = None) -> Path:
    """Writes this rank's class range and (rank 0) the manifest; every rank of ``pfc``'s group must call it.

    Args:
        pfc: The Partial FC module.
        optimizer: Optimizer holding the centers' state, or ``None``.
        directory: The trainer's checkpoint directory (shared by all ranks).
        rank: This rank, checked against ``pfc.rank`` when given.

    Returns:
        Path of the manifest.
    """
    if rank is not None and rank != pfc.rank:
        raise ValueError(f"save_partial_fc called with rank={rank} but the module is rank {pfc.rank}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    row_state, scalar_state = _split_state(optimizer, pfc)
    class_end = pfc.class_start + pfc.num_local
    payload = {"class_start": pfc.class_start, "class_end": class_end, "weight": pfc.weight.detach().cpu(),
               "optimizer_state": row_state}
    if pfc.subcenters is not None:  # per class: rides with the class range, so it reshards with the centers
        payload["subcenter_hits"] = pfc.subcenters.hits.detach().cpu()
        payload["subcenter_dominant"] = pfc.subcenters.dominant.detach().cpu()
    _write_atomic(directory / _range_file(pfc.class_start, class_end), lambda tmp: torch.save(payload, tmp))
    # NOTE: barrier -- every range file must be on disk before rank 0 publishes the manifest that lists it.
    barrier(pfc.process_group)
    manifest_path = directory / MANIFEST_NAME
    if pfc.rank == 0:
        ranges = [class_range(pfc.num_classes, r, pfc.world_size) for r in range(pfc.world_size)]
        margin = pfc.margin_loss
        margin_state = ({k: v.tolist() for k, v in margin.state_dict().items()}
                        if isinstance(margin, torch.nn.Module) else {})
        manifest = {
            "format_version": FORMAT_VERSION,
            "num_classes": pfc.num_classes,
            "embedding_size": pfc.embedding_size,
            "dtype": str(pfc.weight.dtype).removeprefix("torch."),
            "world_size": pfc.world_size,
            "ranges": [{"start": s, "end": e, "file": _range_file(s, e)} for s, e in ranges],
            "sampler_step": pfc.sampler_step,
            "optimizer": None if optimizer is None else {
                "class": type(optimizer).__name__,
                "param_group": {k: v for k, v in optimizer.param_groups[0].items() if k != "params"},
                "scalar_state": scalar_state,
            },
            "margin_state": margin_state,
            "subcenters": pfc.num_subcenters,
            "subcenter_dominant_only": int(pfc.subcenters.cleaning) if pfc.subcenters is not None else 0,
        }
        _write_atomic(manifest_path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
    # NOTE: barrier -- no rank reports the checkpoint complete before the manifest exists.
    barrier(pfc.process_group)
    return manifest_path


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The Partial FC manifest of a checkpoint directory."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no Partial FC manifest {path}")
    return json.loads(path.read_text())


def load_partial_fc(pfc: PartialFC, optimizer: torch.optim.Optimizer | None, directory: str | os.PathLike) -> None:
    """Loads this rank's class range (from any number of saved ranges) into ``pfc`` and ``optimizer``.

    Args:
        pfc: The Partial FC module, built for the current world size.
        optimizer: Optimizer of the centers (its state is replaced), or ``None`` to load the centers only.
        directory: Checkpoint directory written by :func:`save_partial_fc`.

    Raises:
        ValueError: The checkpoint's num_classes, embedding size or optimizer differ from the module's.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    _check_compatible(pfc, optimizer, manifest, directory)
    overlapping = _overlapping_ranges(pfc, manifest, directory)
    blobs = [torch.load(directory / e["file"], map_location="cpu", mmap=True, weights_only=True) for e in overlapping]
    saved_optimizer = manifest["optimizer"]
    # A checkpoint saved before the first optimizer step has no state: the optimizer then starts fresh.
    load_state = (optimizer is not None and saved_optimizer is not None
                  and bool(blobs[0]["optimizer_state"] or saved_optimizer["scalar_state"]))
    layout = _checked_state_layout(pfc, optimizer, saved_optimizer, blobs[0]) if load_state else {}
    row_state = {k: torch.empty(v.shape, dtype=v.dtype, device=pfc.weight.device)
                 for k, v in layout.items() if v.dim()}
    hits, dominant = _copy_ranges(pfc, overlapping, blobs, row_state)
    del blobs
    if pfc.subcenters is not None:
        pfc.subcenters.load_block(hits, dominant, bool(manifest["subcenter_dominant_only"]))
    pfc.sampler_step = int(manifest["sampler_step"])
    _log_dtype_conversion(pfc, manifest.get("dtype", "float32"), directory)
    _restore_margin(pfc, manifest["margin_state"])
    if not load_state:
        return
    for name, scalar in saved_optimizer["scalar_state"].items():
        row_state[name] = torch.tensor(scalar["value"], dtype=getattr(torch, scalar["dtype"]))
    optimizer.state[pfc.weight] = row_state


def _check_compatible(pfc: PartialFC, optimizer: torch.optim.Optimizer | None, manifest: dict[str, Any],
                      directory: Path) -> None:
    """Refuses a checkpoint of other classes, embedding size, sub-center count, optimizer or margin state."""
    for key, ours in (("num_classes", pfc.num_classes), ("embedding_size", pfc.embedding_size)):
        if manifest[key] != ours:
            raise ValueError(f"Partial FC checkpoint {directory / MANIFEST_NAME} has {key}={manifest[key]} but the "
                             f"model is configured with {key}={ours}")
    saved_k = int(manifest.get("subcenters", 1))  # manifests written before sub-centers existed: K = 1
    if saved_k != pfc.num_subcenters:
        raise ValueError(f"Partial FC checkpoint {directory / MANIFEST_NAME} has subcenters={saved_k} but the model is "
                         f"configured with classifier.subcenters={pfc.num_subcenters}")
    saved_optimizer = manifest["optimizer"]
    if optimizer is not None and saved_optimizer is not None and saved_optimizer["class"] != type(optimizer).__name__:
        raise ValueError(f"Partial FC checkpoint {directory} holds {saved_optimizer['class']} state, the run uses "
                         f"{type(optimizer).__name__}")
    margin = pfc.margin_loss
    margin_state = margin.state_dict() if isinstance(margin, torch.nn.Module) else {}
    if set(margin_state) != set(manifest["margin_state"]):
        raise ValueError(f"Partial FC checkpoint {directory} has margin state {sorted(manifest['margin_state'])}, the "
                         f"configured margin {type(margin).__name__} has {sorted(margin_state)}")


def _overlapping_ranges(pfc: PartialFC, manifest: dict[str, Any], directory: Path) -> list[dict[str, Any]]:
    """The manifest's range entries that hold classes of this rank's range; they must cover it, their files exist."""
    start, end = pfc.class_start, pfc.class_start + pfc.num_local
    overlapping = [e for e in manifest["ranges"] if ranges_overlap((start, end), (e["start"], e["end"]))]
    covered = sum(min(end, e["end"]) - max(start, e["start"]) for e in overlapping)
    if covered != pfc.num_local:
        raise ValueError(f"Partial FC checkpoint {directory} covers {covered} of classes [{start}, {end})")
    if missing := [e["file"] for e in overlapping if not (directory / e["file"]).is_file()]:
        raise FileNotFoundError(f"Partial FC checkpoint {directory}: {missing[0]}, which holds classes of "
                                f"[{start}, {end}) (this rank's), is missing")
    return overlapping


def _checked_state_layout(pfc: PartialFC, optimizer: torch.optim.Optimizer, saved_optimizer: dict[str, Any],
                          blob: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The saved optimizer state's shapes and dtypes for this rank's rows, checked by the optimizer."""
    # Refuse a mismatched optimizer before touching anything (meta tensors carry only shape and dtype).
    layout = {k: torch.empty((pfc.weight.shape[0], *v.shape[1:]), dtype=v.dtype, device="meta")
              for k, v in blob["optimizer_state"].items()}
    layout.update({k: torch.empty((), dtype=getattr(torch, v["dtype"]), device="meta")
                   for k, v in saved_optimizer["scalar_state"].items()})
    check = getattr(optimizer, "check_state", None)
    if check is not None:
        check(pfc.weight, layout)
    return layout


def _copy_ranges(pfc: PartialFC, overlapping: list[dict[str, Any]], blobs: list[dict[str, Any]],
                 row_state: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Copies this rank's classes from the range files into the centers and ``row_state``; returns the sub-center
    counts and dominant sub-centers of those classes (None, None without sub-centers)."""
    start, end = pfc.class_start, pfc.class_start + pfc.num_local
    k, sub = pfc.num_subcenters, pfc.subcenters
    hits = dominant = None
    if sub is not None:
        hits, dominant = torch.empty_like(sub.hits), torch.empty_like(sub.dominant)
    with torch.no_grad():
        for entry, blob in zip(overlapping, blobs):
            lo, hi = max(start, entry["start"]), min(end, entry["end"])
            src, dst = slice(lo - entry["start"], hi - entry["start"]), slice(lo - start, hi - start)
            # Center rows (and their optimizer state) are K per class, class-major.
            src_rows, dst_rows = slice(src.start * k, src.stop * k), slice(dst.start * k, dst.stop * k)
            pfc.weight[dst_rows] = blob["weight"][src_rows]
            for key, value in row_state.items():
                value[dst_rows] = blob["optimizer_state"][key][src_rows]
            if sub is not None:
                hits[dst] = blob["subcenter_hits"][src]
                dominant[dst] = blob["subcenter_dominant"][src]
    return hits, dominant


def _log_dtype_conversion(pfc: PartialFC, saved_dtype: str, directory: Path) -> None:
    if saved_dtype != str(pfc.weight.dtype).removeprefix("torch."):
        how = "rounded to nearest" if pfc.weight.dtype == torch.bfloat16 else "exact"
        log.warning("Partial FC checkpoint %s holds %s centers; converted to %s for this run "
                    "(classifier.center_dtype; %s), classes [%d, %d)", directory, saved_dtype,
                    str(pfc.weight.dtype).removeprefix("torch."), how, pfc.class_start,
                    pfc.class_start + pfc.num_local)


def _restore_margin(pfc: PartialFC, saved: dict[str, Any]) -> None:
    """Loads the margin's saved state (CurricularFace's ``t``, AdaFace's norm EMA) in its own dtype and device."""
    margin = pfc.margin_loss
    margin_state = margin.state_dict() if isinstance(margin, torch.nn.Module) else {}
    if margin_state:
        margin.load_state_dict({k: torch.tensor(v, dtype=margin_state[k].dtype, device=margin_state[k].device)
                                for k, v in saved.items()})
