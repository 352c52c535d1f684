"""Learnability audit: is a labelled image set shortcut-poisoned (before purification) or still so (after)?

    r = audit(images, labels, num_classes=10)          # uint8 NHWC + int labels
    r = audit_shards("data/train-{000000..000009}.tar")  # a seeded sample of shards (use_ray=True: Ray Data)
    r = audit_dataset(ds)                                # any Ray Dataset with __key__, an image and a label
    print(r.summary()); r.to_dict()

Availability poisons are shortcuts: label-correlated patterns that a linear model fits far better than it
fits natural images (Yu et al., KDD 2022). The audit needs labels but no clean reference: it trains two small
linear softmax probes on one seeded half of the (sampled) set and scores them on the other half.
- pixel probe: standardised raw pixels (pooled to at most 32x32): spatially fixed shortcuts (LSP, OPS,
  class-wise noise).
- texture probe: per-image correlations of the high-frequency residual (x - 3x3 box blur) at 13 shifts
  within 2 px (zero included), across channels, plus its log energy: shift-invariant, class-wise filtered noise (AR), which
  the pixel probe does not see at all.
Score = the larger held-out accuracy. Thresholds come from clean CIFAR-10 data only (5 disjoint 10k training
subsets, the test split, and JPEG-10 / grayscale / BDR versions of a clean subset), measured by
benchmarks/audit.py and committed in benchmarks/results/audit/audit.json. They hold for 10-class, 32 px
CIFAR-like data; for other data pass `thresholds=` measured the same way on known-clean samples.
"""
from __future__ import annotations

import hashlib
import heapq
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["AuditResult", "CLEAN_CALIBRATION", "THRESHOLDS", "audit", "audit_dataset", "audit_shards",
           "pixel_features", "texture_features"]

# Clean calibration (benchmarks/results/audit/audit.json, seed 0, 10k images each): scores 0.356 0.351 0.366
# 0.354 0.360 (train subsets 0-9k ... 40-49k), 0.368 (test split), 0.328 / 0.346 / 0.345 (first subset after
# JPEG-10 / grayscale / BDR-2): the largest and smallest clean score.
CLEAN_CALIBRATION: dict[str, float] = {"max": 0.3678, "min": 0.3276}
CALIBRATED_ON = (10, (32, 32))  # (classes, image size) of that calibration set: the default thresholds hold there
# clean-like: score <= max_clean + margin, margin = max(spread, 0.02); poisoned: score >= max_clean + 4 margins.
THRESHOLDS: tuple[float, float] = (0.4080, 0.5286)
VERDICTS = ("clean-like", "suspicious", "poisoned")
OFFSETS = [(0, 1), (0, 2)] + [(dy, dx) for dy in (1, 2) for dx in range(-2, 3)]  # 12 half-plane shifts (+ zero)


@dataclass
class AuditResult:
    """Shortcut score (higher = more shortcut), verdict and the numbers behind them."""

    score: float
    verdict: str
    pixel_acc: float  # held-out accuracy of the linear probe on raw pixels
    texture_acc: float  # held-out accuracy of the linear probe on residual-correlation features
    pixel_train_acc: float
    texture_train_acc: float
    n_images: int  # images audited (after sampling); half train the probes, half score them
    num_classes: int
    thresholds: tuple[float, float]  # (clean-like max, poisoned min)
    seed: int
    seconds: float
    class_counts: list[int] = field(default_factory=list)
    calibrated: bool = True  # False: default thresholds on data unlike their calibration set (see `audit`)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "thresholds": list(self.thresholds)}

    def summary(self) -> str:
        """A one-screen report."""
        lo, hi = self.thresholds
        return "\n".join([
            f"learnability audit: {self.verdict.upper()}  (shortcut score {self.score:.3f})",
            f"  thresholds: clean-like <= {lo:.4f} < suspicious < {hi:.4f} <= poisoned "
            + ("(clean CIFAR-10 calibration)" if self.calibrated else
               "(calibrated on 10-class 32x32 CIFAR-10, NOT on data like this: the verdict is indicative only)"),
            f"  pixel probe   (linear, raw pixels):         held-out {self.pixel_acc:.3f}, train {self.pixel_train_acc:.3f}",
            f"  texture probe (linear, residual structure): held-out {self.texture_acc:.3f}, train {self.texture_train_acc:.3f}",
            f"  {self.n_images} images, {self.num_classes} classes (chance {1 / self.num_classes:.3f}), seed {self.seed}, "
            f"{self.seconds:.1f} s",
        ])  # fmt: skip


