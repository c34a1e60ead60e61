"""Identity-based batches (K identities x n images each) regrouped from a stream of instance-based micro-batches.

F²C / FFC (Wang et al., "An Efficient Training Approach for Very Large Scale Face Recognition", CVPR 2022,
arXiv:2105.10375, sec. 3.2) feeds its gallery network from an identity-based loader, so the dynamic class pool
receives whole identities (several images of each) rather than one image of each of B identities. The shards are
read sequentially (DALI, the torch loader, ``s3://`` tars): there is no random access by identity, so this stage
regroups the ordinary loader's stream instead. It keeps a bounded buffer of samples by identity and emits an
identity once it holds ``images_per_id`` of its samples; ``ids_per_batch`` such identities, drawn with a seeded
rng, make one batch. When the buffer is full, its oldest sample is dropped; such samples are counted in
:attr:`IdentityBatcher.stats` (``samples_evicted_unused``), never dropped silently.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Iterator

import torch

IdentityBatch = tuple[torch.Tensor, torch.Tensor, list[str]]


class IdentityBatcher:
    """Regroups a stream of loader micro-batches into identity-based batches: K identities x n images each.

    Args:
        source: Iterable of ``(images [B, ...], labels [B] int, keys [B])`` as ``loader.epoch_samples(...)``
            yields; host or device tensors.
        ids_per_batch: K, the distinct identities of each batch.
        images_per_id: n, the images of each identity in a batch.
        buffer_samples: The most samples held back while waiting for identities to fill (at least K * n).
        seed: Seeds the choice of the K identities among those ready.

    Raises:
        ValueError: ``ids_per_batch`` or ``images_per_id`` below 1, or ``buffer_samples`` below K * n.
    """

    def __init__(self, source: Iterable[IdentityBatch], ids_per_batch: int, images_per_id: int,
                 buffer_samples: int = 4096, seed: int = 0) -> None:
        if ids_per_batch < 1 or images_per_id < 1:
            raise ValueError(f"identity batches need ids_per_batch >= 1 and images_per_id >= 1, got "
                             f"ids_per_batch={ids_per_batch}, images_per_id={images_per_id}")
        if buffer_samples < ids_per_batch * images_per_id:
            raise ValueError(f"identity batches: buffer_samples={buffer_samples} cannot hold one batch of "
                             f"ids_per_batch x images_per_id = {ids_per_batch} x {images_per_id} = "
                             f"{ids_per_batch * images_per_id} samples")
        self.source = source
        self.ids_per_batch, self.images_per_id, self.buffer_samples = ids_per_batch, images_per_id, buffer_samples
        self._rng = random.Random(seed)
        # Per identity, its buffered samples in arrival order: (sequence number, image, key).
        self._by_id: dict[int, deque[tuple[int, torch.Tensor, str]]] = {}
        # Every buffered sample's (sequence number, identity) in arrival order, plus those consumed since (skipped
        # lazily when evicting): the oldest unconsumed entry is always the head of its identity's deque.
        self._order: deque[tuple[int, int]] = deque()
        self._consumed: set[int] = set()
        self._ready: set[int] = set()  # identities holding >= images_per_id samples
        self._seq = 0
        self._buffered = 0
        self._label_device: torch.device | None = None
        self.stats: dict[str, int] = {"batches": 0, "samples_seen": 0, "samples_used": 0,
                                      "samples_evicted_unused": 0, "samples_buffered": 0}

    def __iter__(self) -> Iterator[IdentityBatch]:
        """(images [K*n, ...] same dtype/device as the source, labels [K*n] int64 grouped as
        [id0 x n, id1 x n, ...], keys) endlessly while the source yields."""
        for images, labels, keys in self.source:
            self._add(images, labels, keys)
            while len(self._ready) >= self.ids_per_batch:
                yield self._emit()

    def _add(self, images: torch.Tensor, labels: torch.Tensor, keys: list[str]) -> None:
        self._label_device = labels.device
        # Each sample is copied: a loader may reuse its (pinned) batch buffers, and a view would keep the whole
        # micro-batch alive for as long as one of its samples waits here.
        for image, label, key in zip(images, labels.tolist(), keys, strict=True):
            label = int(label)
            seq, self._seq = self._seq, self._seq + 1
            self._by_id.setdefault(label, deque()).append((seq, image.clone(), key))
            self._order.append((seq, label))
            self._buffered += 1
            self.stats["samples_seen"] += 1
            if len(self._by_id[label]) >= self.images_per_id:
                self._ready.add(label)
            if self._buffered > self.buffer_samples:
                self._evict_oldest()
        self.stats["samples_buffered"] = self._buffered

    def _evict_oldest(self) -> None:
        while True:
            seq, label = self._order.popleft()
            if seq in self._consumed:
                self._consumed.discard(seq)
                continue
            break
        queue = self._by_id[label]
        head_seq, _, _ = queue.popleft()
        assert head_seq == seq, "identity buffer out of arrival order"
        if not queue:
            del self._by_id[label]
        if len(queue) < self.images_per_id:
            self._ready.discard(label)
        self._buffered -= 1
        self.stats["samples_evicted_unused"] += 1

    def _emit(self) -> IdentityBatch:
        n = self.images_per_id
        chosen = self._rng.sample(sorted(self._ready), self.ids_per_batch)
        images: list[torch.Tensor] = []
        keys: list[str] = []
        for label in chosen:
            queue = self._by_id[label]
            for _ in range(n):
                seq, image, key = queue.popleft()
                self._consumed.add(seq)
                images.append(image)
                keys.append(key)
            if not queue:
                del self._by_id[label]
            if len(queue) < n:
                self._ready.discard(label)
        self._buffered -= n * len(chosen)
        if len(self._order) > 2 * self.buffer_samples:  # drop the consumed entries the lazy eviction kept
            self._order = deque(e for e in self._order if e[0] not in self._consumed)
            self._consumed.clear()
        self.stats["batches"] += 1
        self.stats["samples_used"] += n * len(chosen)
        self.stats["samples_buffered"] = self._buffered
        labels = torch.tensor(chosen, dtype=torch.int64).repeat_interleave(n)
        return torch.stack(images), labels.to(self._label_device), keys
