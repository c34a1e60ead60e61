"""``facescale pfe``: train a PFE uncertainty head on a trained model, as an MLflow run.

Only argparse here: the parser is built on every ``facescale`` call, the training code is imported when the command
runs.
"""

from __future__ import annotations

import argparse
from typing import Any


def _cmd_pfe(args: argparse.Namespace) -> int:
    from facescale.config import load_config
    from facescale.pfe.config import PFERunConfig
    from facescale.pfe.train import format_pfe_result, run_pfe

    cfg = load_config(args.config, args.overrides, model=PFERunConfig)
    print(format_pfe_result(run_pfe(cfg, args.model)))
    return 0


def add_pfe_command(sub: Any) -> None:
    """Adds the ``pfe`` sub-command to the ``facescale`` parser's sub-parsers."""
    p = sub.add_parser("pfe", help="train a Probabilistic Face Embeddings uncertainty head on a frozen model "
                       "(Shi & Jain, ICCV 2019); logs backbone + head as one model")
    p.add_argument("--model", required=True, help="models:/name@alias, models:/name/N, models:/m-..., "
                   "runs:/<run id>/<name>, or a checkpoint directory")
    p.add_argument("--config", help="YAML config: a training config (data, tracking, scaling.use_gpu) with an "
                   "optional pfe section; default: the embedded defaults")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. pfe.steps=500 pfe.lr=0.01 data.root=...")
    p.add_argument("--verbose", action="store_true", help="show every library log line")
    p.set_defaults(func=_cmd_pfe)
