"""Bytes each rank downloads when it resumes from an S3 checkpoint: its share (N / W), not the whole checkpoint.

    python benchmarks/resume_io.py [--classes 1000000] [--dim 512] [--save-ranks 2] [--resume-ranks 2]

A real checkpoint, written as training writes it: ``--save-ranks`` gloo processes each hold a Partial FC class range
(``--classes`` identities, ``--dim``-d centers, ``SparseRowSGD`` with its default int8 momentum, one optimizer step
taken so the state exists) and an ``iresnet_tiny`` backbone with SGD momentum, and save through ``TrainCheckpoint`` +
``CheckpointStore`` to ``s3://`` on a real S3 API server (moto, 127.0.0.1). Then ``--resume-ranks`` fresh processes
resume from it as ``train/loop.py`` does (``local_copy(uri, wanted=ckpt.files_for_rank(rank))`` then ``load``), and
every byte the storage layer downloads is counted: the size of each file ``storage.download_file`` wrote, plus each
``storage.read_bytes`` (the manifest). Loaded centers and momentum are checked against the saved ones by digest
where the class ranges coincide.

moto reads a whole object into memory for every ranged GET and joins multipart uploads in memory, so here every
object moves in one request (``storage.DEFAULT_TRANSFER`` raised above the largest file); the bytes are the same.

Writes benchmarks/results/resume_io.json and the `resume_io` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, table, update_section, write_json  # noqa: E402

BUCKET = "resume-io"


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM; ``ru_maxrss`` would carry the spawning driver's over ``exec``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().view(torch.uint8).numpy()).hexdigest()


def _build(args: argparse.Namespace, seed: int):
    """Backbone, Partial FC, their optimizers and the checkpoint object of this rank (after one step)."""
    from facescale.checkpoint.format import TrainCheckpoint, TrainProgress
    from facescale.heads.config import MarginConfig, build_margin
    from facescale.models import build_backbone
    from facescale.parallel import PartialFC, build_partial_fc_optimizer

    torch.manual_seed(seed)
    backbone = build_backbone("iresnet_tiny", args.dim)
    backbone_opt = torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9)
    pfc = PartialFC(build_margin(MarginConfig()), args.dim, args.classes, sample_rate=0.1, seed=seed)
    pfc_opt = build_partial_fc_optimizer(pfc.parameters(), "sgd", lr=0.1, momentum=0.9)  # default: int8 momentum
    pfc.attach_optimizer(pfc_opt)
    g = torch.Generator().manual_seed(seed)
    pfc(torch.randn(8, args.dim, generator=g), torch.randint(0, args.classes, (8,), generator=g)).backward()
    pfc_opt.step()
    for p in backbone.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    backbone_opt.step()
    progress = TrainProgress(step=1, world_size=pfc.world_size)
    arch = {"backbone": "iresnet_tiny", "embedding_size": args.dim}
    return TrainCheckpoint(backbone, pfc, {"backbone": backbone_opt}, progress, arch=arch), pfc, pfc_opt


def _one_request_per_object() -> None:
    from boto3.s3.transfer import TransferConfig

    from facescale import storage

    storage.s3.DEFAULT_TRANSFER = TransferConfig(multipart_threshold=16 << 30, max_concurrency=1)


def _rank(rank: int, world_size: int, port: int, mode: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(minutes=30))
    _one_request_per_object()
    from facescale import storage
    from facescale.checkpoint.committed import local_copy
    from facescale.checkpoint.store import CheckpointStore

    t0 = time.perf_counter()
    if mode == "save":
        ckpt, pfc, opt = _build(args, seed=1)
        built_s = time.perf_counter() - t0
        store = CheckpointStore(f"s3://{BUCKET}/run", rank, world_size, dist.barrier)
        uri = store.save(1, lambda directory: ckpt.save(directory, rank))
        record = {"uri": uri, "class_start": pfc.class_start, "num_local": pfc.num_local, "build_s": built_s,
                  "save_s": time.perf_counter() - t0 - built_s,
                  "digests": {"weight": _digest(pfc.weight), **{k: _digest(v) for k, v in opt.state[pfc.weight].items()
                                                                if v.dim()}}}  # fmt: skip
    else:
        ckpt, pfc, opt = _build(args, seed=2)  # other values: what is loaded must come from the checkpoint
        built_s = time.perf_counter() - t0
        files, meta_bytes = {}, 0
        real_download, real_read = storage.download_file, storage.read_bytes

        def counting_download(url: str, path: str | os.PathLike[str]) -> None:
            real_download(url, path)
            files[url.rsplit("/", 1)[1]] = os.path.getsize(path)

        def counting_read(url: str) -> bytes:
            nonlocal meta_bytes
            data = real_read(url)
            meta_bytes += len(data)
            return data

        storage.download_file, storage.read_bytes = counting_download, counting_read
        wanted = ckpt.files_for_rank(rank)
        with local_copy(args.uri, wanted=wanted) as directory:
            downloaded_s = time.perf_counter() - t0 - built_s
            ckpt.load(directory, rank)
        record = {"rank": rank, "class_start": pfc.class_start, "num_local": pfc.num_local, "files": files,
                  "file_bytes": sum(files.values()), "manifest_bytes": meta_bytes, "build_s": built_s,
                  "download_s": downloaded_s, "load_s": time.perf_counter() - t0 - built_s - downloaded_s,
                  "digests": {"weight": _digest(pfc.weight), **{k: _digest(v) for k, v in opt.state[pfc.weight].items()
                                                                if v.dim()}}}  # fmt: skip
    record["peak_rss_mb"] = _peak_rss_mb()
    Path(out, f"{mode}_rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/test_partial_fc.py: gloo threads once aborted during interpreter finalization


def _spawn(world_size: int, mode: str, args: argparse.Namespace, out: str) -> list[dict]:
    from facescale.parallel.dist import free_loopback_port

    mp.spawn(_rank, args=(world_size, free_loopback_port(), mode, args, out), nprocs=world_size, join=True)
    return [json.loads(Path(out, f"{mode}_rank{r}.json").read_text()) for r in range(world_size)]


def _start_s3() -> object:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[name]
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull})  # fmt: skip
    from facescale import storage

    storage.s3_client().create_bucket(Bucket=BUCKET)
    return server


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--save-ranks", type=int, default=2)
    ap.add_argument("--resume-ranks", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="print only: no JSON, no BENCHMARKS.md section")
    args = ap.parse_args()
    from facescale import storage
    from facescale.checkpoint.committed import verify_checkpoint
    from facescale.parallel.row_state import state_bytes_per_row

    server = _start_s3()
    try:
        with tempfile.TemporaryDirectory(prefix="resume-io-") as out:
            saved = _spawn(args.save_ranks, "save", args, out)
            args.uri = saved[0]["uri"]
            manifest = verify_checkpoint(args.uri)
            listing = storage.list_objects(args.uri)
            resumed = _spawn(args.resume_ranks, "resume", args, out)
    finally:
        server.stop()
    total = sum(manifest["files"].values())
    by_range = {(s["class_start"], s["num_local"]): s["digests"] for s in saved}
    rows, ranks = [], []
    for r in resumed:
        same = by_range.get((r["class_start"], r["num_local"]))
        r["matches_saved"] = None if same is None else same == r["digests"]
        if r["matches_saved"] is False:
            raise SystemExit(f"rank {r['rank']}: loaded centers or momentum differ from the saved ones")
        downloaded = r["file_bytes"] + r["manifest_bytes"]
        ranks.append({k: v for k, v in r.items() if k != "digests"} | {"downloaded_bytes": downloaded,
                                                                        "fraction_of_checkpoint": downloaded / total})
        range_files = [n for n in r["files"] if n.startswith("partial_fc_classes_")]
        rows.append([r["rank"], f"[{r['class_start']:,}, {r['class_start'] + r['num_local']:,})", len(r["files"]),
                     ", ".join(range_files), _gb(downloaded), f"{downloaded / total:.3f}",
                     f"{r['download_s']:.1f}", f"{r['peak_rss_mb']:,.0f}",
                     {None: "-", True: "yes"}[r["matches_saved"]]])  # fmt: skip
    worst = max(x["fraction_of_checkpoint"] for x in ranks)
    goal = 1 / args.resume_ranks
    met = worst <= goal * 1.05
    load = os.getloadavg()[0]
    parent_rss_mb = _peak_rss_mb()
    payload = {"machine": machine(), "load_avg_1min_end": load, "classes": args.classes, "dim": args.dim,
               "save_ranks": args.save_ranks, "resume_ranks": args.resume_ranks, "pfc_optimizer": "SparseRowSGD int8",
               "bytes_per_identity": 4 * args.dim + state_bytes_per_row("sgd", args.dim),
               "checkpoint_files": manifest["files"], "checkpoint_bytes": total,
               "receipt_bytes_not_downloaded": sum(v for k, v in listing.items() if k not in manifest["files"]),
               "save": [{k: v for k, v in s.items() if k != "digests"} for s in saved], "resume": ranks,
               "worst_fraction": worst, "goal_fraction": goal, "goal_met": met,
               "driver_and_moto_peak_rss_mb": parent_rss_mb}  # fmt: skip
    print(json.dumps({"worst_fraction": worst, "checkpoint_bytes": total, "resume": ranks}, indent=1))
    if args.no_write:
        return
    write_json("resume_io", payload)
    m = payload["machine"]
    update_section("resume_io", "\n".join([
        f"## Per-rank resume I/O from S3 ({args.classes:,} identities, {args.save_ranks} → {args.resume_ranks} ranks)",
        "",
        f"`python benchmarks/resume_io.py --classes {args.classes} --dim {args.dim} --save-ranks {args.save_ranks} "
        f"--resume-ranks {args.resume_ranks}` — {m['cores']} cores, torch {m['torch']}, {m['date']}, 1-min load "
        f"average at the end {load:.1f}. A real checkpoint (`iresnet_tiny` backbone + SGD momentum, Partial FC "
        f"{args.dim}-d centers with the default int8 `SparseRowSGD` state, {payload['bytes_per_identity']:,} B per "
        f"identity) saved by {args.save_ranks} gloo ranks to a moto S3 server on 127.0.0.1 through `CheckpointStore`, "
        f"{_gb(total)} GB in {len(manifest['files'])} files; resumed by {args.resume_ranks} fresh ranks as the "
        "training loop does (`local_copy(uri, wanted=ckpt.files_for_rank(rank))`). Downloaded = bytes of the files "
        "`storage.download_file` wrote plus the manifest read; each object in one request (moto re-reads a whole "
        "object per ranged GET). Before this filter every rank downloaded the whole checkpoint (1.000).",
        "",
        table(["rank", "classes", "files", "class-range files", "downloaded GB", "× checkpoint", "download s",
               "peak RSS MB", "loaded = saved"], rows),
        "",
        f"Goal: ≤ 1/{args.resume_ranks} of the checkpoint per rank (+5%) — {'met' if met else 'NOT met'} "
        f"(worst {worst:.3f}). The rest of each rank's share is the replicated model and optimizer "
        f"({_gb(sum(v for k, v in manifest['files'].items() if not k.startswith(('partial_fc_classes_', 'rng_'))))} "
        f"GB). Peak RSS of the driver holding the moto server: {parent_rss_mb:,.0f} MB.",
    ]))


if __name__ == "__main__":
    main()
