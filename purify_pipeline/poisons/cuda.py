"""CUDA: convolution-based unlearnable datasets (Sadasivan et al., CVPR 2023).

Not an additive perturbation in a norm ball: every image of class k is convolved with class k's random 3×3
filter, the same for R, G and B (depthwise, zero padding, no bias), then divided by its own maximum over all
pixels and channels, scaled to 0..255 and truncated to uint8. A filter's taps are uniform in
[0, blur_parameter] with one tap, at a random position, set to `center` (the authors' recipe: kernel 3,
blur parameter 0.3, centre value 1; `final_filter_unlearnable.py` in their repository). The filters come from
the seed alone, so `fit` needs no data. `quantised` returns poisoned - clean (int16), as for every poison.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._base import Poison
from ._common import check_positive, rng_for


@dataclass(frozen=True)
class CUDAConfig:
    blur_parameter: float = 0.3  # taps uniform in [0, blur_parameter]
    center: float = 1.0  # the value of the one tap set at a random position
    kernel_size: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "blur_parameter", check_positive("blur_parameter", self.blur_parameter))
        object.__setattr__(self, "center", check_positive("center", self.center))
        k = check_positive("kernel_size", self.kernel_size, integer=True)
        if k % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {k}")
        object.__setattr__(self, "kernel_size", k)


class CUDA(Poison):
    """Class-wise random blur filters (see the module docstring)."""

    name = "cuda"
    config_cls = CUDAConfig

    def _fit(self, images, labels, keys, *, progress: bool) -> None:
        k, cfg = self.config.kernel_size, self.config
        rng = rng_for(self.seed, "cuda")
        filters = rng.uniform(0.0, cfg.blur_parameter, (self.num_classes, k, k))
        pos = rng.integers(0, k, (self.num_classes, 2))
        filters[np.arange(self.num_classes), pos[:, 0], pos[:, 1]] = cfg.center
        self.filters = filters.astype(np.float32)  # (K, k, k), one per class, applied to each channel

    def convolve(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """The poisoned uint8 images: class filter (cross-correlation, zero padding), / per-image max, x255."""
        k = self.config.kernel_size
        r = k // 2
        x = images.astype(np.float32) / 255.0
        xp = np.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
        w = self.filters[labels]  # (N, k, k)
        h, wd = images.shape[1:3]
        out = np.zeros_like(x)
        for i in range(k):
            for j in range(k):
                out += w[:, i, j, None, None, None] * xp[:, i : i + h, j : j + wd, :]
        peak = out.reshape(len(out), -1).max(axis=1)
        out /= np.maximum(peak, 1e-12)[:, None, None, None]  # an all-black image stays black
        return np.clip(out * 255.0, 0, 255).astype(np.uint8)  # truncated, as the reference's astype

    def _quantised(self, images: np.ndarray, labels: np.ndarray, keys: np.ndarray) -> np.ndarray:
        return self.convolve(images, labels).astype(np.int16) - images.astype(np.int16)
