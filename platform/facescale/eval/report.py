"""Evaluation reports as people read them (text tables), as MLflow stores them (flat metrics) and as plots.

Metric names use only characters MLflow accepts: ``<set>/accuracy``, ``<set>/tpr_at_fpr_1e-4``,
``<set>/rank1_at_1000000``, ``<set>/tpir_at_fpir_1e-2``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from facescale.eval import plots
from facescale.eval.pfe import PfeBinReport, PfeIjbReport
from facescale.eval.rates import format_fpr
from facescale.eval.suite import BinReport, IdentificationReport, IjbReport

Report = BinReport | IjbReport | IdentificationReport


def metric_prefix(name: str) -> str:
    """A set name made safe for MLflow metric keys (letters, digits, ``_ - .``)."""
    return re.sub(r"[^\w.\-]", "_", name)


def _pct(x: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.{digits}f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    body = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join([line, "  ".join("-" * w for w in widths), *body])


def _tpr_table(tpr: dict[float, dict[str, float]]) -> str:
    # n/a: the target FPR is below 1 / (number of impostor pairs), so this set cannot measure it.
    return _table([f"TPR@FPR={format_fpr(t)}" for t in tpr], [[_pct(v["tpr"]) for v in tpr.values()]])


def format_report(rep: Report) -> str:
    """One set's result as text tables."""
    if isinstance(rep, BinReport):
        v = rep.verification
        head = (f"== {rep.name} ({rep.path}): {v['num_pairs']} pairs, "
                f"{rep.roc.num_pos} same / {rep.roc.num_neg} different ==")
        main = _table(["accuracy (10-fold)", "best threshold", "mean embedding norm"],
                      [[f"{_pct(v['accuracy_mean'])} ± {_pct(v['accuracy_std'])}",
                        f"{v['best_threshold']:.2f} (squared L2)", f"{rep.norm_mean:.3f}"]])
        tpr = _tpr_table(rep.tpr_at_fpr)
        quality = _table(["rejected (lowest norm)", "pairs kept", "accuracy"],
                         [[_pct(q["reject_fraction"], 0), str(q["num_pairs"]),
                           f"{_pct(q['accuracy_mean'])} ± {_pct(q['accuracy_std'])}"] for q in rep.quality])
        if isinstance(rep, PfeBinReport):
            return "\n\n".join([head, main, _pfe_bin_tables(rep)])  # its score table holds the TPR@FPR row
        return "\n\n".join([head, main, tpr, quality])
    if isinstance(rep, IjbReport):
        head = (f"== {rep.name}: {rep.num_images} images, {rep.num_templates} templates, "
                f"{rep.roc.num_pos} genuine / {rep.roc.num_neg} impostor template pairs ==")
        scores = f", detector scores from {rep.scores_path}" if rep.scores_path else ""
        weighting = f"IJB weighting: {rep.weighting} ({rep.weighting_description}{scores})"
        if isinstance(rep, PfeIjbReport):
            rows = [(f"pooling ({rep.weighting} weighting), cosine", rep.tpr_at_fpr),
                    ("PFE fusion, MLS", rep.mls_tpr_at_fpr),
                    ("PFE fusion, cosine of fused mu", rep.mu_cosine_tpr_at_fpr)]
            table = _table(["templates", *(f"TPR@FPR={format_fpr(t)}" for t in rep.tpr_at_fpr)],
                           [[name, *(_pct(v["tpr"]) for v in tpr.values())] for name, tpr in rows])
            return "\n\n".join([head, weighting, table])
        return "\n\n".join([head, weighting, _tpr_table(rep.tpr_at_fpr)])
    res = rep.result
    comp = ", ".join(f"{k} {v}" for k, v in rep.composition.items())
    head = (f"== {rep.name} (1:N): {res.num_gallery} enrolled, {res.num_mated} mated / {res.num_non_mated} "
            f"non-mated probes; {comp} ==")
    rank1 = _table(["distractors", "rank-1 identification"],
                   [[f"{c:,}", _pct(r)] for c, r in zip(res.distractor_counts, res.rank1)])
    tpir = _table(["FPIR", "TPIR", "threshold"],
                  [[format_fpr(t), _pct(res.tpir[t]), f"{res.thresholds[t]:.4f}"] for t in res.tpir])
    return "\n\n".join([head, rank1, f"open-set at {res.distractor_counts[-1]:,} distractors:\n{tpir}"])


