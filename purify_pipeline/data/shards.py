"""WebDataset shard I/O: list, stream, decode, encode and atomically write tar shards.

Everything goes through fsspec, so a shard may be a local path, a ``file://``/``s3://``/``gs://``/... URL
(``storage_options`` are passed to the filesystem), or a path on an explicit ``filesystem`` (an fsspec
filesystem or a ``pyarrow.fs.FileSystem``, which is wrapped). Reading is our own streaming tar reader
rather than ``webdataset``/``ray.data.read_webdataset`` because we need (a) raw member bytes, so that
every non-image member passes through byte-identical, and (b) a *loud* error on a truncated or corrupt
tar: Python's ``tarfile`` silently stops at a truncated or garbage header, which would quietly drop
samples. Writing is deterministic (fixed tar metadata), so the same samples give the same bytes, and
atomic (temporary name, then rename), so a crash never leaves a half-written shard under its final name.
"""
from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from purify_pipeline.data._fs import (  # re-exported
    MANIFEST_NAME,
    TMP_MARKER,
    ShardInfo,
    _display,
    fs_path,
    is_local,
    join,
)
from purify_pipeline.data._samples import (  # re-exported
    ShardError,
    decode_image,
    encode_png,
    parse_label,
    to_rgb,
)
from purify_pipeline.data._write import (  # re-exported
    read_manifest,
    sha256_file,
    shard_name,
    write_manifest,
    write_members,
    write_shard,
)

__all__ = [
    "IMAGE_EXTS",
    "MANIFEST_NAME",
    "TMP_MARKER",
    "ShardArrays",
    "ShardError",
    "ShardInfo",
    "decode_image",
    "encode_png",
    "expand",
    "find_image_column",
    "fs_path",
    "is_local",
    "iter_records",
    "iter_samples",
    "join",
    "load_arrays",
    "parse_label",
    "read_manifest",
    "sha256_file",
    "shard_name",
    "split_member_name",
    "to_rgb",
    "write_manifest",
    "write_members",
    "write_shard",
]

IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "npy")



@dataclass
class ShardArrays:
    """Decoded shards in memory: images uint8 NHWC, labels int64 (N,), and per-sample key and shard URL."""

    images: np.ndarray
    labels: np.ndarray
    keys: list[str]
    urls: list[str]


# --------------------------------------------------------------------------------------------- filesystems



def _braces(pattern: str) -> list[str]:
    """``a-{0..2}.tar`` -> three names; braceexpand (a webdataset dependency) is imported only when needed."""
    if "{" not in pattern:
        return [pattern]
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


def expand(
    urls: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    storage_options: Mapping[str, Any] | None = None,
    filesystem: Any = None,
) -> list[str]:
    """Shard URLs from brace patterns (``a-{000000..000009}.tar``), globs, directories (their ``*.tar``)
    or plain paths/URLs; sorted, de-duplicated. Raises FileNotFoundError when a pattern matches nothing
    or a named shard does not exist."""
    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    if not items:
        raise FileNotFoundError("no shard URLs given")
    out: set[str] = set()
    for item in items:
        for url in _braces(os.fspath(item)):
            fs, path = fs_path(url, storage_options, filesystem)
            if any(c in path for c in "*?["):
                found = [p for p in fs.glob(path) if not fs.isdir(p)]
                if not found:
                    raise FileNotFoundError(f"shard pattern {url!r} matches no file")
                out.update(_display(url, fs, p) for p in found)
            elif fs.isdir(path):
                found = sorted(p for p in fs.glob(path.rstrip("/") + "/*.tar*") if TMP_MARKER not in p)
                if not found:
                    raise FileNotFoundError(f"directory {url!r} holds no .tar shard")
                out.update(_display(url, fs, p) for p in found)
            elif fs.exists(path):
                out.add(url if "://" in url or not is_local(fs) else path)
            else:
                raise FileNotFoundError(f"shard {url!r} does not exist")
    return sorted(out)


# --------------------------------------------------------------------------------------------- reading


class _TruncatedTar(Exception):
    pass


class _StrictTarInfo(tarfile.TarInfo):
    """TarInfo whose header parsing turns a missing/short/garbled header into an error.

    ``tarfile`` treats those as a clean end of archive; only an all-zero end-of-archive block is a clean end."""

    @classmethod
    def fromtarfile(cls, tf):  # noqa: D102
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:
            raise
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError) as e:
            raise _TruncatedTar(f"truncated tar (no end-of-archive marker): {e}") from None
        except tarfile.InvalidHeaderError as e:
            raise _TruncatedTar(f"corrupt tar header: {e}") from None


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/train_00042.seg.png`` -> (``dir/train_00042``, ``seg.png``): split at the first dot of the
    basename, as webdataset and ``ray.data.read_webdataset`` do."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        return name, ""
    return (f"{d}/{stem}" if d else stem), ext


