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


# ------------------------------------------------------------------------- UEraser (a training-time defense)
def plasma(n: int, c: int, h: int, w: int, roughness: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fractal "plasma" maps (N, C, H, W) in [0, 1]: midpoint displacement from a 2x2 random grid, doubling the
    resolution with bilinear interpolation and adding uniform noise scaled by roughness**level at each level,
    then min-max normalised per map (the role of kornia's `diamond_square` in its plasma augmentations)."""
    m = torch.rand(n, c, 2, 2, generator=generator)
    level = 1
    while m.shape[-2] < h or m.shape[-1] < w:
        m = F.interpolate(m, scale_factor=2, mode="bilinear", align_corners=True)
        amp = roughness.view(-1, 1, 1, 1) ** level
        m = m + (torch.rand(m.shape, generator=generator) * 2 - 1) * amp
        level += 1
    m = m[..., :h, :w]
    lo, hi = m.amin(dim=(2, 3), keepdim=True), m.amax(dim=(2, 3), keepdim=True)
    return (m - lo) / (hi - lo).clamp_min(1e-12)


def ueraser(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """UEraser's augmentations (Qin et al., 2023) on a float (N, C, H, W) batch in [0, 1]: plasma brightness
    (roughness U(0.1, 0.7), intensity U(0, 1)), plasma contrast (roughness U(0.1, 0.7)), channel shuffle with
    probability 1/2, then TrivialAugmentWide per image (torchvision, seeded from `generator`)."""
    from torchvision.transforms import v2

    n, c, h, w = x.shape
    dev = x.device
    r1, r2 = (torch.empty(n).uniform_(0.1, 0.7, generator=generator) for _ in range(2))
    intensity = torch.rand(n, generator=generator).view(-1, 1, 1, 1)
    x = (x + (2 * plasma(n, c, h, w, r1, generator) - 1).to(dev) * intensity.to(dev)).clamp(0, 1)
    x = ((x - 0.5) * 4 * plasma(n, c, h, w, r2, generator).to(dev) + 0.5).clamp(0, 1)
    shuffle = torch.rand(n, generator=generator) < 0.5
    perms = torch.argsort(torch.rand(n, c, generator=generator), dim=1)
    perms[~shuffle] = torch.arange(c)
    x = x[torch.arange(n)[:, None], perms.to(dev)]
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    trivial = v2.TrivialAugmentWide()
    with torch.random.fork_rng(devices=[]):  # torchvision draws from the global RNG: seed it, then restore it
        torch.manual_seed(seed)
        u8 = (x * 255).round().to(torch.uint8).cpu()
        out = torch.stack([trivial(img) for img in u8])
    return out.to(dev).float().div_(255.0)
