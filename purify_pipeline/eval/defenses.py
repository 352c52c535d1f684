"""Baseline pre-training defenses against unlearnable examples: JPEG-10, grayscale, bit-depth reduction,
sharpening + frequency filtering.

These are the comparison points of METHOD.md ("ISS" JPEG quality 10 and 3-channel grayscale, BDR 2 bits),
plus the published counter to convolution-based poisons such as CUDA (`sharpen_ff`).
Each takes and returns uint8 NHWC RGB images, so it slots in wherever D-VAE purification would: on an
in-memory array (`apply_defense`) or as a Ray Data `map_batches` stage (`DefenseTransform`).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image


def _check_images(images: np.ndarray, fn: str) -> np.ndarray:
    """Validate a uint8 (N, H, W, 3) array; raise a ValueError that says what was expected."""
    if not isinstance(images, np.ndarray):
        raise TypeError(f"{fn}: expected a numpy array of uint8 images (N, H, W, 3), got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise ValueError(f"{fn}: expected dtype uint8 (pixel values 0..255), got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{fn}: expected shape (N, H, W, 3) (RGB, channels last), got {images.shape}")
    return images


def jpeg(images: np.ndarray, quality: int = 10) -> np.ndarray:
    """Encode every image as baseline JPEG at `quality` with Pillow and decode it again (ISS: quality 10).

    A real codec round-trip (not a simulation): chroma subsampling, DCT quantisation and all. Per-image
    loop because the codec is per-image; ~20k CIFAR images/s on one core.
    """
    _check_images(images, "jpeg")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"jpeg: quality must be in 1..100, got {quality}")
    out = np.empty_like(images)
    buf = io.BytesIO()
    for i, img in enumerate(images):
        buf.seek(0)
        buf.truncate()
        Image.fromarray(img, mode="RGB").save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        with Image.open(buf) as dec:
            out[i] = np.asarray(dec.convert("RGB"))
    return out


def grayscale(images: np.ndarray) -> np.ndarray:
    """3-channel grayscale (ISS): ITU-R 601-2 luma, bit-identical to Pillow's `convert("L")`, repeated ×3."""
    _check_images(images, "grayscale")
    x = images.astype(np.uint32)
    # Pillow's fixed-point L = (19595 R + 38470 G + 7471 B + 0x8000) >> 16 (weights 0.299/0.587/0.114).
    lum = (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16
    return np.repeat(lum.astype(np.uint8)[..., None], 3, axis=-1)


def bdr(images: np.ndarray, bits: int = 2) -> np.ndarray:
    """Bit-depth reduction: quantise each channel to 2**bits evenly spaced levels over 0..255 (ISS BDR).

    Same as ISS's `round(x * (2**bits - 1)) / (2**bits - 1)` on [0, 1] images, then back to uint8
    (bits=2 leaves the values {0, 85, 170, 255}).
    """
    _check_images(images, "bdr")
    if not 1 <= int(bits) <= 8:
        raise ValueError(f"bdr: bits must be in 1..8, got {bits}")
    levels = (1 << int(bits)) - 1
    # Integer rounding of x * levels / 255 (half up), then back to the 0..255 scale with rounding.
    q = (images.astype(np.uint32) * levels * 2 + 255) // 510
    return ((q * 255 * 2 + levels) // (2 * levels)).astype(np.uint8)


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix D (n x n): the DCT of a vector v is D @ v, its inverse D.T @ c."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    d = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    d[0] /= np.sqrt(2.0)
    return d


def sharpen_ff(images: np.ndarray, center: float = 2.5, keep: float = 0.3, random: bool = True,
               seed: int = 0) -> np.ndarray:  # fmt: skip
    """Sharpening + frequency filtering (Kim & Sandoval-Segura, 2024: "RSK + FF"), a counter to CUDA's blurs.

    Each image is convolved with a cross-shaped sharpening kernel [[0, -n, 0], [-n, c, -n], [0, -n, 0]],
    n = (c - 1) / 4 (edge-replicated borders, so the size stays), clamped to [0, 1]; then only the lowest
    `keep` fraction of its 2-D DCT rows and columns is kept (orthonormal DCT per channel), clamped and rounded
    to uint8. random=True draws each image's kernel as the authors' "random sharpening kernels" do: c from
    N(center, 0.1), each of the four n from N((c - 1) / 4, 0.1), seeded by `seed` and the image's position.
    The authors apply it on the fly during training (and shrink the image to 30x30 before their random crop
    pads it back); here it is a data transform like the other defenses, one fixed draw per image.
    """
    _check_images(images, "sharpen_ff")
    if not 0 < keep <= 1:
        raise ValueError(f"sharpen_ff: keep must be in (0, 1], got {keep}")
    n_img, h, w, _ = images.shape
    if random:
        rng = np.random.default_rng(seed)
        c = rng.normal(center, 0.1, n_img)
        nb = rng.normal(((c - 1) / 4)[:, None], 0.1, (n_img, 4))
    else:
        c = np.full(n_img, float(center))
        nb = np.repeat(((c - 1) / 4)[:, None], 4, axis=1)
    x = images.astype(np.float64) / 255.0
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    up, left, right, down = (xp[:, 0:h, 1 : w + 1], xp[:, 1 : h + 1, 0:w], xp[:, 1 : h + 1, 2 : w + 2],
                             xp[:, 2 : h + 2, 1 : w + 1])  # fmt: skip
    b = lambda v: v[:, None, None, None]  # noqa: E731 - per-image scalars over (H, W, C)
    y = b(c) * x - b(nb[:, 0]) * up - b(nb[:, 1]) * left - b(nb[:, 2]) * right - b(nb[:, 3]) * down
    y = np.clip(y, 0.0, 1.0)
    dh, dw = _dct_matrix(h), _dct_matrix(w)
    coef = np.einsum("ij,njwc,kw->nikc", dh, y, dw)  # 2-D DCT of each channel
    mask = np.zeros((h, w))
    mask[: int(h * keep), : int(w * keep)] = 1.0
    y = np.einsum("ji,njwc,wk->nikc", dh, coef * mask[None, :, :, None], dw)  # inverse (D orthonormal)
    return np.clip(np.round(y * 255.0), 0, 255).astype(np.uint8)


def identity(images: np.ndarray) -> np.ndarray:
    """No defense (a validated copy), so "none" can sit in the same table as the others."""
    return _check_images(images, "none").copy()


DEFENSES: dict[str, Callable[..., np.ndarray]] = {
    "none": identity,
    "jpeg": jpeg,
    "grayscale": grayscale,
    "bdr": bdr,
    "sharpen_ff": sharpen_ff,
}


def apply_defense(name: str, images: np.ndarray, **kwargs: Any) -> np.ndarray:
    """Run the defense registered as `name` (see `DEFENSES`) with its keyword arguments, e.g. quality=10."""
    if name not in DEFENSES:
        raise ValueError(f"unknown defense {name!r}; choose one of {sorted(DEFENSES)}")
    return DEFENSES[name](images, **kwargs)


@dataclass
class DefenseTransform:
    """A defense as a Ray Data `map_batches` stage: rewrites `column` (uint8 NHWC) of a numpy batch.

    `ds.map_batches(DefenseTransform("jpeg", params={"quality": 10}), batch_format="numpy")`.
    Ray hands read-only batches; the output is a new array, the input is never written.
    """

    name: str
    column: str = "image"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in DEFENSES:
            raise ValueError(f"unknown defense {self.name!r}; choose one of {sorted(DEFENSES)}")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.column not in batch:
            raise KeyError(f"DefenseTransform: batch has no column {self.column!r} (columns: {sorted(batch)})")
        images = np.asarray(batch[self.column])
        if images.dtype == object:  # a column of per-row arrays
            images = np.stack(list(images))
        out = dict(batch)
        out[self.column] = apply_defense(self.name, images, **self.params)
        return out
