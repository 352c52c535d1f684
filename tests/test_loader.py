"""Streaming shard loader: exact-once coverage over ranks x workers, seeded per-epoch shuffling, batches."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from purify_pipeline import shards
from purify_pipeline.data.loader import ShardLoader, ShardStream, resolve_rank

N_SHARDS, PER_SHARD = 4, 10


def _write_shards(root: Path, n_shards: int, per_shard: int, ext: str = "png") -> list[str]:
    """Tiny 8x8 shards; pixel (0, 0, 0) encodes the sample index so images can be matched to keys."""
    urls = []
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            idx = s * per_shard + i
            img = np.full((8, 8, 3), 7 * (idx % 30), np.uint8)
            img[0, 0, 0] = idx
            data = shards.encode_png(img) if ext == "png" else _npy(img)
            samples.append({"__key__": f"s{idx:04d}", ext: data, "cls": str(idx % 10)})
        urls.append(shards.write_shard(str(root / shards.shard_name("train", s)), samples).url)
    return urls


def _npy(img: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, img, allow_pickle=False)
    return buf.getvalue()


@pytest.fixture(scope="module")
def shard_urls(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return _write_shards(tmp_path_factory.mktemp("shards"), N_SHARDS, PER_SHARD)


def _epoch_keys(urls, epoch: int, world_size: int = 2, num_workers: int = 2, seed: int = 0, **kw) -> list[list[str]]:
    """Keys each rank saw in `epoch` (in order), with real DataLoader worker processes."""
    per_rank = []
    for rank in range(world_size):
        loader = ShardLoader(urls, batch_size=3, shuffle_buffer=8, seed=seed, rank=rank, world_size=world_size,
                             num_workers=num_workers, with_keys=True, **kw)
        loader.set_epoch(epoch)
        per_rank.append([k for _, _, keys in loader for k in keys])
    return per_rank


def test_every_sample_exactly_once_per_epoch_across_2_ranks_x_2_workers(shard_urls: list[str]) -> None:
    all_keys = {f"s{i:04d}" for i in range(N_SHARDS * PER_SHARD)}
    for epoch in (0, 1):
        per_rank = _epoch_keys(shard_urls, epoch)
        seen = Counter(k for keys in per_rank for k in keys)
        assert set(seen) == all_keys and set(seen.values()) == {1}
        assert not set(per_rank[0]) & set(per_rank[1])  # ranks read disjoint shards
        assert all(len(keys) == 2 * PER_SHARD for keys in per_rank)  # 4 shards / 2 ranks


def test_shuffling_is_seeded_and_differs_per_epoch(shard_urls: list[str]) -> None:
    e0, e0_again, e1 = _epoch_keys(shard_urls, 0), _epoch_keys(shard_urls, 0), _epoch_keys(shard_urls, 1)
    assert e0 == e0_again  # same seed + epoch -> same order
    assert e0 != e1  # a new epoch reshuffles
    assert _epoch_keys(shard_urls, 0, seed=1) != e0  # another seed, another order
    # within a shard the buffer shuffles too (not the tar order)
    single = _epoch_keys(shard_urls, 0, world_size=1, num_workers=0, shuffle_shards=False)[0]
    assert sorted(single) == sorted(f"s{i:04d}" for i in range(N_SHARDS * PER_SHARD))
    assert single != sorted(single)


def test_loader_advances_epoch_on_each_pass(shard_urls: list[str]) -> None:
    loader = ShardLoader(shard_urls, batch_size=4, shuffle_buffer=8, seed=3, world_size=1, rank=0, with_keys=True)
    first = [k for _, _, ks in loader for k in ks]
    second = [k for _, _, ks in loader for k in ks]
    assert loader.epoch == 2 and first != second and sorted(first) == sorted(second)
    loader.set_epoch(0)
    assert [k for _, _, ks in loader for k in ks] == first


def test_batches_decode_labels_and_augment(shard_urls: list[str]) -> None:
    plain = ShardStream(shard_urls, batch_size=5, shuffle_buffer=0, shuffle_shards=False, rank=0, world_size=1,
                        with_keys=True, shards_in_flight=1)
    x, y, keys = next(iter(plain))
    assert x.dtype == torch.float32 and x.shape == (5, 3, 8, 8) and y.dtype == torch.long
    assert keys == [f"s{i:04d}" for i in range(5)]
    idx = [int(k[1:]) for k in keys]
    assert y.tolist() == [i % 10 for i in idx]
    assert torch.allclose(x[:, 0, 0, 0] * 255, torch.tensor(idx, dtype=torch.float32))

    aug = ShardStream(shard_urls, batch_size=5, shuffle_buffer=0, shuffle_shards=False, rank=0, world_size=1,
                      augment=True, crop_padding=2, shards_in_flight=1)
    xa, ya = next(iter(aug))
    assert xa.shape == x.shape and torch.equal(ya, y)
    assert not torch.equal(xa, x)  # cropped/flipped
    assert (xa == 0).any()  # zero padding came in somewhere


def test_npy_images_and_sample_mode(tmp_path: Path) -> None:
    urls = _write_shards(tmp_path, 2, 3, ext="npy")
    stream = ShardStream(urls, shuffle_buffer=0, shuffle_shards=False, rank=0, world_size=1)
    samples = list(stream)  # two shards in flight: read round-robin
    assert [k for _, _, k in samples] == ["s0000", "s0003", "s0001", "s0004", "s0002", "s0005"]
    img, label, _ = samples[1]
    assert img.dtype == np.uint8 and img.shape == (8, 8, 3) and img[0, 0, 0] == 3 and label == 3


def test_uneven_shards_and_errors(shard_urls: list[str], tmp_path: Path) -> None:
    three = shard_urls[:3]
    # keep (default): every sample once, ranks unequal
    per_rank = _epoch_keys(three, 0, num_workers=0)
    assert sorted(len(k) for k in per_rank) == [PER_SHARD, 2 * PER_SHARD]
    assert len({k for keys in per_rank for k in keys}) == 3 * PER_SHARD
    # even_shards: equal ranks, one shard left out (a different one per epoch over time)
    per_rank = _epoch_keys(three, 0, num_workers=0, even_shards=True)
    assert [len(k) for k in per_rank] == [PER_SHARD, PER_SHARD]
    with pytest.raises(ValueError, match="cannot feed 4 ranks"):
        ShardStream(three, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        resolve_rank(2, 2)
    with pytest.raises(FileNotFoundError):
        ShardStream(str(tmp_path / "missing-{000000..000001}.tar"))

    bad = shards.write_shard(str(tmp_path / "bad-000000.tar"),
                             [{"__key__": "k0", "png": b"not a png", "cls": "1"}]).url
    with pytest.raises(shards.ShardError, match="k0"):
        list(ShardStream([bad], rank=0, world_size=1))


def test_rank_from_environment(shard_urls: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    stream = ShardStream(shard_urls)
    assert (stream.rank, stream.world_size) == (1, 2)
    assert stream.shards_for() == stream.epoch_shards()[1::2]
