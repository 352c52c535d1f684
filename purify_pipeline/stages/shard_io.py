"""The shard side of `purify_shards` (and of the poison job): reading tars into Ray rows, assembling the rows
that come back into output shards, quarantine shards and the manifest; and `fit_purifier`'s decoded training
input (`training_dataset`). Nothing here imports torch, so a fresh Ray worker running a read task does not pay
the seconds that costs.

Every sample group of a tar is one row (`shards.iter_records`), bad ones included, tagged with its shard
index, position and the shard's sample count; a bad row carries its message in ``ERROR_COL``. The driver's
`_ShardAssembler` writes a shard as soon as all its rows are back, so nothing is lost or reordered.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from purify_pipeline.data import outdir, shards
from purify_pipeline.data.shards import ShardError

__all__ = ["ERROR_COL", "decode_training_batch", "read_shards", "save_manifest", "training_dataset", "write_quarantine"]


ERROR_COL = "__error__"


def read_shards(batch: dict[str, np.ndarray], *, on_error: str = "raise", chunk_rows: int = 256,
                storage_options: Mapping[str, Any] | None = None):  # fmt: skip
    """Ray Data task UDF over rows ``{"index", "url"}`` (optionally ``"dups"``: JSON ``{pos: [key, reason]}``
    of samples to quarantine as duplicates): streams each shard and yields its samples as raw bytes.

    Every row carries ``__key__``, ``__url__``, ``__index__`` (input-shard index), ``__pos__`` (position in
    the tar), ``__total__`` (the shard's sample count, so the writer knows when a shard is complete) and
    ``__error__``. A shard is read whole before its first chunk is emitted, because ``__total__`` is only
    known at its end. Every sample group of the tar is one row (`shards.iter_records`): with on_error="skip"
    a bad group (no extension, duplicate or non-adjacent members, truncation) is a row with ``__error__``
    and reading goes on where the tar allows; with "raise" the first one raises ShardError naming shard and key.
    """
    so = dict(storage_options or {})
    dup_col = batch.get("dups")
    for j, (index, url) in enumerate(zip(batch["index"], batch["url"])):
        url = str(url)
        dups = {int(k): v for k, v in json.loads(str(dup_col[j])).items()} if dup_col is not None else {}
        samples = list(shards.iter_records(url, storage_options=so))
        split = {s["__key__"] for s in samples if s.get("__error__", "").startswith("members of this sample are not")}
        for s in samples:
            if s["__key__"] in split:  # every part of a split sample is bad, not only the later ones
                s.setdefault("__error__", "members of this sample are not adjacent in the tar")
            if s["__pos__"] in dups and dups[s["__pos__"]][0] == s["__key__"]:
                s.setdefault("__error__", dups[s["__pos__"]][1])
            if "__error__" in s:
                key = None if s.pop("__shard_error__", False) else s["__key__"]
                err = ShardError(s["__error__"], shard=url, key=key)
                if on_error == "raise":
                    raise err
                s[ERROR_COL] = str(err)
        cols = sorted({c for s in samples for c in s if not c.startswith("__")})
        total = len(samples)
        for start in range(0, total, chunk_rows):
            chunk = samples[start : start + chunk_rows]
            out: dict[str, Any] = {
                "__key__": np.array([s["__key__"] for s in chunk], dtype=object),
                "__url__": np.array([url] * len(chunk), dtype=object),
                "__index__": np.full(len(chunk), int(index), dtype=np.int64),
                "__pos__": np.arange(start, start + len(chunk), dtype=np.int64),
                "__total__": np.full(len(chunk), total, dtype=np.int64),
                ERROR_COL: np.array([s.get(ERROR_COL, "") for s in chunk], dtype=object),
            }
            for c in cols:
                col = np.empty(len(chunk), dtype=object)
                col[:] = [s.get(c) for s in chunk]
                if any(v is not None for v in col):  # an all-None column would come back from Arrow as floats
                    out[c] = col
            yield out


class _ShardAssembler:
    """Driver side of the job: gathers each shard's rows as Ray streams them out (in any order), and once a
    shard has all ``__total__`` rows writes it (on a thread pool) and records it in the manifest."""

    def __init__(self, *, urls: list[str], output: str, prefix: str, manifest: dict, entries: dict[int, dict],
                 on_error: str, storage_options: Mapping[str, Any], pool: ThreadPoolExecutor, bar: Any,
                 on_shard_written: Callable[[dict[str, Any]], None] | None) -> None:  # fmt: skip
        self.urls, self.output, self.prefix, self.manifest, self.entries = urls, output, prefix, manifest, entries
        self.on_error, self.so, self.pool, self.bar, self.callback = on_error, storage_options, pool, bar, on_shard_written
        self.pending: dict[int, list[dict[str, Any]]] = {}
        self.writes: set[Future] = set()
        self.samples_in = self.samples_out = self.quarantined = 0
        self.t0 = time.perf_counter()

    def add_batch(self, batch: dict[str, np.ndarray]) -> None:
        for row in _rows(batch):
            if self.on_error == "raise" and row[ERROR_COL]:
                err = ShardError(row[ERROR_COL])  # the message already names shard and key
                err.shard, err.key = row["__url__"], row["__key__"]
                raise err
            i = int(row["__index__"])
            bucket = self.pending.setdefault(i, [])
            bucket.append(row)
            if len(bucket) == int(row["__total__"]):
                self.writes.add(self.pool.submit(self._write, i, self.pending.pop(i)))
        for f in [f for f in self.writes if f.done()]:
            self.writes.discard(f)
            self._finish(f)

    def close(self, todo: list[int]) -> None:
        """After the stream ended: wait for the writes; shards without any sample are written empty."""
        if self.pending:
            raise RuntimeError(f"shards {sorted(self.pending)} were incomplete when the stream ended")
        while self.writes:
            finished, self.writes = wait(self.writes, return_when=FIRST_COMPLETED)
            for f in finished:
                self._finish(f)
        for i in todo:  # an empty shard never produces a row
            if i not in self.entries:
                self._finish(self.pool.submit(self._write, i, []))

    def _write(self, i: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
        rows.sort(key=lambda r: r["__pos__"])
        good = [{"__key__": r["__key__"], **{c: r[c] for c in sorted(r) if not c.startswith("__")}}
                for r in rows if not r[ERROR_COL]]  # fmt: skip
        bad = [r for r in rows if r[ERROR_COL]]
        name = shards.shard_name(self.prefix, i)
        info = shards.write_shard(shards.join(self.output, name), good, storage_options=self.so)
        entry = {"index": i, "input": self.urls[i], "output": name, "input_count": len(rows),
                 "output_count": info.count, "sha256": info.sha256,
                 "quarantined": [{"key": r["__key__"], "error": r[ERROR_COL]} for r in bad]}  # fmt: skip
        if bad:
            entry.update(write_quarantine(self.urls[i], self.output, name, bad, self.so))
        if entry["input_count"] != entry["output_count"] + len(bad):  # never report a shard that lost samples
            raise RuntimeError(f"{self.urls[i]}: {len(rows)} samples read but {info.count} written + {len(bad)} "
                               "quarantined")  # fmt: skip
        return entry

    def _finish(self, fut: Future) -> None:
        entry = fut.result()
        self.entries[entry["index"]] = entry
        self.samples_in += entry["input_count"]
        self.samples_out += entry["output_count"]
        self.quarantined += len(entry["quarantined"])
        save_manifest(self.output, self.manifest, self.entries, len(self.urls), self.so)
        self.bar.update(1)
        rate = self.samples_in / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix(img_s=f"{rate:.0f}", quarantined=self.quarantined)
        if self.callback is not None:
            self.callback(dict(entry))


def write_quarantine(url: str, output: str, name: str, bad: list[dict[str, Any]],
                     storage_options: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Write ``<output>/quarantine/<name>``: every quarantined sample of input shard ``url`` with its original
    members, re-read from the input exactly as stored, as ``<pos:06d>/<member name>`` (pos: the sample's
    position in the input shard) plus ``<pos:06d>/<key>.quarantine.json`` (shard, key, position, reason)."""
    want = {int(r["__pos__"]): r for r in bad}
    groups = []
    for rec in shards.iter_records(url, storage_options=storage_options, raw=True):
        r = want.get(rec["__pos__"])
        if r is None:
            continue
        if rec["__key__"] != r["__key__"]:
            raise RuntimeError(f"{url} changed while it was being purified (sample #{rec['__pos__']})")
        pre = f"{rec['__pos__']:06d}/"
        why = {"shard": url, "key": r["__key__"], "position": int(r["__pos__"]), "error": r[ERROR_COL]}
        groups.append([(pre + m, data) for m, data in rec["__members__"]]
                      + [(f"{pre}{r['__key__']}.quarantine.json", json.dumps(why, sort_keys=True).encode())])
    if len(groups) != len(want):
        raise RuntimeError(f"{url}: {len(want)} samples to quarantine but {len(groups)} found when re-reading it")
    qname = f"{outdir.QUARANTINE_DIR}/{name}"
    info = shards.write_members(shards.join(output, qname), groups, storage_options=storage_options)
    return {"quarantine": qname, "quarantine_sha256": info.sha256}


def save_manifest(output: str, manifest: dict, entries: dict[int, dict], n_shards: int,
                  storage_options: Mapping[str, Any]) -> str:  # fmt: skip
    """Write the manifest with the finished shards' entries and totals (atomic)."""
    done = [entries[i] for i in sorted(entries)]
    manifest.update(shards=done, complete=len(done) == n_shards, totals={
        "shards": n_shards, "shards_done": len(done),
        "input_count": sum(e["input_count"] for e in done),
        "output_count": sum(e["output_count"] for e in done),
        "quarantined": sum(len(e["quarantined"]) for e in done)})  # fmt: skip
    return shards.write_manifest(output, manifest, storage_options=storage_options)


def _rows(batch: dict[str, np.ndarray]):
    """Rows of a numpy batch as dicts (None values dropped: absent members)."""
    cols = list(batch)
    n = len(batch[cols[0]]) if cols else 0
    for j in range(n):
        row = {}
        for c in cols:
            v = batch[c][j]
            if v is not None and not (isinstance(v, (float, np.floating)) and np.isnan(v)):  # NaN: a null member
                row[c] = v
        yield row


def decode_training_batch(batch: dict[str, np.ndarray], *, num_classes: int, image_size: int) -> dict[str, np.ndarray]:
    """Raw shard rows -> {"image": uint8 NHWC, "label": int64, "key"}; bad samples raise ShardError(shard, key)."""
    images, labels, keys = [], [], []
    for i, key in enumerate(batch["__key__"]):
        url = str(batch["__url__"][i])
        if batch["__error__"][i]:
            raise ShardError(str(batch["__error__"][i]), shard=url, key=str(key))
        row = {c: batch[c][i] for c in batch if not c.startswith("__") and batch[c][i] is not None}
        col = shards.find_image_column(row, shard=url, key=key)
        img = shards.decode_image(row[col], col, shard=url, key=key)
        if img.shape[:2] != (image_size, image_size):
            raise ShardError(f"image is {img.shape[0]}x{img.shape[1]}, the model expects {image_size}x{image_size}",
                             shard=url, key=key)  # fmt: skip
        label = shards.parse_label(row.get("cls"), shard=url, key=key)
        if not 0 <= label < num_classes:
            raise ShardError(f"label {label} is outside the model's classes [0, {num_classes})", shard=url, key=key)
        images.append(img)
        labels.append(label)
        keys.append(str(key))
    return {"image": np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8),
            "label": np.asarray(labels, dtype=np.int64), "key": np.asarray(keys, dtype=object)}  # fmt: skip


def training_dataset(urls: Sequence[str], *, num_classes: int, image_size: int,
                     storage_options: Mapping[str, Any] | None = None) -> Any:  # fmt: skip
    """A Ray Dataset of decoded, validated {"image", "label", "key"} rows read from WebDataset shards: the input of
    `fit_purifier`'s Ray Train workers. Defined here, away from torch, so its read tasks start fast."""
    import ray

    so = dict(storage_options or {})
    ds = ray.data.from_items([{"index": i, "url": u} for i, u in enumerate(urls)], override_num_blocks=len(urls))
    ds = ds.map_batches(read_shards, fn_kwargs={"on_error": "skip", "storage_options": so}, batch_size=1,
                        batch_format="numpy", num_cpus=0.25)  # fmt: skip
    return ds.map_batches(decode_training_batch, fn_kwargs={"num_classes": num_classes, "image_size": image_size},
                          batch_format="numpy", num_cpus=0.25)  # fmt: skip
