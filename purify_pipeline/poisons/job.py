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
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .. import outdir, shards
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


def poison_shard(poison: Poison, url: str, out_url: str, cfg: PoisonJobConfig) -> dict[str, Any]:
    """Read one shard, poison its images, write `out_url`. Returns its manifest entry."""
    samples = list(shards.iter_samples(url, storage_options=cfg.storage_options))
    if not samples:
        raise shards.ShardError("shard holds no samples", shard=url)
    cols, images, labels = [], [], []
    for s in samples:
        key = s["__key__"]
        col = cfg.image_column or shards.find_image_column(s, shard=url, key=key)
        if col not in s:
            raise shards.ShardError(f"no .{col} member", shard=url, key=key)
        img = shards.decode_image(s[col], col, shard=url, key=key)
        if tuple(img.shape[:2]) != poison.image_size:
            raise shards.ShardError(
                f"image is {img.shape[0]}x{img.shape[1]}, the poison was fitted for "
                f"{poison.image_size[0]}x{poison.image_size[1]}", shard=url, key=key)
        if cfg.label_column not in s:
            raise shards.ShardError(f"no .{cfg.label_column} label member", shard=url, key=key)
        label = shards.parse_label(s[cfg.label_column], shard=url, key=key)
        if not 0 <= label < poison.num_classes:
            raise shards.ShardError(f"label {label} outside [0, {poison.num_classes})", shard=url, key=key)
        cols.append(col)
        images.append(img)
        labels.append(label)
    keys = [s["__key__"] for s in samples]
    try:
        poisoned = poison.apply(np.stack(images), np.asarray(labels), sample_ids=keys)
    except ValueError as e:
        raise shards.ShardError(str(e), shard=url) from e

    def out_samples():
        for s, col, img in zip(samples, cols, poisoned):
            out: dict[str, Any] = {}
            for k, v in s.items():
                if k == "__url__":
                    continue
                if k == col:
                    out["png"] = shards.encode_png(img)
                elif k != "png":  # a stale .png beside another image member would be ambiguous
                    out[k] = v
            yield out

    info = shards.write_shard(out_url, out_samples(), storage_options=cfg.storage_options)
    if info.count != len(samples):  # every sample read is written (a bad one raised above)
        raise RuntimeError(f"{url}: {len(samples)} samples read but {info.count} written")
    counts = np.bincount(np.asarray(labels), minlength=poison.num_classes)
    return {"input": url, "url": out_url, "name": os.path.basename(out_url), "count": info.count,
            "input_count": len(samples), "output_count": info.count, "quarantined": [],
            "sha256": info.sha256, "class_counts": counts.tolist()}


class PoisonShardWriter:
    """Ray Data callable class: holds the fitted poison, turns a batch of (index, url) rows into shards."""

    def __init__(self, poison_ref: list, config: PoisonJobConfig) -> None:
        import ray

        # the ObjectRef travels wrapped in a list so that it arrives unresolved; fetch it once per actor
        self.poison: Poison = ray.get(poison_ref[0])
        self.config = config

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for i, url in zip(batch["index"], batch["url"]):
            out_url = shards.join(self.config.output, shards.shard_name(self.config.prefix, int(i)))
            entry = poison_shard(self.poison, str(url), out_url, self.config)
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


def _first_image_size(url: str, cfg: PoisonJobConfig) -> tuple[int, int]:
    for s in shards.iter_samples(url, storage_options=cfg.storage_options):
        col = cfg.image_column or shards.find_image_column(s, shard=url, key=s["__key__"])
        if col not in s:
            raise shards.ShardError(f"no .{col} member", shard=url, key=s["__key__"])
        img = shards.decode_image(s[col], col, shard=url, key=s["__key__"])
        return img.shape[0], img.shape[1]
    raise shards.ShardError("shard holds no samples", shard=url)


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
    progress: bool = True,
    **budget: Any,
) -> dict[str, Any]:
    """Poison WebDataset shards with `name` (see `poisons.POISONS`) and write them under `output`.

    `classes` (names, written to the output manifest) and `num_classes` default to the input manifest's class
    list (else, for poisons fitted on the data, max label + 1 classes named by their index). Needs a running Ray (or starts a local one). Returns the manifest it writes.
    """
    import ray
    import ray.data

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
        arr = shards.load_arrays(urls, image_column=image_column, label_column=label_column,
                                 storage_options=storage_options, show_progress=progress)
        if num_classes is None:
            num_classes = int(arr.labels.max()) + 1
        poison = fit_poison(name, arr.images, arr.labels, num_classes=num_classes, seed=seed,
                            sample_ids=arr.keys, progress=progress, **budget)
        del arr
    else:
        if num_classes is None:
            raise ValueError(f"num_classes is needed for {name!r}: no input manifest.json with `classes` was found")
        poison = fit_poison(name, num_classes=num_classes, seed=seed, image_size=_first_image_size(urls[0], cfg),
                            progress=progress, **budget)

    # stage 2: Ray Data, one row per shard, applied on an actor pool
    if not ray.is_initialized():
        ray.init()
    ref = ray.put(poison)
    ds = ray.data.from_items([{"index": i, "url": u} for i, u in enumerate(urls)], override_num_blocks=len(urls))
    ds = ds.map_batches(
        PoisonShardWriter,
        fn_constructor_kwargs={"poison_ref": [ref], "config": cfg},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=max(1, min(num_actors, len(urls)))),
        num_cpus=actor_cpus,
    )
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
                   "output": int(sum(e["output_count"] for e in entries)), "quarantined": 0},
        "shards": entries,
    }
    fit_stats = {k: getattr(poison, k) for k in ("history", "converged", "surrogate_accuracy", "target_rate")
                 if hasattr(poison, k)}
    if fit_stats:
        manifest["fit"] = fit_stats
    shards.write_manifest(cfg.output, manifest, storage_options=storage_options)
    return manifest