def _pfe_bin_tables(rep: PfeBinReport) -> str:
    """PFE rows of a ``.bin`` set: accuracy and TPR@FPR by score, rejection by norm beside rejection by uncertainty."""
    rows = [("cosine (flip sum, the protocol)", rep.verification, f"{rep.verification['best_threshold']:.2f} (sq. L2)",
             rep.tpr_at_fpr),
            ("PFE MLS", rep.mls, f"{rep.mls['best_threshold']:.2f} (MLS)", rep.mls_tpr_at_fpr),
            ("PFE cosine of fused mu", rep.mu_cosine, f"{rep.mu_cosine['best_threshold']:.2f} (sq. L2)",
             rep.mu_cosine_tpr_at_fpr)]
    tpr_head = [f"TPR@FPR={format_fpr(t)}" for t in rep.tpr_at_fpr]
    scores = _table(["score", "accuracy (10-fold)", "mean threshold", *tpr_head],
                    [[name, f"{_pct(v['accuracy_mean'])} ± {_pct(v['accuracy_std'])}", thr,
                      *(_pct(x["tpr"]) for x in tpr.values())]
                     for name, v, thr, tpr in rows])
    reject = _table(["rejected", "pairs kept", "accuracy (lowest norm rejected)", "accuracy (most uncertain rejected)"],
                    [[_pct(n["reject_fraction"], 0), str(n["num_pairs"]),
                      f"{_pct(n['accuracy_mean'])} ± {_pct(n['accuracy_std'])}",
                      f"{_pct(u['accuracy_mean'])} ± {_pct(u['accuracy_std'])}"]
                     for n, u in zip(rep.quality, rep.uncertainty_quality)])
    return (f"{scores}\n\nmean uncertainty (harmonic mean of sigma^2) {rep.uncertainty_mean:.4g}; "
            f"image and flip fused as a template\n\n{reject}")


def report_metrics(rep: Report) -> dict[str, float]:
    """Flat metrics of one set (NaN values kept; the tracker drops them)."""
    p = metric_prefix(rep.name)
    out: dict[str, float] = {}
    if isinstance(rep, BinReport):
        v = rep.verification
        out.update({f"{p}/accuracy": v["accuracy_mean"], f"{p}/accuracy_std": v["accuracy_std"],
                    f"{p}/best_threshold": v["best_threshold"], f"{p}/embedding_norm_mean": rep.norm_mean})
        for q in rep.quality:
            out[f"{p}/accuracy_reject_{round(100 * q['reject_fraction'])}pct"] = q["accuracy_mean"]
    if isinstance(rep, (BinReport, IjbReport)):
        out.update({f"{p}/tpr_at_fpr_{format_fpr(t)}": v["tpr"] for t, v in rep.tpr_at_fpr.items()})
    if isinstance(rep, (PfeBinReport, PfeIjbReport)):
        out.update({f"{p}/pfe_mls_tpr_at_fpr_{format_fpr(t)}": v["tpr"] for t, v in rep.mls_tpr_at_fpr.items()})
    if isinstance(rep, PfeBinReport):
        out.update({f"{p}/pfe_mls_accuracy": rep.mls["accuracy_mean"],
                    f"{p}/pfe_mls_accuracy_std": rep.mls["accuracy_std"],
                    f"{p}/pfe_mu_cosine_accuracy": rep.mu_cosine["accuracy_mean"],
                    f"{p}/pfe_uncertainty_mean": rep.uncertainty_mean})
        for q in rep.uncertainty_quality:
            out[f"{p}/pfe_accuracy_reject_uncertain_{round(100 * q['reject_fraction'])}pct"] = q["accuracy_mean"]
    if isinstance(rep, PfeIjbReport):
        out.update({f"{p}/pfe_mu_cosine_tpr_at_fpr_{format_fpr(t)}": v["tpr"]
                    for t, v in rep.mu_cosine_tpr_at_fpr.items()})
    if isinstance(rep, IdentificationReport):
        res = rep.result
        out.update({f"{p}/rank1_at_{c}": r for c, r in zip(res.distractor_counts, res.rank1)})
        out.update({f"{p}/tpir_at_fpir_{format_fpr(t)}": v for t, v in res.tpir.items()})
    return {k: float(v) for k, v in out.items()}


