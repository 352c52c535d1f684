"""Sample-level pieces shared by the shard reader and the stages: `ShardError` (bad input, naming shard and
key) and decoding/encoding of one sample's image and label. Re-exported by `purify_pipeline.data.shards`."""
from __future__ import annotations

import io
import re
from typing import Any

import numpy as np

_ADDRESS_RE = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")


class ShardError(ValueError):
    """Bad shard content; the message names the shard URL and, when known, the sample key."""

    def __init__(self, message: str, *, shard: str | None = None, key: str | None = None):
        self.shard = shard
        self.key = key
        where = []
        if shard is not None:
            where.append(f"shard {shard!r}")
        if key is not None:
            where.append(f"key {key!r}")
        message = _ADDRESS_RE.sub(r"<\1>", str(message))  # no ``<... object at 0x7f..>``: stable messages
        super().__init__(f"{', '.join(where)}: {message}" if where else message)

    def __reduce__(self):  # keep .shard/.key when the error crosses a Ray process boundary
        return (_rebuild_shard_error, (self.args[0], self.shard, self.key))


def _rebuild_shard_error(msg: str, shard: str | None, key: str | None) -> "ShardError":
    err = ShardError.__new__(ShardError)
    ValueError.__init__(err, msg)
    err.shard, err.key = shard, key
    return err


# --------------------------------------------------------------------------------------------- decoding


def to_rgb(img: np.ndarray, *, shard: str | None = None, key: str | None = None) -> np.ndarray:
    """uint8 HxW, HxWx1, HxWx3 or HxWx4 -> contiguous uint8 HxWx3: gray is replicated, alpha is dropped
    (not composited: the stored colour values are kept)."""
    a = np.asarray(img)
    if a.dtype != np.uint8:
        raise ShardError(f"image array has dtype {a.dtype}, expected uint8", shard=shard, key=key)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ShardError(f"image array has shape {a.shape}, expected HxW, HxWx1, HxWx3 or HxWx4", shard=shard, key=key)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = a[:, :, :3]
    return np.ascontiguousarray(a)


def decode_image(data: bytes, ext: str = "jpg", *, shard: str | None = None, key: str | None = None) -> np.ndarray:
    """Decode image bytes (JPEG/PNG/WebP via Pillow, or ``.npy`` without pickle) to uint8 HxWx3 RGB.

    Grayscale, palette, RGBA/LA, CMYK and 16-bit images are converted to 8-bit RGB (alpha dropped)."""
    ext = ext.lower().rsplit(".", 1)[-1]
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ShardError(f"image member .{ext} is {type(data).__name__}, expected bytes", shard=shard, key=key)
    if ext == "npy":
        try:
            arr = np.load(io.BytesIO(bytes(data)), allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - any parse failure is bad input
            raise ShardError(f"undecodable .npy image ({e})", shard=shard, key=key) from None
        return to_rgb(arr, shard=shard, key=key)
    from PIL import Image

    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                im = im.point(lambda v: v / 256).convert("L")
            if im.mode != "RGB":
                im = im.convert("RGBA").convert("RGB") if im.mode == "P" else im.convert("RGB")
            return np.asarray(im, dtype=np.uint8).copy()
    except ShardError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise ShardError(f"undecodable .{ext} image ({type(e).__name__}: {e})", shard=shard, key=key) from None


_INT_RE = re.compile(rb"\s*[+-]?\d+\s*")


def parse_label(data: Any, *, shard: str | None = None, key: str | None = None) -> int:
    """Class label from a ``.cls`` member (ASCII integer bytes/str) or an already-decoded int."""
    if data is None:
        raise ShardError("missing label", shard=shard, key=key)
    if isinstance(data, (bool, np.bool_)):
        raise ShardError(f"label {data!r} is not an integer", shard=shard, key=key)
    if isinstance(data, (int, np.integer)):
        return int(data)
    if isinstance(data, str):
        data = data.encode("utf-8", "replace")
    if isinstance(data, (bytes, bytearray, memoryview)):
        b = bytes(data)
        if _INT_RE.fullmatch(b):
            return int(b)
        shown = b[:40].decode("utf-8", "replace")
        raise ShardError(f"label {shown!r} is not an integer", shard=shard, key=key)
    raise ShardError(f"label of type {type(data).__name__} is not an integer", shard=shard, key=key)


def encode_png(img: np.ndarray, *, compress_level: int = 1) -> bytes:
    """Lossless PNG bytes of a uint8 HxWx3 (or HxW) image. Level 1: fast, still lossless; deterministic."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()
