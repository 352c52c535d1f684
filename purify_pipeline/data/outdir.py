"""Output-directory safety and input checks shared by the shard jobs (`purify_shards`, `poison_shards`).

Rules: a job only ever deletes or overwrites its *own* files: the names it writes (``manifest.json``,
``<prefix>-NNNNNN.tar``, ``quarantine/<prefix>-NNNNNN.tar``) in a directory that holds its manifest, and
its own temporary files (``<own name>.tmp-<12 hex digits>``, as `shards.write_shard` names them). A
directory without the job's manifest is refused when it holds a file the job would write; an output
directory that holds the inputs is refused. Keys are checked across all input shards before any work:
the D-VAE noise (and the key-seeded poisons) are seeded by the sample key, so two samples with one key
would get the same noise.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Sequence

from purify_pipeline.data import shards
from purify_pipeline.data.shards import ShardError

__all__ = ["QUARANTINE_DIR", "check_not_input", "clean_own_tmp", "duplicate_keys", "existing_names", "is_own_tmp",
           "own_names", "raise_on_duplicates", "remove_own", "shard_keys"]

QUARANTINE_DIR = "quarantine"
_TMP_TAIL = re.escape(shards.TMP_MARKER) + r"[0-9a-f]{12}"


def _norm(url: str) -> str:
    return os.path.realpath(url) if "://" not in url else url.rstrip("/")


def check_not_input(output: str, urls: Sequence[str]) -> None:
    """Refuse an output directory that is (or holds) the input shards' directory."""
    out = _norm(output)
    for u in urls:
        parent = u.rsplit("/", 1)[0] if "/" in u else "."
        if _norm(parent) == out or _norm(u) == out:
            raise ValueError(f"output {output} is the directory of the input shard {u}: write to another directory")


def own_names(prefix: str, n: int) -> set[str]:
    """Every name (relative to the output) a job over n input shards writes."""
    names = {shards.MANIFEST_NAME}
    for i in range(n):
        names |= {shards.shard_name(prefix, i), f"{QUARANTINE_DIR}/{shards.shard_name(prefix, i)}"}
    return names


def existing_names(output: str, storage_options: Mapping[str, Any] | None = None) -> set[str]:
    """Names of the files in the output directory and its quarantine/ subdirectory (relative to it)."""
    fs, path = shards.fs_path(output, storage_options)
    path = path.rstrip("/")
    out: set[str] = set()
    for sub in ("", f"/{QUARANTINE_DIR}"):
        try:
            listed = fs.ls(path + sub, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for e in listed:
            if e.get("type") != "directory":
                out.add((sub.lstrip("/") + "/" if sub else "") + e["name"].rstrip("/").rsplit("/", 1)[-1])
    return out


def is_own_tmp(name: str, prefixes: Sequence[str]) -> bool:
    """``manifest.json.tmp-<hex12>`` / ``[quarantine/]<prefix>-NNNNNN.tar.tmp-<hex12>``: a crashed write of ours."""
    alts = "|".join(re.escape(p) + r"-\d{6}\.tar" for p in prefixes)
    pat = rf"(?:{re.escape(shards.MANIFEST_NAME)}|(?:{QUARANTINE_DIR}/)?(?:{alts})){_TMP_TAIL}"
    return re.fullmatch(pat, name) is not None


def clean_own_tmp(output: str, prefixes: Sequence[str], storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Delete the temporary files a crashed run of this job left (only names `is_own_tmp` accepts)."""
    fs, path = shards.fs_path(output, storage_options)
    gone = sorted(n for n in existing_names(output, storage_options) if is_own_tmp(n, prefixes))
    for n in gone:
        fs.rm(f"{path.rstrip('/')}/{n}")
    return gone


def remove_own(output: str, names: Sequence[str], storage_options: Mapping[str, Any] | None = None) -> None:
    """Delete files the job's manifest lists as its own (missing ones are fine)."""
    fs, path = shards.fs_path(output, storage_options)
    for n in names:
        p = f"{path.rstrip('/')}/{n}"
        if fs.exists(p):
            fs.rm(p)


def shard_keys(urls: Sequence[str], *, storage_options: Mapping[str, Any] | None = None,
               threads: int = 4) -> list[list[tuple[int, str | None]]]:  # fmt: skip
    """``(position, key)`` of every sample group of each shard, in order (key None for an unreadable group).
    Reads tar headers only."""

    def keys(url: str) -> list[tuple[int, str | None]]:
        return [(r["__pos__"], None if "__error__" in r else r["__key__"])
                for r in shards.iter_records(url, storage_options=storage_options, data=False)]  # fmt: skip

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return list(pool.map(keys, urls))


def duplicate_keys(urls: Sequence[str], *, storage_options: Mapping[str, Any] | None = None, threads: int = 4,
                   keys: list[list[tuple[int, str | None]]] | None = None,
                   ) -> dict[int, dict[int, tuple[str, str]]]:  # fmt: skip
    """Sample keys that occur in more than one input shard: ``{shard index: {position: (key, reason)}}``
    for every occurrence after the first (shards in input order). Reads tar headers only, or takes them from
    `keys` (`shard_keys(urls)`) when the caller already has them."""
    per_shard = keys if keys is not None else shard_keys(urls, storage_options=storage_options, threads=threads)
    first: dict[str, tuple[int, int]] = {}
    dups: dict[int, dict[int, tuple[str, str]]] = {}
    for i, found in enumerate(per_shard):
        for pos, key in found:
            if key is None:
                continue
            if key not in first:
                first[key] = (i, pos)
            elif first[key][0] != i:  # within one shard the reader itself flags repeated keys
                j, p = first[key]
                reason = (f"duplicate key: also in shard {urls[j]!r} (sample #{p}); the noise is seeded by "
                          "the key, so keys must be unique across the input")  # fmt: skip
                dups.setdefault(i, {})[pos] = (key, reason)
    return dups


def raise_on_duplicates(urls: Sequence[str], dups: dict[int, dict[int, tuple[str, str]]]) -> None:
    """Raise ShardError naming the first duplicate key and both shards (for on_error="raise")."""
    for i in sorted(dups):
        pos = min(dups[i])
        key, reason = dups[i][pos]
        n = sum(len(d) for d in dups.values())
        raise ShardError(f"{reason} ({n} duplicate key(s) in all)", shard=urls[i], key=key)
