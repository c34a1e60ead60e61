"""Plots people would rather see than read: ROC/DET curves, rank-1 vs distractors, quality rejection."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    """matplotlib's pyplot on the headless Agg backend, imported on first use: the training step imports this
    module's callers, and must also run where matplotlib is not installed (a bare GPU image, benchmarks/gpu_check.py).
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: plots are files logged to MLflow, never windows
    import matplotlib.pyplot as plt

    return plt


def plot_roc(results: Mapping[str, Mapping[str, Any]], path: str | Path, title: str = "Verification ROC") -> Path:
    """Overlays the ROC curves of several verification results (name → ``evaluate()`` dict) in one PNG.

    Args:
        results: Curves to draw; each needs ``tpr``, ``fpr`` and ``accuracy_mean``.
        path: Output PNG.
        title: Figure title.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, res in results.items():
        fpr, tpr = res["fpr"], res["tpr"]
        ax.plot(fpr, tpr, label=f"{name} (acc {100 * res['accuracy_mean']:.2f}%)")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _finish(fig: Any, ax: Any, path: Path, title: str, legend_loc: str) -> Path:
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc=legend_loc, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_roc_log(curves: Mapping[str, Any], path: str | Path, title: str = "ROC") -> Path:
    """ROC curves on a log FPR axis (where TPR@FPR 1e-6 … 1e-1 are read), one per named curve.

    Args:
        curves: Name → :class:`facescale.eval.rates.Roc`.
        path: Output PNG.
        title: Figure title.

    Returns:
        The written path.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, roc in curves.items():
        keep = roc.fpr > 0  # log axis: the FPR = 0 start has no place on it
        ax.plot(roc.fpr[keep], roc.tpr[keep], label=name)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    return _finish(fig, ax, Path(path), title, "lower right")


def plot_det(curves: Mapping[str, Any], path: str | Path, title: str = "DET") -> Path:
    """Detection-error trade-off: false non-match rate against false match rate, both on log axes.

    Args:
        curves: Name → :class:`facescale.eval.rates.Roc`.
        path: Output PNG.
        title: Figure title.

    Returns:
        The written path.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, roc in curves.items():
        keep = (roc.fpr > 0) & (roc.fnr > 0)
        ax.plot(roc.fpr[keep], roc.fnr[keep], label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("false positive rate (FMR)")
    ax.set_ylabel("false negative rate (FNMR)")
    return _finish(fig, ax, Path(path), title, "upper right")


def plot_rank1_vs_distractors(curves: Mapping[str, tuple[list[int], list[float]]], path: str | Path,
                              title: str = "Rank-1 identification vs distractors") -> Path:
    """Rank-1 identification rate against the number of distractors (log axis; 0 drawn at 1).

    Args:
        curves: Name → ``(distractor counts, rank-1 rates)``.
        path: Output PNG.
        title: Figure title.

    Returns:
        The written path.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, (counts, rates) in curves.items():
        ax.plot([max(c, 1) for c in counts], [100 * r for r in rates], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_ylim(0, 101)
    ax.set_xlabel("distractors (0 drawn at 1)")
    ax.set_ylabel("rank-1 identification rate (%)")
    return _finish(fig, ax, Path(path), title, "lower left")


def plot_quality_rejection(curves: Mapping[str, list[Mapping[str, Any]]], path: str | Path,
                           title: str = "Accuracy vs rejected low-quality pairs",
                           xlabel: str = "pairs rejected, lowest embedding norm first (%)") -> Path:
    """Verification accuracy as the lowest-quality pairs are rejected (rows of ``accuracy_vs_rejection``).

    Args:
        curves: Name → rows with ``reject_fraction`` and ``accuracy_mean``.
        path: Output PNG.
        title: Figure title.
        xlabel: What was rejected first (PFE curves reject by uncertainty as well as by norm).

    Returns:
        The written path.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, rows in curves.items():
        ax.plot([100 * r["reject_fraction"] for r in rows], [100 * r["accuracy_mean"] for r in rows],
                marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("verification accuracy (%)")
    return _finish(fig, ax, Path(path), title, "lower right")
