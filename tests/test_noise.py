"""The purifier's latent noise: one counter-based generator, specified exactly, independent of batching."""
from __future__ import annotations

import math

import numpy as np
import torch

from purify_pipeline.dvae.noise import sample_ids_for_keys, sample_noise

MASK = (1 << 64) - 1


def _mix(x: int) -> int:  # splitmix64's finaliser on Python ints: the specification
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def _reference(seed: int, sid: int, numel: int) -> np.ndarray:
    """Pure-Python draw of one sample: what every device must produce (up to float32 rounding of the transform)."""
    base = _mix(_mix((sid * 0x9E3779B97F4A7C15 + _mix(seed & MASK)) & MASK))
    half = (numel + 1) // 2
    out = np.empty(2 * half)
    for j in range(half):
        h = _mix((base + j * 0xD1B54A32D192ED03) & MASK)
        u1 = (((h >> 40) & 0xFFFFFF) + 0.5) / 2**24
        u2 = ((h >> 16) & 0xFFFFFF) / 2**24
        r = math.sqrt(-2.0 * math.log(u1))
        out[j], out[half + j] = r * math.cos(2 * math.pi * u2), r * math.sin(2 * math.pi * u2)
    return out[:numel]


def test_noise_matches_the_integer_specification():
    ids = sample_ids_for_keys(["a", "b", "000123"])
    z = sample_noise(7, ids, (3, 2, 2), passes=2)
    assert z.shape == (3, 2, 3, 2, 2) and z.dtype == torch.float32
    for i, sid in enumerate(ids.tolist()):
        np.testing.assert_allclose(z[i].flatten().numpy(), _reference(7, sid, 24), atol=2e-5)


def test_noise_does_not_depend_on_batching_or_chunking():
    ids = np.arange(300, dtype=np.int64) * 7919
    shape = (256, 16, 16)  # the cpu preset's latent: more than one CPU chunk per batch
    whole = sample_noise(0, ids, shape)
    assert torch.equal(whole[123:125], sample_noise(0, ids[123:125], shape))
    assert torch.equal(whole[:1], sample_noise(0, torch.from_numpy(ids[:1]), shape))
    assert not torch.equal(whole[0], sample_noise(1, ids[:1], shape)[0])  # the seed matters
    assert not torch.equal(whole[0, 0], whole[0, 1])  # so does the pass


def test_noise_is_standard_normal():
    z = sample_noise(3, np.arange(64), (256, 16, 16)).flatten().double()
    assert abs(z.mean()) < 3e-3 and abs(z.std() - 1) < 3e-3
    assert abs((z.abs() > 1.96).double().mean() - 0.05) < 2e-3  # the tails too, not only the moments
    assert np.isfinite(z.numpy()).all()
