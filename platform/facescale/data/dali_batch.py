"""The DALI loader's parts: its reader and decode pipelines, the encoded batches between them and their checks,
and the pieces of shards a rank's reader reads.

A batch keeps DALI's own ``TensorListCPU`` of JPEGs when it is exactly one read batch (the common case), so the
decode stage gets it without a per-sample Python copy; batches assembled from leftovers (after a skipped sample, a
restart mid-batch, a shard boundary or a decode failure) hold a list of per-sample ``TensorCPU`` views instead.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import simplejpeg
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import feed_ndarray

from facescale.data.shards import parse_label
from facescale.data.wds_index import INDEX_VERSION, split_member

_DIGIT_0, _DIGIT_9 = ord("0"), ord("9")
_MAX_FAST_DIGITS = 18  # int64 holds every 18-digit decimal
_FAILED_SAMPLE_RE = re.compile(r"[Ff]ailed to decode sample #(\d+)")  # DALI decoder error, index in batch


@dataclass
class EncodedBatch:
    """Samples on their way to the decoder, in stream order.

    Attributes:
        jpegs: Stage 1's ``TensorListCPU`` (whole read batch) or a list of per-sample ``TensorCPU``.
        keys: Sample keys.
        shards: Shard path of each sample.
        labels: Class ids, ``int64``.
        mirrors: Mirror flags, ``int32`` (DALI's ``crop_mirror_normalize`` argument type).
        cursors: Raw position (1-based count of samples this rank read) of each sample.
    """

    jpegs: Any
    keys: list[str]
    shards: list[str]
    labels: np.ndarray
    mirrors: np.ndarray
    cursors: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    def jpeg(self, i: int) -> Any:
        """Sample ``i``'s encoded JPEG as a DALI ``TensorCPU`` (a view into the read batch)."""
        return self.jpegs[i]

    def select(self, indices: list[int] | np.ndarray) -> EncodedBatch:
        """The samples at ``indices``, in that order (JPEGs become a per-sample list)."""
        idx = [int(i) for i in indices]
        return EncodedBatch([self.jpeg(i) for i in idx], [self.keys[i] for i in idx], [self.shards[i] for i in idx],
                            self.labels[idx], self.mirrors[idx], self.cursors[idx])  # fmt: skip

    @staticmethod
    def concat(parts: list[EncodedBatch]) -> EncodedBatch:
        """One batch of the samples of ``parts``, in order."""
        return EncodedBatch([p.jpeg(i) for p in parts for i in range(len(p))], [k for p in parts for k in p.keys],
                            [s for p in parts for s in p.shards], np.concatenate([p.labels for p in parts]),
                            np.concatenate([p.mirrors for p in parts]),
                            np.concatenate([p.cursors for p in parts]))  # fmt: skip


def parse_source_infos(padded: np.ndarray) -> tuple[list[str], list[str]]:
    """Keys and shard paths from DALI's webdataset ``source_info`` (``tar_path:data_offset:member_name``).

    Args:
        padded: ``uint8 [n, width]``: the ``source_info`` strings, zero-padded to one width.

    Returns:
        ``(keys, shards)``; both empty strings where the sample had no such component.
    """
    width = padded.shape[1] if padded.ndim == 2 else 0
    raw = padded.tobytes()
    keys, shards = [], []
    for i in range(padded.shape[0]):
        info = raw[i * width : (i + 1) * width].rstrip(b"\0").decode("utf-8", "replace")
        path, _, member = info.rpartition(":")
        shards.append(path.rpartition(":")[0])
        keys.append(split_member(member)[0])  # DALI's key rule, the one its reader grouped the sample by
    return keys, shards


def parse_labels(padded: np.ndarray, keys: list[str], shards: list[str], num_classes: int) -> np.ndarray:
    """Class ids from zero-padded ``.cls`` bytes, checked like ``shards.parse_label`` checks one sample.

    Rows that are plain digits (what every FaceScale writer writes) are parsed in one vectorised pass; any other
    row (whitespace, missing, not a number) goes through ``parse_label``, which accepts it or names shard and key.

    Args:
        padded: ``uint8 [n, width]``: each sample's ``.cls`` bytes, zero-padded.
        keys: Sample keys, for errors.
        shards: Shard paths, for errors.
        num_classes: Labels must be below it.

    Returns:
        ``int64 [n]``.

    Raises:
        LabelError: A label is missing, not an integer, or ``>= num_classes``; names shard and key.
    """
    n = padded.shape[0]
    arr = padded.reshape(n, -1) if n else padded.reshape(0, 0)
    digit = (arr >= _DIGIT_0) & (arr <= _DIGIT_9)
    pad = arr == 0
    # A plain row: one or more digits, then only padding (no digit after the first zero byte).
    plain = digit.any(1) & (digit | pad).all(1) & (np.diff(pad.astype(np.int8), axis=1) >= 0).all(1)
    if arr.shape[1] > _MAX_FAST_DIGITS:
        plain[:] = False
    values = np.zeros(n, np.int64)
    for col in range(arr.shape[1] if plain.any() else 0):
        values = np.where(digit[:, col], values * 10 + (arr[:, col].astype(np.int64) - _DIGIT_0), values)
    for i in np.flatnonzero(~plain | (values >= num_classes)):
        raw = arr[i].tobytes().rstrip(b"\0")
        sample = {"__url__": shards[i], "__key__": keys[i], "cls": raw or None}
        values[i] = parse_label(sample, num_classes)  # raises with the standard message, or parses the odd form
    return values


def header_problem(jpeg: np.ndarray, size: tuple[int, ...]) -> str | None:
    """What is wrong with an encoded image that its header already shows, or ``None``."""
    if jpeg.size == 0:
        return "has no .jpg"
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
    except ValueError as exn:
        return f"corrupt JPEG: {exn}"
    return None if (height, width) == size else f"is {height}x{width}, expected {size}"


def failed_index(exn: RuntimeError, batch: EncodedBatch) -> int | None:
    """Index in ``batch`` of the sample DALI failed on: from its message, else the first simplejpeg rejects."""
    match = _FAILED_SAMPLE_RE.search(str(exn))
    if match is not None and int(match.group(1)) < len(batch):
        return int(match.group(1))
    for i in range(len(batch)):
        try:
            simplejpeg.decode_jpeg(np.asarray(batch.jpeg(i)), colorspace="RGB")
        except ValueError:
            return i
    return None


def dali_error_line(exn: Exception) -> str:
    """The line of a DALI error that says what failed (its messages open with the pipeline's traceback)."""
    lines = [line.strip(" :") for line in str(exn).splitlines() if line.strip()]
    for line in lines:
        if _FAILED_SAMPLE_RE.search(line):
            return line
    return lines[0] if lines else repr(exn)


def range_parts(order: np.ndarray, counts: np.ndarray, first: int, last: int) -> list[tuple[int, int, int]]:
    """The pieces of shards that hold samples ``[first, last)`` of the sequence the shards make in ``order``.

    Args:
        order: Shard indices in reading order.
        counts: Samples of each shard of ``order``.
        first: First sample of the range in that sequence.
        last: One past its last sample.

    Returns:
        ``(shard, begin, end)`` in reading order: samples ``[begin, end)`` of the shard (by its index file's order).
    """
    ends = np.cumsum(counts)
    starts = ends - counts
    begins, stops = np.maximum(starts, first), np.minimum(ends, last)
    return [(int(shard), int(b - s), int(e - s)) for shard, s, b, e in zip(order, starts, begins, stops) if e > b]


def write_trimmed_index(index_path: str | os.PathLike[str], begin: int, end: int,
                        out_path: str | os.PathLike[str]) -> str:  # fmt: skip
    """A DALI index of samples ``[begin, end)`` of a shard: the lines of its full index, under a new header.

    DALI's webdataset reader reads exactly the samples an index lists, so this is how a reader over whole files
    reads part of a shard (a rank's range starts and ends inside shards). Written once per ``out_path``.
    """
    out = Path(out_path)
    if not out.is_file():
        with open(index_path) as f:
            f.readline()
            lines = list(itertools.islice(f, begin, end))
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(f"{INDEX_VERSION} {len(lines)}\n" + "".join(lines))
        os.replace(tmp, out)
    return str(out)


_FORKED_LEFTOVERS: list[Any] = []


def shutdown(pipe: Any) -> None:
    """Stop a DALI pipeline's threads now (DALI's own ``__del__`` and atexit hook call the same method)."""
    # NOTE: a DALI pipeline sits in reference cycles (graph nodes <-> pipeline, callbacks), so dropping it stops its
    # threads only at the next garbage collection. A fork in that window (a DataLoader worker, a Ray task) copies
    # mutexes those threads hold, and the child can hang on one; seen in tests that fork after a DALI epoch.
    # A forked child that collects its copy of a pipeline must not stop it either: the threads are not there, and
    # stopping them crashes or hangs the child. There the copy is kept instead (never freed, never stopped).
    if getattr(pipe, "_facescale_pid", os.getpid()) != os.getpid():
        _FORKED_LEFTOVERS.append(pipe)
        return
    stop = getattr(pipe, "_shutdown", None)
    if stop is not None:
        stop()


def build_reader(paths: list[str], indices: list[str], batch_size: int, prefetch: int, shuffle: bool, seed: int,
                 fill: int) -> Any:  # fmt: skip
    """A built webdataset reader pipeline over ``paths``: ``(jpeg, cls, cls source_info, jpeg source_info)``.

    Raises:
        RuntimeError: DALI cannot open a file or parse an index.
    """

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None, prefetch_queue_depth=prefetch,
                  exec_dynamic=True)  # fmt: skip
    def read_graph():  # type: ignore[no-untyped-def]
        jpeg, cls = fn.readers.webdataset(
            paths=paths, index_paths=indices, ext=["jpg", "cls"], missing_component_behavior="empty",
            random_shuffle=shuffle, initial_fill=max(1, fill), seed=seed, name="reader",
            # NOTE: DALI keeps the files it mmaps in a process-wide cache keyed by path, so a shard rewritten in
            # place would be read stale by the next pipeline of this process; plain reads cost ~nothing here.
            dont_use_mmap=True,
        )  # fmt: skip
        # Padded to one width per batch, so Python reads each as one array instead of sample by sample.
        info = fn.pad(fn.get_property(cls, key="source_info"), fill_value=0)
        jpeg_info = fn.pad(fn.get_property(jpeg, key="source_info"), fill_value=0)  # names a sample without .cls
        return jpeg, fn.pad(cls, fill_value=0), info, jpeg_info

    pipe = read_graph()
    pipe._facescale_pid = os.getpid()  # see shutdown
    try:
        pipe.build()
    except RuntimeError:
        shutdown(pipe)
        raise
    return pipe


