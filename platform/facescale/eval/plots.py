"""Plots people would rather see than read: ROC curves of verification runs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: plots are files logged to MLflow, never windows
import matplotlib.pyplot as plt  # noqa: E402


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
    plt.close(fig)
    return path
