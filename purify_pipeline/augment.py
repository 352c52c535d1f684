"""Batch augmentation in torch: random crop after zero padding + horizontal flip, seeded by a Generator.

The standard CIFAR training augmentation (torchvision `RandomCrop(32, padding=4)` + `RandomHorizontalFlip`)
done on a whole batch with one gather, so it costs next to nothing and is reproducible from the generator.
Shared by the in-memory training loop, the Ray Train job and the streaming shard loader.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_float_nchw(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [0, 1] (no normalisation, as in the paper protocol)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images of shape (N, H, W, C), got {images.dtype} {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def random_crop_flip(
    x: torch.Tensor, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-image random translation by up to `padding` px (zero fill) and mirror with probability 1/2.

    `x`: float (N, C, H, W). Random numbers come from `generator` (CPU) so a seeded generator gives the
    same crops on every run; the result is a new tensor on x's device.
    """
    if x.ndim != 4:
        raise ValueError(f"expected a batch (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if n == 0 or (padding == 0 and not flip):
        return x.clone()
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    mirror = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    rows = dy[:, None] + torch.arange(h)  # (N, H) rows of the padded image
    cols = dx[:, None] + torch.arange(w)  # (N, W)
    cols = torch.where(mirror[:, None], cols.flip(1), cols)
    dev = x.device
    xp = F.pad(x, (padding,) * 4) if padding else x
    idx_n = torch.arange(n, device=dev)[:, None, None, None]
    idx_c = torch.arange(c, device=dev)[None, :, None, None]
    return xp[idx_n, idx_c, rows.to(dev)[:, None, :, None], cols.to(dev)[:, None, None, :]]
