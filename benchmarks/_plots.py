"""Shared figure helper for the benchmark scripts."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def save_image_grid(path: Path, rows: Sequence[tuple[str, np.ndarray]], *, row_height: float = 1.3) -> None:
    """One labelled row of images (N, H, W, 3; uint8 or floats in [0, 1]) per (label, images) pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(len(imgs) for _, imgs in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, row_height * len(rows)), squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(n):
            axes[r, c].imshow(imgs[c])
            axes[r, c].axis("off")
        axes[r, 0].set_title(label, fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