def iter_records(
    url: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    filesystem: Any = None,
    raw: bool = False,
    data: bool = True,
) -> Iterator[dict[str, Any]]:
    """Every sample group of one tar shard, bad ones included, in tar order: dicts with ``__key__``,
    ``__url__``, ``__pos__`` (0, 1, ... in the shard), raw bytes per member extension, and ``__error__``
    (the bare reason) on a bad group. ``raw=True`` adds ``__members__``: the group's (member name, bytes)
    exactly as stored. ``data=False`` reads headers only (keys; no member bytes, no data checks).

    A group is a run of adjacent members with the same key. A member without an extension, a duplicated
    member or a key seen earlier in the shard (non-adjacent members) makes its group bad and reading goes
    on; a truncated or corrupt tar makes the group being read bad (or, before any member, yields one
    record ``<after N samples>`` without members) and ends the shard. So the records count what the tar holds.
    """
    fs, path = fs_path(url, storage_options, filesystem)
    seen: set[str] = set()
    current: dict[str, Any] | None = None
    n = 0

    def start(key: str) -> dict[str, Any]:
        rec: dict[str, Any] = {"__key__": key, "__url__": url, "__pos__": n}
        if raw:
            rec["__members__"] = []
        if key in seen:
            rec["__error__"] = "members of this sample are not adjacent in the tar"
        seen.add(key)
        return rec

    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*" if data else "r:*",
                                                    tarinfo=_StrictTarInfo) as tf:  # fmt: skip
            for m in tf:
                if not m.isreg():
                    continue
                key, ext = split_member_name(m.name)
                if current is not None and current["__key__"] != key:
                    yield current  # a new key starts: the previous sample is complete
                    current, n = None, n + 1
                if current is None:
                    current = start(key)
                value = tf.extractfile(m).read() if data else b""  # type: ignore[union-attr]
                if raw:
                    current["__members__"].append((m.name, value))
                if not ext:
                    current.setdefault("__error__", f"member {m.name!r} has no extension")
                elif ext in current:
                    current.setdefault("__error__", f"duplicate member {m.name!r}")
                else:
                    current[ext] = value
    except (_TruncatedTar, tarfile.TarError, EOFError, OSError) as e:
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise
        if current is None:
            current = start(f"<after {n} samples>")
            current["__shard_error__"] = True
        current["__error__"] = f"truncated or corrupt tar ({e})"
    if current is not None:
        yield current


def iter_samples(
    url: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    filesystem: Any = None,
) -> Iterator[dict[str, Any]]:
    """Stream the samples of one tar shard: dicts with ``__key__``, ``__url__`` and raw bytes per member
    extension. Raises ShardError (naming shard and key) on a truncated/corrupt tar, a member without an
    extension, a duplicated member, or a sample whose members are not adjacent (see `iter_records`)."""
    for rec in iter_records(url, storage_options=storage_options, filesystem=filesystem):
        if "__error__" in rec:
            key = None if rec.pop("__shard_error__", False) else rec["__key__"]
            raise ShardError(rec["__error__"], shard=url, key=key)
        del rec["__pos__"]
        yield rec


def load_arrays(
    urls: str | Sequence[str],
    *,
    image_column: str | None = None,
    label_column: str = "cls",
    storage_options: Mapping[str, Any] | None = None,
    filesystem: Any = None,
    progress: bool = True,
) -> ShardArrays:
    """Decode whole shards into memory, in shard order then tar order. All images must share one size."""
    from purify_pipeline._progress import progress as _bar

    shard_urls = expand(urls, storage_options=storage_options, filesystem=filesystem)
    images: list[np.ndarray] = []
    labels: list[int] = []
    keys: list[str] = []
    where: list[str] = []
    for url in _bar(shard_urls, enabled=progress, desc="load shards", unit="shard"):
        for s in iter_samples(url, storage_options=storage_options, filesystem=filesystem):
            key = s["__key__"]
            col = image_column or find_image_column(s, shard=url, key=key)
            if col not in s:
                raise ShardError(f"no .{col} member", shard=url, key=key)
            img = decode_image(s[col], col, shard=url, key=key)
            if images and img.shape != images[0].shape:
                raise ShardError(f"image size {img.shape} differs from the first image's {images[0].shape}", shard=url, key=key)
            images.append(img)
            labels.append(parse_label(s.get(label_column), shard=url, key=key))
            keys.append(key)
            where.append(url)
    if not images:
        raise ShardError(f"no samples in {len(shard_urls)} shard(s)")
    return ShardArrays(np.stack(images), np.asarray(labels, dtype=np.int64), keys, where)


def find_image_column(sample: Mapping[str, Any], *, shard: str | None = None, key: str | None = None) -> str:
    """The first of jpg/jpeg/png/webp/npy present in a sample (by column name, also ``x.png`` style)."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    for col in sample:
        if not col.startswith("__") and col.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
            return col
    cols = sorted(c for c in sample if not c.startswith("__"))
    raise ShardError(f"no image member (looked for {'/'.join(IMAGE_EXTS)}; found {cols})", shard=shard, key=key)


# --------------------------------------------------------------------------------------------- writing



