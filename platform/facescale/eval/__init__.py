"""Evaluation: verification on ``.bin`` sets, ROC and TPR@FPR, IJB templates, 1:N identification, quality, plots.

Modules: ``verification`` (the 10-fold ``.bin`` protocol), ``rates`` (ROC, TPR@FPR), ``ijb`` (template pooling
and meta files), ``identification`` (rank-1 vs distractors, TPIR@FPIR), ``synthetic`` (rendered 1:N sets),
``quality`` (embedding norm as quality), ``pfe`` (Probabilistic Face Embeddings: MLS scores, template fusion, the
``--pfe`` protocols), ``suite`` (a model through each protocol), ``report`` and ``plots``.
No module here imports Ray, MLflow or boto3.
"""

from facescale.eval.verification import (
    BinFormatError,
    check_bin,
    compute_embeddings,
    evaluate,
    load_bin,
    roc_curve,
    verify_model,
)

__all__ = ["BinFormatError", "check_bin", "compute_embeddings", "evaluate", "load_bin", "roc_curve", "verify_model"]
