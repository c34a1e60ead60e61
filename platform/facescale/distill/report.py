"""The comparison across a pipeline's stages: a table (MLflow ``log_table``), a bar plot, a printed summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: plots are files logged to MLflow
import matplotlib.pyplot as plt  # noqa: E402

from facescale.tracking.lineage import StageRecord  # noqa: E402


def _accuracy_std(rec: StageRecord) -> float:
    values = [v for k, v in rec.metrics.items() if k.startswith("val/") and k.endswith("/accuracy_std")]
    return sum(values) / len(values) if values else float("nan")


def stage_table(records: list[StageRecord], champion: str | None) -> dict[str, list[Any]]:
    """Columns of the comparison table, one row per stage in run order."""
    return {
        "stage": [r.stage for r in records],
        "generation": [r.tags.get("facescale.generation", "") for r in records],
        "backbone": [r.tags.get("facescale.backbone", "") for r in records],
        "held_out_accuracy": [r.accuracy for r in records],
        "accuracy_std": [_accuracy_std(r) for r in records],
        "final_loss": [r.metrics.get("train/loss", float("nan")) for r in records],
        "model_id": [r.model_id for r in records],
        "model_version": [r.version for r in records],
        "init_model_id": [r.tags.get("facescale.init_model_id", "") for r in records],
        "champion": [r.stage == champion for r in records],
        "run_id": [r.run_id for r in records],
    }


def plot_accuracy(records: list[StageRecord], path: str | Path, title: str) -> Path:
    """Held-out accuracy (± std over folds) per stage, as bars in run order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(1.3 * len(records) + 2.5, 4))
    acc = [100 * r.accuracy for r in records]
    std = [100 * _accuracy_std(r) for r in records]
    bars = ax.bar([r.stage for r in records], acc, yerr=std, capsize=4,
                  color=["#888888" if r.stage in ("teacher", "scratch") else "#3b75af" for r in records])
    for bar, value in zip(bars, acc):
        ax.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 3), textcoords="offset points")
    low = min((a - s for a, s in zip(acc, std) if a == a), default=0.0)
    ax.set_ylim(max(0.0, low - 5), 100)
    ax.set_ylabel("held-out verification accuracy (%)")
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_summary(records: list[StageRecord], skipped: list[str], champion: str | None,
                   times_s: dict[str, float]) -> str:
    """A printed table: stage, backbone, init, held-out accuracy, time; skipped stages marked."""
    rows = [("stage", "backbone", "init", "held-out accuracy", "time", "model version")]
    for r in records:
        acc = f"{100 * r.accuracy:.2f}% ± {100 * _accuracy_std(r):.2f}" if r.accuracy == r.accuracy else "n/a"
        when = "skipped (done)" if r.stage in skipped else f"{times_s.get(r.stage, float('nan')):.0f} s"
        star = " (champion)" if r.stage == champion else ""
        rows.append((r.stage + star, r.tags.get("facescale.backbone", ""),
                     r.tags.get("facescale.init_model_id", "")[:14], acc, when, r.version))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
