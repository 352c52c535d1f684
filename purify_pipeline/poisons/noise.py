"""Random-noise controls: sample-wise and class-wise uniform noise in an L∞ ball (default ±8/255).

Weak "poisons" used as baselines: sample-wise noise carries no label information; class-wise noise is one
fixed pattern per class, a trivial linear shortcut.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._base import Poison
from ._common import check_positive, per_sample_uniform, quantise_linf, rng_for


@dataclass(frozen=True)
class NoiseConfig:
    eps: float = 8 / 255  # L∞ radius in [0,1] units

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", check_positive("eps", self.eps))
        if self.eps > 1:
            raise ValueError(f"eps must be <= 1 (images are in [0,1]), got {self.eps}")


class RandomNoise(Poison):
    """Sample-wise uniform noise in [-eps, eps], drawn from (seed, sample id)."""

    name = "random"
    config_cls = NoiseConfig

    def _quantised(self, images: np.ndarray, labels: np.ndarray, keys: np.ndarray) -> np.ndarray:
        h, w = self.image_size
        u = per_sample_uniform(self.seed, "random", keys, (h, w, 3))
        return quantise_linf(u * self.config.eps, self.config.eps)


class ClasswiseNoise(Poison):
    """One uniform [-eps, eps] pattern per class (drawn once from the seed), added to every image of the class."""

    name = "classwise"
    config_cls = NoiseConfig

    def _fit(self, images, labels, keys, *, progress: bool) -> None:
        h, w = self.image_size
        u = rng_for(self.seed, "classwise").uniform(-1.0, 1.0, (self.num_classes, h, w, 3))
        self.patterns = quantise_linf(u * self.config.eps, self.config.eps)  # (K, H, W, 3) int16

    def _quantised(self, images: np.ndarray, labels: np.ndarray, keys: np.ndarray) -> np.ndarray:
        return self.patterns[labels]
