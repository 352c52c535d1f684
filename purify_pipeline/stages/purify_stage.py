"""`PurifyStage`: D-VAE purification as a Ray Data map stage; `PurifyBatch` is its stateful UDF.

    stage = PurifyStage("ckpt_dir", batch_size=256)    # one single-threaded actor per CPU (actors=, num_gpus=)
    ds = stage(ray.data.read_webdataset(urls))        # or: ds.map_batches(PurifyBatch, **stage.map_batches_kwargs())

`PurifyBatch` loads the checkpoint once per actor (from a path or fsspec URL: constructor arguments travel
pickled, so a model object never does), decodes and validates each row, purifies the good rows in one fused
no-grad pass per model batch, and returns it in the form it came in: decoded arrays (Ray's default decoding)
as uint8 arrays in the same column, encoded bytes (``decoder=None``) as lossless PNG bytes. Keys and every
other column pass through untouched; grayscale and RGBA images are converted to RGB (gray replicated, alpha dropped).

Noise in ``mode="sample"`` is drawn per sample from ``(seed, sample_id)``, with ``sample_id`` a blake2b-64
hash of the row's ``__key__`` (of the image bytes when there is no key), so the output does not depend on
how Ray batches, orders or retries rows, and equals ``Purifier.purify`` with the same ids and seed.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping

import numpy as np

from purify_pipeline.data.shards import (
    IMAGE_EXTS,
    ShardError,
    decode_image,
    encode_png,
    find_image_column,
    parse_label,
    to_rgb,
)

__all__ = ["PurifyBatch", "PurifyConfig", "PurifyStage"]

OnError = Literal["raise", "skip"]
_log = logging.getLogger(__name__)
_RESAMPLE = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


@dataclass(frozen=True)
class PurifyConfig:
    """What a purification does (shared by the stage, its UDF and the shard job).

    checkpoint: directory or fsspec URL written by ``Purifier.save``.
    image_column: None = the first of jpg/jpeg/png/webp/npy present. label_column: ASCII int bytes or int.
    mode/seed: ``Purifier.purify``'s. on_error: "raise" (ShardError naming shard and key) or "skip".
    quarantine_column: with "skip", None drops bad rows; a name keeps them, with the error message in that
        column ("" for good rows) and an empty image; rows arriving with a message there are passed over.
    resize: None = images must be the checkpoint's size; else a PIL filter name used to resize to it.
    output_format: None (default) keeps the input's form: encoded image bytes in -> lossless PNG bytes out (in
        column "png"), decoded arrays in -> uint8 HxWx3 arrays out in the same column. "png" / "array" force one:
        "png" = PNG bytes in ``output_column`` (default "png"; the input image column is dropped when named
        differently); "array" = uint8 HxWx3 arrays (default column: the input image column).
    model_batch_size: images per forward pass inside a Ray batch on a GPU (on a CPU the model always runs blocks of
        `dvae.purifier.CPU_BLOCK` images, so bytes never depend on batching). threads: torch threads per actor.
    bf16: bfloat16 autocast for the forward passes (a GPU, or a CPU with AMX / AVX512-BF16; `purify_shards` 1.4-1.7x
        faster than fp32 on such a CPU, benchmarks/results/speed/), off by default: the output differs from fp32's by rounding.
    stages: 2 = full purification; 1 = the stage-1 output x - p1 only (what the fit job trains stage 2 on).
    """

    checkpoint: str
    image_column: str | None = None
    label_column: str = "cls"
    mode: Literal["sample", "mean"] = "sample"
    seed: int = 0
    on_error: OnError = "raise"
    quarantine_column: str | None = None
    resize: str | None = None
    output_format: Literal["png", "array"] | None = None
    output_column: str | None = None
    png_compress_level: int = 1
    model_batch_size: int = 256
    device: str | None = None
    threads: int | None = None
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    stages: int = 2
    bf16: bool = False

    def __post_init__(self) -> None:
        if self.stages not in (1, 2):
            raise ValueError(f"stages must be 1 or 2, got {self.stages!r}")
        if not isinstance(self.checkpoint, str):
            raise TypeError(f"checkpoint must be a path or URL string, got {type(self.checkpoint).__name__}")
        if self.mode not in ("sample", "mean"):
            raise ValueError(f"mode must be 'sample' or 'mean', got {self.mode!r}")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")
        if self.output_format not in (None, "png", "array"):
            raise ValueError(f"output_format must be None, 'png' or 'array', got {self.output_format!r}")
        if self.resize is not None and self.resize not in _RESAMPLE:
            raise ValueError(f"resize must be None or one of {_RESAMPLE}, got {self.resize!r}")
        if self.model_batch_size < 1:
            raise ValueError(f"model_batch_size must be >= 1, got {self.model_batch_size}")


def _detect_image_column(cols: list[str]) -> str | None:
    """jpg/jpeg/png/webp/npy in that order of preference, then any ``*.png``-style column."""
    for ext in IMAGE_EXTS:
        if ext in cols:
            return ext
    return next((c for c in cols if c.rsplit(".", 1)[-1].lower() in IMAGE_EXTS), None)


def _input_format(values: np.ndarray | None) -> Literal["png", "array"]:
    """How the image column arrived: encoded bytes -> "png" out; decoded arrays (Ray's default) -> "array" out."""
    if values is None:
        return "png"
    if values.dtype != object:
        return "array"  # a tensor column: every row decoded to the same shape
    first = next((v for v in values if v is not None), None)
    if isinstance(first, np.ndarray) and first.dtype == object and first.ndim == 0:
        first = first.item()
    return "png" if first is None or isinstance(first, (bytes, bytearray, memoryview)) else "array"


class PurifyBatch:
    """Stateful Ray Data UDF: ``dict[str, np.ndarray]`` batch in, purified batch out (see module docstring).

    Usable directly: ``ds.map_batches(PurifyBatch, fn_constructor_kwargs={"checkpoint": ...},
    batch_size=256, batch_format="numpy", compute=ActorPoolStrategy(size=2), num_cpus=1)``.
    """

    def __init__(self, checkpoint: str | None = None, *, config: PurifyConfig | None = None, **kwargs: Any) -> None:
        import torch

        from purify_pipeline.dvae.purifier import Purifier

        if config is None:
            if checkpoint is None:
                raise TypeError("PurifyBatch needs a checkpoint path/URL or a PurifyConfig")
            config = PurifyConfig(checkpoint=checkpoint, **kwargs)
        elif checkpoint is not None or kwargs:
            raise TypeError("pass either config= or checkpoint + options, not both")
        self.cfg = config
        if config.threads:
            torch.set_num_threads(config.threads)
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        self.purifier = Purifier.load(config.checkpoint, device=self.device, **dict(config.storage_options))
        self.size = self.purifier.image_size
        self.num_classes = self.purifier.num_classes

    # ---- per-row decoding and validation ----
    def _image(self, value: Any, col: str, shard: str | None, key: str | None) -> np.ndarray:
        if value is None:
            raise ShardError(f"missing image (.{col})", shard=shard, key=key)
        if isinstance(value, (bytes, bytearray, memoryview)):
            img = decode_image(value, col, shard=shard, key=key)
        elif isinstance(value, np.ndarray) and value.dtype == object and value.ndim == 0:
            return self._image(value.item(), col, shard, key)
        else:
            img = to_rgb(np.asarray(value), shard=shard, key=key)
        if img.shape[:2] != (self.size, self.size):
            if self.cfg.resize is None:
                raise ShardError(f"image is {img.shape[0]}x{img.shape[1]}, the checkpoint expects {self.size}x{self.size}"
                                 " (pass resize= to resize)", shard=shard, key=key)  # fmt: skip
            from PIL import Image

            filt = getattr(Image.Resampling, self.cfg.resize.upper())
            img = np.asarray(Image.fromarray(img).resize((self.size, self.size), filt), dtype=np.uint8)
        return img

    def _label(self, value: Any, shard: str | None, key: str | None) -> int:
        lab = parse_label(value, shard=shard, key=key)
        if not 0 <= lab < self.num_classes:
            raise ShardError(f"label {lab} is outside the checkpoint's classes [0, {self.num_classes})", shard=shard, key=key)
        return lab

    # ---- the UDF ----
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg = self.cfg
        cols = [c for c in batch if not c.startswith("__")]
        n = len(next(iter(batch.values()))) if batch else 0
        if n == 0:
            return batch
        keys = batch.get("__key__")
        urls = batch.get("__url__")
        qcol = cfg.quarantine_column
        errors: list[str] = [str(e) if e else "" for e in batch[qcol]] if qcol and qcol in batch else [""] * n
        srcs: list[str | None] = [cfg.image_column] * n  # each row's image column
        images, labels, good = [], [], []
        for i in range(n):
            if errors[i]:
                continue
            key = None if keys is None else str(keys[i])
            shard = None if urls is None else str(urls[i])
            try:
                if cfg.image_column is None:  # per row: formats may mix within one shard and one batch
                    present = [c for c in cols if batch[c][i] is not None]
                    srcs[i] = _detect_image_column(present)
                    if srcs[i] is None:
                        find_image_column({c: None for c in present}, shard=shard, key=key)  # raises, listing members
                col = srcs[i]
                if col not in batch:
                    raise ShardError(f"no .{col} member", shard=shard, key=key)
                img = self._image(batch[col][i], col, shard, key)
                lab = self._label(batch[cfg.label_column][i] if cfg.label_column in batch else None, shard, key)
            except ShardError as e:
                if cfg.on_error == "raise":
                    from purify_pipeline._ray_errors import row_error

                    raise row_error(e) from None
                errors[i] = str(e)
                continue
            images.append(img)
            labels.append(lab)
            good.append(i)
        used = sorted({srcs[i] for i in good if srcs[i] is not None})
        col = cfg.image_column or _detect_image_column(used) or _detect_image_column(cols)
        if len(used) > 1:  # mixed formats: a purified row's own image member is replaced, whichever it was
            batch = dict(batch)
            for c in sorted(set(used) - {col}):
                v = np.array(batch[c], dtype=object)  # a copy: zero-copy batches are read-only
                v[[i for i in good if srcs[i] == c]] = None
                if any(x is not None for x in v):
                    batch[c] = v
                else:  # an all-None column would come back from Arrow as floats
                    del batch[c]
        if qcol is None and len(good) < n:  # skip without a quarantine column: say what is dropped
            for i in range(n):
                if errors[i]:
                    _log.warning("PurifyStage drops a bad row (on_error='skip'; quarantine_column=... keeps it): %s",
                                 errors[i])  # fmt: skip
        purified = self._purify(images, labels, [keys[i] for i in good] if keys is not None else None)
        return self._assemble(batch, col or "", n, good, purified, errors)

    def _purify(self, images: list[np.ndarray], labels: list[int], keys: list | None) -> np.ndarray:
        if not images:
            return np.empty((0, self.size, self.size, 3), np.uint8)
        x = np.stack(images)
        y = np.asarray(labels, dtype=np.int64)
        from purify_pipeline.dvae.noise import sample_ids_for_keys

        ids = sample_ids_for_keys(keys if keys is not None else [im.tobytes() for im in images])
        if self.device.type == "cpu":
            return self.purifier.purify(x, y, mode=self.cfg.mode, seed=self.cfg.seed, sample_ids=ids,
                                        batch_size=self.cfg.model_batch_size, stages=self.cfg.stages,
                                        bf16=self.cfg.bf16)  # fmt: skip
        return self._purify_accelerator(x, y, ids)

    def _purify_accelerator(self, x: np.ndarray, y: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """GPU path: uint8 batch moved once (pinned, non-blocking), converted on the device, the three forward
        passes fused in one no-grad ``purify_torch`` call, uint8 copied back once."""
        import torch

        from purify_pipeline.dvae.noise import sample_noise

        out = np.empty_like(x)
        bs = self.cfg.model_batch_size
        pin = self.device.type == "cuda"

        def move(t: torch.Tensor) -> torch.Tensor:
            return (t.pin_memory() if pin else t).to(self.device, non_blocking=pin)

        with torch.inference_mode():
            for s in range(0, len(x), bs):
                xb = move(torch.from_numpy(x[s : s + bs]))
                yb = move(torch.from_numpy(y[s : s + bs]))
                xf = xb.permute(0, 3, 1, 2).float().div_(255.0)
                eps = None
                if self.cfg.mode == "sample":
                    eps = sample_noise(self.cfg.seed, ids[s : s + bs], self.purifier.stage1.latent_shape, device=self.device)
                xp = self.purifier.purify_torch(xf, yb, mode=self.cfg.mode, eps=eps, stages=self.cfg.stages,
                                                bf16=self.cfg.bf16)  # fmt: skip
                out[s : s + bs] = torch.round(xp * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return out

    def _assemble(self, batch: dict[str, np.ndarray], col: str, n: int, good: list[int], purified: np.ndarray,
                  errors: list[str]) -> dict[str, np.ndarray]:  # fmt: skip
        cfg = self.cfg
        fmt = cfg.output_format or _input_format(batch.get(col))
        out_col = cfg.output_column or ("png" if fmt == "png" else col or "image")
        keep = np.ones(n, dtype=bool)
        if cfg.quarantine_column is None:
            keep[[i for i in range(n) if errors[i]]] = False
        rows = np.flatnonzero(keep)
        pos = {i: j for j, i in enumerate(good)}
        if fmt == "png":
            values = np.empty(len(rows), dtype=object)
            for j, i in enumerate(rows):
                values[j] = encode_png(purified[pos[i]], compress_level=cfg.png_compress_level) if i in pos else b""
        else:
            values = np.zeros((len(rows), self.size, self.size, 3), np.uint8)
            for j, i in enumerate(rows):
                if i in pos:
                    values[j] = purified[pos[i]]
        result: dict[str, np.ndarray] = {}
        for c, v in batch.items():
            if c == col and out_col != col:
                continue  # the input image is replaced by the purified one
            result[c] = v if keep.all() else v[rows]
        result[out_col] = values
        if cfg.quarantine_column is not None:
            result[cfg.quarantine_column] = np.asarray([errors[i] for i in rows], dtype=object)
        return result


class PurifyStage:
    """Callable on a ``ray.data.Dataset``: ``ds = PurifyStage(ckpt, ...)(ds)`` adds one actor-pool map stage.

    actors: pool size (int) or (min, max); None (default) = one per GPU of the cluster with num_gpus > 0, else
    one single-threaded actor per CPU of the cluster (on 2 cores 1.2x the throughput of one 2-thread actor, the
    same bytes: one actor computes while the other decodes and encodes, benchmarks/results/purify/). num_gpus > 0 puts
    each actor on a GPU. num_cpus: CPUs reserved per
    actor; None (default) = up to 1 each while leaving ``reserve_cpus`` of the cluster free for the pipeline's
    read and write tasks (``read_webdataset`` tasks ask for 1 CPU: an actor pool that takes every CPU hangs the
    pipeline, ray #44687). An explicit setting that leaves less than ``reserve_cpus`` fails fast with a
    ValueError naming what to change (``reserve_cpus=0`` turns the check off, e.g. on an autoscaling cluster).
    threads: torch threads per CPU actor; None = 1 with the default pool, else this machine's cores divided
    among the actors. Other keyword
    options are ``PurifyConfig`` fields. A crashed actor is restarted and its batch retried (Ray Data's actor
    pool defaults); outputs are a function of (seed, key), so a retry writes the same pixels.
    """

    udf_class: type = PurifyBatch  # subclass and override to customise the per-actor UDF

    def __init__(self, checkpoint: str, *, image_column: str | None = None, label_column: str = "cls",
                 batch_size: int = 256, actors: int | tuple[int, int] | None = None, num_gpus: float = 0,
                 num_cpus: float | None = None, reserve_cpus: float = 1.0, mode: Literal["sample", "mean"] = "sample",
                 seed: int = 0, on_error: OnError = "raise", **options: Any) -> None:  # fmt: skip
        import os

        if not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError("checkpoint must be a path or fsspec URL (the actors load it), not a model object")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        max_actors = actors[1] if isinstance(actors, tuple) else actors
        if actors is not None and (not isinstance(max_actors, int) or max_actors < 1):
            raise ValueError(f"actors must be a positive int, a (min, max) pair or None, got {actors!r}")
        options.setdefault("device", "cuda" if num_gpus > 0 else "cpu")
        options.setdefault("model_batch_size", batch_size)
        if options["device"] == "cpu" and options.get("threads") is None:
            options["threads"] = 1 if actors is None else max(1, (os.cpu_count() or 1) // max_actors)
        self.config = PurifyConfig(checkpoint=os.fspath(checkpoint), image_column=image_column,
                                   label_column=label_column, mode=mode, seed=seed, on_error=on_error, **options)  # fmt: skip
        self.batch_size = batch_size
        self.actors = actors
        self.num_gpus = num_gpus
        self.num_cpus = num_cpus
        self.reserve_cpus = reserve_cpus

    def resolve_actors(self, cluster_cpus: float | None, cluster_gpus: float | None = None) -> int | tuple[int, int]:
        """The actor pool on a cluster of `cluster_cpus` CPUs and `cluster_gpus` GPUs (None: unknown, Ray not
        started): the explicit `actors`, or one per GPU (num_gpus > 0) / one per CPU."""
        import os

        if self.actors is not None:
            return self.actors
        if self.num_gpus:
            return max(1, int(cluster_gpus // self.num_gpus)) if cluster_gpus else 1
        return max(1, int(cluster_cpus if cluster_cpus is not None else (os.cpu_count() or 1)))

    def resolve_num_cpus(self, cluster_cpus: float | None) -> float:
        """CPUs per actor for a cluster of `cluster_cpus` (None: unknown, Ray not started): the explicit value,
        checked, or the default that leaves ``reserve_cpus`` free."""
        pool = self.resolve_actors(cluster_cpus)
        n = pool[1] if isinstance(pool, tuple) else pool
        if self.num_cpus is None:
            if cluster_cpus is None:
                return 1.0
            return max(0.0, min(1.0, (cluster_cpus - self.reserve_cpus) / n))
        if cluster_cpus is not None and self.reserve_cpus > 0 and cluster_cpus - n * self.num_cpus < self.reserve_cpus:
            raise ValueError(
                f"PurifyStage would hang this pipeline: {n} actor(s) x num_cpus={self.num_cpus} leave "
                f"{cluster_cpus - n * self.num_cpus:g} of the cluster's {cluster_cpus:g} CPUs, and the read/write tasks "
                f"need {self.reserve_cpus:g} (read_webdataset asks 1 CPU per task). Lower num_cpus (e.g. "
                f"num_cpus={max(0.0, (cluster_cpus - self.reserve_cpus) / n):g}) or actors, or leave num_cpus=None; "
                "reserve_cpus=0 skips this check.")  # fmt: skip
        return float(self.num_cpus)

    def map_batches_kwargs(self, cluster_cpus: float | None = None, cluster_gpus: float | None = None) -> dict[str, Any]:
        """The keyword arguments this stage passes to ``Dataset.map_batches`` on a cluster of `cluster_cpus` CPUs
        and `cluster_gpus` GPUs (None: unknown)."""
        from ray.data import ActorPoolStrategy

        pool = self.resolve_actors(cluster_cpus, cluster_gpus)
        if isinstance(pool, tuple):
            compute = ActorPoolStrategy(min_size=pool[0], max_size=pool[1])
        else:
            compute = ActorPoolStrategy(size=pool)
        one_to_one = self.config.on_error == "raise" or self.config.quarantine_column is not None
        kw: dict[str, Any] = dict(fn_constructor_kwargs={"config": self.config}, batch_size=self.batch_size,
                                  batch_format="numpy", compute=compute, num_cpus=self.resolve_num_cpus(cluster_cpus),
                                  udf_modifying_row_count=not one_to_one)  # fmt: skip
        if self.num_gpus:
            kw["num_gpus"] = self.num_gpus
        return kw

    def __call__(self, ds: Any) -> Any:
        """`ds` with this stage appended. With ``on_error="raise"`` the returned dataset's context has
        ``raise_original_map_exception`` set, so a bad row reaches the driver as a ``ShardError`` naming its
        shard and key (Ray Data would otherwise wrap it in a ``UserCodeException``)."""
        import ray

        res = ray.cluster_resources() if ray.is_initialized() else {}
        out = ds.map_batches(self.udf_class, **self.map_batches_kwargs(res.get("CPU"), res.get("GPU")))
        if self.config.on_error == "raise":
            out.context.raise_original_map_exception = True
        return out

    def __repr__(self) -> str:
        opts = {k: v for k, v in asdict(self.config).items() if v not in (None, {}, "")}
        return (f"PurifyStage(batch_size={self.batch_size}, actors={self.actors}, num_cpus={self.num_cpus}, "
                f"num_gpus={self.num_gpus}, {opts})")
