"""1:1 verification on InsightFace ``.bin`` sets (LFW / CFP-FP / AgeDB style).

Protocol (as InsightFace reports it, e.g. in the ArcFace paper's LFW/CFP-FP/AgeDB-30 tables): each image's
embedding is the L2-normalised sum of the embeddings of the image and its horizontal flip; a pair's distance is
the squared L2 distance of the two normalised embeddings (0 to 4); thresholds 0, 0.01, ..., 3.99; the pairs are
split into 10 contiguous folds; for each fold the threshold with the best accuracy on the other 9 folds is
applied to it. Reported: mean and std of the 10 fold accuracies and the chosen thresholds.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from facescale.data.transforms import normalize_images
from facescale.eval.images import decode_rgb

THRESHOLDS = np.arange(0.0, 4.0, 0.01)


class BinFormatError(ValueError):
    """A ``.bin`` file that is not InsightFace's pickled ``(images, issame)`` tuple; names the file."""


def _read_bin(path: Path) -> tuple[list[Any], np.ndarray]:
    """Unpickles a ``.bin`` and checks its structure (no image decoding); raises naming the file."""
    if not path.is_file():
        raise BinFormatError(f"verification file not found: {path}")
    try:
        with path.open("rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as exc:  # noqa: BLE001 -- any unpickling failure means "not a .bin"; re-raised with the file
        raise BinFormatError(f"{path}: not a pickled (images, issame) tuple: {exc}") from exc
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise BinFormatError(f"{path}: expected a pickled (images, issame) tuple, got {type(obj).__name__}")
    raw_images, raw_issame = obj
    issame = np.asarray(list(raw_issame), dtype=bool)
    if len(raw_images) % 2:
        raise BinFormatError(f"{path}: {len(raw_images)} images is an odd number; pairs need 2N images")
    if len(raw_images) != 2 * len(issame):
        raise BinFormatError(f"{path}: {len(raw_images)} images make {len(raw_images) // 2} pairs "
                             f"but issame has {len(issame)} labels")
    return list(raw_images), issame


def check_bin(path: str | Path) -> int:
    """Checks a ``.bin``'s structure without decoding its images (a cheap up-front check before a long run).

    Args:
        path: The ``.bin`` file.

    Returns:
        Its number of pairs.

    Raises:
        BinFormatError: Missing file, not a pickled ``(images, issame)``, odd image count or pair/label mismatch.
    """
    return len(_read_bin(Path(path))[1])


def load_bin(path: str | Path, image_size: tuple[int, int] = (112, 112)) -> tuple[np.ndarray, np.ndarray]:
    """Loads an InsightFace verification ``.bin``.

    The file is a pickled tuple ``(images, issame)``: ``images`` a list of 2N encoded images (JPEG/PNG bytes,
    as InsightFace ships them, or the same bytes as 1-D uint8 numpy arrays) or decoded uint8 arrays ``[H, W, 3]``,
    pairs interleaved ``[a0, b0, a1, b1, ...]``;
    ``issame`` a list of N booleans. Python-2 pickles (InsightFace's originals) load with ``encoding='bytes'``.

    Args:
        path: The ``.bin`` file.
        image_size: Expected ``(H, W)`` of every image.

    Returns:
        ``images`` uint8 ``[2N, H, W, 3]`` RGB and ``issame`` bool ``[N]``.

    Raises:
        BinFormatError: Not a pickle of that shape, odd image count, pair/label count mismatch, bad image --
            the message names the file (and the image index).
    """
    path = Path(path)
    raw_images, issame = _read_bin(path)
    images = np.empty((len(raw_images), *image_size, 3), dtype=np.uint8)
    for i, item in enumerate(raw_images):
        encoded = _encoded_bytes(item)
        if encoded is not None:
            try:
                arr = decode_rgb(encoded)
            except Exception as exc:  # noqa: BLE001 -- decoder errors vary by backend; re-raised naming the image
                raise BinFormatError(f"{path}: image {i} cannot be decoded ({_describe(item)}): {exc}") from exc
        else:
            arr = np.asarray(item)
            if arr.dtype != np.uint8 or arr.ndim != 3:
                raise BinFormatError(f"{path}: image {i} is {_describe(item)}: expected encoded JPEG/PNG bytes "
                                     f"(bytes or a 1-D uint8 array) or a decoded uint8 {(*image_size, 3)} array")
        if arr.shape != (*image_size, 3):
            raise BinFormatError(f"{path}: image {i} has shape {arr.shape}, expected {(*image_size, 3)}")
        images[i] = arr
    return images, issame


def _encoded_bytes(item: Any) -> bytes | None:
    """The encoded image an item of a ``.bin`` holds, or None if it is not an encoded image.

    Encoded images come as ``bytes`` (Python-2 ``str`` loaded with ``encoding='bytes'``) or, in ``.bin`` files
    re-saved with numpy (``np.frombuffer(jpeg, np.uint8)``, as some converters write them), as 1-D uint8 arrays of
    the same bytes. A decoded image is a 3-D ``[H, W, 3]`` array and is returned as None.
    """
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.ndim == 1 and item.dtype == np.uint8:
        return item.tobytes()
    return None


def _describe(item: Any) -> str:
    if isinstance(item, np.ndarray):
        return f"a {item.dtype} array of shape {item.shape}"
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"{len(item)} encoded bytes"
    return f"a {type(item).__name__}"


def _to_nchw(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` RGB → uint8 ``[N, 3, H, W]`` on the host (pinned for a CUDA device), as loaders batch."""
    batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    return batch.pin_memory() if device.type == "cuda" else batch


@torch.no_grad()
def compute_embeddings(model: nn.Module | Callable[[torch.Tensor], torch.Tensor], images: np.ndarray,
                       batch_size: int = 128, device: torch.device | str = "cpu",
                       return_norms: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Embeddings as the protocol defines them: L2-normalised sum of image and flipped image.

    Args:
        model: Backbone (put in eval mode by the caller or here if it is an ``nn.Module``).
        images: uint8 ``[N, H, W, 3]`` RGB.
        batch_size: Images per forward pass.
        device: Device to run on.
        return_norms: Also return each image's raw embedding norm (mean over image and flip), the MagFace
            quality score, from the same forward passes.

    Returns:
        float32 ``[N, D]`` unit-norm embeddings; with ``return_norms`` also float32 ``[N]`` norms.
    """
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    device = torch.device(device)
    chunks, norms = [], []
    try:
        for start in range(0, len(images), batch_size):
            # uint8 crosses to the device and is normalised there, as in training (DESIGN.md)
            x = normalize_images(_to_nchw(images[start:start + batch_size], device), device)
            plain, flipped = model(x).float(), model(torch.flip(x, dims=[3])).float()
            chunks.append(torch.nn.functional.normalize(plain + flipped).cpu())
            norms.append(((plain.norm(dim=1) + flipped.norm(dim=1)) / 2).cpu())
    finally:
        if was_training:
            model.train()
    emb = torch.cat(chunks).numpy() if chunks else np.empty((0, 0), np.float32)
    if return_norms:
        return emb, (torch.cat(norms).numpy() if norms else np.empty(0, np.float32))
    return emb


def _accuracy(threshold: float, dist: np.ndarray, issame: np.ndarray) -> float:
    return float(np.mean((dist < threshold) == issame))


def roc_curve(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray = THRESHOLDS) -> tuple[np.ndarray, ...]:
    """TPR and FPR of "same" = ``dist < threshold`` at each threshold."""
    # Hand-written, not sklearn.metrics.roc_curve: that one gives points at the observed scores only, with
    # "same" = score >= threshold, and NaN rates for a set without positive or negative pairs. The protocol's curve
    # is at the fixed grid THRESHOLDS with a strict "<" on distances, and a missing class counts as 1 (rates of 0).
    pred = dist[None, :] < thresholds[:, None]
    num_pos = max(int(issame.sum()), 1)
    num_neg = max(int((~issame).sum()), 1)
    tpr = (pred & issame[None, :]).sum(1) / num_pos
    fpr = (pred & ~issame[None, :]).sum(1) / num_neg
    return tpr, fpr


def evaluate(embeddings: np.ndarray, issame: np.ndarray, nfolds: int = 10) -> dict[str, Any]:
    """10-fold verification accuracy with thresholds chosen on the other folds.

    Args:
        embeddings: ``[2N, D]`` embeddings, pairs interleaved; normalised here (idempotent if already unit norm).
        issame: ``[N]`` booleans.
        nfolds: Number of contiguous folds.

    Returns:
        ``accuracy_mean``, ``accuracy_std``, ``best_threshold`` (mean over folds), ``fold_thresholds``,
        ``fold_accuracies``, ``tpr``/``fpr`` (ROC over all pairs), ``thresholds``, ``num_pairs``.
    """
    embeddings = np.asarray(embeddings, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    if embeddings.ndim != 2 or len(embeddings) != 2 * len(issame):
        raise ValueError(f"embeddings {embeddings.shape} do not match {len(issame)} pairs (need [2N, D])")
    if len(issame) < nfolds:
        raise ValueError(f"{len(issame)} pairs cannot be split into {nfolds} folds")
    embeddings = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(min=1e-12)
    dist = np.sum((embeddings[0::2] - embeddings[1::2]) ** 2, axis=1)
    # Contiguous folds, the first (N mod k) one pair larger -- the split sklearn's KFold(shuffle=False) makes.
    folds = np.array_split(np.arange(len(issame)), nfolds)
    fold_acc, fold_thr = [], []
    for test_idx in folds:
        train_mask = np.ones(len(issame), dtype=bool)
        train_mask[test_idx] = False
        train_acc = [_accuracy(t, dist[train_mask], issame[train_mask]) for t in THRESHOLDS]
        best = float(THRESHOLDS[int(np.argmax(train_acc))])
        fold_thr.append(best)
        fold_acc.append(_accuracy(best, dist[test_idx], issame[test_idx]))
    tpr, fpr = roc_curve(dist, issame)
    return {
        "accuracy_mean": float(np.mean(fold_acc)),
        "accuracy_std": float(np.std(fold_acc)),
        "best_threshold": float(np.mean(fold_thr)),
        "fold_thresholds": fold_thr,
        "fold_accuracies": fold_acc,
        "tpr": tpr,
        "fpr": fpr,
        "thresholds": THRESHOLDS,
        "num_pairs": int(len(issame)),
    }


def verify_model(model: nn.Module, bin_path: str | Path, batch_size: int = 128,
                 device: torch.device | str = "cpu", cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """Loads (or reuses from ``cache``) a ``.bin`` and evaluates ``model`` on it."""
    key = str(bin_path)
    if cache is not None and key in cache:
        images, issame = cache[key]
    else:
        images, issame = load_bin(bin_path)
        if cache is not None:
            cache[key] = (images, issame)
    emb = compute_embeddings(model, images, batch_size=batch_size, device=device)
    result = evaluate(emb, issame)
    return result