def _exhausted() -> Any:
    raise StopIteration


class _Feeder:
    """The decode pipeline's ``external_source``: calls the current epoch's feed (the pipeline outlives epochs).

    A feed returns ``(jpegs, mirrors)``; on CPU the pipeline takes only the JPEGs (the host mirrors, see ``run``).
    """

    def __init__(self, with_mirrors: bool) -> None:
        self.feed: Any = _exhausted
        self.with_mirrors = with_mirrors

    def __call__(self) -> Any:
        batch = self.feed()
        return batch if self.with_mirrors else batch[0]


class DecodePipeline:
    """The decode stage's DALI pipeline: built once, drained and reset between epochs, rebuilt after a failure.

    ``mixed``: ``(jpegs, mirrors)`` from the current feed → ``fn.decoders.image`` (nvJPEG) →
    ``fn.crop_mirror_normalize`` (mirror, CHW, uint8) → a torch tensor on the GPU. CPU: JPEGs → ``fn.decoders.image``
    → HWC, then mirrored and laid out CHW by one numpy copy per sample into the torch tensor (pinned when
    ``pin_memory``).

    NOTE: on CPU that host copy measured faster than any DALI pass for the same work: decode + it ~12-13k images/s
    on 2 cores, decode + ``crop_mirror_normalize`` to CHW uint8 ~10-11k, ``fn.flip`` + ``fn.transpose`` slower still
    (decode alone ~15k; 112x112 JPEGs, benchmarks/loader.py's set).

    Args:
        batch_size: Samples per batch.
        num_threads: Decode threads.
        device_id: CUDA device (``mixed``), or ``None`` for CPU decoding.
        prefetch: Batches DALI prepares ahead.
        image_size: ``(H, W)`` of every image.
        pin_memory: Host batches in pinned memory (CPU decoding only).
    """

    def __init__(self, batch_size: int, num_threads: int, device_id: int | None, prefetch: int,
                 image_size: tuple[int, int], pin_memory: bool) -> None:  # fmt: skip
        self.batch_size, self.num_threads, self.device_id, self.prefetch = batch_size, num_threads, device_id, prefetch
        self.image_size, self.pin_memory = tuple(image_size), pin_memory and device_id is None
        self._feeder, self._pipe, self._used = _Feeder(with_mirrors=device_id is not None), None, False

    def start(self, feed: Any, rebuild: bool = False) -> None:
        """Make the pipeline ready for an epoch fed by ``feed`` (``rebuild``: after it failed mid-epoch)."""
        if self._pipe is not None and self._used and not rebuild:
            self._feeder.feed = _exhausted
            try:
                while True:  # batches an epoch left early still had in flight (none after a whole epoch)
                    self._pipe.run()
            except StopIteration:
                self._pipe.reset()
            except RuntimeError:  # one of them does not decode: it was never going to be used
                rebuild = True
        if self._pipe is None or rebuild:
            self.close()
            self._pipe = self._build()
        self._used = True
        self._feeder.feed = feed

    def end_epoch(self) -> None:
        """The current feed is over: DALI asking for more input gets the end of the epoch."""
        self._feeder.feed = _exhausted

    def run(self) -> Any:
        """The next decoded batch, as DALI's output (valid until the next ``run``; see ``to_torch``).

        Raises:
            StopIteration: The feed ended.
            RuntimeError: DALI failed (an image that does not decode fails the whole pipeline).
        """
        assert self._pipe is not None, "start() first"
        return self._pipe.run()[0]

    def to_torch(self, images: Any, mirrors: np.ndarray) -> torch.Tensor:
        """``run``'s output as ``uint8 [B, 3, H, W]``; ``mirrors`` are the flags fed with it (used on CPU)."""
        shape = (len(images), 3, *self.image_size)
        if self.device_id is not None:
            out = torch.empty(shape, dtype=torch.uint8, device=torch.device("cuda", self.device_id))
            return feed_ndarray(images.as_tensor(), out, cuda_stream=torch.cuda.current_stream(out.device))
        # NOTE: pinned blocks come from torch's caching host allocator, which reuses a block only after the
        # non_blocking copies that read it have finished: a reused buffer that is never overwritten in flight.
        out = torch.empty(shape, dtype=torch.uint8, pin_memory=self.pin_memory)
        hwc, chw = np.asarray(images.as_tensor()), out.numpy()  # DALI's buffer, valid until the next run
        for i, mirror in enumerate(mirrors.tolist()):
            chw[i] = (hwc[i, :, ::-1] if mirror else hwc[i]).transpose(2, 0, 1)
        return out

    def close(self) -> None:
        """Stop the pipeline's threads (a later ``start`` builds it again)."""
        if self._pipe is not None:
            shutdown(self._pipe)
            self._pipe = None

    def _build(self) -> Any:
        feeder, mixed = self._feeder, self.device_id is not None  # the graph captures no `self`

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                      prefetch_queue_depth=self.prefetch, exec_dynamic=True)  # fmt: skip
        def decode_graph():  # type: ignore[no-untyped-def]
            if not mixed:  # mirrored and laid out CHW on the host (see the class NOTE)
                jpegs = fn.external_source(source=feeder, batch=True, dtype=types.UINT8)
                return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
            jpegs, mirror = fn.external_source(source=feeder, num_outputs=2, batch=True,
                                               dtype=[types.UINT8, types.INT32])  # fmt: skip
            images = fn.decoders.image(jpegs, device="mixed", output_type=types.RGB)
            # uint8 out: the training device normalises (data.transforms.normalize_images)
            return fn.crop_mirror_normalize(images, mirror=mirror, dtype=types.UINT8, output_layout="CHW")

        pipe = decode_graph()
        pipe._facescale_pid = os.getpid()  # see shutdown
        pipe.build()
        return pipe
