"""The ``facescale`` command: data, train (and more as the platform grows).

Config problems are reported as one clear message and exit code 2, before Ray or MLflow start.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from facescale.config import ConfigError, FaceScaleConfig, load_config
from facescale.console import set_verbose

if TYPE_CHECKING:
    from facescale.train.hooks import WorkerHooks

log = logging.getLogger("facescale")


def _add_verbose_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="show every log line of Ray Train, MLflow and the workers (default: one progress line per "
                        "stage; the full logs are in Ray's log files and MLflow either way)")


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=0.2 scaling.num_workers=4")


def _cmd_synth(args: argparse.Namespace) -> int:
    from facescale.data.synth import synthesize

    cfg = load_config(args.config, args.overrides) if args.config else FaceScaleConfig()
    s = cfg.synth
    out = args.out or cfg.data.root
    manifest = synthesize(
        out,
        identities=args.identities or s.identities,
        images_per_identity=args.images_per_identity or s.images_per_identity,
        seed=s.seed if args.seed is None else args.seed,
        difficulty=s.difficulty if args.difficulty is None else args.difficulty,
        held_out_identities=args.held_out_identities or s.held_out_identities,
        num_pairs=args.pairs or s.num_pairs,
        samples_per_shard=args.samples_per_shard or s.samples_per_shard,
        occluded_pairs=args.occluded_pairs,
    )
    print(f"wrote {manifest.num_samples} samples of {manifest.num_classes} identities in "
          f"{len(manifest.shards)} shards to {out} (digest {manifest.digest[:12]}), verification pairs in "
          f"{os.path.join(out, 'verification.bin')}")
    if args.occluded_pairs:
        print(f"occluded verification pairs in {os.path.join(out, 'verification_occluded.bin')}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from facescale.distill.cache import teacher_hooks
    from facescale.train.launch import format_results, run_training

    cfg = load_config(args.config, args.overrides)
    hooks = teacher_hooks(cfg, args.hooks)  # + a distillation run's teacher reader (checks the cache)
    if cfg.scaling.launcher == "torchrun":
        from facescale.train.torchrun import run_torchrun  # no Ray on this path

        result = run_torchrun(cfg, hooks=hooks)
        if result is not None:  # rank 0
            print(format_results(result))
        return 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        raise ConfigError(f"this process is one of {os.environ['WORLD_SIZE']} that torchrun started, but "
                          "scaling.launcher is ray (each would start its own Ray run): add scaling.launcher=torchrun")
    result = run_training(cfg, hooks=hooks)
    print(format_results(result))
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from facescale.distill.pipeline import load_pipeline
    from facescale.distill.report import format_summary
    from facescale.distill.runner import PipelineRunner

    spec = load_pipeline(args.pipeline, args.overrides)
    runner = PipelineRunner(spec, args.run_id, source=args.pipeline)  # validates every stage before Ray starts
    print(f"pipeline {spec.name}: run id {runner.pipeline_run_id} (re-submit with --run-id "
          f"{runner.pipeline_run_id} to resume)", flush=True)
    res = runner.run()
    records = [res.records[s] for s in spec.stage_names()]
    print(f"\nFaceScale recursive distillation: {spec.name}, run id {res.pipeline_run_id}")
    print(format_summary(records, res.skipped, res.champion, res.stage_times_s))
    from facescale.tracking.lineage import safe_name

    aliases = ", ".join(map(safe_name, spec.stage_names()))
    champion = safe_name(res.champion) if res.champion else "none"
    print(f"registered model {res.registered_model}: aliases {aliases}, champion -> {champion}")
    print(f"MLflow parent run {res.parent_run_id} at {res.tracking_uri}; plots: {', '.join(map(str, res.plots))}")
    from mlflow.tracking import MlflowClient

    from facescale.tracking.mlflow_run import ui_url

    experiment_id = MlflowClient(res.tracking_uri).get_run(res.parent_run_id).info.experiment_id
    if res.tracking_uri.startswith("sqlite:"):
        print(f"open the UI with: .venv/bin/mlflow ui --backend-store-uri {res.tracking_uri} --port 5000")
    print(f"the pipeline's runs: {ui_url(res.tracking_uri, experiment_id)}")
    print(f"wall time {res.wall_time_s:.0f} s")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from facescale.parallel.plan import run_plan

    return run_plan(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``facescale`` command."""
    parser = argparse.ArgumentParser(prog="facescale", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="make and convert datasets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write synthetic identities as WebDataset shards + verification .bin")
    _add_config_args(synth, required=False)
    synth.add_argument("--out", help="output directory (default: data.root of the config)")
    synth.add_argument("--identities", type=int)
    synth.add_argument("--images-per-identity", type=int)
    synth.add_argument("--held-out-identities", type=int)
    synth.add_argument("--pairs", type=int, help="verification pairs in verification.bin")
    synth.add_argument("--occluded-pairs", type=int, default=0, help="pairs of a second held-out set, "
                       "verification_occluded.bin, one face of each occluded (the same pairs as --pairs when equal)")
    synth.add_argument("--seed", type=int)
    synth.add_argument("--difficulty", type=float, help="0 (easy) .. 1 (hard)")
    synth.add_argument("--samples-per-shard", type=int)
    synth.set_defaults(func=_cmd_synth)
    from facescale.data.cli import add_data_commands

    add_data_commands(data)  # from-rec, from-folder, push, pull
    from facescale.data.shard_sets import add_index_command

    add_index_command(data)  # index: DALI index files for shard sets written without them

    train = sub.add_parser("train", help="train a backbone (Ray Train, or torchrun: scaling.launcher=torchrun)")
    _add_config_args(train)
    _add_verbose_arg(train)
    train.set_defaults(func=_cmd_train)

    distill = sub.add_parser("distill", help="run a recursive-distillation pipeline (teacher → generations)")
    distill.add_argument("--pipeline", required=True, help="pipeline spec YAML (pipelines/*.yaml)")
    distill.add_argument("--run-id", help="pipeline run id; re-using one resumes that run (default: new)")
    distill.add_argument("overrides", nargs="*", help="dotted overrides of the spec, e.g. generations=3 "
                         "config.train.lr=0.1")
    _add_verbose_arg(distill)
    distill.set_defaults(func=_cmd_distill)

    from facescale.parallel.plan import add_plan_arguments

    plan = sub.add_parser("plan", help="per-rank memory and communication of a Partial FC or FFC classifier")
    add_plan_arguments(plan)
    plan.set_defaults(func=_cmd_plan)

    from facescale.eval_cli import add_eval_commands

    add_eval_commands(sub)  # eval, export
    from facescale.pfe.cli import add_pfe_command

    add_pfe_command(sub)  # pfe: the PFE uncertainty head on a trained model
    return parser


def main(argv: Sequence[str] | None = None, *, hooks: WorkerHooks | None = None) -> int:
    """Entry point of the ``facescale`` console script.

    ``hooks`` (Python callers only, e.g. a test that plants faults; ``train/hooks.py``) reach ``facescale train``'s
    training loop; no command-line flag or config key sets them.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    args.hooks = hooks
    set_verbose(bool(getattr(args, "verbose", False)))  # read by the launchers (facescale/console.py)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"facescale: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FloatingPointError) as exc:  # a missing input; a run stopped on NaN/inf (names it)
        print(f"facescale: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
