"""``facescale eval`` and ``facescale export``: evaluate a model in the protocols users report, export it to ONNX.

Bad input (a malformed ``.bin`` or meta file, a missing image, a model URI that does not resolve) is one line on
stderr and exit code 2, found before the long part of the run wherever a cheap check can find it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("facescale.eval")

EVAL_EXPERIMENT = "facescale-eval"


class EvalUsageError(ValueError):
    """Arguments that cannot make an evaluation (nothing to evaluate, clashing set names, bad counts)."""


def add_eval_commands(sub: Any) -> None:
    """Adds the ``eval`` and ``export`` sub-commands to the ``facescale`` parser's sub-parsers."""
    ev = sub.add_parser("eval", help="verification (.bin), IJB TPR@FPR, 1:N identification; plots; MLflow run")
    ev.add_argument("--model", required=True, help="models:/name@alias, models:/name/N, models:/m-..., "
                    "runs:/<run id>/<name>, or a checkpoint directory")
    ev.add_argument("--bin", nargs="+", default=[], metavar="BIN", help="InsightFace .bin verification sets")
    ev.add_argument("--ijb-meta", help="IJB 'image template media' file")
    ev.add_argument("--ijb-pairs", help="IJB 'template1 template2 label' file")
    ev.add_argument("--ijb-images", help="directory of the aligned 112x112 crops named in --ijb-meta")
    ev.add_argument("--ijb-scores", help="IJB detector scores, 'image x1 y1 ... x5 y5 score' per line "
                    "(InsightFace's ijbc_name_5pts_score.txt); needed by --ijb-weighting detector and both")
    ev.add_argument("--ijb-weighting", choices=("none", "norm", "detector", "both"), default="both",
                    help="image weights before template pooling: none (unit features), norm (embedding norm), "
                    "detector (detector score), both (norm x score, as InsightFace publishes IJB results; default)")
    ev.add_argument("--pfe", action="store_true", help="also Probabilistic Face Embeddings (the model needs "
                    "forward_pfe, e.g. from `facescale pfe`): MLS verification beside cosine, uncertainty rejection "
                    "beside norm rejection on --bin sets; PFE template fusion and MLS on IJB")
    ev.add_argument("--id-folder", help="1:N from a folder with gallery/<id>/, probes/<id>/ and distractors/")
    ev.add_argument("--id-synthetic", action="store_true", help="1:N on rendered synthetic identities")
    ev.add_argument("--id-enrolled", type=int, default=100, help="synthetic: enrolled identities")
    ev.add_argument("--id-non-mated", type=int, default=100, help="synthetic: searched but not enrolled")
    ev.add_argument("--id-rendered-distractors", type=int, default=1000, help="synthetic: rendered distractors")
    ev.add_argument("--id-max-distractors", type=int, default=1_000_000,
                    help="synthetic: total distractors (beyond the rendered ones: fitted-Gaussian embeddings)")
    ev.add_argument("--id-difficulty", type=float, default=0.5, help="synthetic: generator difficulty 0..1")
    ev.add_argument("--id-seed", type=int, default=0, help="synthetic: generator seed")
    ev.add_argument("--distractor-counts", type=int, nargs="+", help="rank-1 curve points (default 10 .. 1e6)")
    ev.add_argument("--batch-size", type=int, default=128)
    ev.add_argument("--device", default="cpu", help="torch device, e.g. cuda:0")
    ev.add_argument("--out", default="eval_results", help="directory for plots, report.json and report.txt")
    ev.add_argument("--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI or sqlite:///mlruns.db)")
    ev.add_argument("--experiment", default=EVAL_EXPERIMENT, help="MLflow experiment of the eval run")
    ev.add_argument("--run-name", help="MLflow run name")
    ev.add_argument("--artifact-root", default="mlartifacts", help="artifact root of a new local experiment")
    ev.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    ev.set_defaults(func=cmd_eval)

    ex = sub.add_parser("export", help="export a model to ONNX (dynamic batch) and check parity in onnxruntime")
    ex.add_argument("--model", required=True, help="MLflow model URI or checkpoint directory (as for eval)")
    ex.add_argument("--out", required=True, help="ONNX file to write")
    ex.add_argument("--opset", type=int, default=17)
    ex.add_argument("--atol", type=float, default=1e-4, help="parity tolerance on normalised embeddings")
    ex.add_argument("--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI or sqlite:///mlruns.db)")
    ex.set_defaults(func=cmd_export)


def _bad_input(exc: Exception) -> int:
    print(f"facescale: {exc}", file=sys.stderr)
    return 2


def _input_errors() -> tuple[type[Exception], ...]:
    from facescale.eval.ijb import MetaFileError
    from facescale.eval.images import ImageFolderError
    from facescale.eval.pfe import PfeModelError
    from facescale.eval.verification import BinFormatError
    from facescale.tracking.models import ModelResolveError

    return BinFormatError, MetaFileError, ImageFolderError, ModelResolveError, EvalUsageError, PfeModelError


