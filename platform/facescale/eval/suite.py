"""Runs one model through the protocols users report: ``.bin`` verification, IJB templates, 1:N identification.

Each ``run_*`` function takes a backbone and files, and returns a report object that
:mod:`facescale.eval.report` turns into tables, flat metrics and plots.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facescale.data.transforms import normalize_images
from facescale.eval.identification import (
    DISTRACTOR_COUNTS,
    FPIR_TARGETS,
    IdentificationResult,
    array_chunks,
    identify,
)
from facescale.eval.ijb import (
    WEIGHTING_DESCRIPTIONS,
    IjbWeighting,
    MetaFileError,
    TemplateMedia,
    pool_templates,
    read_detector_scores,
    read_template_media,
    read_template_pairs,
    scores_for_images,
    template_pair_scores,
    weight_features,
)
from facescale.eval.images import ImageFolderError, list_identity_folder, list_images, read_aligned_image, read_images
from facescale.eval.quality import REJECT_FRACTIONS, accuracy_vs_rejection
from facescale.eval.rates import FPR_TARGETS, Roc, compute_roc, pair_scores, tpr_at_fpr
from facescale.eval.verification import compute_embeddings, evaluate, load_bin


@dataclass
class BinReport:
    """Verification of one ``.bin`` set.

    Attributes:
        name: Set name (file stem).
        path: The file.
        verification: :func:`facescale.eval.verification.evaluate` result.
        norm_mean: Mean raw embedding norm over the set's images.
        roc: ROC of all pairs by cosine similarity.
        tpr_at_fpr: :func:`facescale.eval.rates.tpr_at_fpr` result.
        quality: :func:`facescale.eval.quality.accuracy_vs_rejection` rows.
    """

    name: str
    path: str
    verification: dict[str, Any]
    norm_mean: float
    roc: Roc
    tpr_at_fpr: dict[float, dict[str, float]]
    quality: list[dict[str, Any]]


@dataclass
class IjbReport:
    """1:1 template verification on IJB-style meta files.

    Attributes:
        weighting: How image features were weighted before pooling (:func:`facescale.eval.ijb.weight_features`):
            the numbers depend on it, so every report names it.
        scores_path: The detector-score file, when the weighting used one.
    """

    name: str
    num_images: int
    num_templates: int
    roc: Roc
    tpr_at_fpr: dict[float, dict[str, float]]
    weighting: str
    scores_path: str | None = None

    @property
    def weighting_description(self) -> str:
        """The weighting in words."""
        return WEIGHTING_DESCRIPTIONS[self.weighting]


@dataclass
class IdentificationReport:
    """1:N identification; ``composition`` says what the gallery, probes and distractors were."""

    name: str
    result: IdentificationResult
    composition: dict[str, Any]


def run_bin(model: torch.nn.Module, path: str | Path, batch_size: int = 128, device: str = "cpu",
            fpr_targets: tuple[float, ...] = FPR_TARGETS,
            reject_fractions: tuple[float, ...] = REJECT_FRACTIONS) -> BinReport:
    """Verification protocol, TPR@FPR and quality rejection on one ``.bin``.

    Args:
        model: Backbone in eval mode.
        path: The ``.bin`` file (raises ``BinFormatError`` naming it when malformed).
        batch_size: Images per forward pass.
        device: Device for the model.
        fpr_targets: FPR targets.
        reject_fractions: Low-quality shares to reject.

    Returns:
        The report.
    """
    images, issame = load_bin(path)
    emb, norms = compute_embeddings(model, images, batch_size=batch_size, device=device, return_norms=True)
    roc = compute_roc(pair_scores(emb[0::2], emb[1::2]), issame)
    return BinReport(name=Path(path).stem, path=str(path), verification=evaluate(emb, issame),
                     norm_mean=float(np.mean(norms)), roc=roc, tpr_at_fpr=tpr_at_fpr(roc, fpr_targets),
                     quality=accuracy_vs_rejection(emb, issame, norms, reject_fractions))


@torch.no_grad()
def flip_sum_features(model: torch.nn.Module, images: np.ndarray, batch_size: int = 128,
                      device: str = "cpu") -> np.ndarray:
    """Un-normalised flip sums ``f(x) + f(flip(x))``: the protocol's embedding before its L2 normalisation.

    :func:`compute_embeddings` returns them normalised; IJB's norm weighting needs the norm too (``ijb_11.py``
    adds the two halves of its flip-test feature and keeps the sum's norm).

    Args:
        model: Backbone (run in eval mode; its mode is restored afterwards).
        images: uint8 ``[N, H, W, 3]`` RGB.
        batch_size: Images per forward pass.
        device: Device of the model.

    Returns:
        float32 ``[N, D]``.
    """
    was_training = model.training
    model.eval()
    chunks = []
    try:
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2)
            x = normalize_images(batch.contiguous(), device)  # uint8 crosses to the device, normalised there
            chunks.append((model(x).float() + model(torch.flip(x, dims=[3])).float()).cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks).numpy() if chunks else np.empty((0, 0), np.float32)


def _embed_paths(model: torch.nn.Module, paths: list[Path], batch_size: int, device: str,
                 embed: Any = compute_embeddings) -> np.ndarray:
    """Reads and embeds files in slices, so only one slice of images is in memory at a time."""
    chunks = []
    step = max(batch_size, 256)
    for s in range(0, len(paths), step):
        imgs = np.stack([read_aligned_image(p) for p in paths[s:s + step]])
        chunks.append(embed(model, imgs, batch_size=batch_size, device=device))
    return np.concatenate(chunks)


def load_ijb_scores(meta: TemplateMedia, weighting: IjbWeighting,
                    scores_path: str | Path | None) -> np.ndarray | None:
    """The detector score of each image-list line, if ``weighting`` uses them (a cheap check before the model).

    Args:
        meta: The image list.
        weighting: The IJB weighting.
        scores_path: The detector-score file (``*_name_5pts_score.txt``), or None.

    Returns:
        ``[L]`` scores in image-list order, or None for ``none``/``norm``.

    Raises:
        MetaFileError: Scores needed but no file given, or the file malformed or lacking an image.
    """
    if weighting not in ("detector", "both"):
        return None
    if scores_path is None:
        raise MetaFileError(f"IJB weighting {weighting!r} multiplies each image by its face detector score: give "
                            "the detector-score file (--ijb-scores, e.g. ijbc_name_5pts_score.txt), or choose "
                            "--ijb-weighting norm or none")
    return scores_for_images(read_detector_scores(scores_path), meta)


def read_ijb_inputs(meta_path: str | Path, pairs_path: str | Path, weighting: IjbWeighting,
                    scores_path: str | Path | None) -> tuple[TemplateMedia, Any, np.ndarray | None]:
    """The IJB meta file, its pairs and the detector scores the weighting needs, all checked before the (slow)
    embedding pass: ``(meta, pairs, detector scores or None)``."""
    meta = read_template_media(meta_path)
    pairs = read_template_pairs(pairs_path, meta)
    return meta, pairs, load_ijb_scores(meta, weighting, scores_path)


def run_ijb(model: torch.nn.Module, meta_path: str | Path, pairs_path: str | Path, images_root: str | Path,
            batch_size: int = 128, device: str = "cpu", fpr_targets: tuple[float, ...] = FPR_TARGETS,
            weighting: IjbWeighting = "both", scores_path: str | Path | None = None) -> IjbReport:
    """IJB-style 1:1: embed every image of the image list, weight, pool templates, score template pairs.

    Args:
        model: Backbone in eval mode.
        meta_path: ``image template media`` file.
        pairs_path: ``template1 template2 label`` file.
        images_root: Directory of the aligned 112×112 crops the image list names.
        batch_size: Images per forward pass.
        device: Device for the model.
        fpr_targets: FPR targets.
        weighting: ``none``, ``norm``, ``detector`` or ``both`` (default, as InsightFace publishes IJB results;
            see :mod:`facescale.eval.ijb`).
        scores_path: Detector-score file; required by ``detector`` and ``both``.

    Returns:
        The report.
    """
    meta, pairs, detector_scores = read_ijb_inputs(meta_path, pairs_path, weighting, scores_path)
    root = Path(images_root)
    if len(meta.images) <= 50_000:
        raw = flip_sum_features(model, read_images(root, meta.images, desc="ijb images"), batch_size=batch_size,
                                device=device)
    else:
        raw = _embed_paths(model, [root / n for n in meta.images], batch_size, device, embed=flip_sum_features)
    weighted = weight_features(raw, weighting, detector_scores)
    template_ids, features = pool_templates(weighted, meta.templates, meta.media)
    roc = compute_roc(template_pair_scores(template_ids, features, pairs), pairs.labels)
    return IjbReport(name=Path(pairs_path).stem, num_images=len(meta.images), num_templates=len(template_ids),
                     roc=roc, tpr_at_fpr=tpr_at_fpr(roc, fpr_targets), weighting=weighting,
                     scores_path=str(scores_path) if detector_scores is not None else None)


def run_identification_folder(model: torch.nn.Module, root: str | Path, batch_size: int = 128,
                              device: str = "cpu", counts: tuple[int, ...] = DISTRACTOR_COUNTS,
                              fpir_targets: tuple[float, ...] = FPIR_TARGETS) -> IdentificationReport:
    """1:N from a folder ``root/gallery/<identity>/*``, ``root/probes/<identity>/*``, ``root/distractors/**``.

    Probes whose identity folder name is not in the gallery are non-mated. ``distractors/`` is optional.

    Args:
        model: Backbone in eval mode.
        root: The folder.
        batch_size: Images per forward pass.
        device: Device for the model.
        counts: Distractor counts of the rank-1 curve.
        fpir_targets: FPIR targets.

    Returns:
        The report.
    """
    root = Path(root)
    g_paths, g_labels, g_names = list_identity_folder(root / "gallery")
    p_paths, p_labels, p_names = list_identity_folder(root / "probes")
    # Labels are folder names: map probe labels into the gallery's numbering, unknown names to -1 - index.
    index = {name: i for i, name in enumerate(g_names)}
    probe_labels = np.array([index.get(p_names[label], -1 - int(label)) for label in p_labels])
    if not (probe_labels >= 0).any():
        raise ImageFolderError(f"{root}: no probes/<identity> folder matches a gallery/<identity> folder")
    gallery = _embed_paths(model, g_paths, batch_size, device)
    probes = _embed_paths(model, p_paths, batch_size, device)
    d_paths = list_images(root / "distractors") if (root / "distractors").is_dir() else []
    distractors = _embed_paths(model, d_paths, batch_size, device) if d_paths else np.empty((0, gallery.shape[1]))
    result = identify(gallery, g_labels, probes, probe_labels, array_chunks(distractors),
                      counts=counts, fpir_targets=fpir_targets)
    return IdentificationReport(name=root.name, result=result,
                                composition={"gallery_images": len(g_paths), "gallery_identities": len(g_names),
                                             "probe_images": len(p_paths), "distractor_images": len(d_paths)})
