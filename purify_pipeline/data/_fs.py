"""Where shards live: fsspec (or pyarrow) filesystems and paths, shared by the reading and writing sides."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

MANIFEST_NAME = "manifest.json"
TMP_MARKER = ".tmp-"


@dataclass(frozen=True)
class ShardInfo:
    """A written shard: its URL, number of samples and sha256 of its bytes."""

    url: str
    count: int
    sha256: str


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


def join(base: str, name: str) -> str:
    """``base/name`` for local paths and URLs alike."""
    return f"{base.rstrip('/')}/{name}" if base else name
