"""`purify_shards`: WebDataset shards in, purified shards out, as one streaming Ray Data job.

    summary = purify_shards("data/train-{000000..000049}.tar", "out/", "ckpt_dir")
    # out/purified-000000.tar ... out/purified-000049.tar + out/manifest.json

Plan: ``from_items(one row per input shard)`` -> read tasks (one per shard: stream the tar, emit its samples
as raw bytes in chunks, each row tagged with its shard index, position and the shard's sample count) ->
``PurifyStage`` (actor pool; bad rows are kept with a message in ``__error__`` so counts always add up, and
with on_error="raise" the driver raises that row's ShardError itself, naming shard and key, rather than
digging it out of Ray's exception wrappers) ->
the driver collects rows per shard as Ray streams them out and, as soon as a shard has all its rows, writes
``<prefix>-<index:06d>.tar`` atomically (on a small thread pool, so slow object stores overlap with compute)
and records it in ``manifest.json``. Shard boundaries, key order and byte-identical pass-through members are
therefore kept without a shuffle or a global group-by, and memory is bounded by the shards in flight.

Resume: a shard is done when the manifest lists it and the output file's sha256 still matches; a re-run
with the same checkpoint and settings only processes the others. Output names depend on the input shard's
position in the sorted input list (not on Ray's uuids), so resumed and uninterrupted runs give the same bytes.

Counting and quarantine: every sample group of a tar is one row (`shards.iter_records`), bad ones included,
so per shard ``input_count = output_count + len(quarantined)`` holds by construction and is checked before
a shard is recorded. Quarantined samples are re-read from their input shard and written, original members
byte for byte plus the reason, to ``<output>/quarantine/<prefix>-<index:06d>.tar`` (a subdirectory, so a
glob or directory read of the output never picks them up as training data).

Output safety (`_prepare_output`, `outdir`): the job deletes or replaces only its own files, and refuses
(before touching anything) an output that holds the inputs, a foreign manifest.json, or, without its
manifest, a file it would overwrite. The manifest carries no timestamps, durations or run ids: identical
runs (same inputs, checkpoint path and settings) write byte-identical manifests; the run's timing is only
in the returned `PurifySummary`.

Limit: the driver assembles and writes every output shard, so the job's output bandwidth is one process's;
purified CIFAR-size PNGs are ~2-3 KB, i.e. tens of MB/s at 20k images/s, well within that.
"""
from __future__ import annotations

import json
import re
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

from purify_pipeline._progress import progress as _bar
from purify_pipeline._progress import progress_enabled
from purify_pipeline.data import outdir, shards
from purify_pipeline.stages.purify_stage import PurifyStage
from purify_pipeline.stages.shard_io import (
    ERROR_COL,
    _ShardAssembler,
    read_shards,
    save_manifest,
)

__all__ = ["PurifySummary", "purify_shards"]

MANIFEST_FORMAT = "purify_pipeline.purified_shards"


@dataclass
class PurifySummary:
    """What a `purify_shards` run did. ``images_per_s`` counts the samples this run processed."""

    output: str
    manifest: str
    shards: int
    shards_written: int
    shards_resumed: int
    samples_in: int
    samples_out: int
    quarantined: int
    seconds: float
    images_per_s: float
    checkpoint_fingerprint: str
    audit: dict[str, Any] | None = None  # {"input": ..., "output": ...} with audit=True (see `audit`)

    def __str__(self) -> str:
        text = (f"purified {self.samples_in} samples in {self.seconds:.1f} s ({self.images_per_s:.0f} images/s): "
                f"{self.samples_out} written, {self.quarantined} quarantined; shards: {self.shards_written} written, "
                f"{self.shards_resumed} already done, {self.shards} total -> {self.output}")  # fmt: skip
        if self.audit:
            i, o = self.audit["input"], self.audit["output"]
            from purify_pipeline.eval.audit import CLEAN_CALIBRATION as c

            text += (f"\nshortcut score {i['score']:.3f} ({i['verdict']}) -> {o['score']:.3f} ({o['verdict']}); "
                     f"clean CIFAR-10 scores {c['min']:.2f}-{c['max']:.2f}")  # fmt: skip
        return text


def _audit_record(urls: Sequence[str], seed: int, so: Mapping[str, Any]) -> dict[str, Any]:
    """The learnability audit of `urls` as the manifest records it (no timing: identical runs, identical bytes)."""
    from purify_pipeline.eval.audit import audit_shards

    r = audit_shards(list(urls), seed=seed, storage_options=so).to_dict()
    r.pop("seconds", None)
    return r


