"""OPS: one-pixel shortcut (Wu et al., ICLR 2023).

Per class, search every (pixel position, colour ∈ {0,1}³) pair and keep the one maximising
mean_i |c - x_i[pos]| / std_i |c - x_i[pos]| over that class's images (|·| averaged over the 3 channels):
a colour far from, and consistently far from, what the class has there. Classes are searched in index
order and skip pairs already taken by another class. Applying sets that pixel to that colour in every
image of the class (L0 = 1; an image that already has the colour there is unchanged). The search is
deterministic given the data: the seed is recorded but changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._base import Poison
from ._common import progress as progress_bar

COLOURS = np.array([[r, g, b] for r in (0, 1) for g in (0, 1) for b in (0, 1)], dtype=np.float32)  # (8, 3)


@dataclass(frozen=True)
class OPSConfig:
    """OPS has no tunable budget: exactly one pixel per image, set to a corner of the RGB cube."""


def pixel_scores(images: np.ndarray) -> np.ndarray:
    """mean/std of |colour - pixel| over the images, for every colour and position: (8, H, W)."""
    x = images.astype(np.float32) / 255.0
    out = np.empty((len(COLOURS), *images.shape[1:3]), dtype=np.float64)
    for ci, c in enumerate(COLOURS):
        d = np.abs(x - c).mean(axis=-1)  # (n, H, W)
        out[ci] = d.mean(axis=0) / (d.std(axis=0) + 1e-8)
    return out


class OPS(Poison):
    name = "ops"
    config_cls = OPSConfig
    needs_data = True

    def _fit(self, images, labels, keys, *, progress: bool) -> None:
        h, w = self.image_size
        if h * w * len(COLOURS) < self.num_classes:
            raise ValueError(f"OPS needs H*W*8 >= num_classes distinct (pixel, colour) pairs, got {h}x{w}")
        missing = sorted(set(range(self.num_classes)) - set(np.unique(labels).tolist()))
        if missing:
            raise ValueError(f"OPS fits one pixel per class from that class's images; no images for classes {missing}")
        taken = np.zeros((len(COLOURS), h, w), dtype=bool)
        self.positions = np.zeros((self.num_classes, 2), dtype=np.int64)  # (row, col)
        self.colours = np.zeros((self.num_classes, 3), dtype=np.uint8)  # 0 or 255 per channel
        for k in progress_bar(range(self.num_classes), enabled=progress, desc="ops: pixel search"):
            s = np.where(taken, -np.inf, pixel_scores(images[labels == k]))
            ci, r, c = np.unravel_index(int(np.argmax(s)), s.shape)
            taken[ci, r, c] = True
            self.positions[k] = (r, c)
            self.colours[k] = (COLOURS[ci] * 255).astype(np.uint8)

    def _quantised(self, images: np.ndarray, labels: np.ndarray, keys: np.ndarray) -> np.ndarray:
        q = np.zeros(images.shape, dtype=np.int16)
        n = np.arange(len(labels))
        r, c = self.positions[labels, 0], self.positions[labels, 1]
        q[n, r, c] = self.colours[labels].astype(np.int16) - images[n, r, c].astype(np.int16)
        return q
