"""Class-balanced subsets of a sharded dataset, written back as shards (the demo's and pipelines' small sets)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from purify_pipeline.data import shards

__all__ = ["select_balanced", "write_split"]


def select_balanced(urls: Sequence[str], per_class: int, num_classes: int) -> list[dict[str, Any]]:
    """The first `per_class` samples of every class, in shard order (raw sample dicts, no ``__url__``)."""
    counts = np.zeros(num_classes, dtype=np.int64)
    out: list[dict[str, Any]] = []
    for url in urls:
        for s in shards.iter_samples(url):
            y = shards.parse_label(s.get("cls"), shard=url, key=s["__key__"])
            if not 0 <= y < num_classes:
                raise shards.ShardError(f"label {y} is outside [0, {num_classes})", shard=url, key=s["__key__"])
            if counts[y] < per_class:
                counts[y] += 1
                out.append({k: v for k, v in s.items() if k != "__url__"})
            if counts.min() >= per_class:
                return out
    short = {i: int(c) for i, c in enumerate(counts) if c < per_class}
    raise ValueError(f"not enough samples: wanted {per_class} per class, classes short: {short}")


def write_split(out: Path, prefix: str, samples: list[dict[str, Any]], shard_size: int, manifest: dict[str, Any]) -> list[str]:
    """Write samples as `<prefix>-NNNNNN.tar` shards of `shard_size` + manifest.json (last: it marks completion)."""
    out.mkdir(parents=True, exist_ok=True)
    entries, urls = [], []
    for j in range(0, len(samples), shard_size):
        name = shards.shard_name(prefix, j // shard_size)
        info = shards.write_shard(str(out / name), samples[j : j + shard_size])
        entries.append({"file": name, "samples": info.count, "sha256": info.sha256})
        urls.append(str(out / name))
    manifest = {**manifest, "splits": {prefix: {"samples": len(samples), "shards": entries}}}
    shards.write_manifest(str(out), manifest)
    return urls