class StillPoisonedWarning(RuntimeWarning):
    """The audit finds the purified output as learnable by a shortcut as a poisoned set (verdict "poisoned")."""


def warn_if_still_poisoned(output: str, record: Mapping[str, Any]) -> None:
    """Say so when purification left a shortcut: D-VAE removes small additive perturbations, and a poison of
    another kind (e.g. class-wise image filters) passes through it; training on such output stays unlearnable."""
    o = record["output"]
    if o["verdict"] == "poisoned":
        warnings.warn(f"{output}: the purified output still scores as poisoned (shortcut score {record['input']['score']:.3f}"
                      f" -> {o['score']:.3f}): purification did not remove this poison (D-VAE removes small additive "
                      "perturbations; class-wise image filters, for one, pass through it), and a model trained on it "
                      "is likely to learn the shortcut instead of the images", StillPoisonedWarning,
                      stacklevel=3)  # fmt: skip



def _pool_for(stage: PurifyStage, batches: int, cpus: float | None, gpus: float | None) -> int | tuple[int, int]:
    """The stage's default actor pool, but no actor that no batch can reach: a 2-batch job on 16 CPUs starts 2
    actors, not 16 (each imports torch and loads the model before it can work)."""
    pool = stage.resolve_actors(cpus, gpus)
    return max(1, min(pool, batches)) if isinstance(pool, int) else pool


def _settings(stage: PurifyStage, prefix: str) -> dict[str, Any]:
    c = stage.config
    return {"prefix": prefix, "mode": c.mode, "seed": c.seed, "image_column": c.image_column,
            "label_column": c.label_column, "resize": c.resize, "stages": c.stages,
            **({"bf16": True} if c.bf16 else {})}  # fmt: skip


def _done_shards(manifest: dict | None, urls: list[str], output: str, fingerprint: str, settings: dict,
                 storage_options: Mapping[str, Any], verify: bool) -> dict[int, dict]:  # fmt: skip
    """Manifest entries of shards a previous run finished and that are still intact on disk."""
    if not manifest:
        return {}
    if manifest.get("checkpoint_fingerprint") != fingerprint or manifest.get("settings") != settings:
        raise ValueError(f"{output} holds shards purified with another checkpoint or settings "
                         f"({manifest.get('checkpoint_fingerprint', '?')[:12]}…, {manifest.get('settings')}); "
                         "use another output directory or overwrite=True")  # fmt: skip
    done = {}
    for entry in manifest.get("shards", []):
        i = entry["index"]
        if i >= len(urls) or entry["input"] != urls[i]:
            continue
        files = [(entry["output"], entry["sha256"])]
        if entry.get("quarantine"):
            files.append((entry["quarantine"], entry["quarantine_sha256"]))
        try:
            for name, sha in files:
                url = shards.join(output, name)
                if verify and shards.sha256_file(url, storage_options=storage_options) != sha:
                    break
                if not verify and not shards.fs_path(url, storage_options)[0].exists(url):
                    break
            else:
                done[i] = entry
        except FileNotFoundError:
            continue
    return done


def _listed(manifest: dict) -> set[str]:
    return {n for e in manifest.get("shards", []) for n in (e.get("output"), e.get("quarantine")) if n}


def _prepare_output(output: str, urls: list[str], prefix: str, overwrite: bool,
                    storage_options: Mapping[str, Any]) -> tuple[dict | None, list[str], list[str]]:  # fmt: skip
    """Check that the job may write into ``output``; returns (the previous run's manifest or None, its files
    to delete, prefixes of its temporary files to delete): the caller deletes them once the settings check
    passed, so a refused run deletes nothing. Refuses, before anything is deleted or written:
    an output that is the inputs' directory; a manifest.json of something else (even with overwrite); a
    directory without this job's manifest holding a file the job would write; with a manifest, a file named
    like the job's shards that neither the old nor the new input list accounts for. Deletes only this job's
    own files: crash leftovers ``<own name>.tmp-<hex>`` and shards its old manifest lists (or its old input
    list names) that the new run will not rewrite (stale shards of a longer input list, another prefix)."""
    outdir.check_not_input(output, urls)
    old = shards.read_manifest(output, storage_options=storage_options)
    present = outdir.existing_names(output, storage_options)
    new_names = outdir.own_names(prefix, len(urls))
    if old is None:
        clash = sorted(present & new_names)
        if clash:
            raise ValueError(f"{output} has no purify_shards manifest but holds {', '.join(clash[:3])}"
                             f"{' ...' if len(clash) > 3 else ''}, which this job would overwrite; "
                             "use an empty or new output directory")  # fmt: skip
        return None, [], []
    if old.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{output}: manifest.json is not a purify_shards manifest (it is not this job's "
                         "output directory; overwrite does not apply); use another output directory")  # fmt: skip
    old_prefix = str((old.get("settings") or {}).get("prefix", prefix))
    ours = _listed(old) | outdir.own_names(old_prefix, len(old.get("inputs") or []))
    strangers = sorted(n for n in present - ours - new_names
                       if re.fullmatch(rf"(?:{outdir.QUARANTINE_DIR}/)?{re.escape(prefix)}-\d{{6}}\.tar", n))  # fmt: skip
    if strangers:
        raise ValueError(f"{output} holds {', '.join(strangers[:3])}, named like this job's shards but not "
                         "written by it (not in its manifest); move it away or use another output directory")  # fmt: skip
    stale = sorted((present & ours) - new_names - {shards.MANIFEST_NAME})
    return old, stale, sorted({prefix, old_prefix})