def _check_inputs(args: argparse.Namespace) -> None:
    """Everything that can be checked without the model: files exist and parse (raises the typed errors)."""
    from facescale.eval.ijb import MetaFileError, read_template_media, read_template_pairs
    from facescale.eval.images import ImageFolderError
    from facescale.eval.suite import load_ijb_scores
    from facescale.eval.verification import check_bin

    if not (args.bin or args.ijb_meta or args.ijb_pairs or args.id_folder or args.id_synthetic):
        raise EvalUsageError("nothing to evaluate: give --bin, --ijb-meta/--ijb-pairs/--ijb-images, --id-folder "
                             "or --id-synthetic")
    if args.pfe and not (args.bin or args.ijb_meta):
        raise EvalUsageError("--pfe evaluates --bin sets and IJB templates: give at least one of them")
    names = [Path(b).stem for b in args.bin]
    if len(set(names)) != len(names):
        raise EvalUsageError(f"two --bin files share a name ({', '.join(names)}): results are keyed by file stem")
    for path in args.bin:
        check_bin(path)
    ijb = [args.ijb_meta, args.ijb_pairs, args.ijb_images]
    if (any(ijb) or args.ijb_scores) and not all(ijb):
        raise MetaFileError("IJB evaluation needs all of --ijb-meta, --ijb-pairs and --ijb-images")
    if all(ijb):
        meta = read_template_media(args.ijb_meta)
        read_template_pairs(args.ijb_pairs, meta)
        load_ijb_scores(meta, args.ijb_weighting, args.ijb_scores)
        if not Path(args.ijb_images).is_dir():
            raise ImageFolderError(f"--ijb-images: directory not found: {args.ijb_images}")
    if args.id_folder and not (Path(args.id_folder) / "gallery").is_dir():
        raise ImageFolderError(f"--id-folder {args.id_folder}: no gallery/ sub-folder")
    if args.id_synthetic:
        if args.id_enrolled < 1 or args.id_non_mated < 0 or args.id_max_distractors < 0:
            raise EvalUsageError("--id-enrolled must be >= 1, --id-non-mated and --id-max-distractors >= 0")
        if args.id_max_distractors > args.id_rendered_distractors and args.id_rendered_distractors < 2:
            raise EvalUsageError("--id-max-distractors beyond the rendered ones needs --id-rendered-distractors >= 2 "
                                 "(the Gaussian is fitted to them)")
        if not 0.0 <= args.id_difficulty <= 1.0:
            raise EvalUsageError(f"--id-difficulty must be in [0, 1], got {args.id_difficulty}")


def _run_protocols(args: argparse.Namespace, module: Any) -> list[Any]:
    from facescale.eval import pfe, suite
    from facescale.eval.identification import DISTRACTOR_COUNTS
    from facescale.eval.synthetic import describe, synthetic_identification

    counts = tuple(args.distractor_counts or DISTRACTOR_COUNTS)
    kw = {"batch_size": args.batch_size, "device": args.device}
    reports: list[Any] = []
    for path in args.bin:
        log.info("verification on %s%s", path, " with PFE" if args.pfe else "")
        reports.append((pfe.run_bin_pfe if args.pfe else suite.run_bin)(module, path, **kw))
    if args.ijb_meta:
        log.info("IJB templates from %s and %s, %s weighting", args.ijb_meta, args.ijb_pairs, args.ijb_weighting)
        run_ijb = pfe.run_ijb_pfe if args.pfe else suite.run_ijb
        reports.append(run_ijb(module, args.ijb_meta, args.ijb_pairs, args.ijb_images,
                               weighting=args.ijb_weighting, scores_path=args.ijb_scores, **kw))
    if args.id_folder:
        log.info("1:N identification from %s", args.id_folder)
        reports.append(suite.run_identification_folder(module, args.id_folder, counts=counts, **kw))
    if args.id_synthetic:
        log.info("1:N identification on synthetic identities (%d rendered distractors, %d in all)",
                 args.id_rendered_distractors, args.id_max_distractors)
        run = synthetic_identification(module, num_enrolled=args.id_enrolled, num_non_mated=args.id_non_mated,
                                       num_rendered_distractors=args.id_rendered_distractors,
                                       max_distractors=args.id_max_distractors, seed=args.id_seed,
                                       difficulty=args.id_difficulty, counts=counts, **kw)
        reports.append(suite.IdentificationReport(name="synthetic_1n", result=run.result, composition=describe(run)))
    return reports


