"""Writing shards: deterministic tar bytes (fixed metadata, so the same samples give the same bytes), written
atomically (a temporary name, then a rename), with their sha256 computed on the way; manifests likewise."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import uuid
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from purify_pipeline.data._fs import (
    MANIFEST_NAME,
    TMP_MARKER,
    ShardInfo,
    fs_path,
    is_local,
    join,
)
from purify_pipeline.data._samples import ShardError


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
