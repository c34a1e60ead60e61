"""The comparison across a pipeline's stages: tables (MLflow ``log_table``), a bar plot, a printed summary.

Under ``seeds`` a stage has one record per seed; the comparison is the mean over seeds and the sample standard
deviation across them (``ddof=1``: the seeds are a sample of the training randomness), per stage. With one seed there
is no spread across seeds to show; the error bars are then the spread over verification folds, as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: plots are files logged to MLflow
import matplotlib.pyplot as plt  # noqa: E402

from facescale.tracking.lineage import TAG_EPOCHS, StageRecord  # noqa: E402


def _accuracy_std(rec: StageRecord) -> float:
    values = [v for k, v in rec.metrics.items() if k.startswith("val/") and k.endswith("/accuracy_std")]
    return sum(values) / len(values) if values else float("nan")


@dataclass
class StageSummary:
    """One stage over its seeds: mean and sample std of the held-out accuracy (std NaN with one seed)."""

    stage: str
    seeds: list[int | None]
    accuracies: list[float]
    epochs: str

    @property
    def mean(self) -> float:
        return sum(self.accuracies) / len(self.accuracies) if self.accuracies else float("nan")

    @property
    def std(self) -> float:
        n = len(self.accuracies)
        if n < 2:
            return float("nan")
        return math.sqrt(sum((a - self.mean) ** 2 for a in self.accuracies) / (n - 1))


def summarize(records: list[StageRecord]) -> list[StageSummary]:
    """Records grouped by stage (without seed), in first-run order; NaN accuracies (no verification set) dropped."""
    out: dict[str, StageSummary] = {}
    for r in records:
        summary = out.setdefault(r.base_stage, StageSummary(r.base_stage, [], [], r.tags.get(TAG_EPOCHS, "")))
        if r.accuracy == r.accuracy:
            summary.seeds.append(r.seed)
            summary.accuracies.append(r.accuracy)
    return list(out.values())


def summary_table(records: list[StageRecord]) -> dict[str, list[Any]]:
    """Columns of the per-stage table: mean ± std over seeds, the seeds and each seed's accuracy."""
    rows = summarize(records)
    return {
        "stage": [s.stage for s in rows],
        "student_epochs": [s.epochs for s in rows],
        "num_seeds": [len(s.accuracies) for s in rows],
        "accuracy_mean": [s.mean for s in rows],
        "accuracy_std_over_seeds": [s.std for s in rows],
        "seeds": [",".join(str(x) for x in s.seeds) for s in rows],
        "accuracies": [",".join(f"{a:.4f}" for a in s.accuracies) for s in rows],
    }


def comparison_metrics(records: list[StageRecord]) -> dict[str, float]:
    """Parent-run metrics: ``<stage>/accuracy`` (the mean over seeds), ``<stage>/accuracy_std_over_seeds`` (2+
    seeds), ``<stage>/num_seeds``, and each seeded run's ``<stage>/seed<s>/accuracy``."""
    metrics: dict[str, float] = {}
    for s in summarize(records):
        if not s.accuracies:
            continue
        metrics[f"{s.stage}/accuracy"] = s.mean
        metrics[f"{s.stage}/num_seeds"] = float(len(s.accuracies))
        if len(s.accuracies) > 1:
            metrics[f"{s.stage}/accuracy_std_over_seeds"] = s.std
    for r in records:
        if r.stage != r.base_stage and r.accuracy == r.accuracy:
            metrics[f"{r.stage}/accuracy"] = r.accuracy
    return metrics


def stage_table(records: list[StageRecord], champion: str | None) -> dict[str, list[Any]]:
    """Columns of the comparison table, one row per stage run (per seed under ``seeds``) in run order."""
    return {
        "stage": [r.stage for r in records],
        "base_stage": [r.base_stage for r in records],
        "seed": [r.seed if r.seed is not None else "" for r in records],
        "student_epochs": [r.tags.get(TAG_EPOCHS, "") for r in records],
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
    """Held-out accuracy per stage, as bars in run order: the mean over seeds ± their std, each seed a dot; with one
    seed per stage, the accuracy ± std over verification folds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = summarize(records)
    seeded = any(len(s.accuracies) > 1 for s in rows)
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 2.5, 4))
    acc = [100 * s.mean for s in rows]
    if seeded:
        std = [100 * s.std if s.std == s.std else 0.0 for s in rows]
    else:
        by_stage = {r.base_stage: r for r in records}
        std = [100 * _accuracy_std(by_stage[s.stage]) for s in rows]
    labels = [f"{s.stage}\n({s.epochs} ep)" if s.epochs and s.stage != "teacher" else s.stage for s in rows]
    bars = ax.bar(labels, acc, yerr=std, capsize=4,
                  color=["#888888" if s.stage.startswith(("teacher", "scratch")) else "#3b75af" for s in rows])
    if seeded:
        for i, s in enumerate(rows):
            ax.plot([i] * len(s.accuracies), [100 * a for a in s.accuracies], "o", color="black", markersize=3)
        ax.set_xlabel(f"mean ± std over seeds ({max(len(s.accuracies) for s in rows)} per student stage)")
    else:
        ax.set_xlabel("one seed; ± std over the verification folds (test-set sampling, not training randomness)")
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
    """A printed table: stage, backbone, init, epochs (of student training behind the model: gen-k counts its
    predecessors'), held-out accuracy, time; skipped stages marked; then the mean ± std over seeds per stage (when a
    stage has 2+ seeds) and what two runs must share to print the same numbers (dataset digest, CPU kernels)."""
    rows = [("stage", "backbone", "init", "epochs", "held-out accuracy", "time", "model version")]
    for r in records:
        acc = f"{100 * r.accuracy:.2f}% ± {100 * _accuracy_std(r):.2f}" if r.accuracy == r.accuracy else "n/a"
        when = "skipped (done)" if r.stage in skipped else f"{times_s.get(r.stage, float('nan')):.0f} s"
        star = " (champion)" if r.stage == champion else ""
        rows.append((r.stage + star, r.tags.get("facescale.backbone", ""),
                     r.tags.get("facescale.init_model_id", "")[:14], r.tags.get(TAG_EPOCHS, ""), acc, when, r.version))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    # What must match for two runs to print the same numbers (README, "Reproducibility"): the data and the CPU kernels.
    digests = sorted({r.tags.get("facescale.dataset_digest", "")[:12] for r in records} - {""})
    cpus = sorted({r.tags.get("facescale.cpu_capability", "") for r in records} - {""})
    if digests or cpus:
        lines.append(f"dataset digest {', '.join(digests) or '?'}; CPU kernels {', '.join(cpus) or '?'}")
    rows_by_stage = summarize(records)
    if any(len(s.accuracies) > 1 for s in rows_by_stage):
        lines += ["", "over seeds (mean ± sample std):"]
        for s in rows_by_stage:
            spread = f" ± {100 * s.std:.2f}" if s.std == s.std else ""
            lines.append(f"  {s.stage:<16} {100 * s.mean:6.2f}%{spread}  ({len(s.accuracies)} seed(s), "
                         f"{s.epochs or '?'} epochs)")
    return "\n".join(lines)
