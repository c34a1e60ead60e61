"""The ``facescale plan`` command line: its options and the count parsers they use (``10M``, ``0.01``).

Kept apart from the planner (``facescale.parallel.plan``, which re-exports these) so the option list reads in one
place; this module imports no planner.
"""

from __future__ import annotations

import argparse
import re

_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}


def parse_count(text: str) -> int:
    """``"10M"`` -> 10_000_000; accepts k/K, M, G/B suffixes, decimals (``"1.5M"``) and plain integers."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMgGbB]?)\s*", str(text))
    if not match:
        raise ValueError(f"not a count: {text!r} (use e.g. 100k, 10M, 5000000)")
    value = float(match.group(1)) * _SUFFIXES[match.group(2).upper()]
    if value != int(value) or value <= 0:
        raise ValueError(f"not a positive whole count: {text!r}")
    return int(value)


def parse_pool_size(text: str) -> int | float:
    """``--pool-size``: a fraction in (0, 1) of the identities (``"0.01"``), else a count (``"10k"``)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None and 0 < value < 1:
        return value
    return parse_count(text)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``facescale plan`` options to ``parser``."""
    parser.add_argument("--classifier", choices=["partial_fc", "ffc"], default="partial_fc",
                        help="partial_fc (sharded centers) or ffc (the F²C dynamic class pool)")
    parser.add_argument("--pool-size", type=parse_pool_size, default=None,
                        help="ffc: pool slots (e.g. 10k) or a fraction of --identities (e.g. 0.01)")
    parser.add_argument("--ids-per-batch", type=int, default=64, help="ffc: gallery identities per rank and step")
    parser.add_argument("--images-per-id", type=int, default=2, help="ffc: gallery images per identity")
    parser.add_argument("--identities", type=parse_count, default=None,
                        help="number of classes, e.g. 10M (required unless --fit)")
    parser.add_argument("--world-size", type=int, required=True, help="ranks the classes are sharded over")
    parser.add_argument("--batch-size", type=int, required=True, help="per-rank batch size")
    parser.add_argument("--sample-rate", type=float, default=1.0, help="Partial FC sample rate")
    parser.add_argument("--embedding", type=int, default=512, help="embedding size")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    parser.add_argument("--state-dtype", choices=["fp32", "bf16", "int8"], default=None)
    parser.add_argument("--second-moment", choices=["full", "row"], default="row")
    parser.add_argument("--dense", action="store_true", help="the arcface_torch v2 baseline (dense fp32 state)")
    parser.add_argument("--margin", default="arcface",
                        choices=["arcface", "cosface", "combined", "magface", "curricularface", "adaface"])
    parser.add_argument("--subcenters", type=int, default=1, help="centers per class (Sub-center ArcFace's K)")
    parser.add_argument("--inter-class-filter", action="store_true", help="PFC v2 inter-class filter on")
    parser.add_argument("--center-dtype", choices=["fp32", "bf16"], default="fp32", help="storage of the centers")
    parser.add_argument("--backbone", default=None, help="registered backbone: plan the whole rank, not only the "
                        "classifier (parameters, gradients, optimizer state, activations at --batch-size)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="backbone precision")
    parser.add_argument("--engine", choices=["ddp", "deepspeed"], default="ddp", help="backbone engine")
    parser.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None,
                        help="DeepSpeed ZeRO stage (default 2, the config default; --engine deepspeed only)")
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="per-rank budget (the rank peak: backbone included with --backbone); exit 1 if exceeded")
    parser.add_argument("--fit", action="store_true", help="print the most identities that fit --memory-gib")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
