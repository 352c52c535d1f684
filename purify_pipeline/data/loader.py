"""Stream (purified) WebDataset shards into a PyTorch training loop: `ShardStream` and `ShardLoader`, built on
the `webdataset` library (its `split_by_worker` and `WebLoader`), with this package's validated tar reader.

    loader = ShardLoader("out/train-{000000..000049}.tar", batch_size=128, shuffle_buffer=2000, seed=0,
                         augment=True, num_workers=2)          # rank/world_size: from torch.distributed or env
    for epoch in range(epochs):
        loader.set_epoch(epoch)                                # optional: each pass advances the epoch anyway
        for x, y in loader:                                    # x float32 (B, 3, H, W) in [0, 1], y int64 (B,)
            ...

How an epoch is split (shard-level, like webdataset's `split_by_node` + `split_by_worker`):
1. the shard list is shuffled with a generator seeded by (seed, epoch): the same on every rank;
2. rank r takes shards r, r + world_size, ... of that order; DataLoader worker w of a rank takes every
   num_workers-th of those; so every shard, hence every sample, is read by exactly one (rank, worker);
3. each worker reads `shards_in_flight` shards round-robin into a shuffle buffer seeded by
   (seed, epoch, rank, worker), decodes jpg/png/npy + cls, batches, and augments the batch (crop + flip).

When the shard count is not a multiple of world_size, ranks get different numbers of shards, so they see
different numbers of samples (and batches) in an epoch; with DDP that makes the longer rank wait forever
at a collective. Pass `even_shards=True` to drop the `len(urls) % world_size` shards at the end of each
epoch's shuffled order (a different few each epoch; every sample is still seen about equally often over
many epochs), and keep shards of equal size so batch counts match. Uneven division across DataLoader
workers is harmless (the DataLoader just merges what its workers produce). Fewer shards than ranks is
an error; fewer shards than ranks x workers leaves some workers idle.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, Mapping

import numpy as np
import torch
from torch.utils.data import IterableDataset

from purify_pipeline.data import shards
from purify_pipeline.data.augment import random_crop_flip, to_float_nchw


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): explicit values, else torch.distributed if initialised, else env RANK/WORLD_SIZE
    (set by torchrun and Ray Train), else (0, 1)."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


class ShardStream(IterableDataset):
    """An IterableDataset over WebDataset shards, split by rank and DataLoader worker, seeded per epoch.

    With `batch_size=None` it yields samples `(image uint8 HxWx3 ndarray, label int, key str)`; with a
    batch size it yields `(x, y)` (or `(x, y, keys)` with `with_keys=True`): x float32 (B, 3, H, W) in
    [0, 1] (augmented when `augment`), y int64 (B,). Each worker's last batch may be short unless
    `drop_last`. See the module docstring for the splitting rules.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        batch_size: int | None = None,
        shuffle_buffer: int = 1000,
        shuffle_shards: bool = True,
        seed: int = 0,
        augment: bool = False,
        crop_padding: int = 4,
        flip: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        even_shards: bool = False,
        shards_in_flight: int = 2,
        drop_last: bool = False,
        with_keys: bool = False,
        image_column: str | None = None,
        label_column: str = "cls",
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.urls = shards.expand(urls, storage_options=storage_options)
        self.rank, self.world_size = resolve_rank(rank, world_size)
        if len(self.urls) < self.world_size:
            raise ValueError(f"{len(self.urls)} shard(s) cannot feed {self.world_size} ranks: every rank needs "
                             "at least one shard (write more, smaller shards)")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        if shuffle_buffer < 0 or shards_in_flight < 1:
            raise ValueError("shuffle_buffer must be >= 0 and shards_in_flight >= 1")
        if augment and batch_size is None:
            raise ValueError("augment=True works on batches: set batch_size")
        self.batch_size, self.shuffle_buffer, self.shuffle_shards = batch_size, shuffle_buffer, shuffle_shards
        self.seed, self.augment, self.crop_padding, self.flip = seed, augment, crop_padding, flip
        self.even_shards, self.shards_in_flight, self.drop_last = even_shards, shards_in_flight, drop_last
        self.with_keys, self.image_column, self.label_column = with_keys, image_column, label_column
        self.storage_options = storage_options
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shard order, buffer shuffle and augmentation the next pass uses."""
        self.epoch = int(epoch)

    def epoch_shards(self, epoch: int | None = None) -> list[str]:
        """The epoch's shard order (same on every rank), trimmed to a multiple of world_size if even_shards."""
        epoch = self.epoch if epoch is None else epoch
        order = list(self.urls)
        if self.shuffle_shards:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(order))
            order = [order[i] for i in perm]
        if self.even_shards:
            order = order[: len(order) - len(order) % self.world_size]
        return order

    def shards_for(self, worker: int = 0, num_workers: int = 1, epoch: int | None = None) -> list[str]:
        """Shards that DataLoader worker `worker` of `num_workers` on this rank reads in `epoch`."""
        return self.epoch_shards(epoch)[self.rank :: self.world_size][worker::num_workers]

    # ---- iteration ----
    def _samples(self, urls: list[str]) -> Iterator[tuple[np.ndarray, int, str, str]]:
        """Decoded (image, label, key, shard) from `urls`, `shards_in_flight` shards read round-robin."""
        pending = list(urls)
        active: list[Iterator[dict[str, Any]]] = []
        while pending or active:
            while pending and len(active) < self.shards_in_flight:
                active.append(shards.iter_samples(pending.pop(0), storage_options=self.storage_options))
            for it in list(active):
                s = next(it, None)
                if s is None:
                    active.remove(it)
                    continue
                url, key = s["__url__"], s["__key__"]
                col = self.image_column or shards.find_image_column(s, shard=url, key=key)
                if col not in s:
                    raise shards.ShardError(f"no .{col} member", shard=url, key=key)
                img = shards.decode_image(s[col], col, shard=url, key=key)
                yield img, shards.parse_label(s.get(self.label_column), shard=url, key=key), key, url

    def _shuffled(self, samples: Iterator[Any], rng: np.random.Generator) -> Iterator[Any]:
        """Reservoir-style shuffle buffer: emit a random element of the buffer for every new sample."""
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        buf: list[Any] = []
        for s in samples:
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                continue
            i = int(rng.integers(len(buf)))
            buf[i], s = s, buf[i]
            yield s
        rng.shuffle(buf)
        yield from buf

    def _batch(self, items: list[tuple[np.ndarray, int, str, str]], gen: torch.Generator) -> tuple:
        shape = items[0][0].shape
        for img, _, key, url in items:
            if img.shape != shape:
                raise shards.ShardError(f"image size {img.shape} differs from {shape} in the same batch "
                                        "(resize the shards to one size first)", shard=url, key=key)
        x = to_float_nchw(np.stack([it[0] for it in items]))
        if self.augment:
            x = random_crop_flip(x, self.crop_padding, self.flip, gen)
        y = torch.tensor([it[1] for it in items], dtype=torch.long)
        return (x, y, [it[2] for it in items]) if self.with_keys else (x, y)

    def __iter__(self) -> Iterator[Any]:
        import webdataset as wds

        _, _, worker, num_workers = wds.utils.pytorch_worker_info()
        # node split by this stream's rank (explicit or resolved), then webdataset's split across DataLoader workers
        mine = list(wds.split_by_worker(self.epoch_shards()[self.rank :: self.world_size]))
        stream_seed = [self.seed, self.epoch, self.rank, worker]
        rng = np.random.default_rng(stream_seed)
        samples = self._shuffled(self._samples(mine), rng)
        if self.batch_size is None:
            for img, label, key, _ in samples:
                yield img, label, key
            return
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence(stream_seed).generate_state(1)[0]))
        items: list[tuple[np.ndarray, int, str, str]] = []
        for s in samples:
            items.append(s)
            if len(items) == self.batch_size:
                yield self._batch(items, gen)
                items = []
        if items and not self.drop_last:
            yield self._batch(items, gen)


class ShardLoader:
    """A DataLoader over a `ShardStream`: batches from `num_workers` processes, a new seeded order per epoch.

    Each `iter()` runs the epoch set by `set_epoch` (default 0) and then advances it by one, so a plain
    `for epoch ...: for x, y in loader` reshuffles every epoch, and `set_epoch(e)` reproduces epoch e.
    Keyword arguments not listed go to `ShardStream` (shuffle_shards, crop_padding, even_shards, ...).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        batch_size: int = 128,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        augment: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        **stream_kwargs: Any,
    ) -> None:
        self.stream = ShardStream(urls, batch_size=batch_size, shuffle_buffer=shuffle_buffer, seed=seed,
                                  augment=augment, rank=rank, world_size=world_size, **stream_kwargs)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self._epoch = 0

    @property
    def epoch(self) -> int:
        """The epoch the next iteration will run."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def __iter__(self) -> Iterator[Any]:
        import webdataset as wds

        self.stream.set_epoch(self._epoch)
        # Workers are started per epoch (persistent_workers=False) so each gets this epoch's stream copy.
        dl = wds.WebLoader(self.stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                           persistent_workers=False)  # fmt: skip
        self._epoch += 1
        return iter(dl)