def report_dict(rep: Report) -> dict[str, Any]:
    """A JSON-ready summary of one set (no per-threshold curves)."""
    if isinstance(rep, PfeBinReport):
        base = report_dict(BinReport(**{k: getattr(rep, k) for k in BinReport.__dataclass_fields__}))
        return {**base, "pfe": {"mls": {k: rep.mls[k] for k in ("accuracy_mean", "accuracy_std", "best_threshold",
                                                                 "fold_accuracies")},
                                "mls_tpr_at_fpr": {format_fpr(t): x for t, x in rep.mls_tpr_at_fpr.items()},
                                "mu_cosine_accuracy_mean": rep.mu_cosine["accuracy_mean"],
                                "mu_cosine_tpr_at_fpr": {format_fpr(t): x for t, x in rep.mu_cosine_tpr_at_fpr.items()},
                                "uncertainty_mean": rep.uncertainty_mean,
                                "uncertainty_quality": rep.uncertainty_quality}}
    if isinstance(rep, PfeIjbReport):
        base = report_dict(IjbReport(**{k: getattr(rep, k) for k in IjbReport.__dataclass_fields__}))
        cos = {format_fpr(t): x for t, x in rep.mu_cosine_tpr_at_fpr.items()}
        return {**base, "pfe": {"mls_tpr_at_fpr": {format_fpr(t): x for t, x in rep.mls_tpr_at_fpr.items()},
                                "mu_cosine_tpr_at_fpr": cos}}
    if isinstance(rep, BinReport):
        v = rep.verification
        return {"kind": "bin", "name": rep.name, "path": rep.path, "num_pairs": v["num_pairs"],
                "accuracy_mean": v["accuracy_mean"], "accuracy_std": v["accuracy_std"],
                "best_threshold": v["best_threshold"], "fold_accuracies": v["fold_accuracies"],
                "embedding_norm_mean": rep.norm_mean,
                "tpr_at_fpr": {format_fpr(t): x for t, x in rep.tpr_at_fpr.items()}, "quality": rep.quality}
    if isinstance(rep, IjbReport):
        return {"kind": "ijb", "name": rep.name, "num_images": rep.num_images, "num_templates": rep.num_templates,
                "num_genuine": rep.roc.num_pos, "num_impostor": rep.roc.num_neg, "weighting": rep.weighting,
                "weighting_description": rep.weighting_description, "detector_scores": rep.scores_path,
                "tpr_at_fpr": {format_fpr(t): x for t, x in rep.tpr_at_fpr.items()}}
    res = rep.result
    return {"kind": "identification", "name": rep.name, "composition": rep.composition,
            "num_gallery": res.num_gallery, "num_mated": res.num_mated, "num_non_mated": res.num_non_mated,
            "distractor_counts": res.distractor_counts, "rank1": res.rank1,
            "tpir_at_fpir": {format_fpr(t): x for t, x in res.tpir.items()},
            "thresholds": {format_fpr(t): x for t, x in res.thresholds.items()}}


def write_plots(reports: Sequence[Report], out_dir: str | Path) -> list[Path]:
    """ROC and DET of every 1:1 set, rank-1 vs distractors of every 1:N set, quality rejection of ``.bin`` sets.

    Args:
        reports: Reports of one evaluation.
        out_dir: Directory for the PNGs.

    Returns:
        The written files.
    """
    out = Path(out_dir)
    # An IJB curve's label names its weighting: the same model gives other curves under another one.
    curves = {(f"{r.name} ({r.weighting} weighting)" if isinstance(r, IjbReport) else r.name): r.roc
              for r in reports if isinstance(r, (BinReport, IjbReport))}
    written = []
    if curves:
        written.append(plots.plot_roc_log(curves, out / "roc.png", title="Verification ROC"))
        written.append(plots.plot_det(curves, out / "det.png", title="Verification DET"))
    quality = {r.name: r.quality for r in reports if isinstance(r, BinReport)}
    if quality:
        written.append(plots.plot_quality_rejection(quality, out / "quality_rejection.png"))
    ident = {r.name: (r.result.distractor_counts, r.result.rank1) for r in reports
             if isinstance(r, IdentificationReport)}
    if ident:
        written.append(plots.plot_rank1_vs_distractors(ident, out / "rank1_vs_distractors.png"))
    pfe = [r for r in reports if isinstance(r, (PfeBinReport, PfeIjbReport))]
    if pfe:  # MLS beside cosine, and (for .bin sets) uncertainty beside norm as the quality that rejects
        pfe_curves = {f"{r.name} {label}": roc for r in pfe for label, roc in
                      (("MLS", r.mls_roc), ("cosine", r.roc), ("cosine of fused mu", r.mu_cosine_roc))}
        written.append(plots.plot_roc_log(pfe_curves, out / "pfe_roc.png", title="Verification ROC: PFE MLS vs cosine"))
        rejection = {f"{r.name} {label}": rows for r in pfe if isinstance(r, PfeBinReport)
                     for label, rows in (("by norm", r.quality), ("by uncertainty", r.uncertainty_quality))}
        if rejection:
            written.append(plots.plot_quality_rejection(
                rejection, out / "pfe_quality_rejection.png", title="Accuracy vs rejected pairs: uncertainty vs norm",
                xlabel="pairs rejected, lowest quality first (%)"))
    return written
