"""`convert`: image datasets on disk -> class-balanced WebDataset shards + ``manifest.json``.

    manifest = convert("~/data/cifar-10-batches-py", "data/cifar10")     # train-000000.tar ... test-000009.tar

Sources (``fmt="auto"`` detects them):
- ``cifar``: CIFAR-10/100 as torchvision downloads them (the "python version": ``data_batch_1..5`` +
  ``test_batch`` + ``batches.meta``, or ``train`` + ``test`` + ``meta`` for CIFAR-100) or the "binary
  version" (``data_batch_1.bin`` ... / ``train.bin``). The python version is a set of pickles; they are read
  with `SafeUnpickler`, which can only rebuild dicts, lists, bytes, str, numbers and *numeric* numpy arrays
  (any other class or function in the stream is an error), then checked for the CIFAR layout. With
  ``download="cifar10"|"cifar100"`` torchvision's downloader fetches the archive first (needs a network).
- ``imagefolder``: ``root/<class>/<image>`` (torchvision's ImageFolder: classes are the sorted folder names),
  or ``root/<split>/<class>/<image>`` with split folders named train/val/valid/validation/test.
- ``npz``/``npy``: uint8 images (N,H,W,3), (N,3,H,W), (N,H,W) and integer labels: an ``.npz`` with
  ``images``/``x`` + ``labels``/``y`` (optionally ``classes``), or Keras-style ``x_train``/``y_train``/
  ``x_test``/``y_test``; or an ``.npy`` of images with ``labels=`` another ``.npy``. Read with
  ``allow_pickle=False``.

Output, per split: ``<split>-000000.tar`` ... with ``<key>.png`` (arrays; lossless) or the image file's own
bytes (``.jpg``/``.png``/``.webp`` from a folder, untouched unless ``image_size`` asks for a resize) and
``<key>.cls`` (ASCII class index). Shards are *class-balanced*: samples are interleaved so that every shard
(and so every prefix of shards) holds each class in proportion, then shuffled within the shard (seeded).
Keys are ``<split>_<index>`` with the index in the source's own order. ``manifest.json`` has the same layout
as the bundled CIFAR-10 shards: ``classes`` (names in index order) and, per split, sample count and
``file``/``samples``/``sha256`` per shard.
"""
from __future__ import annotations

import io
import os
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from purify_pipeline._progress import progress as _bar
from purify_pipeline.data import shards
from purify_pipeline.data.sources import (  # ConvertError, SafeUnpickler, SplitSource, detect_format: re-exported
    ConvertError,
    SafeUnpickler,
    SplitSource,
    _cifar_root,
    _read_cifar_binary,
    _read_cifar_python,
    _read_imagefolder,
    _read_npy,
    _read_npz,
    detect_format,
    download_cifar,
)

__all__ = ["ConvertError", "SafeUnpickler", "SplitSource", "balanced_order", "convert", "detect_format", "read_source"]

FORMATS = ("auto", "cifar", "imagefolder", "npz", "npy")
_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # stored byte-for-byte when no resize is asked


# --------------------------------------------------------------------------------------------- images


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to `size` (bicubic), then a centre crop to size x size."""
    from PIL import Image

    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    im = Image.fromarray(img).resize((nw, nh), Image.Resampling.BICUBIC)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _array_source(name: str, x: np.ndarray, y: np.ndarray, where: str, image_size: int | None) -> SplitSource:
    def read(i: int) -> tuple[str, bytes]:
        img = x[i] if image_size is None else _resize(x[i], image_size)
        return "png", shards.encode_png(img)

    return SplitSource(name, y, read, lambda i: f"{where} [{name} #{i}]")


def _file_source(name: str, files: list[tuple[Path, int]], image_size: int | None) -> SplitSource:
    from PIL import Image

    def read(i: int) -> tuple[str, bytes]:
        path = files[i][0]
        data = path.read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format
                if image_size is None and fmt in _KEEP_FORMATS and (fmt != "PNG" or im.mode in ("RGB", "L", "RGBA", "P")):
                    im.verify()
                    return _KEEP_FORMATS[fmt], data
                im.load()
                img = shards.decode_image(data, (fmt or "png").lower())
        except shards.ShardError as e:
            raise ConvertError(f"{path}: {e}") from None
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            raise ConvertError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
        if image_size is not None:
            img = _resize(img, image_size)
        return "png", shards.encode_png(img)

    labels = np.asarray([c for _, c in files], dtype=np.int64)
    return SplitSource(name, labels, read, lambda i: str(files[i][0]))


# ---------------------------------------------------------------------------------------- the job


def read_source(source: str | os.PathLike, *, fmt: str = "auto", splits: Sequence[str] | None = None,
                split: str = "train", labels: str | os.PathLike | None = None, classes: Sequence[str] | None = None,
                image_size: int | None = None) -> tuple[list[str], list[SplitSource], str]:  # fmt: skip
    """(class names, one SplitSource per split, detected format). `split` names the single split of an
    ImageFolder without split folders or of a plain images/labels array."""
    path = Path(source).expanduser()
    if fmt not in FORMATS:
        raise ConvertError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "auto":
        fmt = detect_format(path)
    names: list[str] | None
    if fmt == "cifar":
        root = _cifar_root(path)
        if root is None:
            raise ConvertError(f"{path}: no CIFAR batch files (looked for batches.meta/test_batch, meta/train/test, *.bin)")
        binary = any(root.glob("*.bin"))
        names, arrays = (_read_cifar_binary if binary else _read_cifar_python)(root, splits)
        fmt = ("cifar-binary" if binary else "cifar-python")
        sources = [_array_source(s, x, y, str(root), image_size) for s, (x, y) in arrays.items()]
    elif fmt in ("npz", "npy"):
        names, arrays = _read_npz(path, splits, split) if fmt == "npz" else (None, _read_npy(path, labels, split))
        sources = [_array_source(s, x, y, str(path), image_size) for s, (x, y) in arrays.items()]
    else:
        names, files = _read_imagefolder(path, splits, split)
        sources = [_file_source(s, f, image_size) for s, f in files.items()]
    if classes is not None:
        names = list(classes)
    if not sources:
        raise ConvertError(f"{path}: no split matches {list(splits or [])}")
    k = 1 + max(int(s.labels.max()) for s in sources if len(s.labels))
    names = names or [str(i) for i in range(k)]
    if k > len(names):
        raise ConvertError(f"{path}: label {k - 1} has no class name ({len(names)} classes: {names[:5]}...)")
    return names, sources, fmt


def balanced_order(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A permutation that spreads every class evenly: each class's samples (shuffled) sit at evenly spaced
    fractional positions (j + u_c) / n_c, merged by position, so any prefix holds each class in proportion."""
    rng = np.random.default_rng(seed)
    idx, pos = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rng.shuffle(members)
        idx.append(members)
        pos.append((np.arange(len(members)) + rng.uniform()) / len(members))
    if not idx:
        return np.zeros(0, dtype=np.int64)
    idx_all, pos_all = np.concatenate(idx), np.concatenate(pos)
    return idx_all[np.lexsort((idx_all, pos_all))]


