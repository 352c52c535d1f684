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

import hashlib
import io
import json
import os
import tarfile
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ._samples import ShardError, decode_image, encode_png, parse_label, to_rgb  # re-exported

__all__ = [
    "IMAGE_EXTS",
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
MANIFEST_NAME = "manifest.json"
TMP_MARKER = ".tmp-"


@dataclass(frozen=True)
class ShardInfo:
    """A written shard: its URL, number of samples and sha256 of its bytes."""

    url: str
    count: int
    sha256: str


@dataclass
class ShardArrays:
    """Decoded shards in memory: images uint8 NHWC, labels int64 (N,), and per-sample key and shard URL."""

    images: np.ndarray
    labels: np.ndarray
    keys: list[str]
    urls: list[str]


# --------------------------------------------------------------------------------------------- filesystems


def fs_path(url: str, storage_options: Mapping[str, Any] | None = None, filesystem: Any = None):
    """(fsspec filesystem, path within it) for a URL/path; a pyarrow filesystem is wrapped for fsspec."""
    import fsspec

    if filesystem is not None:
        try:
            import pyarrow.fs as pafs

            if isinstance(filesystem, pafs.FileSystem):
                from fsspec.implementations.arrow import ArrowFSWrapper

                filesystem = ArrowFSWrapper(filesystem)
        except ImportError:  # pragma: no cover - pyarrow is a dependency
            pass
        return filesystem, filesystem._strip_protocol(url)
    return fsspec.core.url_to_fs(url, **dict(storage_options or {}))


def is_local(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _display(url: str, fs: Any, path: str) -> str:
    """The URL under which a listed path is reported: plain path for local files, full URL otherwise."""
    if is_local(fs) and "://" not in url:
        return path
    if "://" in url:
        return fs.unstrip_protocol(path)
    return path


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
    from ._progress import progress as _bar

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


def shard_name(prefix: str, i: int) -> str:
    """Stable, brace-addressable shard name: ``prefix-000042.tar``."""
    return f"{prefix}-{i:06d}.tar"


class _HashingWriter(io.RawIOBase):
    """File wrapper that sha256-hashes what it writes."""

    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.h.update(b)
        self.f.write(b)
        return len(b)


def _member_bytes(value: Any, *, shard: str, key: str, col: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 1:
        return value.tobytes()
    raise ShardError(f"column {col!r} holds {type(value).__name__}; write_shard needs bytes or str", shard=shard, key=key)


def _atomic_write(url: str, write_fn, storage_options=None, filesystem=None):
    """Run ``write_fn(fileobj)`` against a temporary sibling of ``url`` and rename it into place on success;
    on any error the temporary file is removed and ``url`` is untouched."""
    fs, path = fs_path(url, storage_options, filesystem)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if is_local(fs) and parent:
        os.makedirs(parent, exist_ok=True)
    tmp = f"{path}{TMP_MARKER}{uuid.uuid4().hex[:12]}"
    try:
        with fs.open(tmp, "wb") as f:
            result = write_fn(f)
            if is_local(fs):
                f.flush()
                os.fsync(f.fileno())
        if is_local(fs):
            os.replace(tmp, path)
        else:
            fs.mv(tmp, path)  # object stores: the final key appears only once, complete
    except BaseException:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        except Exception:  # noqa: BLE001 - cleanup is best effort
            pass
        raise
    return result


def write_shard(
    url: str,
    samples: Iterable[Mapping[str, Any]],
    *,
    storage_options: Mapping[str, Any] | None = None,
    filesystem: Any = None,
) -> ShardInfo:
    """Write samples (dicts with ``__key__`` and bytes/str per extension; ``__*`` columns and None values
    are skipped) as one tar, atomically: temporary name, then rename. Tar metadata is fixed (mtime 0,
    uid/gid 0, mode 0644), so the same samples always give the same bytes and sha256."""

    def members():
        for n, s in enumerate(samples):
            key = s.get("__key__")
            if not isinstance(key, str) or not key:
                raise ShardError(f"sample #{n} has no __key__", shard=url)
            yield [(f"{key}.{c}", _member_bytes(v, shard=url, key=key, col=c))
                   for c, v in s.items() if not c.startswith("__") and v is not None]  # fmt: skip

    return write_members(url, members(), storage_options=storage_options, filesystem=filesystem)


def write_members(url: str, groups: Iterable[Sequence[tuple[str, bytes]]], *,
                  storage_options: Mapping[str, Any] | None = None, filesystem: Any = None) -> ShardInfo:  # fmt: skip
    """Write groups of (member name, bytes) as one tar, names as given, atomically and deterministically
    (as `write_shard`); the returned count is the number of groups."""

    def _write(f) -> ShardInfo:
        hw, n = _HashingWriter(f), 0
        with tarfile.open(fileobj=hw, mode="w|", format=tarfile.PAX_FORMAT) as tf:
            for group in groups:
                for name, data in group:
                    ti = tarfile.TarInfo(name)
                    ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
                    ti.uid = ti.gid = 0
                    ti.uname = ti.gname = ""
                    tf.addfile(ti, io.BytesIO(data))
                n += 1
        return ShardInfo(url, n, hw.h.hexdigest())

    return _atomic_write(url, _write, storage_options, filesystem)


def sha256_file(url: str, *, storage_options: Mapping[str, Any] | None = None, filesystem: Any = None) -> str:
    """sha256 hex digest of a file's bytes."""
    fs, path = fs_path(url, storage_options, filesystem)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def join(base: str, name: str) -> str:
    """``base/name`` for local paths and URLs alike."""
    return f"{base.rstrip('/')}/{name}" if base else name


def write_manifest(
    output_dir: str,
    manifest: Mapping[str, Any],
    *,
    storage_options: Mapping[str, Any] | None = None,
    filesystem: Any = None,
) -> str:
    """Write ``output_dir/manifest.json`` atomically; returns its URL."""
    url = join(os.fspath(output_dir), MANIFEST_NAME)
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
    _atomic_write(url, lambda f: f.write(data), storage_options, filesystem)
    return url


def read_manifest(
    output_dir: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    filesystem: Any = None,
) -> dict | None:
    """``output_dir/manifest.json`` as a dict, or None when there is none."""
    fs, path = fs_path(join(os.fspath(output_dir), MANIFEST_NAME), storage_options, filesystem)
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
