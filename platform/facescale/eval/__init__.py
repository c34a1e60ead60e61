"""Evaluation: verification protocol on ``.bin`` sets, plots."""

from facescale.eval.verification import (
    BinFormatError,
    compute_embeddings,
    evaluate,
    load_bin,
    roc_curve,
    verify_model,
)

__all__ = ["BinFormatError", "compute_embeddings", "evaluate", "load_bin", "roc_curve", "verify_model"]
