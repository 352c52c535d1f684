"""Baseline defenses: shapes, dtype, the real JPEG codec, Pillow-exact grayscale, BDR levels, sharpen + DCT
low-pass, errors."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from purify_pipeline.eval.defenses import (
    DEFENSES,
    DefenseTransform,
    _dct_matrix,
    apply_defense,
    bdr,
    grayscale,
    jpeg,
    sharpen_ff,
)


@pytest.fixture()
def images(rng: np.random.Generator) -> np.ndarray:
    # smooth-ish images (a gradient + noise) so JPEG has structure to keep and detail to drop
    base = np.linspace(0, 255, 32)[None, :, None, None] * np.ones((6, 32, 32, 3)) * 0.5
    return np.clip(base + rng.integers(0, 48, (6, 32, 32, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_shape_dtype_and_input_untouched(name: str, images: np.ndarray) -> None:
    before = images.copy()
    out = apply_defense(name, images)
    assert out.shape == images.shape and out.dtype == np.uint8
    assert out is not images
    np.testing.assert_array_equal(images, before)


def test_jpeg_round_trips_through_the_codec(images: np.ndarray) -> None:
    out = jpeg(images, quality=10)
    for img, o in zip(images, out):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=10)
        np.testing.assert_array_equal(o, np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    # lossy: quality 10 changes pixels a lot, quality 95 much less
    err10 = np.abs(out.astype(int) - images).mean()
    err95 = np.abs(jpeg(images, quality=95).astype(int) - images).mean()
    assert err10 > 1.2 * err95 > 0


def test_grayscale_matches_pillow_and_has_equal_channels(images: np.ndarray) -> None:
    out = grayscale(images)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    ref = np.stack([np.asarray(Image.fromarray(i).convert("L")) for i in images])
    np.testing.assert_array_equal(out[..., 0], ref)


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_bdr_levels_match_float_reference(bits: int) -> None:
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    out = bdr(x, bits=bits)
    levels = 2**bits - 1
    ref = np.round(np.round(x / 255.0 * levels) / levels * 255.0).astype(np.uint8)
    np.testing.assert_array_equal(out, ref)
    assert len(np.unique(out)) == 2**bits
    if bits == 2:
        assert set(np.unique(out)) == {0, 85, 170, 255}


def test_sharpen_ff_sharpens_then_keeps_only_low_frequencies(images: np.ndarray) -> None:
    # the identity kernel (centre 1, neighbours 0) and every frequency kept: the images come back
    np.testing.assert_array_equal(sharpen_ff(images, center=1.0, keep=1.0, random=False), images)
    # the fixed kernel alone is the cross-shaped sharpening filter with edge-replicated borders
    x = images.astype(float) / 255
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    ref = 2.5 * x - 0.375 * (xp[:, :-2, 1:-1] + xp[:, 2:, 1:-1] + xp[:, 1:-1, :-2] + xp[:, 1:-1, 2:])
    want = np.round(np.clip(ref, 0, 1) * 255)
    assert np.abs(sharpen_ff(images, keep=1.0, random=False).astype(float) - want).max() <= 1
    # the low-pass: outside the kept 9x9 block of the DCT only uint8 rounding is left
    out = sharpen_ff(images, keep=0.3, seed=1)
    d = _dct_matrix(32)
    coef = np.einsum("ij,njwc,kw->nikc", d, out.astype(float) / 255, d)
    high = coef.copy()
    high[:, :9, :9] = 0
    assert (high**2).sum() < 1e-3 * (coef**2).sum()
    # random kernels: seeded, one per image
    np.testing.assert_array_equal(out, sharpen_ff(images, keep=0.3, seed=1))
    assert not np.array_equal(out, sharpen_ff(images, keep=0.3, seed=2))
    with pytest.raises(ValueError, match="keep"):
        sharpen_ff(images, keep=0.0)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((2, 8, 8, 3), np.float32), "uint8"),
        (np.zeros((8, 8, 3), np.uint8), r"\(N, H, W, 3\)"),
        (np.zeros((2, 8, 8, 1), np.uint8), r"\(N, H, W, 3\)"),
    ],
)
@pytest.mark.parametrize("name", ["jpeg", "grayscale", "bdr", "sharpen_ff"])
def test_bad_input_is_a_clear_error(name: str, bad: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        apply_defense(name, bad)


def test_unknown_defense_and_bad_params() -> None:
    x = np.zeros((1, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown defense"):
        apply_defense("blur", x)
    with pytest.raises(ValueError, match="quality"):
        jpeg(x, quality=0)
    with pytest.raises(ValueError, match="bits"):
        bdr(x, bits=0)


def test_transform_for_map_batches_leaves_readonly_input(images: np.ndarray) -> None:
    images.setflags(write=False)  # Ray hands read-only batches
    batch = {"image": images, "label": np.arange(len(images))}
    out = DefenseTransform("bdr", params={"bits": 2})(batch)
    np.testing.assert_array_equal(out["image"], bdr(images, 2))
    np.testing.assert_array_equal(out["label"], batch["label"])
    with pytest.raises(KeyError, match="no column"):
        DefenseTransform("jpeg", column="jpg")(batch)
