"""IJB-style template verification: meta files, template pooling, template-pair scores.

The two meta files users have (names as in the IJB-B/IJB-C release that InsightFace evaluates, e.g.
``ijbb_face_tid_mid.txt`` and ``ijbb_template_pair_label.txt``):

    image template media      one line per face image: image file name, template id, media id
    template1 template2 label one line per template pair: label 1 = same identity, 0 = different

A third file, the detector scores, comes with InsightFace's IJB release (``ijbc_name_5pts_score.txt``)::

    image x1 y1 ... x5 y5 score   one line per face image: 5 landmarks and the face detector's score (last column)

Template features as InsightFace's IJB evaluation builds them (``recognition/_evaluation_/ijb/ijb_11.py``,
``image2template_feature``): each image's feature is first weighted (below), the features of the images of one
media (frames of one video, or a single still) are averaged, the media averages of a template are summed, and the
sum is L2-normalised. A pair's score is the cosine similarity of its two template features.

Weighting (``ijb_11.py``'s ``use_norm_score`` / ``use_detector_score``; its published tables use both, its
"N1 D1" test mode). The image feature is the flip sum ``f(x) + f(flip(x))`` before normalisation:

    none       the L2-normalised feature: every image counts the same
    norm       the un-normalised feature: its norm (the model's confidence, as in MagFace) weighs it
    detector   the L2-normalised feature times the detector score: non-faces and poor detections weigh less
    both       the un-normalised feature times the detector score (the published default)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from facescale.eval.rates import pair_scores

IjbWeighting = Literal["none", "norm", "detector", "both"]
IJB_WEIGHTINGS: tuple[str, ...] = ("none", "norm", "detector", "both")
WEIGHTING_DESCRIPTIONS = {
    "none": "unit-norm image features (unweighted)",
    "norm": "image features weighted by their embedding norm",
    "detector": "unit-norm image features weighted by the detector score",
    "both": "image features weighted by embedding norm x detector score, as published",
}


class MetaFileError(ValueError):
    """A malformed IJB meta file, or a pair naming a template the image list does not have; names file and line."""


@dataclass
class TemplateMedia:
    """The ``image template media`` file, one entry per line.

    Attributes:
        path: The file it was read from.
        images: Image file name per line.
        templates: Template id per line.
        media: Media id per line.
        lines: Line number of each entry in the file (for messages); None when not read from a file.
    """

    path: Path
    images: list[str]
    templates: np.ndarray
    media: np.ndarray
    lines: list[int] | None = None


@dataclass
class TemplatePairs:
    """The ``template1 template2 label`` file."""

    path: Path
    template1: np.ndarray
    template2: np.ndarray
    labels: np.ndarray


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    if not path.is_file():
        raise MetaFileError(f"meta file not found: {path}")
    out = []
    with path.open() as f:
        for lineno, line in enumerate(f, start=1):
            text = line.strip()
            if text and not text.startswith("#"):
                out.append((lineno, text.split()))
    if not out:
        raise MetaFileError(f"{path}: no entries")
    return out


def _int(path: Path, lineno: int, field: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise MetaFileError(f"{path}:{lineno}: {field} {value!r} is not an integer") from None


def read_template_media(path: str | Path) -> TemplateMedia:
    """Reads an ``image template media`` file.

    Args:
        path: The file.

    Returns:
        Its entries.

    Raises:
        MetaFileError: Missing file, a line without exactly three fields, or a non-integer id (file and line named).
    """
    path = Path(path)
    images, templates, media, lines = [], [], [], []
    for lineno, fields in _lines(path):
        if len(fields) != 3:
            raise MetaFileError(f"{path}:{lineno}: expected 'image template media', got {' '.join(fields)!r}")
        images.append(fields[0])
        templates.append(_int(path, lineno, "template", fields[1]))
        media.append(_int(path, lineno, "media", fields[2]))
        lines.append(lineno)
    return TemplateMedia(path, images, np.asarray(templates, np.int64), np.asarray(media, np.int64), lines)


def read_template_pairs(path: str | Path, meta: TemplateMedia | None = None) -> TemplatePairs:
    """Reads a ``template1 template2 label`` file and checks its templates against the image list.

    Args:
        path: The file.
        meta: The image list; when given, every template named in a pair must appear in it.

    Returns:
        The pairs.

    Raises:
        MetaFileError: Malformed line, label other than 0/1, or a template unknown to ``meta`` (file and line named).
    """
    path = Path(path)
    known = set(np.unique(meta.templates).tolist()) if meta is not None else None
    t1, t2, labels = [], [], []
    for lineno, fields in _lines(path):
        if len(fields) != 3:
            raise MetaFileError(f"{path}:{lineno}: expected 'template1 template2 label', got {' '.join(fields)!r}")
        a = _int(path, lineno, "template1", fields[0])
        b = _int(path, lineno, "template2", fields[1])
        label = _int(path, lineno, "label", fields[2])
        if label not in (0, 1):
            raise MetaFileError(f"{path}:{lineno}: label must be 0 or 1, got {label}")
        if known is not None:
            for t in (a, b):
                if t not in known:
                    raise MetaFileError(f"{path}:{lineno}: template {t} is not in {meta.path}")
        t1.append(a)
        t2.append(b)
        labels.append(bool(label))
    return TemplatePairs(path, np.asarray(t1, np.int64), np.asarray(t2, np.int64), np.asarray(labels, bool))


@dataclass
class DetectorScores:
    """The detector-score file (``image x1 y1 ... x5 y5 score``), by image name.

    Attributes:
        path: The file it was read from.
        scores: Detector score per image name.
        lines: Line number of each image name (for messages).
    """

    path: Path
    scores: dict[str, float]
    lines: dict[str, int]


_SCORE_LINE = "'image x1 y1 ... x5 y5 score' (12 fields) or 'image score'"


def read_detector_scores(path: str | Path) -> DetectorScores:
    """Reads a detector-score file: the image name first, the detector score in the last column.

    InsightFace's ``*_name_5pts_score.txt`` has 12 fields (name, 5 landmarks, score); a 2-field ``image score``
    file is read the same way. The landmarks are not used here (evaluation reads crops already aligned).

    Args:
        path: The file.

    Returns:
        The scores.

    Raises:
        MetaFileError: Missing file; a line without its score column (1 or 11 fields) or with another field count;
            a score that is not a finite number >= 0 (a negative weight would flip the feature); an image named
            twice -- each naming the file and line.
    """
    path = Path(path)
    scores: dict[str, float] = {}
    lines: dict[str, int] = {}
    for lineno, fields in _lines(path):
        if len(fields) in (1, 11):
            raise MetaFileError(f"{path}:{lineno}: the detector score column is missing: {len(fields)} fields, "
                                f"expected {_SCORE_LINE}")
        if len(fields) not in (2, 12):
            raise MetaFileError(f"{path}:{lineno}: expected {_SCORE_LINE}, got {len(fields)} fields")
        name, value = fields[0], fields[-1]
        try:
            score = float(value)
        except ValueError:
            raise MetaFileError(f"{path}:{lineno}: detector score {value!r} is not a number") from None
        if not (math.isfinite(score) and score >= 0):
            raise MetaFileError(f"{path}:{lineno}: detector score {value!r} must be a finite number >= 0")
        if name in scores:
            raise MetaFileError(f"{path}:{lineno}: image {name!r} already has a score on line {lines[name]}")
        scores[name], lines[name] = score, lineno
    return DetectorScores(path, scores, lines)


def scores_for_images(scores: DetectorScores, meta: TemplateMedia) -> np.ndarray:
    """The detector score of every line of the image list, matched by image name.

    Args:
        scores: The detector-score file.
        meta: The image list.

    Returns:
        float64 ``[L]`` scores in ``meta`` order.

    Raises:
        MetaFileError: An image of ``meta`` that ``scores`` lacks (names both files and the image list's line).
    """
    out = np.empty(len(meta.images))
    for i, name in enumerate(meta.images):
        score = scores.scores.get(name)
        if score is None:
            where = f"{meta.path}:{meta.lines[i]}" if meta.lines else f"{meta.path}: entry {i + 1}"
            raise MetaFileError(f"{where}: image {name!r} has no detector score in {scores.path}")
        out[i] = score
    return out


def weight_features(features: np.ndarray, weighting: IjbWeighting,
                    detector_scores: np.ndarray | None = None) -> np.ndarray:
    """Image features weighted before template pooling (see the module docstring).

    Args:
        features: ``[L, D]`` un-normalised image features (flip sums).
        weighting: ``none``, ``norm``, ``detector`` or ``both``.
        detector_scores: ``[L]`` detector scores; needed by ``detector`` and ``both``.

    Returns:
        float64 ``[L, D]`` features for :func:`pool_templates`.
    """
    if weighting not in IJB_WEIGHTINGS:
        raise ValueError(f"unknown IJB weighting {weighting!r}; expected one of {', '.join(IJB_WEIGHTINGS)}")
    out = np.asarray(features, dtype=np.float64)
    if weighting in ("none", "detector"):  # ijb_11.py: use_norm_score=False normalises away the norm
        out = out / np.linalg.norm(out, axis=1, keepdims=True).clip(min=1e-12)
    if weighting in ("detector", "both"):  # ijb_11.py: use_detector_score multiplies by the faceness score
        if detector_scores is None:
            raise ValueError(f"IJB weighting {weighting!r} needs detector scores")
        scores = np.asarray(detector_scores, dtype=np.float64)
        if scores.shape != (len(out),):
            raise ValueError(f"{scores.shape} detector scores for {len(out)} image features")
        out = out * scores[:, None]
    return out


def pool_templates(embeddings: np.ndarray, templates: np.ndarray, media: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Template features: media mean → template sum → L2 normalise.

    Args:
        embeddings: ``[L, D]`` image features, one per meta line, already weighted (:func:`weight_features`;
            unit-norm embeddings are the ``none`` weighting).
        templates: ``[L]`` template id per image.
        media: ``[L]`` media id per image.

    Returns:
        ``(template_ids [T] sorted, features [T, D] float32 unit norm)``.
    """
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if not len(embeddings) == len(templates) == len(media):
        raise ValueError(f"{len(embeddings)} embeddings for {len(templates)} template and {len(media)} media ids")
    # A media id is only meaningful within its template (the same video may be used by several templates).
    groups, group_of = np.unique(np.stack([templates, media], axis=1), axis=0, return_inverse=True)
    group_of = group_of.ravel()
    media_sum = np.zeros((len(groups), embeddings.shape[1]))
    np.add.at(media_sum, group_of, embeddings)
    media_mean = media_sum / np.bincount(group_of, minlength=len(groups))[:, None]
    template_ids, template_of = np.unique(groups[:, 0], return_inverse=True)
    features = np.zeros((len(template_ids), embeddings.shape[1]))
    np.add.at(features, template_of.ravel(), media_mean)
    features /= np.linalg.norm(features, axis=1, keepdims=True).clip(min=1e-12)
    return template_ids, features.astype(np.float32)


def template_pair_scores(template_ids: np.ndarray, features: np.ndarray, pairs: TemplatePairs) -> np.ndarray:
    """Cosine similarity of each pair's template features.

    Args:
        template_ids: Sorted ids from :func:`pool_templates`.
        features: ``[T, D]`` template features.
        pairs: The pairs (their templates must be among ``template_ids``).

    Returns:
        float64 ``[num_pairs]`` scores.
    """
    rows = []
    for side in (pairs.template1, pairs.template2):
        idx = np.searchsorted(template_ids, side).clip(max=len(template_ids) - 1)
        missing = template_ids[idx] != side
        if missing.any():
            lineno = int(np.flatnonzero(missing)[0])
            raise MetaFileError(f"{pairs.path}: pair {lineno + 1} names template {int(side[lineno])}, "
                                "which has no embeddings")
        rows.append(idx)
    return pair_scores(features[rows[0]], features[rows[1]])
