"""Local paths checked on the nodes that read them, before a multi-node run starts.

A local path is a per-node fact (DESIGN.md, cluster rules): that the driver sees ``/data/ms1mv3`` says nothing about
the node that will host rank 3. So when the Ray cluster has more than one node, every local path a run reads or
writes is checked with one small Ray task per node that can host a worker, pinned there:

- an input (the dataset, a verification file, a checkpoint, a teacher cache) must exist there and be the same
  thing the driver sees: the same manifest digest, or a key file of the same size;
- a directory the run writes (checkpoint storage, a local MLflow store, a teacher cache being built) must be shared:
  the driver writes a probe file into it, and each node must see that probe and be able to write there itself.

Every problem found names the config key, the path and the node, and all of them are reported at once, before any
worker trains. On a one-node cluster nothing is checked (nothing to compare with), at no cost. ``s3://`` paths are
not local and are never checked here.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger("facescale.node_check")

PROBE_PREFIX = ".facescale-probe-"
TASK_TIMEOUT_S = 120.0  # a node that does not answer by then is reported, not waited for
Kind = Literal["dataset", "file", "shared_dir"]


class NodePathError(FileNotFoundError):
    """A local path that some node hosting workers cannot use; the message names the key, path and node."""


@dataclass(frozen=True)
class PathSpec:
    """One local path of a run and what every worker node must find there.

    Attributes:
        key: Config key it comes from (``data.root``), named in errors.
        path: Absolute path as the driver sees it.
        kind: ``dataset``: a shard set whose manifest digest must match; ``file``: a file whose size must match;
            ``shared_dir``: a directory the run writes, which every node must see and be able to write.
        shown: How the user wrote it (``runs``), for the message; defaults to ``path``.
    """

    key: str
    path: str
    kind: Kind
    shown: str = ""


@dataclass(frozen=True)
class WorkerNode:
    """A node that can host workers: Ray node id, address, and how many of the run's workers fit there."""

    node_id: str
    address: str
    capacity: int

    def describe(self, num_workers: int) -> str:
        return f"node {self.address} (id {self.node_id[:8]}; up to {min(self.capacity, num_workers)} of " \
               f"{num_workers} workers there)"


def worker_nodes(per_worker: dict[str, float], nodes: list[dict[str, Any]]) -> list[WorkerNode]:
    """The alive nodes of ``ray.nodes()`` whose total resources fit at least one worker of ``per_worker``."""
    out = []
    for node in nodes:
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        fits = [math.floor(have.get(name, 0.0) / need + 1e-9) for name, need in per_worker.items() if need > 0]
        capacity = min(fits) if fits else 0
        if capacity > 0:
            out.append(WorkerNode(node["NodeID"], node.get("NodeManagerAddress", "?"), capacity))
    return out


def _look(spec: PathSpec, driver_probe: str | None) -> Any:
    """What this process sees at ``spec.path``: a digest, a size or a probe name; ``Problem`` when unusable.

    For a ``shared_dir``, the driver (``driver_probe`` None) creates the directory and leaves a probe file there;
    a node must see the driver's probe and be able to write (and remove) one of its own.
    """
    path = Path(spec.path)
    if spec.kind == "dataset":
        from facescale.data import load_manifest
        from facescale.data.errors import DataError

        try:
            return load_manifest(path).digest
        except (DataError, OSError) as exn:
            return Problem(f"cannot be read as a dataset ({exn})")
    if spec.kind == "file":
        try:
            return path.stat().st_size
        except OSError:
            return Problem("does not exist")
    try:
        path.mkdir(parents=True, exist_ok=True)
        mine = path / f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        mine.write_text("facescale node check\n")
    except OSError as exn:
        return Problem(f"is not writable ({exn.strerror or exn})")
    if driver_probe is None:
        return mine.name  # stays until every node has looked
    mine.unlink(missing_ok=True)
    return driver_probe if (path / driver_probe).is_file() else Problem("is not visible")


@dataclass(frozen=True)
class Problem:
    """Why a path cannot be used where it was looked at."""

    why: str


def _node_task(specs: list[PathSpec], expected: list[Any]) -> list[tuple[int, str]]:
    """Runs on one node: ``(spec index, reason)`` of every path that differs from what the driver saw."""
    problems = []
    for i, (spec, want) in enumerate(zip(specs, expected)):
        seen = _look(spec, want if spec.kind == "shared_dir" else None)
        if isinstance(seen, Problem):
            problems.append((i, seen.why))
        elif seen != want:
            what = "a dataset with manifest digest" if spec.kind == "dataset" else "a file of"
            unit = "" if spec.kind == "dataset" else " bytes"
            problems.append((i, f"holds {what} {str(seen)[:12]}{unit}, the driver sees {str(want)[:12]}{unit}"))
    return problems


def check_paths_on_nodes(specs: list[PathSpec], per_worker: dict[str, float], num_workers: int) -> int:
    """Checks every local path of ``specs`` on every node that can host one of the run's workers.

    Args:
        specs: The run's local paths (``s3://`` ones must be left out by the caller).
        per_worker: Resources one worker needs (``{"CPU": 1, "GPU": 1, "my_slot": 1}``), to find the nodes.
        num_workers: Workers of the run (named in messages).

    Returns:
        The number of nodes checked (0 on a one-node cluster: nothing is checked).

    Raises:
        NodePathError: Naming key, path and node for every path some node cannot use.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    all_nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(all_nodes) <= 1 or not specs:
        return 0
    nodes = worker_nodes(per_worker, all_nodes)
    expected = [_look(spec, None) for spec in specs]
    probes = [(spec, e) for spec, e in zip(specs, expected) if spec.kind == "shared_dir" and isinstance(e, str)]
    try:
        if bad := [f"{s.key}={s.shown or s.path}: {s.path} {e.why} on the driver" for s, e in zip(specs, expected)
                   if isinstance(e, Problem)]:
            raise NodePathError("\n".join(bad))
        task = ray.remote(num_cpus=0, max_retries=0)(_node_task)
        pending = {node.node_id: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node.node_id, soft=False)).remote(specs, expected) for node in nodes}
        problems: list[str] = []
        for node in nodes:
            try:
                found = ray.get(pending[node.node_id], timeout=TASK_TIMEOUT_S)
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError) as exn:
                problems.append(f"{node.describe(num_workers)} could not check the run's paths: {exn!r}")
                continue
            problems += [f"{specs[i].key}={specs[i].shown or specs[i].path}: {specs[i].path} {why} on "
                         f"{node.describe(num_workers)}; {_advice(specs[i])}" for i, why in found]
    finally:
        for spec, probe in probes:
            Path(spec.path, probe).unlink(missing_ok=True)
    if problems:
        raise NodePathError("\n".join(["local paths that not every node can use (a local path is a per-node "
                                       "fact; nodes share no disk unless they mount the same filesystem):",
                                       *problems]))
    log.info("checked %d local paths on %d nodes: every node sees the same files", len(specs), len(nodes))
    return len(nodes)


def _advice(spec: PathSpec) -> str:
    if spec.key.startswith("tracking."):
        return "use an MLflow tracking server (tracking.uri=http://…) or a directory every node mounts"
    return "use s3://… or a directory every node mounts"


def is_local(path: str | None) -> bool:
    """A path on a node's filesystem (not a URL such as ``s3://``)."""
    return bool(path) and "://" not in str(path)


