"""``facescale data`` commands that bring data in and move it: from-rec, from-folder, push, pull.

Handlers import their module when they run, so ``facescale --help`` stays fast and boto3 is only imported by
``push``/``pull`` (``data/shard_sets.py``). Data errors print one line naming the file, shard or URL and exit 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from facescale.data.errors import DataError
from facescale.storage import StorageError


def _print_report(report: Any) -> None:
    print(report.summary())
    for example in report.examples[:5]:
        print(f"  skipped: {example}")


def _cmd_from_rec(args: argparse.Namespace) -> int:
    from facescale.data.convert import from_rec

    report = from_rec(args.rec, args.out, args.idx, samples_per_shard=args.samples_per_shard, seed=args.seed,
                      resize=args.resize, on_error=args.on_error, num_threads=args.threads)  # fmt: skip
    _print_report(report)
    return 0


def _cmd_from_folder(args: argparse.Namespace) -> int:
    from facescale.data.convert import from_folder

    report = from_folder(args.root, args.out, samples_per_shard=args.samples_per_shard, seed=args.seed,
                         resize=args.resize, on_error=args.on_error, num_threads=args.threads,
                         landmarks=args.landmarks)  # fmt: skip
    _print_report(report)
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from facescale.data import shard_sets  # boto3 loads on the first s3:// call

    manifest = shard_sets.push(args.local_dir, args.s3_url)
    print(f"pushed {manifest.num_samples} samples in {len(manifest.shards)} shards to {manifest.root}")
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    from facescale.data import shard_sets

    manifest = shard_sets.pull(args.s3_url, args.local_dir)
    print(f"pulled {manifest.num_samples} samples in {len(manifest.shards)} shards to {manifest.root}")
    return 0


def _guarded(handler: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (DataError, StorageError) as exn:
            print(f"facescale data {args.data_command}: {exn}", file=sys.stderr)
            return 1

    return run


def _add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory for shards + manifest.json")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="seed of the global shuffle")
    p.add_argument("--resize", choices=("stretch", "center_crop", "off"), default="stretch",
                   help="images that are not 112x112: resize (stretch), crop to square then resize, or skip")
    p.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                   help="undecodable images (and, with --landmarks, images without usable landmarks): "
                   "count and skip them, or stop at the first")
    p.add_argument("--threads", type=int, help="image threads (default: from-rec 1, from-folder CPU count up to 8)")


def add_data_commands(data: argparse._SubParsersAction) -> None:
    """Register from-rec, from-folder, push and pull under the ``facescale data`` sub-command group.

    Args:
        data: The ``data`` group's sub-parsers (``add_subparsers`` result).
    """
    rec = data.add_parser("from-rec", help="convert an InsightFace train.rec/train.idx into shuffled shards")
    rec.add_argument("--rec", required=True, help="train.rec (a 'property' file beside it gives num_classes)")
    rec.add_argument("--idx", help="train.idx (default: beside --rec)")
    _add_convert_args(rec)
    rec.set_defaults(func=_guarded(_cmd_from_rec))

    folder = data.add_parser("from-folder", help="convert a folder with one sub-folder per identity into shards")
    folder.add_argument("--root", required=True, help="folder of identity folders; sorted names get ids 0..N-1")
    folder.add_argument("--landmarks", metavar="CSV",
                        help="align each image to the ArcFace 112x112 template from its 5 landmarks: rows "
                        "'path,x1,y1,...,x5,y5' (left eye, right eye, nose, left/right mouth corner; path relative "
                        "to --root); replaces --resize; images without usable landmarks follow --on-error")
    _add_convert_args(folder)
    folder.set_defaults(func=_guarded(_cmd_from_folder))

    push = data.add_parser("push", help="upload a shard set to s3://bucket/prefix (manifest.json last)")
    push.add_argument("local_dir", help="directory with manifest.json and its shards")
    push.add_argument("s3_url", help="s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL, credentials from AWS_*)")
    push.set_defaults(func=_guarded(_cmd_push))

    pull = data.add_parser("pull", help="download a shard set from s3://bucket/prefix (sha256-checked)")
    pull.add_argument("s3_url", help="s3://bucket/prefix holding manifest.json")
    pull.add_argument("local_dir", help="destination directory")
    pull.set_defaults(func=_guarded(_cmd_pull))
