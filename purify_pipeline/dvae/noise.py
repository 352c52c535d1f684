"""The purifier's latent noise: one counter-based generator, the same draw on every device and batching.

Element j of sample i's noise is a function of (seed, id_i, j) only: splitmix64 of the three gives 64 random
bits, two 24-bit uniforms of which become two normals (Box-Muller). The integer part is exact on every device;
the transform is float32 math (log, sqrt, sin, cos), so CPU and GPU agree up to their libm's last-bit rounding.
A resume on another device type, or a shard purified on a CPU beside one purified on a GPU, therefore sees the
same noise; and a sample's draw never depends on which batch it arrived in.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["sample_ids_for_keys", "sample_noise"]

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64: per-sample stride
_STRIDE = -3335678366873096957  # 0xD1B54A32D192ED03 as int64: per-element stride
_M1, _M2 = -4658895280553007687, -7723592293110705685  # splitmix64's multipliers as int64
_CHUNK = 1 << 16  # elements hashed at a time on the CPU: the int64 temporaries stay in cache


def sample_ids_for_keys(keys: Any) -> np.ndarray:
    """Stable non-negative int64 per key: blake2b-64 of the UTF-8 key (bytes are hashed as they are)."""
    out = np.empty(len(keys), dtype=np.int64)
    for i, k in enumerate(keys):
        b = k if isinstance(k, (bytes, bytearray)) else str(k).encode("utf-8")
        out[i] = int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little") & ((1 << 63) - 1)
    return out


def _mix64_(x: Tensor) -> Tensor:
    """splitmix64's finaliser on an int64 tensor, in place (arithmetic wraps; logical shifts as masked ones)."""
    t = torch.empty_like(x)
    for shift, mult in ((30, _M1), (27, _M2), (31, None)):
        torch.bitwise_right_shift(x, shift, out=t)
        t.bitwise_and_((1 << (64 - shift)) - 1)
        x.bitwise_xor_(t)
        if mult is not None:
            x.mul_(mult)
    return x


def sample_noise(seed: int, sample_ids: np.ndarray | Tensor, shape: Sequence[int], passes: int = 3,
                 device: str | torch.device = "cpu") -> Tensor:  # fmt: skip
    """Standard-normal float32 noise (N, passes, *shape) on `device`; sample i's draw depends on (seed, id_i) only."""
    device = torch.device(device)
    ids = torch.as_tensor(np.asarray(sample_ids, dtype=np.int64) if not isinstance(sample_ids, Tensor) else sample_ids,
                          dtype=torch.int64).to(device)  # fmt: skip
    numel = passes * math.prod(shape)
    half = (numel + 1) // 2
    key = _mix64_(torch.tensor([seed], dtype=torch.int64, device=device))
    base = _mix64_(_mix64_(ids * _GOLDEN + key))  # (N,)
    offs = torch.arange(half, dtype=torch.int64, device=device) * _STRIDE
    out = torch.empty((len(ids), 2 * half), dtype=torch.float32, device=device)
    rows = max(1, _CHUNK // max(1, half)) if device.type == "cpu" else len(ids)
    for s in range(0, len(ids), rows):
        h = _mix64_(base[s : s + rows, None] + offs)  # (n, half): 64 random bits per pair of normals
        u1 = ((h >> 40) & 0xFFFFFF).to(torch.float32).add_(0.5).mul_(2.0**-24)  # (0, 1): the log stays finite
        u2 = ((h >> 16) & 0xFFFFFF).to(torch.float32).mul_(2.0 * math.pi * 2.0**-24)
        r = u1.log_().mul_(-2.0).sqrt_()
        out[s : s + rows, :half] = r * torch.cos(u2)
        out[s : s + rows, half:] = r.mul_(torch.sin(u2))
    return out[:, :numel].reshape(len(ids), passes, *shape)
