"""LSP: linear-separable synthetic perturbations (Yu et al., KDD 2022, "Availability attacks create shortcuts").

Each class gets one Gaussian cluster in a small feature space (the `make_classification` recipe: centres on
the vertices of a hypercube of side 2·class_sep, unit normal samples mixed by a random per-cluster matrix
A ∈ U(-1,1)^{F×F}). An image of class k draws one sample f ~ N(0,I)·A_k + c_k (seeded by its sample id);
the F = 3·grid² features are laid out as a (3, grid, grid) map, each feature filling its patch
(8×8 on 32 px), rescaled to L2 = `l2` and added. Defaults: grid 4 (48 features), class_sep 10,
l2 = √(H·W·3)·6/255 (≈ 1.30 on 32 px; the per-pixel RMS 6/255 is kept for other sizes).
Re-implemented in numpy (no sklearn dependency).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ._base import Poison
from ._common import check_positive, per_sample_normal, quantise_l2, rng_for


@dataclass(frozen=True)
class LSPConfig:
    l2: float | None = None  # None: sqrt(H*W*3) * 6/255 (= 1.30 at 32x32)
    grid: int = 4  # patches per side; patch = ceil(size / grid) pixels (8 at 32 px)
    class_sep: float = 10.0

    def __post_init__(self) -> None:
        if self.l2 is not None:
            object.__setattr__(self, "l2", check_positive("l2", self.l2))
        object.__setattr__(self, "grid", check_positive("grid", self.grid, integer=True))
        object.__setattr__(self, "class_sep", check_positive("class_sep", self.class_sep))


def default_l2(h: int, w: int) -> float:
    """The LSP paper's budget: per-pixel RMS 6/255, i.e. sqrt(3072)·6/255 ≈ 1.30 on CIFAR."""
    return math.sqrt(h * w * 3) * 6.0 / 255.0


def make_clusters(num_classes: int, n_features: int, class_sep: float, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Cluster centres (K, F) at distinct hypercube vertices ±class_sep, and mixing matrices (K, F, F)."""
    if n_features < 63 and 2**n_features < num_classes:
        raise ValueError(f"{num_classes} classes need more than {n_features} LSP features (2^F vertices)")
    vertices: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    while len(vertices) < num_classes:
        v = tuple(int(b) for b in rng.integers(0, 2, n_features))
        if v not in seen:
            seen.add(v)
            vertices.append(v)
    centres = (np.array(vertices, dtype=np.float64) * 2.0 - 1.0) * class_sep
    mixing = 2.0 * rng.uniform(size=(num_classes, n_features, n_features)) - 1.0
    return centres, mixing


class LSP(Poison):
    name = "lsp"
    config_cls = LSPConfig

    def _fit(self, images, labels, keys, *, progress: bool) -> None:
        h, w = self.image_size
        if self.config.l2 is None:
            self.config = dataclasses.replace(self.config, l2=default_l2(h, w))
        g = self.config.grid
        if g > min(h, w):
            raise ValueError(f"LSP grid {g} is larger than the image ({h}x{w})")
        self.n_features = 3 * g * g
        self.centres, self.mixing = make_clusters(
            self.num_classes, self.n_features, self.config.class_sep, rng_for(self.seed, "lsp/clusters")
        )

    def features(self, labels: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """One cluster sample per image: z·A_y + c_y, z ~ N(0, I) from (seed, sample id). Shape (N, F)."""
        z = per_sample_normal(self.seed, "lsp/sample", keys, (self.n_features,))
        out = np.empty_like(z)
        for k in np.unique(labels):
            idx = labels == k
            out[idx] = z[idx] @ self.mixing[k] + self.centres[k]
        return out

    def _quantised(self, images: np.ndarray, labels: np.ndarray, keys: np.ndarray) -> np.ndarray:
        h, w = self.image_size
        g = self.config.grid
        f = self.features(labels, keys).reshape(-1, 3, g, g)
        ph, pw = -(-h // g), -(-w // g)
        d = np.repeat(np.repeat(f, ph, axis=2), pw, axis=3)[:, :, :h, :w]  # each feature fills its patch
        d = d.transpose(0, 2, 3, 1)
        d *= (self.config.l2 / np.sqrt((d**2).sum(axis=(1, 2, 3)))).reshape(-1, 1, 1, 1)
        return quantise_l2(d, self.config.l2)