def _prepare_output(out: Path, prefixes: Iterable[str], overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConvertError(f"output {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConvertError(f"output {out} already exists and is not empty (pass --overwrite to replace its shards)")
        for p in prefixes:
            for f in out.glob(f"{p}-*.tar*"):
                f.unlink()
        (out / shards.MANIFEST_NAME).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def convert(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    fmt: str = "auto",
    splits: Sequence[str] | None = None,
    split: str = "train",
    labels: str | os.PathLike | None = None,
    classes: Sequence[str] | None = None,
    shard_size: int = 1000,
    image_size: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    download: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert a dataset to class-balanced WebDataset shards in `output`; return the manifest written.

    splits: only these splits (CIFAR: train/test; default all). split: the name of a single-split source.
    shard_size: samples per shard. image_size: resize (shorter side + centre crop) to a square, re-encoded as
    PNG. limit: keep only the first `limit` samples of each split *in balanced order* (still class-balanced).
    download: "cifar10"/"cifar100" fetches that dataset into `source` first if it is not there.
    """
    src, out = Path(source).expanduser(), Path(output).expanduser()
    if shard_size < 1:
        raise ConvertError(f"shard_size must be >= 1, got {shard_size}")
    if download is not None and _cifar_root(src) is None:
        download_cifar(src, download)
    names, sources, detected = read_source(src, fmt=fmt, splits=splits, split=split, labels=labels,
                                           classes=classes, image_size=image_size)  # fmt: skip
    _prepare_output(out, [s.name for s in sources], overwrite)
    manifest: dict[str, Any] = {"classes": names, "splits": {},
                                "source": {"path": str(src), "format": detected, "seed": seed,
                                           "image_size": image_size, "limit": limit}}  # fmt: skip
    for s in sources:
        order = balanced_order(s.labels, seed)
        if limit is not None:
            order = order[:limit]
        n_shards = max(1, -(-len(order) // shard_size))
        width = max(5, len(str(len(s.labels) - 1)))
        entries = []
        bar = _bar(total=len(order), enabled=progress, desc=f"convert {s.name}", unit="img")
        for j in range(n_shards):
            chunk = order[j * shard_size : (j + 1) * shard_size].copy()
            np.random.default_rng([seed, zlib.crc32(s.name.encode()), j]).shuffle(chunk)

            def samples(chunk: np.ndarray = chunk) -> Iterable[dict[str, Any]]:
                for i in chunk:
                    ext, data = s.read(int(i))
                    bar.update(1)
                    yield {"__key__": f"{s.name}_{int(i):0{width}d}", ext: data, "cls": str(int(s.labels[i]))}

            name = shards.shard_name(s.name, j)
            info = shards.write_shard(str(out / name), samples())
            entries.append({"file": name, "samples": info.count, "sha256": info.sha256})
        bar.close()
        counts = np.bincount(s.labels[order], minlength=len(names)).tolist()
        manifest["splits"][s.name] = {"samples": int(len(order)), "class_counts": counts, "shards": entries}
    shards.write_manifest(str(out), manifest)
    return manifest