def _log_to_mlflow(args: argparse.Namespace, loaded: Any, metrics: dict[str, float], files: list[Path],
                   report_json: str, report_txt: str) -> tuple[str, str]:
    """One MLflow run with params, metrics (linked to the LoggedModel when there is one) and artifacts."""
    import math

    from mlflow.entities import LoggedModelInput, Metric
    from mlflow.tracking import MlflowClient

    from facescale.tracking.mlflow_run import default_tracking_uri, end_run, resolve_local_uri, start_run

    uri = resolve_local_uri(args.tracking_uri or default_tracking_uri())
    params = {"model": loaded.source, "model_id": loaded.model_id or "", "backbone": loaded.backbone or "",
              "embedding_size": loaded.embedding_size, "bins": ",".join(args.bin), "ijb_pairs": args.ijb_pairs or "",
              "id_folder": args.id_folder or "", "id_synthetic": args.id_synthetic, "pfe": args.pfe}
    tags = {"facescale.kind": "eval", "facescale.model": loaded.source}
    if args.ijb_meta:  # IJB numbers depend on the weighting: the run says which one made them
        params.update({"ijb_weighting": args.ijb_weighting, "ijb_scores": args.ijb_scores or ""})
        tags["facescale.ijb_weighting"] = args.ijb_weighting
    run_id = start_run(uri, args.experiment, args.artifact_root, args.run_name, params,
                       json.dumps(vars(args), default=str, indent=2), tags=tags)
    ok = False
    try:
        client = MlflowClient(uri)
        if loaded.model_id:
            client.log_inputs(run_id, models=[LoggedModelInput(loaded.model_id)])
        ts = int(time.time() * 1000)
        batch = [Metric(k, v, ts, 0, model_id=loaded.model_id) for k, v in metrics.items() if math.isfinite(v)]
        for start in range(0, len(batch), 1000):
            client.log_batch(run_id, metrics=batch[start:start + 1000])
        for path in files:
            client.log_artifact(run_id, str(path), "plots")
        client.log_text(run_id, report_json, "eval/report.json")
        client.log_text(run_id, report_txt, "eval/report.txt")
        ok = True
    finally:
        end_run(uri, run_id, ok)
    return uri, run_id


def cmd_eval(args: argparse.Namespace) -> int:
    """Handler of ``facescale eval``."""
    from facescale.eval.report import format_report, report_dict, report_metrics, write_plots
    from facescale.tracking.models import load_backbone

    try:
        _check_inputs(args)
        loaded = load_backbone(args.model, args.tracking_uri)
        if args.pfe:
            from facescale.eval.pfe import require_pfe

            require_pfe(loaded.module, loaded.source)  # before the long part
        module = loaded.module.to(args.device)
        print(f"model {loaded.source}: {loaded.backbone or 'unknown backbone'}, embedding {loaded.embedding_size}"
              + (f", model id {loaded.model_id}" if loaded.model_id else ""), flush=True)
        reports = _run_protocols(args, module)
    except _input_errors() as exc:
        return _bad_input(exc)
    texts = [format_report(r) for r in reports]
    report_txt = "\n\n".join(texts) + "\n"
    print("\n" + report_txt, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, float] = {}
    for r in reports:
        metrics.update(report_metrics(r))
    summary = {"model": loaded.source, "model_id": loaded.model_id, "backbone": loaded.backbone,
               "embedding_size": loaded.embedding_size, "sets": [report_dict(r) for r in reports]}
    report_json = json.dumps(summary, indent=2, default=float)
    (out / "report.json").write_text(report_json + "\n")
    (out / "report.txt").write_text(report_txt)
    files = write_plots(reports, out)
    print(f"plots and report in {out}: {', '.join(p.name for p in files)}")
    if not args.no_mlflow:
        uri, run_id = _log_to_mlflow(args, loaded, metrics, files, report_json, report_txt)
        print(f"MLflow run {run_id} in experiment {args.experiment!r} at {uri}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Handler of ``facescale export``."""
    from facescale.export import OnnxParityError, export_onnx
    from facescale.tracking.models import ModelResolveError, load_backbone

    try:
        loaded = load_backbone(args.model, args.tracking_uri)
    except ModelResolveError as exc:
        return _bad_input(exc)
    metadata = {"source": loaded.source, "backbone": loaded.backbone or "", "model_id": loaded.model_id or "",
                "embedding_size": str(loaded.embedding_size)}
    try:
        res = export_onnx(loaded.module, args.out, metadata=metadata, opset=args.opset, atol=args.atol)
    except OnnxParityError as exc:
        print(f"facescale: export failed the parity check: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {res.path} ({res.size_mb:.1f} MiB, opset {res.opset}, dynamic batch): onnxruntime matches "
          f"PyTorch, max |diff| of normalised embeddings {res.max_abs_diff:.2e} <= {args.atol:g} at batch sizes "
          f"{', '.join(map(str, res.parity_batches))}")
    return 0
