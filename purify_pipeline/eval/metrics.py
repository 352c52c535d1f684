"""Purification quality measures on uint8 images."""
from __future__ import annotations

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)


def retention(purified: np.ndarray, clean: np.ndarray, delta: np.ndarray) -> float:
    """Poison retention: mean over images of <x_purified - x_clean, d> / <d, d>.

    1 means the perturbation d survived untouched (the poisoned input itself scores ~1), 0 that nothing of it
    is left along its direction. uint8 images are read in [0, 1] units; `delta` is float in the same units
    (or uint8-quantised differences already divided by 255). Images with d = 0 are ignored.
    """
    p, c, d = _unit(purified), _unit(clean), np.asarray(delta, dtype=np.float64)
    if p.shape != c.shape:
        raise ValueError(f"purified {p.shape} and clean {c.shape} must have the same shape")
    d = np.broadcast_to(d, p.shape)
    n = len(p)
    dd = (d.reshape(n, -1) ** 2).sum(1)
    num = ((p - c).reshape(n, -1) * d.reshape(n, -1)).sum(1)
    ok = dd > 0
    if not ok.any():
        raise ValueError("delta is zero for every image")
    return float((num[ok] / dd[ok]).mean())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over the whole set (peak = 1 in [0, 1] units)."""
    mse = float(np.mean((_unit(a) - _unit(b)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)
