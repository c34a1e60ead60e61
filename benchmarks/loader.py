"""Training-loader throughput on the same shards with 2 threads: the DALI decode limit, the DALI loader, the torch
loader and a Pillow DataLoader baseline, all delivering what the loaders deliver: uint8 ``[B, 3, H, W]``, mirrored.

    python benchmarks/loader.py [--images 3000] [--batch-size 128] [--repeats 7] [--data DIR]

Writes benchmarks/results/loader.json and the `loader` section of BENCHMARKS.md. The loaders run in turn,
``--repeats`` rounds, so that load from other processes falls on all of them alike; the median round is reported.
Rates are steady-state (after a warm-up, within an epoch); the DALI loader's epoch start (a new reader per epoch;
its decode pipeline is built once) is timed separately.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, table, update_section, write_json  # noqa: E402

from facescale.data import build_loader, load_manifest, synthesize  # noqa: E402
from facescale.data.dali_loader import build_dali_loader  # noqa: E402
from facescale.data.wds_index import ensure_indices  # noqa: E402

THREADS = 2


def raw_dali(root: Path, batch_size: int, mmap: bool, mirror: bool = False) -> Callable[[], Iterator[int]]:
    """The limit: DALI's webdataset reader + CPU decoder, no shuffle, mirror, layout change or torch hand-off.

    With ``mirror``, the decoded images are also mirrored (random) and laid out CHW uint8 into a torch tensor the way
    the DALI loader does on CPU (one numpy copy per sample): the pixel work every loader must do, without the
    loader's machinery. ``crop_mirror_normalize`` in DALI does the same slower on CPU (see ``dali_batch``).
    """
    from nvidia.dali import fn, pipeline_def, types

    manifest = load_manifest(root)
    urls, indices = manifest.shard_urls(), ensure_indices(manifest)

    def run() -> Iterator[int]:
        @pipeline_def(batch_size=batch_size, num_threads=THREADS, device_id=None, prefetch_queue_depth=2, seed=0)
        def graph():  # type: ignore[no-untyped-def]
            jpeg = fn.readers.webdataset(paths=urls, index_paths=indices, ext=["jpg"], dont_use_mmap=not mmap)
            return fn.decoders.image(jpeg, device="cpu", output_type=types.RGB)

        pipe = graph()
        pipe.build()
        coins = np.random.default_rng(0)
        try:
            while True:
                (images,) = pipe.run()
                if mirror:
                    hwc = np.asarray(images.as_tensor())
                    chw = torch.empty((len(images), 3, *hwc.shape[1:3]), dtype=torch.uint8).numpy()
                    for i, flip in enumerate((coins.random(len(images)) < 0.5).tolist()):
                        chw[i] = (hwc[i, :, ::-1] if flip else hwc[i]).transpose(2, 0, 1)
                yield len(images)
        finally:
            pipe._shutdown()  # stop its threads now rather than at the next GC (as the loader does)

    return run


def dali_loader(root: Path, batch_size: int) -> Callable[[], Iterator[int]]:
    """The DALI training loader: read, shuffle, check, decode, mirror, uint8 torch tensors (one rank)."""
    loader = build_dali_loader(root, batch_size=batch_size, rank=0, world_size=1, seed=0, num_threads=THREADS)

    def run() -> Iterator[int]:
        for epoch in range(1000):
            for _, _, keys in loader.epoch_samples(epoch):
                yield len(keys)

    return run


def torch_loader(root: Path, batch_size: int) -> Callable[[], Iterator[int]]:
    """The torch loader: webdataset streams + simplejpeg in 2 persistent DataLoader worker processes."""
    loader = build_loader(root, batch_size=batch_size, rank=0, world_size=1, seed=0, num_workers=THREADS)

    def run() -> Iterator[int]:
        for epoch in range(1000):
            for _, _, keys in loader.epoch_samples(epoch):
                yield len(keys)

    return run


class _PillowFaces(torch.utils.data.Dataset):
    """The classic map-style baseline (as in InsightFace arcface_torch's dataset): random access by index, Pillow
    decode, random flip, ToTensor-style normalisation to float32 in the workers; with ``uint8``, CHW uint8 out as
    the loaders now deliver (the like-for-like comparison). Samples are read at their tar offsets from the index
    files."""

    def __init__(self, root: Path, uint8: bool = False) -> None:
        self.uint8 = uint8
        manifest = load_manifest(root)
        self.items: list[tuple[str, int, int, int, int]] = []
        for url, index in zip(manifest.shard_urls(), ensure_indices(manifest)):
            for line in Path(index).read_text().splitlines()[1:]:
                fields = line.split()
                parts = {fields[i]: (int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)}
                (jpg_at, jpg_size), (cls_at, cls_size) = parts["jpg"], parts["cls"]
                self.items.append((url, jpg_at, jpg_size, cls_at, cls_size))
        self.rng = np.random.default_rng(0)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        url, offset, size, cls_at, cls_size = self.items[i]
        with open(url, "rb") as f:
            f.seek(offset)
            data = f.read(size)
            f.seek(cls_at)
            label = int(f.read(cls_size))
        image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        if self.rng.random() < 0.5:
            image = image[:, ::-1]
        tensor = torch.from_numpy(image.transpose(2, 0, 1).copy())
        return (tensor, label) if self.uint8 else (tensor.float().sub_(127.5).div_(127.5), label)


def pillow_loader(root: Path, batch_size: int, uint8: bool = False) -> Callable[[], Iterator[int]]:
    dataset = _PillowFaces(root, uint8)

    def run() -> Iterator[int]:
        for _ in range(1000):
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                                 num_workers=THREADS, prefetch_factor=2)  # fmt: skip
            for _, labels in loader:
                yield len(labels)

    return run


def dali_epoch_start_s(root: Path, batch_size: int, epochs: int = 5) -> float:
    """Median seconds from asking the DALI loader for an epoch to its first batch (reader build, buffer fill)."""
    loader = build_dali_loader(root, batch_size=batch_size, rank=0, world_size=1, seed=0, num_threads=THREADS)
    starts = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        batches = loader.epoch_samples(epoch)
        next(batches)
        starts.append(time.perf_counter() - t0)
        batches.close()
    loader.close()
    return statistics.median(starts[1:])  # epoch 0 also builds the decode pipeline, once per run


def measure(run: Callable[[], Iterator[int]], num_images: int, warmup: int) -> float:
    """Images per second over ``num_images`` images, after ``warmup`` images (pipeline start, worker spawn)."""
    stream = run()
    seen = 0
    while seen < warmup:
        seen += next(stream)
    t0, seen = time.perf_counter(), 0
    while seen < num_images:
        seen += next(stream)
    rate = seen / (time.perf_counter() - t0)
    stream.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000,
                        help="images timed per loader and round (default: within one epoch of the 4000-image set)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--data", help="shard set to use (default: synthesize 4000 images in a temporary dir)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data or tmp)
        if args.data is None:
            synthesize(root, identities=200, images_per_identity=20, seed=0, difficulty=0.5, held_out_identities=0,
                       num_pairs=0, samples_per_shard=500, progress=False)  # fmt: skip
        manifest = load_manifest(root)
        loaders = {
            "raw DALI read + decode (mmap)": raw_dali(root, args.batch_size, mmap=True),
            "raw DALI read + decode (the limit)": raw_dali(root, args.batch_size, mmap=False),
            "DALI read + decode + mirror/CHW only": raw_dali(root, args.batch_size, mmap=False, mirror=True),
            "DALI loader (uint8 torch tensors)": dali_loader(root, args.batch_size),
            "torch loader (webdataset + simplejpeg)": torch_loader(root, args.batch_size),
            "Pillow DataLoader baseline": pillow_loader(root, args.batch_size),
            "Pillow DataLoader, uint8 out": pillow_loader(root, args.batch_size, uint8=True),
        }
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        load_before = os.getloadavg()
        for round_index in range(args.repeats):
            for name, run in loaders.items():
                rate = measure(run, args.images, warmup=2 * args.batch_size)
                rates[name].append(rate)
                print(f"round {round_index}: {name:40s} {rate:8.0f} img/s", flush=True)
        epoch_start = dali_epoch_start_s(root, args.batch_size)
        load_after = os.getloadavg()
    median = {name: statistics.median(r) for name, r in rates.items()}
    limit = median["raw DALI read + decode (the limit)"]
    pillow = median["Pillow DataLoader baseline"]
    pillow_uint8 = median["Pillow DataLoader, uint8 out"]
    results = [{"loader": name, "images_per_s": round(median[name], 1), "rounds": [round(r, 1) for r in rates[name]],
                "of_limit": round(median[name] / limit, 3), "vs_pillow": round(median[name] / pillow, 2)}
               for name in loaders]  # fmt: skip
    info = machine()
    full = median["DALI loader (uint8 torch tensors)"]
    pixels = median["DALI read + decode + mirror/CHW only"]
    # (the key keeps its name; the bare pipeline now mirrors and lays out CHW uint8 instead of normalising)
    goals = {"dali_loader_of_limit": round(full / limit, 3), "dali_loader_vs_pillow": round(full / pillow, 2),
             "dali_loader_of_decode_and_normalise": round(full / pixels, 3), "goal_of_limit": 0.85,
             "goal_vs_pillow": 3.0, "dali_loader_vs_pillow_uint8": round(full / pillow_uint8, 2)}  # fmt: skip
    write_json("loader", {"machine": info, "threads": THREADS, "batch_size": args.batch_size,
                          "images_per_round": args.images, "dataset_images": manifest.num_samples,
                          "delivers": "uint8 [B, 3, 112, 112], mirrored, not normalised",
                          "load_average_1min": [load_before[0], load_after[0]], "goals": goals,
                          "dali_epoch_start_s": round(epoch_start, 3),
                          "results": results})  # fmt: skip
    rows = [[r["loader"], f"{r['images_per_s']:.0f}", f"{r['of_limit']:.2f}", f"{r['vs_pillow']:.2f}",
             " / ".join(f"{x:.0f}" for x in r["rounds"])] for r in results]  # fmt: skip
    of_limit_met, vs_pillow_met = full / limit >= 0.85, full / pillow >= 3.0
    verdict = {(True, True): "both goals met", (True, False): "the first goal met, the second missed",
               (False, True): "the first goal missed, the second met",
               (False, False): "both goals missed"}[(of_limit_met, vs_pillow_met)]  # fmt: skip
    why = []
    if not of_limit_met:
        why.append(f"A bare DALI decode followed by the loader's mirror + CHW uint8 copy reaches {pixels / limit:.0%} "
                   "of the limit on these 2 cores: that pixel pass (on the host for CPU decoding, the fastest way "
                   "measured; DALI's `crop_mirror_normalize` is slower on CPU) is the first part of the gap, and the "
                   "`mixed` (nvJPEG) path runs it on the GPU; the loader's checks, keys, shuffle and torch hand-off "
                   f"cost the rest ({full / pixels:.0%} of the bare pipeline's rate), on the same 2 cores as the "
                   "decoder threads")  # fmt: skip
    if not vs_pillow_met:
        why.append(f"The raw read + decode limit is itself {limit / pillow:.1f}× the classic baseline (both decode "
                   f"with libjpeg-turbo on the same 2 cores), so at {full / limit:.0%} of that limit the loader is "
                   f"{full / pillow:.1f}× it: the same gap (pixel pass, then the loader's own work) costs this "
                   "goal")  # fmt: skip
    torch_rate = median["torch loader (webdataset + simplejpeg)"]
    if torch_rate > full:
        why.append(f"On this CPU the torch loader (simplejpeg in 2 worker processes, uint8 out) is "
                   f"{torch_rate / full - 1:.0%} faster than the DALI loader: on CPU both are bound by libjpeg-turbo "
                   "on the same 2 cores, and DALI's own gain is nvJPEG decoding (`mixed`) on GPU nodes")  # fmt: skip
    update_section("loader", f"## Training loader throughput ({THREADS} threads, batch {args.batch_size}, CPU)\n\n"
                   + table(["loader", "images/s (median)", "of the limit", "× Pillow", "rounds"], rows) + "\n\n"
                   "The loaders deliver what the training step now takes: uint8 `[B, 3, 112, 112]`, mirrored, "
                   "normalised later on the training device (`data.transforms.normalize_images`). The Pillow "
                   "baseline is InsightFace's classic dataset (float32 normalised in the workers), the goal's "
                   f"reference; with uint8 out as well it runs {pillow_uint8:.0f} images/s, and the DALI loader is "
                   f"{full / pillow_uint8:.1f}× that. "
                   f"DALI loader: {goals['dali_loader_of_limit']:.0%} of the raw DALI read + decode limit (goal "
                   f"≥ 85 %) and {goals['dali_loader_vs_pillow']:.1f}× the Pillow baseline (goal ≥ 3×): {verdict} on "
                   "this CPU. " + "".join(w + ". " for w in why) + "GPU decoding was not measured (no GPU here). "
                   "Rates are steady state; the DALI loader builds its decode pipeline once per run and a reader per "
                   f"epoch, {epoch_start:.2f} s to the first batch of an epoch (median). Same "
                   f"{manifest.num_samples} synthetic 112×112 JPEGs (`facescale data synth`, {len(manifest.shards)} "
                   f"shards, local disk, page-cached) for every loader; {args.images} images timed per loader and "
                   f"round after a warm-up, {args.repeats} rounds with the loaders in turn. {info['cpu']}, "
                   f"{info['cores']} cores, torch {info['torch']}, {info['date']}. The machine was shared with other "
                   f"jobs: 1-min load average {load_before[0]:.1f} before and {load_after[0]:.1f} after, on "
                   f"{info['cores']} cores, so absolute rates are lower than on an idle machine and vary by round.")
    print(f"DALI loader: {goals['dali_loader_of_limit']:.1%} of the limit, "
          f"{goals['dali_loader_vs_pillow']:.2f}x Pillow")


if __name__ == "__main__":
    main()