def purify_shards(
    inputs: str | Sequence[str],
    output: str,
    checkpoint: str,
    *,
    prefix: str = "purified",
    image_column: str | None = None,
    label_column: str = "cls",
    mode: Literal["sample", "mean"] = "sample",
    seed: int = 0,
    on_error: Literal["raise", "skip"] = "raise",
    resize: str | None = None,
    batch_size: int = 256,
    actors: int | tuple[int, int] | None = None,
    num_cpus: float | None = None,
    num_gpus: float = 0,
    threads: int | None = None,
    read_num_cpus: float = 0.25,
    storage_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    verify: bool = True,
    write_threads: int = 4,
    progress: bool = True,
    on_shard_written: Callable[[dict[str, Any]], None] | None = None,
    stages: int = 2,
    check_keys: bool = True,
    audit: bool = False,
    bf16: bool = False,
) -> PurifySummary:
    """Purify WebDataset shards with a D-VAE checkpoint; write ``<output>/<prefix>-NNNNNN.tar`` + manifest.

    inputs: brace pattern / glob / directory / list of paths or fsspec URLs (sorted; output shard i comes
    from the i-th input); output: directory or URL (one run at a time per output);
    storage_options: fsspec options for inputs, output and checkpoint (e.g. s3 endpoint and keys).
    The image member becomes ``<key>.png`` (lossless); every other member is copied byte-identical.
    Every sample group of every tar is counted (`shards.iter_records`); per shard input count = output count
    + quarantined, checked before a shard is recorded. on_error="skip" quarantines bad samples instead of
    failing: listed in the manifest and kept, original members byte for byte, in
    ``<output>/quarantine/<prefix>-NNNNNN.tar`` (see `write_quarantine`); "raise" stops at the first.
    Keys must be unique across the inputs (the noise is seeded by the key; check_keys=False skips the
    header scan that checks it): a repeated key raises, or with "skip" its later occurrences are quarantined.
    The image member is found per sample (jpg/jpeg/png/webp/npy may mix) unless image_column names it.
    Re-running after an interruption finishes only the missing shards (``overwrite=True`` starts over);
    the job never deletes or overwrites a file it did not write (see `_prepare_output`), and the manifest
    holds no timestamps or run ids, so identical runs write identical bytes, manifest included.
    ``on_shard_written(entry)`` is called after each shard.
    audit=True records the learnability audit (`audit.audit_shards`, <= 10k sampled images, ~1 min on 2 cores each)
    of the inputs and of the output in the manifest and the summary: "shortcut score 0.95 -> 0.36"; an output
    that still scores "poisoned" raises a `StillPoisonedWarning`.
    stages=1 writes the stage-1 output only (used by `fit_purifier` to build stage 2's training set).
    actors/num_cpus/num_gpus/threads/batch_size/bf16 as in ``PurifyStage``; read_num_cpus: CPUs per read task.
    Returns a `PurifySummary` (also printed when progress is shown).
    """
    import ray

    from purify_pipeline.dvae.purifier import Purifier

    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    so = dict(storage_options or {})
    output = str(output).rstrip("/")
    urls = shards.expand(inputs, storage_options=so)
    fingerprint = Purifier.load(str(checkpoint), **so).fingerprint  # fail fast on a bad checkpoint
    # bad rows always travel as data (quarantine column); with on_error="raise" the driver raises on the first
    stage = PurifyStage(str(checkpoint), image_column=image_column, label_column=label_column,
                        batch_size=batch_size, actors=actors, num_gpus=num_gpus, num_cpus=num_cpus, mode=mode,
                        seed=seed, on_error="skip", resize=resize, threads=threads, storage_options=so,
                        quarantine_column=ERROR_COL, output_format="png", stages=stages,
                        reserve_cpus=read_num_cpus, bf16=bf16)  # fmt: skip
    settings = _settings(stage, prefix)
    fs, out_path = shards.fs_path(output, so)
    if shards.is_local(fs):
        fs.makedirs(out_path, exist_ok=True)
    old, stale, tmp_prefixes = _prepare_output(output, urls, prefix, overwrite, so)
    entries = _done_shards(None if overwrite else old, urls, output, fingerprint, settings, so, verify)
    keys = outdir.shard_keys(urls, storage_options=so, threads=write_threads) if check_keys else None
    dups = outdir.duplicate_keys(urls, keys=keys) if keys is not None else {}
    if dups and on_error == "raise":
        outdir.raise_on_duplicates(urls, dups)
    if old is not None:  # the directory is this job's and the run may go on: clear its own leftovers
        outdir.clean_own_tmp(output, tmp_prefixes, so)
        outdir.remove_own(output, stale, so)
    resumed = len(entries)
    manifest = {"format": MANIFEST_FORMAT, "version": 2, "checkpoint": str(checkpoint),
                "checkpoint_fingerprint": fingerprint, "settings": settings, "inputs": urls}  # fmt: skip
    todo = [i for i in range(len(urls)) if i not in entries]
    save_manifest(output, manifest, entries, len(urls), so)  # marks the directory as this job's before any shard
    t0 = time.perf_counter()
    asm = None
    if todo:
        if not ray.is_initialized():
            ray.init()
        ctx = ray.data.DataContext.get_current()
        ray_bars = ctx.enable_progress_bars
        ctx.enable_progress_bars = ray_bars and progress_enabled(progress)
        if actors is None and keys is not None:  # its actors keep the default pool's threads: the same bytes
            res = ray.cluster_resources()
            batches = sum(-(-len(keys[i]) // batch_size) for i in todo)
            stage.actors = _pool_for(stage, batches, res.get("CPU"), res.get("GPU"))
        bar = _bar(total=len(todo), enabled=progress, desc="purify shards", unit="shard")
        try:
            items = [{"index": i, "url": urls[i], "dups": json.dumps({str(p): list(v) for p, v in dups.get(i, {}).items()})}
                     for i in todo]  # fmt: skip
            ds = ray.data.from_items(items, override_num_blocks=len(todo))
            ds = ds.map_batches(read_shards, fn_kwargs={"on_error": "skip", "chunk_rows": batch_size,
                                "storage_options": so}, batch_size=1, batch_format="numpy", num_cpus=read_num_cpus)  # fmt: skip
            ds = stage(ds)
            with ThreadPoolExecutor(max_workers=max(1, write_threads)) as pool:
                asm = _ShardAssembler(urls=urls, output=output, prefix=prefix, manifest=manifest, entries=entries,
                                      on_error=on_error, storage_options=so, pool=pool, bar=bar,
                                      on_shard_written=on_shard_written)  # fmt: skip
                try:
                    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                        asm.add_batch(batch)
                    asm.close(todo)
                finally:
                    for f in asm.writes:
                        f.cancel()
        except BaseException:
            own = outdir.existing_names(output, so) & outdir.own_names(prefix, len(urls))
            if old is None and not entries and own == {shards.MANIFEST_NAME}:  # a first run that wrote no shard
                outdir.remove_own(output, [shards.MANIFEST_NAME], so)  # leaves the directory as it found it
            raise
        finally:
            bar.close()
            ctx.enable_progress_bars = ray_bars
    if audit and len(entries) == len(urls):
        out_urls = [shards.join(output, entries[i]["output"]) for i in sorted(entries)]
        manifest["audit"] = {"input": _audit_record(urls, seed, so), "output": _audit_record(out_urls, seed, so)}
        warn_if_still_poisoned(output, manifest["audit"])
    path = save_manifest(output, manifest, entries, len(urls), so)
    seconds = time.perf_counter() - t0
    n_in = asm.samples_in if asm else 0
    summary = PurifySummary(output=output, manifest=path, shards=len(urls), shards_written=len(todo),
                            shards_resumed=resumed, samples_in=n_in, samples_out=asm.samples_out if asm else 0,
                            quarantined=asm.quarantined if asm else 0, seconds=seconds,
                            images_per_s=n_in / max(seconds, 1e-9), checkpoint_fingerprint=fingerprint,
                            audit=manifest.get("audit"))  # fmt: skip
    if progress_enabled(progress):
        print(summary, file=sys.stderr)
    return summary