def _check(images: np.ndarray, labels: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    y = np.asarray(labels)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 NHWC with 1 or 3 channels, got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise ValueError("no images to audit")
    if y.ndim != 1 or len(y) != len(images):
        raise ValueError(f"{len(images)} images but labels of shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {y.dtype}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got {y.min()}..{y.max()}")
    present = np.unique(y)
    if len(present) < 2:
        raise ValueError(f"the audit needs at least two classes; all {len(y)} images are class {present[0]}")
    if len(images) < 20:
        raise ValueError(f"too few images to audit ({len(images)}; at least 20, ideally thousands)")
    if min(images.shape[1:3]) < 8:
        raise ValueError(f"images of {images.shape[1]}x{images.shape[2]} px are too small (at least 8x8)")
    return images, y.astype(np.int64)


def pixel_features(images: np.ndarray) -> torch.Tensor:
    """Raw pixels in [0,1], average-pooled to at most 32x32, flattened (N, C*h*w)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
    h, w = x.shape[2:]
    if max(h, w) > 32:
        x = F.adaptive_avg_pool2d(x, (min(h, 32), min(w, 32)))
    return x.reshape(len(x), -1)


def texture_features(images: np.ndarray, chunk: int = 2000) -> torch.Tensor:
    """Per image: log energy of the high-frequency residual r = x - box3x3(x) per channel, and the normalised
    correlations of r between channels at 13 shifts within 2 px (N, C + C(C-1)/2 + 12*C*C)."""
    out = []
    for i in range(0, len(images), chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + chunk])).permute(0, 3, 1, 2).float().div_(255)
        r = (x - F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))[:, :, 2:-2, 2:-2]
        n, c, h, w = r.shape
        e = (r * r).mean((2, 3))
        rn = r / (e.sqrt()[:, :, None, None] + 1e-6)
        feats = [torch.log(e + 1e-8)]
        feats += [(rn[:, a] * rn[:, b]).mean((1, 2))[:, None] for a in range(c) for b in range(a + 1, c)]
        for dy, dx in OFFSETS:
            a = rn[:, :, dy:, max(dx, 0) : w + min(dx, 0)]
            b = rn[:, :, : h - dy, max(-dx, 0) : w - max(dx, 0)]
            feats.append(torch.einsum("nchw,ndhw->ncd", a, b).reshape(n, -1) / (a.shape[2] * a.shape[3]))
        out.append(torch.cat(feats, 1))
    return torch.cat(out)


def _linear_probe(x: torch.Tensor, y: torch.Tensor, tr: torch.Tensor, te: torch.Tensor, *, num_classes: int,
                  epochs: int, lr: float, gen: torch.Generator, batch_size: int = 256) -> tuple[float, float]:
    """Standardise on the train half, fit softmax regression with Adam for `epochs` epochs but at least as many
    steps as 10k images get (20 batches an epoch), so small sets are not under-trained; (train, held-out acc)."""
    epochs = max(epochs, math.ceil(epochs * 20 / math.ceil(len(tr) / batch_size)))
    mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
    x = (x - mu) / sd
    w = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(epochs):
        order = tr[torch.randperm(len(tr), generator=gen)]
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(x[idx] @ w + b, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = [((x[s] @ w + b).argmax(1) == y[s]).float().mean().item() for s in (tr, te)]
    return acc[0], acc[1]


def verdict_for(score: float, thresholds: tuple[float, float] = THRESHOLDS) -> str:
    """clean-like / suspicious / poisoned for a score under (clean-like max, poisoned min)."""
    return VERDICTS[0] if score <= thresholds[0] else VERDICTS[2] if score >= thresholds[1] else VERDICTS[1]


def audit(images: np.ndarray, labels: Any, *, num_classes: int, seed: int = 0, max_images: int | None = 10_000,
          thresholds: tuple[float, float] | None = None) -> AuditResult:
    """Audit uint8 NHWC `images` with integer `labels`; at most `max_images` (a seeded sample) are used.

    The default thresholds were measured on clean 10-class 32x32 CIFAR-10; on other data (another class count or
    image size) the result says `calibrated=False` and a warning asks for `thresholds=` measured on known-clean
    samples of that kind."""
    t0 = time.perf_counter()
    images, y = _check(images, labels, num_classes)
    calibrated = thresholds is not None or (num_classes, images.shape[1:3]) == CALIBRATED_ON
    if not calibrated:
        warnings.warn(f"the audit's default thresholds are calibrated on clean 10-class 32x32 CIFAR-10; this data has "
                      f"{num_classes} classes at {images.shape[1]}x{images.shape[2]}, so the verdict is indicative only: "
                      "pass thresholds= measured on known-clean samples of this data (benchmarks/audit.py shows how)",
                      stacklevel=2)  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    if max_images is not None and len(images) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(images), max_images, replace=False))
        images, y = images[keep], y[keep]
    yt = torch.from_numpy(y)
    perm = torch.randperm(len(y), generator=gen)
    tr, te = perm[: len(y) // 2], perm[len(y) // 2 :]
    pix = _linear_probe(pixel_features(images), yt, tr, te, num_classes=num_classes, epochs=8, lr=1e-3, gen=gen)
    tex = _linear_probe(texture_features(images), yt, tr, te, num_classes=num_classes, epochs=10, lr=1e-2, gen=gen)
    score = max(pix[1], tex[1])
    th = tuple(thresholds) if thresholds is not None else THRESHOLDS
    return AuditResult(score=score, verdict=verdict_for(score, th), pixel_acc=pix[1], texture_acc=tex[1],
                       pixel_train_acc=pix[0], texture_train_acc=tex[0], n_images=len(y), num_classes=num_classes,
                       thresholds=th, seed=seed, seconds=time.perf_counter() - t0,
                       class_counts=np.bincount(y, minlength=num_classes).tolist(), calibrated=calibrated)  # fmt: skip


# ------------------------------------------------------------------------------------------------ over shards


def _rank(key: str, seed: int) -> int:
    """A sample's place in the seeded sample order: the same for any shard order, split or worker count."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big")


def _shard_ranks(url: str, seed: int, so: dict | None = None) -> list[int]:
    from purify_pipeline.data import shards

    return [_rank(s["__key__"], seed) for s in shards.iter_samples(url, storage_options=so)]


def _shard_sample(url: str, seed: int, cutoff: int, so: dict | None = None) -> list[tuple[int, np.ndarray, int]]:
    """(rank, decoded image, label) of the shard's samples whose rank is <= cutoff."""
    from purify_pipeline.data import shards

    out = []
    for s in shards.iter_samples(url, storage_options=so):
        r = _rank(s["__key__"], seed)
        if r <= cutoff:
            col = shards.find_image_column(s, shard=url, key=s["__key__"])
            out.append((r, shards.decode_image(s[col], col, shard=url, key=s["__key__"]),
                        shards.parse_label(s.get("cls"), shard=url, key=s["__key__"])))  # fmt: skip
    return out


def audit_shards(urls: str | Sequence[str], *, num_classes: int | None = None, max_images: int = 10_000,
                 seed: int = 0, use_ray: bool = False, thresholds: tuple[float, float] | None = None,
                 storage_options: dict | None = None) -> AuditResult:  # fmt: skip
    """Audit WebDataset shards (`.cls` labels): the `max_images` samples of smallest seeded key hash, i.e. a
    uniform sample that does not depend on shard order. use_ray=True runs it as two Ray Data passes (hash
    the keys per shard, then decode only the sampled images per shard); the sample and result are the same."""
    from purify_pipeline.data import shards

    so = dict(storage_options or {})
    found = shards.expand(urls, storage_options=so)
    if use_ray:
        import ray

        items = ray.data.from_items([{"url": u} for u in found], override_num_blocks=len(found))
        ranks = items.flat_map(lambda row: [{"r": r} for r in _shard_ranks(row["url"], seed, so)])
        allr = np.sort(np.concatenate([b["r"] for b in ranks.iter_batches(batch_format="numpy")]).astype(np.uint64))
        if len(allr) == 0:
            raise ValueError(f"no samples in {len(found)} shard(s)")
        cutoff = int(allr[min(max_images, len(allr)) - 1])
        rows = items.flat_map(lambda row: [{"r": r, "image": x, "label": y}
                                           for r, x, y in _shard_sample(row["url"], seed, cutoff, so)])  # fmt: skip
        picked = sorted(((int(r["r"]), r["image"], int(r["label"])) for r in rows.iter_rows()), key=lambda t: t[0])
    else:
        heap: list[tuple[int, int, str, dict]] = []  # max-heap by rank (negated) of raw samples
        for url in found:
            for i, s in enumerate(shards.iter_samples(url, storage_options=so)):
                item = (-_rank(s["__key__"], seed), -i, url, s)  # (rank, position) ties never reach the dict
                if len(heap) < max_images:
                    heapq.heappush(heap, item)  # type: ignore[arg-type]
                elif item[0] > heap[0][0]:
                    heapq.heapreplace(heap, item)  # type: ignore[arg-type]
        if not heap:
            raise ValueError(f"no samples in {len(found)} shard(s)")
        picked = []
        for neg, _, url, s in sorted(heap, key=lambda t: -t[0]):
            col = shards.find_image_column(s, shard=url, key=s["__key__"])
            picked.append((-neg, shards.decode_image(s[col], col, shard=url, key=s["__key__"]),
                           shards.parse_label(s.get("cls"), shard=url, key=s["__key__"])))  # fmt: skip
    images = np.stack([p[1] for p in picked])
    labels = np.array([p[2] for p in picked], dtype=np.int64)
    k = num_classes if num_classes is not None else int(labels.max()) + 1
    return audit(images, labels, num_classes=k, seed=seed, max_images=None, thresholds=thresholds)


def audit_dataset(ds: Any, *, image_column: str | None = None, label_column: str = "cls", key_column: str = "__key__",
                  num_classes: int | None = None, max_images: int = 10_000, seed: int = 0,
                  thresholds: tuple[float, float] | None = None) -> AuditResult:  # fmt: skip
    """Audit a Ray Dataset in a user's pipeline (e.g. before or after a `PurifyStage`): rows with a key, an image
    (encoded bytes or a decoded HxWx3 array; image_column None = jpg/jpeg/png/webp/npy, the first present) and
    an integer label. Two passes: the keys' seeded hashes (a key column only), then the `max_images` rows of
    smallest hash, decoded where they are. The same sample, hence the same result, as `audit_shards` over
    the shards the dataset was read from."""
    from purify_pipeline.data import shards

    def ranks(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"r": np.array([_rank(str(k), seed) for k in batch[key_column]], dtype=np.uint64)}

    allr = np.sort(np.concatenate([b["r"] for b in ds.select_columns([key_column]).map_batches(ranks, batch_format="numpy")
                                   .iter_batches(batch_format="numpy")] or [np.zeros(0, np.uint64)]))  # fmt: skip
    if len(allr) == 0:
        raise ValueError("the dataset has no rows")
    cutoff = int(allr[min(max_images, len(allr)) - 1])

    def sample(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rs, imgs, labs = [], [], []
        for i, k in enumerate(batch[key_column]):
            r = _rank(str(k), seed)
            if r > cutoff:
                continue
            key = str(k)
            col = image_column or next((c for c in shards.IMAGE_EXTS if c in batch and batch[c][i] is not None), None)
            if col is None:
                raise shards.ShardError(f"no image column among {sorted(batch)}", key=key)
            v = batch[col][i]
            img = shards.decode_image(v, col, key=key) if isinstance(v, (bytes, bytearray)) else shards.to_rgb(np.asarray(v), key=key)
            rs.append(r)
            imgs.append(img)
            labs.append(shards.parse_label(batch[label_column][i], key=key))
        # raw bytes + shape: most batches sample no row, and a bytes column has one schema whatever the count
        raw = np.empty(len(imgs), dtype=object)
        raw[:] = [im.tobytes() for im in imgs]
        return {"r": np.array(rs, dtype=np.uint64), "image": raw, "h": np.array([im.shape[0] for im in imgs], np.int64),
                "w": np.array([im.shape[1] for im in imgs], np.int64), "label": np.array(labs, dtype=np.int64)}  # fmt: skip

    got = [b for b in ds.map_batches(sample, batch_format="numpy").iter_batches(batch_format="numpy") if len(b["r"])]
    r = np.concatenate([b["r"] for b in got])
    order = np.argsort(r, kind="stable")
    images = np.stack([np.frombuffer(x, np.uint8).reshape(h, w, 3) for b in got
                       for x, h, w in zip(b["image"], b["h"], b["w"])])[order]  # fmt: skip
    labels = np.concatenate([b["label"] for b in got])[order]
    k = num_classes if num_classes is not None else int(labels.max()) + 1
    return audit(images, labels, num_classes=k, seed=seed, max_images=None, thresholds=thresholds)
