"""Synthetic 1:N identification: enrolled, non-mated and distractor identities drawn by the synthetic generator.

Identities come from the generator's held-out stream (``facescale.data.synth.sample_identities(...,
held_out=True)``), so none is a training class. Identity ``i`` of the set renders its samples with the sample
streams of identity ``ID_OFFSET + i``, far from any training or ``verification.bin`` sample stream. Layout:

    identities [0, E)             enrolled: sample 0 in the gallery, samples 1..P as mated probes
    identities [E, E + U)         not enrolled: samples 1..P as non-mated probes
    identities [E + U, E + U + R) rendered distractors: sample 0 each

Distractors beyond the R rendered ones (up to a million) are :class:`GaussianDistractors` fitted to the rendered
distractors' embeddings: a forward pass per distractor would take hours on a CPU, a matrix multiply per chunk
takes seconds, and a fitted Gaussian keeps the embedding space's anisotropy that uniform random unit vectors lack
(uniform vectors in 512-D score about N(0, 1/512) against any probe and would make the curve look flat).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import simplejpeg
import torch

from facescale.eval.identification import (
    DISTRACTOR_COUNTS,
    FPIR_TARGETS,
    GaussianDistractors,
    IdentificationResult,
    array_chunks,
    identify,
)
from facescale.eval.verification import compute_embeddings

ID_OFFSET = 1_000_000_000


@dataclass
class SyntheticIdentification:
    """What was rendered for :func:`synthetic_identification`, and the result."""

    result: IdentificationResult
    num_enrolled: int
    num_non_mated_identities: int
    num_rendered_distractors: int
    num_gaussian_distractors: int
    probes_per_identity: int


def render_faces(identities: Sequence[int], samples: Sequence[int], seed: int, difficulty: float,
                 total_identities: int) -> np.ndarray:
    """Renders sample ``samples[k]`` of identity ``identities[k]`` (JPEG round trip, like training images).

    Args:
        identities: Identity indices in ``[0, total_identities)``.
        samples: Sample index per identity.
        seed: Generator seed.
        difficulty: Nuisance strength in ``[0, 1]``.
        total_identities: Size of the identity set (latents depend on it through the look-alike draw).

    Returns:
        uint8 ``[len(identities), 112, 112, 3]``.
    """
    from facescale.data.synth import FaceRenderer, render_jpeg, sample_identities

    latents, _ = sample_identities(total_identities, seed, difficulty, held_out=True)
    renderer = FaceRenderer()
    out = np.empty((len(identities), 112, 112, 3), np.uint8)
    for k, (i, s) in enumerate(zip(identities, samples)):
        jpeg = render_jpeg(renderer, latents[i], seed, ID_OFFSET + int(i), int(s), difficulty)
        out[k] = simplejpeg.decode_jpeg(jpeg, colorspace="RGB")
    return out


def synthetic_identification(model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
                             num_enrolled: int = 100, num_non_mated: int = 100, num_rendered_distractors: int = 1000,
                             max_distractors: int = 1_000_000, probes_per_identity: int = 1, seed: int = 0,
                             difficulty: float = 0.5, batch_size: int = 128, device: torch.device | str = "cpu",
                             counts: Sequence[int] = DISTRACTOR_COUNTS, fpir_targets: Sequence[float] = FPIR_TARGETS,
                             progress: bool = True) -> SyntheticIdentification:
    """Renders a synthetic gallery, probes and distractors, embeds them with ``model`` and runs :func:`identify`.

    Args:
        model: Backbone.
        num_enrolled: Enrolled identities (one gallery image each).
        num_non_mated: Identities searched for but not enrolled.
        num_rendered_distractors: Distractor identities rendered and embedded.
        max_distractors: Total distractors; those beyond the rendered ones are fitted-Gaussian embeddings.
        probes_per_identity: Probe images per enrolled and per non-mated identity.
        seed: Generator seed.
        difficulty: Generator difficulty in ``[0, 1]`` (look-alike share and nuisance).
        batch_size: Images per forward pass.
        device: Device for the model.
        counts: Distractor counts of the rank-1 curve (the stream ends at ``max_distractors``).
        fpir_targets: FPIR targets.
        progress: Show progress bars.

    Returns:
        The result and the composition of the set.
    """
    if num_enrolled < 1 or probes_per_identity < 1:
        raise ValueError(f"need num_enrolled >= 1 and probes_per_identity >= 1, got {num_enrolled}, "
                         f"{probes_per_identity}")
    if num_rendered_distractors < 0 or num_non_mated < 0 or max_distractors < 0:
        raise ValueError("identity and distractor counts must be >= 0")
    num_rendered = min(num_rendered_distractors, max_distractors)
    total = num_enrolled + num_non_mated + num_rendered
    args = {"seed": seed, "difficulty": difficulty, "total_identities": total}

    def embed(ids: np.ndarray, samples: np.ndarray) -> np.ndarray:
        chunks = []
        step = max(batch_size, 256)
        for s in range(0, len(ids), step):  # render and embed in slices: images never pile up in memory
            imgs = render_faces(ids[s:s + step], samples[s:s + step], **args)
            chunks.append(compute_embeddings(model, imgs, batch_size=batch_size, device=device))
        return np.concatenate(chunks) if chunks else np.empty((0, 0), np.float32)

    enrolled = np.arange(num_enrolled)
    gallery = embed(enrolled, np.zeros(num_enrolled, np.int64))
    searched = np.arange(num_enrolled + num_non_mated)
    probe_ids = np.repeat(searched, probes_per_identity)
    probe_samples = np.tile(np.arange(1, probes_per_identity + 1), len(searched))
    probes = embed(probe_ids, probe_samples)
    rendered = embed(np.arange(num_enrolled + num_non_mated, total), np.zeros(num_rendered, np.int64))
    num_gaussian = 0
    stream: Iterator[np.ndarray] = array_chunks(rendered) if len(rendered) else iter(())
    if max_distractors > num_rendered:
        if num_rendered < 2:
            raise ValueError(f"fitting {max_distractors - num_rendered} Gaussian distractors needs at least 2 "
                             f"rendered distractors, got {num_rendered}")
        num_gaussian = max_distractors - num_rendered
        stream = chain(stream, GaussianDistractors.fit(rendered, seed=seed).chunks(num_gaussian))
    result = identify(gallery, enrolled, probes, probe_ids, stream,
                      counts=counts, fpir_targets=fpir_targets, progress=progress)
    return SyntheticIdentification(result=result, num_enrolled=num_enrolled, num_non_mated_identities=num_non_mated,
                                   num_rendered_distractors=num_rendered, num_gaussian_distractors=num_gaussian,
                                   probes_per_identity=probes_per_identity)


def describe(run: SyntheticIdentification) -> dict[str, Any]:
    """The composition of a synthetic run as flat parameters (for logs and MLflow)."""
    return {"enrolled": run.num_enrolled, "non_mated_identities": run.num_non_mated_identities,
            "rendered_distractors": run.num_rendered_distractors,
            "gaussian_distractors": run.num_gaussian_distractors, "probes_per_identity": run.probes_per_identity}
