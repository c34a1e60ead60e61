"""Stages 2 and 3 of the DALI loader (:mod:`facescale.data.dali_loader`): check each read batch, decode in DALI.

Stage 2 checks labels and JPEG headers without decoding; stage 3 feeds whole batches to the decode pipeline and,
when DALI's decoder fails on one image, names it and (``on_error="skip"``) re-feeds the batches in flight without it.
The policies are in the loader's module docstring. :class:`CheckAndDecode` is the loader's base class: these
methods use the loader's state, declared below.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from facescale.data.dali_batch import (
    DecodePipeline,
    EncodedBatch,
    dali_error_line,
    failed_index,
    header_problem,
    parse_labels,
    parse_source_infos,
)
from facescale.data.errors import ImageDecodeError, ShardError
from facescale.data.loader import OnError
from facescale.data.manifest import Manifest

logger = logging.getLogger("facescale.data.dali_loader")  # the loader's logger: its messages, as before the split


class CheckAndDecode:
    """Stages 2 and 3 of :class:`facescale.data.dali_loader.DaliFaceLoader`, which sets the attributes below."""

    manifest: Manifest
    batch_size: int
    rank: int
    on_error: OnError
    range_size: int  # samples in this rank's range: more bad images in a row than that means none is decodable
    pin_memory: bool
    _stats: Counter[str]
    _position: dict[str, Any]
    _generation: int
    _decoder: DecodePipeline
    _source_urls: dict[str, str]

    # -- stage 2 ---------------------------------------------------------------------------------------------------

    def _checked(self, raw: Iterator[tuple[Any, ...]], cursor: int) -> Iterator[EncodedBatch]:
        """Stage 2: labels checked, headers parsed; bad images skipped or raised per ``on_error``.

        Samples at raw positions up to ``cursor`` (the part of a read batch before a restart point) are dropped.
        """
        size = tuple(self.manifest.image_size)
        bad_in_a_row = 0
        for jpegs, cls, infos, jpeg_infos, mirrors, cursors in raw:
            keys, shards = parse_source_infos(infos)
            if not all(keys):  # a sample without .cls has no cls source_info: name it from its .jpg
                named = parse_source_infos(jpeg_infos.as_array())
                keys, shards = [k or named[0][i] for i, k in enumerate(keys)], [
                    s or named[1][i] for i, s in enumerate(shards)]  # fmt: skip
            if self._source_urls:
                shards = [self._source_urls.get(s, s) for s in shards]
            old = int(np.searchsorted(cursors, cursor, side="right"))  # samples at or before the restart point
            self._stats["fast_forwarded"] += old
            labels = parse_labels(cls[old:], keys[old:], shards[old:], self.manifest.num_classes)
            batch = EncodedBatch(jpegs, keys, shards, np.concatenate([np.zeros(old, np.int64), labels]), mirrors,
                                 cursors)  # fmt: skip
            keep = []
            for i in range(old, len(batch)):
                problem = header_problem(np.asarray(jpegs[i]), size)
                if problem is None:
                    keep.append(i)
                    bad_in_a_row = 0
                else:
                    error = ImageDecodeError(f"shard {shards[i]}: sample {keys[i]!r} {problem}", shards[i], keys[i])
                    if self.on_error == "fail":
                        raise error
                    self._skip(error)
                    bad_in_a_row += 1
                    if bad_in_a_row > self.range_size:
                        raise ShardError(f"rank {self.rank}: no decodable image in a whole pass over its samples "
                                         f"(last: {error})", shards[i]) from error  # fmt: skip
            yield batch if len(keep) == len(batch) else batch.select(keep)

    def _skip(self, error: ImageDecodeError) -> None:
        self._stats["skipped_samples"] += 1
        logger.warning("skipping sample: %s", error)

    # -- stage 3 ---------------------------------------------------------------------------------------------------

    def _decode(self, batches: Iterator[EncodedBatch], num_batches: int, generation: int) -> Iterator[
            tuple[torch.Tensor, torch.Tensor, list[str]]]:  # fmt: skip
        """Stage 3: decode and mirror ``num_batches`` batches in DALI; yield them as uint8 torch tensors."""
        carry: list[EncodedBatch] = []  # checked samples not yet fed, in order (leftovers of partial read batches)
        in_flight: deque[EncodedBatch] = deque()  # batches fed to DALI and not yet yielded, oldest first
        delivered = 0

        def feed() -> tuple[Any, np.ndarray]:
            if delivered + len(in_flight) >= num_batches:
                raise StopIteration
            if not carry:
                batch = next(batches)
                if len(batch) == self.batch_size:  # the usual case: one whole read batch, handed over as is
                    in_flight.append(batch)
                    self._stats["samples"] += len(batch)
                    return batch.jpegs, batch.mirrors
                carry.append(batch)
            while sum(len(b) for b in carry) < self.batch_size:
                carry.append(next(batches))
            joined = EncodedBatch.concat(carry)
            batch = joined.select(range(self.batch_size))
            carry[:] = [joined.select(range(self.batch_size, len(joined)))] if len(joined) > self.batch_size else []
            in_flight.append(batch)
            self._stats["samples"] += len(batch)
            return batch.jpegs, batch.mirrors

        self._decoder.start(feed)
        try:
            while delivered < num_batches:
                try:
                    images = self._decoder.run()
                except StopIteration:
                    raise AssertionError(f"decode stage ended after {delivered} of {num_batches} batches") from None
                except RuntimeError as exn:  # DALI: the whole decode pipeline fails on one undecodable image
                    self._recover(exn, in_flight, carry)
                    self._decoder.start(feed, rebuild=True)
                    continue
                batch = in_flight.popleft()
                delivered += 1
                self._position["step_in_epoch"] += 1
                self._position["cursors"] = {"0": int(batch.cursors[-1])}
                labels = torch.from_numpy(batch.labels)
                images = self._decoder.to_torch(images, batch.mirrors)
                yield images, labels.pin_memory() if self.pin_memory else labels, batch.keys
                if self._generation != generation:
                    raise RuntimeError(f"epoch_samples: another epoch started on this loader after {delivered} "
                                       "batches of this one; a loader runs one epoch at a time")  # fmt: skip
        except Exception:
            if self._generation == generation:  # an epoch that failed: stop the decode threads now (see _close)
                self._decoder.close()
            raise
        finally:
            if self._generation == generation:
                self._decoder.end_epoch()  # DALI may still ask for input: this epoch's is over

    def _recover(self, exn: RuntimeError, in_flight: deque[EncodedBatch], carry: list[EncodedBatch]) -> None:
        """Name the sample that failed the decode pipeline; under ``skip``, re-queue the in-flight ones without it."""
        if not in_flight:
            raise exn
        batch = in_flight[0]  # DALI reports errors in order: the failing iteration is the oldest one in flight
        bad = failed_index(exn, batch)
        if bad is None:
            shards = sorted(set(batch.shards))
            raise ImageDecodeError(f"rank {self.rank}: DALI could not decode a batch from shards {shards} and no "
                                   f"sample of it fails alone: {exn}", shards[0]) from exn  # fmt: skip
        key, shard = batch.keys[bad], batch.shards[bad]
        error = ImageDecodeError(f"shard {shard}: sample {key!r}: corrupt JPEG (DALI's decoder: {dali_error_line(exn)} "
                                 "of its batch)", shard, key)  # fmt: skip
        if self.on_error == "fail":
            raise error from exn
        self._skip(error)
        # Everything in flight goes back in order, before the leftovers; undelivered samples are counted when re-fed.
        self._stats["samples"] -= sum(len(b) for b in in_flight)
        pending = [batch.select([i for i in range(len(batch)) if i != bad]), *list(in_flight)[1:], *carry]
        in_flight.clear()
        carry[:] = [b for b in pending if len(b)]
