"""Shared helpers for the poison generators: input validation, per-sample seeding, uint8 quantisation.

Conventions (all poisons): images are uint8 NHWC RGB arrays; a perturbation `delta` is float32 NHWC in
[0,1] image units. The poisoned image is `clip(x + q, 0, 255)` with `q = round(255 * delta)` (round half
away from zero), which equals rounding `x/255 + delta` to uint8 except at exact .5 ties. Budgets are
enforced on `q`, so they hold *after* quantisation: L∞ exactly (|q| ≤ round(255·eps)), L2 by shrinking
an image's delta until its rounded version fits (then clipping can only shrink it further).
"""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np

from purify_pipeline._progress import progress  # noqa: F401  (re-exported for the generators)

SampleIds = Sequence[int] | Sequence[str] | np.ndarray | None


def check_images(images: Any, *, what: str = "images") -> np.ndarray:
    """Return `images` if it is a non-empty uint8 (N, H, W, 3) numpy array, else raise a clear error."""
    if not isinstance(images, np.ndarray):
        raise TypeError(f"{what} must be a numpy uint8 array of shape (N, H, W, 3), got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise TypeError(f"{what} must have dtype uint8 (0..255 RGB), got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{what} must be RGB NHWC with shape (N, H, W, 3), got shape {images.shape}")
    if images.shape[0] == 0:
        raise ValueError(f"{what} is an empty batch (N = 0); nothing to poison")
    if images.shape[1] < 1 or images.shape[2] < 1:
        raise ValueError(f"{what} has an empty spatial size {images.shape[1:3]}")
    return images


def check_labels(labels: Any, n: int, num_classes: int) -> np.ndarray:
    """Return labels as int64 (n,), checking shape, integrality and the range [0, num_classes)."""
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},) to match the images, got {lab.shape}")
    if lab.dtype.kind not in "iu":
        if lab.dtype.kind == "f" and np.all(np.isfinite(lab)) and np.all(lab == np.round(lab)):
            lab = lab.astype(np.int64)
        else:
            raise TypeError(f"labels must be integers, got dtype {lab.dtype}")
    lab = lab.astype(np.int64)
    bad = (lab < 0) | (lab >= num_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"labels must lie in [0, {num_classes}) (num_classes={num_classes}); "
            f"{int(bad.sum())} out of range, first at index {i}: {int(lab[i])}"
        )
    return lab


def check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return int(num_classes)


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_positive(name: str, value: Any, *, integer: bool = False, allow_zero: bool = False) -> Any:
    """Budgets and compute knobs: a clear error for the wrong sign or type."""
    ok_type = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, ok_type):
        kind = "an integer" if integer else "a number"
        raise TypeError(f"{name} must be {kind}, got {value!r}")
    if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        sign = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {sign}, got {value!r}")
    return int(value) if integer else float(value)


def sample_keys(sample_ids: SampleIds, n: int) -> np.ndarray:
    """Stable uint64 key per sample: int ids as given, string ids (e.g. WebDataset keys) hashed (blake2b).

    Without ids the key is the position in the batch, so per-sample noise then depends on batch order;
    pass ids (the shard job passes the sample keys) to make the bytes independent of batching.
    """
    if sample_ids is None:
        return np.arange(n, dtype=np.uint64)
    ids = list(sample_ids) if not isinstance(sample_ids, np.ndarray) else sample_ids
    if len(ids) != n:
        raise ValueError(f"sample_ids must have one id per image ({n}), got {len(ids)}")
    arr = np.asarray(ids)
    if arr.dtype.kind in "iu":
        if (arr < 0).any():
            raise ValueError("integer sample_ids must be >= 0")
        return arr.astype(np.uint64)
    if arr.dtype.kind in "US" or arr.dtype == object:
        out = np.empty(n, dtype=np.uint64)
        for i, s in enumerate(ids):
            if not isinstance(s, (str, bytes)):
                raise TypeError(f"sample_ids must be all ints or all strings, got {type(s).__name__} at {i}")
            b = s.encode() if isinstance(s, str) else s
            out[i] = int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little")
        return out
    raise TypeError(f"sample_ids must be integers or strings, got dtype {arr.dtype}")


def _tag(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little")


def rng_for(seed: int, tag: str, key: int | None = None) -> np.random.Generator:
    """A numpy Generator for (seed, purpose tag[, sample key]); independent streams per purpose and sample."""
    entropy = [int(seed), _tag(tag)]
    if key is not None:
        k = int(key)
        entropy += [k & 0xFFFFFFFF, k >> 32]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def per_sample_normal(seed: int, tag: str, keys: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal draws of `shape` per sample, from (seed, tag, key): independent of batching."""
    out = np.empty((len(keys), *shape), dtype=np.float64)
    for i, k in enumerate(keys):
        out[i] = rng_for(seed, tag, int(k)).standard_normal(shape)
    return out


def per_sample_uniform(seed: int, tag: str, keys: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform [-1, 1) draws of `shape` per sample, from (seed, tag, key)."""
    out = np.empty((len(keys), *shape), dtype=np.float64)
    for i, k in enumerate(keys):
        out[i] = rng_for(seed, tag, int(k)).uniform(-1.0, 1.0, shape)
    return out


def round_half_away(a: np.ndarray) -> np.ndarray:
    return np.sign(a) * np.floor(np.abs(a) + 0.5)


def add_quantised(images: np.ndarray, q: np.ndarray) -> np.ndarray:
    """clip(x + q, 0, 255) as uint8, q an integer-valued perturbation in pixel units."""
    return np.clip(images.astype(np.int16) + q.astype(np.int16), 0, 255).astype(np.uint8)


def quantise_linf(delta: np.ndarray, eps: float) -> np.ndarray:
    """Integer pixel perturbation with |q| <= round(255·eps) exactly (delta in [0,1] units)."""
    lim = float(round_half_away(np.asarray(255.0 * eps)))
    return np.clip(round_half_away(np.asarray(delta, np.float64) * 255.0), -lim, lim).astype(np.int16)


def quantise_l2(delta: np.ndarray, l2: float, *, max_iter: int = 8) -> np.ndarray:
    """Integer pixel perturbation per image whose L2 norm (in [0,1] units) is <= l2 after rounding.

    Starts from round(255·delta); images whose rounded norm overshoots get their delta shrunk by the
    overshoot ratio and re-rounded (a few iterations), then truncated towards zero as a last resort.
    """
    d = np.asarray(delta, np.float64) * 255.0
    limit = l2 * 255.0
    axes = tuple(range(1, d.ndim))
    scale = np.ones(d.shape[0])
    q = round_half_away(d)
    for it in range(max_iter):
        norm = np.sqrt((q**2).sum(axis=axes))
        over = norm > limit
        if not over.any():
            return q.astype(np.int16)
        scale[over] *= (limit / norm[over]) * (1 - 1e-4 * 2**it)  # shrink a little more each time
        q[over] = round_half_away(d[over] * scale[over].reshape((-1,) + (1,) * (d.ndim - 1)))
    norm = np.sqrt((q**2).sum(axis=axes))
    over = norm > limit
    if over.any():  # truncation toward zero never increases any |q|; shrink until it fits
        dnorm = np.sqrt((d[over] ** 2).sum(axis=axes))
        sc = np.minimum(scale[over], limit / np.maximum(dnorm, 1e-300))
        q[over] = np.trunc(d[over] * sc.reshape((-1,) + (1,) * (d.ndim - 1)))
    return q.astype(np.int16)


def to_float(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 255.0
