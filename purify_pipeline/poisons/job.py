"""Shard-to-shard poisoning job: clean WebDataset shards in, poisoned shards (PNG) + manifest.json out.

Two stages:
1. Driver: fit the poison once - class-level state (OPS pixels, LSP clusters, AR filters, class-wise
   noise) or, for EM/TAP, the per-sample perturbations of the whole set keyed by sample key. Poisons
   that need the data (ops, em, tap) load all input images into memory for this.
2. Ray Data: one row per input shard, `map_batches(PoisonShardWriter)` on an actor pool; each actor
   fetches the fitted poison once and, per shard, reads it, applies the poison with the sample keys as
   sample ids (so bytes don't depend on which actor handles which shard), and writes the output shard
   under the same index: `<prefix>-{i:06d}.tar`. Keys, labels and all non-image members pass through
   unchanged; the image member is replaced by a lossless `.png` (JPEG would partly purify the poison).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from purify_pipeline.data import outdir, shards

from . import fit as fit_poison
from . import get as get_poison
from ._base import Poison
from ._common import check_seed

CREATED_BY = "purify_pipeline.poisons.job.poison_shards"
_SHARD_RE = re.compile(r"^(?P<prefix>.+)-\d{6}\.tar$")


@dataclass(frozen=True)
class PoisonJobConfig:
    """Where the shards go and how they are written (the poison itself travels fitted)."""

    output: str
    prefix: str
    image_column: str | None = None  # None: the first of jpg/jpeg/png/webp/npy per sample
    label_column: str = "cls"
    storage_options: Mapping[str, Any] | None = field(default=None, hash=False)


def _default_prefix(urls: Sequence[str]) -> str:
    """`train` for inputs named train-000000.tar ...; else `poisoned`."""
    prefixes = {m.group("prefix") for u in urls if (m := _SHARD_RE.match(os.path.basename(u)))}
    return prefixes.pop() if len(prefixes) == 1 and all(_SHARD_RE.match(os.path.basename(u)) for u in urls) \
        else "poisoned"


def _check_sample(rec: dict[str, Any], url: str, cfg: PoisonJobConfig, image_size: tuple[int, int] | None,
                  num_classes: int | None) -> tuple[str, np.ndarray, int]:  # fmt: skip
    """(image member, decoded image, label) of one `shards.iter_records` record; ShardError naming shard and key
    when the sample is unusable (a bad tar group, no or undecodable image, wrong size, missing or bad label)."""
    key = rec["__key__"]
    if "__error__" in rec:
        raise shards.ShardError(rec["__error__"], shard=url, key=None if rec.get("__shard_error__") else key)
    col = cfg.image_column or shards.find_image_column(rec, shard=url, key=key)
    if col not in rec:
        raise shards.ShardError(f"no .{col} member", shard=url, key=key)
    img = shards.decode_image(rec[col], col, shard=url, key=key)
    if image_size is not None and tuple(img.shape[:2]) != tuple(image_size):
        raise shards.ShardError(f"image is {img.shape[0]}x{img.shape[1]}, the poison was fitted for "
                                f"{image_size[0]}x{image_size[1]}", shard=url, key=key)  # fmt: skip
    if cfg.label_column not in rec:
        raise shards.ShardError(f"no .{cfg.label_column} label member", shard=url, key=key)
    label = shards.parse_label(rec[cfg.label_column], shard=url, key=key)
    if num_classes is not None and not 0 <= label < num_classes:
        raise shards.ShardError(f"label {label} outside [0, {num_classes})", shard=url, key=key)
    return col, img, label


def _bad(rec: dict[str, Any], e: shards.ShardError) -> dict[str, Any]:
    from purify_pipeline.stages.shard_io import ERROR_COL

    return {"__pos__": rec["__pos__"], "__key__": rec["__key__"], ERROR_COL: str(e)}


def load_good_arrays(urls: Sequence[str], cfg: PoisonJobConfig, on_error: str = "raise", progress: bool = False,
                     num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:  # fmt: skip
    """(images, labels, keys) of every usable sample, for poisons fitted on the data; with on_error="skip" the
    samples the writers will quarantine are left out (labels outside [0, num_classes) too, when it is known),
    with "raise" the first one raises."""
    from purify_pipeline._progress import progress as bar

    images, labels, keys = [], [], []
    size = None
    for url in bar(urls, enabled=progress, desc="load shards", unit="shard"):
        for rec in shards.iter_records(url, storage_options=cfg.storage_options):
            try:
                _, img, lab = _check_sample(rec, url, cfg, size, num_classes)
            except shards.ShardError:
                if on_error == "raise":
                    raise
                continue
            size = size or img.shape[:2]
            images.append(img)
            labels.append(lab)
            keys.append(rec["__key__"])
    if not images:
        raise shards.ShardError(f"no usable sample in {len(urls)} shard(s)")
    return np.stack(images), np.asarray(labels, dtype=np.int64), keys


def poison_shard(poison: Poison, url: str, out_url: str, cfg: PoisonJobConfig, on_error: str = "raise") -> dict[str, Any]:
    """Read one shard, poison its images, write `out_url`. Returns its manifest entry. Every sample group of the
    tar is counted: with on_error="skip" a bad one is quarantined (listed in the entry, its original members
    kept in ``quarantine/<name>``), so input count = output count + quarantined; "raise" stops at the first."""
    recs = list(shards.iter_records(url, storage_options=cfg.storage_options))
    if not recs:
        raise shards.ShardError("shard holds no samples", shard=url)
    good, bad = [], []
    for rec in recs:
        try:
            good.append((rec, *_check_sample(rec, url, cfg, poison.image_size, poison.num_classes)))
        except shards.ShardError as e:
            if on_error == "raise":
                raise
            bad.append(_bad(rec, e))
    keys = [r["__key__"] for r, *_ in good]
    poisoned: Any = []
    if good:
        try:
            poisoned = poison.apply(np.stack([g[2] for g in good]), np.asarray([g[3] for g in good]), sample_ids=keys)
        except ValueError as e:
            raise shards.ShardError(str(e), shard=url) from e

    def out_samples():
        for (rec, col, _, _), img in zip(good, poisoned):
            out: dict[str, Any] = {"__key__": rec["__key__"]}
            for k, v in rec.items():
                if k.startswith("__"):
                    continue
                if k == col:
                    out["png"] = shards.encode_png(img)
                elif k != "png":  # a stale .png beside another image member would be ambiguous
                    out[k] = v
            yield out

    info = shards.write_shard(out_url, out_samples(), storage_options=cfg.storage_options)
    if info.count + len(bad) != len(recs):  # never report a shard that lost samples
        raise RuntimeError(f"{url}: {len(recs)} samples read but {info.count} written + {len(bad)} quarantined")
    counts = np.bincount(np.asarray([g[3] for g in good], dtype=np.int64), minlength=poison.num_classes)
    from purify_pipeline.stages.shard_io import ERROR_COL, write_quarantine

    entry = {"input": url, "url": out_url, "name": os.path.basename(out_url), "count": info.count,
             "input_count": len(recs), "output_count": info.count,
             "quarantined": [{"key": b["__key__"], "error": b[ERROR_COL]} for b in bad],
             "sha256": info.sha256, "class_counts": counts.tolist()}  # fmt: skip
    if bad:
        entry.update(write_quarantine(url, cfg.output, entry["name"], bad, dict(cfg.storage_options or {})))
    return entry


class PoisonShardWriter:
    """Ray Data callable class: holds the fitted poison, turns a batch of (index, url) rows into shards."""

    def __init__(self, poison_ref: list, config: PoisonJobConfig, on_error: str = "raise") -> None:
        import ray

        # the ObjectRef travels wrapped in a list so that it arrives unresolved; fetch it once per actor
        self.poison: Poison = ray.get(poison_ref[0])
        self.config, self.on_error = config, on_error

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for i, url in zip(batch["index"], batch["url"]):
            out_url = shards.join(self.config.output, shards.shard_name(self.config.prefix, int(i)))
            try:
                entry = poison_shard(self.poison, str(url), out_url, self.config, self.on_error)
            except shards.ShardError as e:
                from purify_pipeline._ray_errors import row_error

                raise row_error(e) from None
            rows.append({"index": int(i), "entry": json.dumps(entry)})
        return {"index": np.array([r["index"] for r in rows]), "entry": np.array([r["entry"] for r in rows])}


def _classes_from_inputs(urls: Sequence[str], storage_options: Mapping[str, Any] | None) -> tuple[list[str] | None, int | None]:
    """(class names, number of classes) from a manifest.json beside the input shards, if any."""
    base = urls[0].rsplit("/", 1)[0] if "/" in urls[0] else "."
    m = shards.read_manifest(base, storage_options=storage_options) or {}
    for k in ("classes", "class_names"):
        if isinstance(m.get(k), list):
            return [str(c) for c in m[k]], len(m[k])
    return None, int(m["num_classes"]) if isinstance(m.get("num_classes"), int) else None


def _first_image_size(urls: Sequence[str], cfg: PoisonJobConfig, on_error: str) -> tuple[int, int]:
    """Size of the first usable image (with on_error="raise" the first sample must be usable)."""
    for url in urls:
        for rec in shards.iter_records(url, storage_options=cfg.storage_options):
            try:
                return tuple(_check_sample(rec, url, cfg, None, None)[1].shape[:2])  # type: ignore[return-value]
            except shards.ShardError:
                if on_error == "raise":
                    raise
        if on_error == "raise":
            raise shards.ShardError("shard holds no samples", shard=url)
    raise shards.ShardError(f"no usable sample in {len(urls)} shard(s)")


def _check_output(output: str, urls: Sequence[str], storage_options: Mapping[str, Any] | None) -> None:
    """Refuse the inputs' own directory and a directory whose manifest.json is not a poison job's (it would be
    replaced); same-named shards of an earlier poison run are replaced, nothing else is touched."""
    outdir.check_not_input(output, urls)
    old = shards.read_manifest(output, storage_options=storage_options)
    if old is not None and old.get("created_by") != CREATED_BY:
        raise ValueError(f"{output} holds a manifest.json that no poison job wrote; use another output directory")


def poison_shards(
    inputs: str | Sequence[str],
    output: str,
    name: str,
    *,
    seed: int,
    num_classes: int | None = None,
    classes: Sequence[str] | None = None,
    prefix: str | None = None,
    image_column: str | None = None,
    label_column: str = "cls",
    num_actors: int = 2,
    actor_cpus: float = 1.0,
    storage_options: Mapping[str, Any] | None = None,
    on_error: str = "raise",
    progress: bool = True,
    **budget: Any,
) -> dict[str, Any]:
    """Poison WebDataset shards with `name` (see `poisons.POISONS`) and write them under `output`.

    on_error: "raise" stops at the first bad sample with a ShardError naming shard and key; "skip" quarantines
    bad samples as `purify_shards` does (listed in the manifest, original members in ``quarantine/``), and
    poisons fitted on the data are fitted on the usable samples only.
    `classes` (names, written to the output manifest) and `num_classes` default to the input manifest's class
    list (else, for poisons fitted on the data, max label + 1 classes named by their index). Needs a running Ray (or starts a local one). Returns the manifest it writes.
    """
    import ray
    import ray.data

    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    poison_cls = get_poison(name)
    seed = check_seed(seed)
    urls = shards.expand(inputs, storage_options=storage_options)
    _check_output(os.fspath(output), urls, storage_options)
    # keys seed the per-sample poisons and identify EM/TAP perturbations: they must be unique
    outdir.raise_on_duplicates(urls, outdir.duplicate_keys(urls, storage_options=storage_options))
    cfg = PoisonJobConfig(output=os.fspath(output), prefix=prefix or _default_prefix(urls),
                          image_column=image_column, label_column=label_column, storage_options=storage_options)
    if classes is None:
        classes, found = _classes_from_inputs(urls, storage_options)
        num_classes = num_classes if num_classes is not None else found
    else:
        classes = [str(c) for c in classes]
        if num_classes is not None and num_classes != len(classes):
            raise ValueError(f"num_classes={num_classes} but {len(classes)} class names were given")
        num_classes = len(classes)

    # stage 1: fit once in the driver
    if poison_cls.needs_data:
        images, labels, keys = load_good_arrays(urls, cfg, on_error, progress=progress, num_classes=num_classes)
        if num_classes is None:
            num_classes = int(labels.max()) + 1
        poison = fit_poison(name, images, labels, num_classes=num_classes, seed=seed, sample_ids=keys,
                            progress=progress, **budget)  # fmt: skip
        del images, labels, keys
    else:
        if num_classes is None:
            raise ValueError(f"num_classes is needed for {name!r}: no input manifest.json with `classes` was found")
        poison = fit_poison(name, num_classes=num_classes, seed=seed, image_size=_first_image_size(urls, cfg, on_error),
                            progress=progress, **budget)

    # stage 2: Ray Data, one row per shard, applied on an actor pool
    if not ray.is_initialized():
        ray.init()
    ref = ray.put(poison)
    ds = ray.data.from_items([{"index": i, "url": u} for i, u in enumerate(urls)], override_num_blocks=len(urls))
    with warnings.catch_warnings():  # max_restarts has no named parameter in map_batches yet
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = ds.map_batches(
            PoisonShardWriter,
            fn_constructor_kwargs={"poison_ref": [ref], "config": cfg, "on_error": on_error},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=max(1, min(num_actors, len(urls)))),
            num_cpus=actor_cpus,
            # no actor restarts: a restarted actor could not re-fetch the poison its constructor got by reference
            # (Ray's core worker prints an error line for that combination); a failed job is simply re-run
            max_restarts=0,
        )
    ds.context.raise_original_map_exception = True  # a bad sample reaches the caller as its ShardError
    rows = sorted(ds.take_all(), key=lambda r: int(r["index"]))
    entries = [json.loads(str(r["entry"])) for r in rows]
    per_class = np.sum([e.pop("class_counts") for e in entries], axis=0).tolist()
    manifest = {
        **poison.describe(),
        "created_by": CREATED_BY,
        "image_member": "png",
        "label_member": label_column,
        # the class list travels with the shards so that `fit`/`purify` downstream know the label space
        "classes": classes if classes is not None and len(classes) == poison.num_classes
        else [str(c) for c in range(poison.num_classes)],
        "inputs": urls,
        "counts": {"samples": int(sum(e["count"] for e in entries)), "shards": len(entries),
                   "per_class": per_class, "input": int(sum(e["input_count"] for e in entries)),
                   "output": int(sum(e["output_count"] for e in entries)),
                   "quarantined": int(sum(len(e["quarantined"]) for e in entries))},
        "shards": entries,
    }
    fit_stats = {k: getattr(poison, k) for k in ("history", "converged", "surrogate_accuracy", "target_rate")
                 if hasattr(poison, k)}
    if fit_stats:
        manifest["fit"] = fit_stats
    shards.write_manifest(cfg.output, manifest, storage_options=storage_options)
    return manifest
