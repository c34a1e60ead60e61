"""Builds a teacher-embedding cache in parallel on the Ray cluster: one task per group of shards.

The cache format lives in ``facescale.distill.cache`` and the per-shard work in ``facescale.distill.cache_write``;
this module only spreads that work over Ray workers (the teacher travels through the object store, so workers need
no MLflow access) and shows progress as shards finish. The tasks run on any node and write their shard files
straight into the cache, so the cache is an ``s3://`` prefix or a directory every node mounts at the same path; a
local directory that only some nodes see is caught at the commit (``commit_cache``), naming the shard files the
driver cannot see.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from torch import nn
from tqdm import tqdm

from facescale.config import ScalingConfig
from facescale.data.manifest import Manifest
from facescale.distill.cache import (
    CacheMeta,
    cache_uri,
    check_cache,
    clear_cache,
    is_s3,
    list_cache,
    read_build_marker,
    read_meta,
    shard_name,
    write_build_marker,
)
from facescale.distill.cache_write import commit_cache, embed_shard

log = logging.getLogger("facescale.teacher_cache")


def _embed_shards(teacher: nn.Module, manifest_json: dict[str, Any], root: str, shard_ids: list[int],
                  cache_dir: str, batch_size: int, num_threads: int, use_gpu: bool,
                  on_error: str) -> dict[int, tuple[int, int]]:  # fmt: skip
    """Ray task: embeds a group of shards into their cache files; ``{shard: (embedded, skipped)}``."""
    import torch

    torch.set_num_threads(num_threads)
    device = torch.device("cuda") if use_gpu else torch.device("cpu")
    teacher = teacher.to(device)
    manifest = Manifest.model_validate(manifest_json).with_root(root)
    return {i: embed_shard(teacher, manifest, i, cache_dir, batch_size, device, on_error) for i in shard_ids}


def _prepare(cache_dir: str, teacher_model_id: str, manifest: Manifest, problem: str) -> None:
    """Keeps the shard files of an interrupted build of the same teacher and data; clears anything else."""
    if read_build_marker(cache_dir) == {"teacher_model_id": teacher_model_id, "dataset_digest": manifest.digest}:
        log.info("teacher cache %s: resuming an interrupted build", cache_dir)
        return
    if list_cache(cache_dir):
        log.warning("teacher cache %s is rebuilt: %s", cache_dir, problem)
    clear_cache(cache_dir)
    write_build_marker(cache_dir, teacher_model_id, manifest.digest)


def build_teacher_cache(teacher: nn.Module, teacher_model_id: str, manifest: Manifest, cache_dir: str | Path,
                        embedding_size: int, scaling: ScalingConfig, batch_size: int = 128,
                        on_error: str = "fail") -> tuple[CacheMeta, bool]:
    """Makes sure ``cache_dir`` holds this teacher's embeddings of this dataset; computes what is missing.

    A complete cache for the same teacher model id and dataset digest is reused as it is. A cache made by another
    teacher or for other data is reported (warning, with the reason) and rebuilt. Shard files of an interrupted
    build of the same teacher and data are kept, so the build resumes.

    Args:
        teacher: Teacher backbone.
        teacher_model_id: Identity of the teacher (its MLflow model id).
        manifest: Training-set manifest (with its root).
        cache_dir: Cache directory (created; shared by every node) or ``s3://bucket/prefix``.
        embedding_size: Teacher embedding size.
        scaling: Ray resources: one task per worker, ``cpus_per_worker`` threads each, a GPU each with ``use_gpu``.
        batch_size: Images per teacher forward pass.
        on_error: The data error policy (``data.on_error``).

    Returns:
        The cache metadata and whether anything was computed now (False: reused as it was).
    """
    import ray

    cache_dir = cache_uri(cache_dir)
    if not is_s3(cache_dir):
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    problem = check_cache(cache_dir, teacher_model_id, manifest)
    if problem is None:
        meta = read_meta(cache_dir)
        assert meta is not None
        log.info("teacher cache %s reused: teacher %s, dataset %s", cache_dir, teacher_model_id, manifest.digest[:12])
        return meta, False
    _prepare(cache_dir, teacher_model_id, manifest, problem)
    present = list_cache(cache_dir)
    todo = [i for i in range(len(manifest.shards)) if shard_name(i) not in present]
    counts: dict[int, tuple[int, int]] = {}
    t0 = time.perf_counter()
    if todo:
        num_tasks = max(1, min(scaling.num_workers, len(todo)))
        task = ray.remote(_embed_shards).options(num_cpus=scaling.cpus_per_worker,
                                                 num_gpus=1 if scaling.use_gpu else 0)  # fmt: skip
        teacher_ref = ray.put(teacher.cpu())
        manifest_json = manifest.model_dump(mode="json")
        threads = max(1, int(scaling.cpus_per_worker))
        # Shards are dealt in small groups, so progress moves and a slow worker does not hold the tail.
        size = max(1, len(todo) // (4 * num_tasks))
        groups = [todo[start:start + size] for start in range(0, len(todo), size)]
        pending = [task.remote(teacher_ref, manifest_json, str(manifest.root), g, cache_dir, batch_size, threads,
                               scaling.use_gpu, on_error) for g in groups]  # fmt: skip
        with tqdm(total=len(todo), desc="teacher embeddings", unit="shard") as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                finished = ray.get(done[0])
                counts.update(finished)
                bar.update(len(finished))
    # Shards kept from an interrupted build are counted by reading them back (commit_cache).
    meta = commit_cache(cache_dir, teacher_model_id, manifest, embedding_size, counts)
    log.info("teacher cache %s built: %d samples (%d skipped) in %.1f s", cache_dir, meta.num_samples,
             meta.skipped_samples, time.perf_counter() - t0)
    return meta, True
