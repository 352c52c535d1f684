"""The formats a dataset arrives in, read into labelled splits for `convert`: CIFAR-10/100 (python pickles,
read with `SafeUnpickler`, or the binary version), ImageFolder trees, and .npz / .npy arrays.

Nothing here unpickles an arbitrary object: CIFAR's pickles are rebuilt by `SafeUnpickler`, which knows only
dicts, lists, bytes, str, numbers and numeric numpy arrays; arrays are loaded with ``allow_pickle=False``.
"""
from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

IMAGE_FILE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


_SPLIT_DIRS = ("train", "val", "valid", "validation", "test")


_CIFAR_DIRS = ("cifar-10-batches-py", "cifar-100-python", "cifar-10-batches-bin", "cifar-100-binary")


class ConvertError(ValueError):
    """Input that cannot be converted; the message names the file and what was expected."""


@dataclass
class SplitSource:
    """One split of a source dataset: labels, keys and a lazy reader of each image as (ext, bytes)."""

    name: str
    labels: np.ndarray  # int64 (N,)
    read: Callable[[int], tuple[str, bytes]]
    describe: Callable[[int], str]  # where sample i comes from, for error messages


def _safe_dtype(obj: Any, align: bool = False, copy: bool = False) -> np.dtype:
    dt = np.dtype(obj, align, copy)
    if dt.kind not in "biuf" or dt.fields is not None:
        raise ConvertError(f"pickle holds a numpy array of dtype {dt}; only numeric arrays are accepted")
    return dt


def _safe_reconstruct(cls: Any, shape: Any, dtype: Any) -> np.ndarray:
    if cls is not np.ndarray:
        raise ConvertError("pickle rebuilds an array subclass; only plain numpy arrays are accepted")
    return np.ndarray.__new__(np.ndarray, shape, _safe_dtype(dtype))


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if encoding.lower().replace("-", "") not in ("latin1", "iso88591"):
        raise ConvertError(f"pickle asks for codec {encoding!r}; only latin-1 byte strings are accepted")
    return text.encode("latin1")


class SafeUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR's python-version batches that can build nothing but data.

    Opcodes for dicts, lists, tuples, bytes, str and numbers need no globals; the only globals resolved are
    numpy's array reconstruction (replaced by versions that accept plain numeric arrays only) and the
    latin-1 ``_codecs.encode`` that protocol-2 pickles use for bytes. Everything else raises ConvertError,
    so a malicious "batch" cannot run code."""

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _safe_dtype,
        ("_codecs", "encode"): _latin1_encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise ConvertError(f"pickle refers to {module}.{name}, which a CIFAR batch never does; refusing to load it") from None

    def persistent_load(self, pid: Any) -> Any:
        raise ConvertError("pickle uses persistent ids; refusing to load it")


def safe_load_pickle(path: Path) -> Any:
    """Load one CIFAR python-version batch file with `SafeUnpickler` (bytes keys, as Python 2 wrote them)."""
    with open(path, "rb") as f:
        try:
            return SafeUnpickler(f, encoding="bytes").load()
        except ConvertError as e:
            raise ConvertError(f"{path}: {e}") from None
        except Exception as e:  # noqa: BLE001 - truncated/garbled pickles raise many types
            raise ConvertError(f"{path}: not a readable CIFAR batch ({type(e).__name__}: {e})") from None


def _field(d: Any, name: str, path: Path) -> Any:
    if not isinstance(d, dict):
        raise ConvertError(f"{path}: expected a dict, got {type(d).__name__}")
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    raise ConvertError(f"{path}: no {name!r} entry (has {sorted(str(k) for k in d)})")


def _names(values: Any, path: Path) -> list[str]:
    if not isinstance(values, list) or not values:
        raise ConvertError(f"{path}: class names must be a non-empty list")
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _cifar_root(path: Path) -> Path | None:
    """The directory holding CIFAR batch files: `path` itself or one of torchvision's folder names in it."""
    for cand in [path, *(path / d for d in _CIFAR_DIRS)]:
        if not cand.is_dir():
            continue
        names = {p.name for p in cand.iterdir()}
        if {"batches.meta", "test_batch"} <= names or {"meta", "train", "test"} <= names:
            return cand
        if "test_batch.bin" in names or {"train.bin", "test.bin"} <= names:
            return cand
    return None


def _cifar_arrays(data: Any, labels: Any, path: Path, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}"
        raise ConvertError(f"{path}: 'data' must be a uint8 array (N, 3072), got {got}")
    lab = np.asarray(labels)
    if lab.shape != (len(data),) or lab.dtype.kind not in "iu":
        raise ConvertError(f"{path}: labels must be {len(data)} integers, got shape {lab.shape} dtype {lab.dtype}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), lab.astype(np.int64)


def _read_cifar_python(root: Path, splits: Sequence[str] | None) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if (root / "batches.meta").exists():  # CIFAR-10
        classes = _names(_field(safe_load_pickle(root / "batches.meta"), "label_names", root / "batches.meta"), root / "batches.meta")
        files = {"train": [root / f"data_batch_{i}" for i in range(1, 6)], "test": [root / "test_batch"]}
        label_key = "labels"
    else:  # CIFAR-100: fine labels
        classes = _names(_field(safe_load_pickle(root / "meta"), "fine_label_names", root / "meta"), root / "meta")
        files = {"train": [root / "train"], "test": [root / "test"]}
        label_key = "fine_labels"
    for split, paths in files.items():
        if splits is not None and split not in splits:
            continue
        xs, ys = [], []
        for p in paths:
            if not p.exists():
                raise ConvertError(f"{p}: missing CIFAR batch file")
            d = safe_load_pickle(p)
            x, y = _cifar_arrays(_field(d, "data", p), _field(d, label_key, p), p)
            xs.append(x)
            ys.append(y)
        out[split] = (np.concatenate(xs), np.concatenate(ys))
    return classes, out


def _read_cifar_binary(root: Path, splits: Sequence[str] | None) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    if (root / "test_batch.bin").exists():  # CIFAR-10: 1 label byte + 3072 pixel bytes per record
        names_file, header, label_byte = root / "batches.meta.txt", 1, 0
        files = {"train": [root / f"data_batch_{i}.bin" for i in range(1, 6)], "test": [root / "test_batch.bin"]}
    else:  # CIFAR-100: coarse label byte, fine label byte, 3072 pixel bytes
        names_file, header, label_byte = root / "fine_label_names.txt", 2, 1
        files = {"train": [root / "train.bin"], "test": [root / "test.bin"]}
    if not names_file.exists():
        raise ConvertError(f"{names_file}: missing class-name file")
    classes = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()]
    out = {}
    rec = header + 3072
    for split, paths in files.items():
        if splits is not None and split not in splits:
            continue
        xs, ys = [], []
        for p in paths:
            if not p.exists():
                raise ConvertError(f"{p}: missing CIFAR batch file")
            raw = np.fromfile(p, dtype=np.uint8)
            if raw.size % rec:
                raise ConvertError(f"{p}: size {raw.size} is not a multiple of the {rec}-byte CIFAR record")
            raw = raw.reshape(-1, rec)
            x, y = _cifar_arrays(np.ascontiguousarray(raw[:, header:]), raw[:, label_byte].astype(np.int64), p)
            xs.append(x)
            ys.append(y)
        out[split] = (np.concatenate(xs), np.concatenate(ys))
    return classes, out


def download_cifar(root: Path, which: str) -> None:
    """Fetch CIFAR-10/100 (python version) into `root` with torchvision's downloader (checks the md5)."""
    import torchvision.datasets as tvd

    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}.get(which)
    if cls is None:
        raise ConvertError(f"download must be 'cifar10' or 'cifar100', got {which!r}")
    root.mkdir(parents=True, exist_ok=True)
    try:
        # download=True fetches and extracts the archive; the constructor then reads the batches with pickle,
        # which is torchvision's own (trusted, md5-checked) data. We re-read them with SafeUnpickler anyway.
        cls(str(root), train=True, download=True)
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        raise ConvertError(f"could not download {which} into {root} ({type(e).__name__}: {e})") from None


def _as_nhwc(images: Any, where: str) -> np.ndarray:
    a = np.asarray(images)
    if a.dtype != np.uint8:
        raise ConvertError(f"{where}: images must be uint8 (0..255), got dtype {a.dtype}")
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4:
        raise ConvertError(f"{where}: images must have shape (N,H,W,3), (N,3,H,W) or (N,H,W), got {a.shape}")
    if a.shape[-1] not in (1, 3, 4) and a.shape[1] in (1, 3, 4):
        a = a.transpose(0, 2, 3, 1)
    if a.shape[-1] not in (1, 3, 4):
        raise ConvertError(f"{where}: cannot find the channel axis of shape {a.shape} (expected 1, 3 or 4 channels)")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.ascontiguousarray(a[..., :3])


def _as_labels(labels: Any, n: int, where: str) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.shape != (n,) or y.dtype.kind not in "iu":
        raise ConvertError(f"{where}: labels must be {n} integers (one per image), got shape {y.shape} dtype {y.dtype}")
    if n and y.min() < 0:
        raise ConvertError(f"{where}: labels must be >= 0, got {y.min()}")
    return y.astype(np.int64)


def _read_npz(path: Path, splits: Sequence[str] | None, split: str) -> tuple[list[str] | None, dict[str, tuple[np.ndarray, np.ndarray]]]:
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise ConvertError(f"{path}: not a readable .npz without pickle ({type(e).__name__}: {e})") from None
    with z:
        keys = set(z.files)
        classes = [str(c) for c in z["classes"]] if "classes" in keys else None
        out = {}
        per_split = sorted({m.group(2) for k in keys if (m := re.fullmatch(r"(x|images)_(\w+)", k))})
        if per_split:  # Keras style: x_train / y_train, x_test / y_test
            for s in per_split:
                if splits is not None and s not in splits:
                    continue
                xk = f"x_{s}" if f"x_{s}" in keys else f"images_{s}"
                yk = next((k for k in (f"y_{s}", f"labels_{s}") if k in keys), None)
                if yk is None:
                    raise ConvertError(f"{path}: {xk} has no matching y_{s} / labels_{s} array")
                x = _as_nhwc(z[xk], f"{path}[{xk}]")
                out[s] = (x, _as_labels(z[yk], len(x), f"{path}[{yk}]"))
        else:
            xk = next((k for k in ("images", "x", "data", "X") if k in keys), None)
            yk = next((k for k in ("labels", "y", "targets", "Y") if k in keys), None)
            if xk is None or yk is None:
                raise ConvertError(f"{path}: expected arrays 'images' and 'labels' (or x/y, or x_train/y_train), found {sorted(keys)}")
            x = _as_nhwc(z[xk], f"{path}[{xk}]")
            out[split] = (x, _as_labels(z[yk], len(x), f"{path}[{yk}]"))
    return classes, out


def _read_npy(path: Path, labels: str | os.PathLike | None, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if labels is None:
        raise ConvertError(f"{path}: a .npy of images needs a labels .npy as well (--labels)")
    try:
        x = np.load(path, allow_pickle=False)
        y = np.load(labels, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise ConvertError(f"{path} / {labels}: not readable .npy without pickle ({type(e).__name__}: {e})") from None
    x = _as_nhwc(x, str(path))
    return {split: (x, _as_labels(y, len(x), str(labels)))}


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_FILE_EXTS and not p.name.startswith(".")


def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _is_imagefolder(root: Path) -> bool:
    return any(any(_is_image(f) for f in d.rglob("*")) for d in _class_dirs(root))


def _read_imagefolder(root: Path, splits: Sequence[str] | None, split: str) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    split_dirs = [d for d in _class_dirs(root) if d.name in _SPLIT_DIRS and _is_imagefolder(d)]
    trees = {d.name: d for d in split_dirs} if split_dirs else {split: root}
    classes: list[str] | None = None
    out: dict[str, list[tuple[Path, int]]] = {}
    for name, tree in trees.items():
        names = [d.name for d in _class_dirs(tree)]
        if classes is None:
            classes = names
        elif names != classes:
            raise ConvertError(f"{tree}: class folders {names} differ from the other split's {classes}")
        if splits is not None and name not in splits:
            continue
        files = [(f, c) for c, d in enumerate(_class_dirs(tree)) for f in sorted(d.rglob("*")) if _is_image(f)]
        if not files:
            raise ConvertError(f"{tree}: no image files ({'/'.join(IMAGE_FILE_EXTS)}) under its class folders")
        out[name] = files
    return classes or [], out


def detect_format(source: Path) -> str:
    """cifar | imagefolder | npz | npy for a path, or ConvertError saying what was found."""
    if source.is_file():
        suffix = source.suffix.lower()
        if suffix in (".npz", ".npy"):
            return suffix[1:]
        raise ConvertError(f"{source}: a file source must be .npz or .npy")
    if not source.is_dir():
        raise ConvertError(f"{source}: no such file or directory")
    if _cifar_root(source) is not None:
        return "cifar"
    if _is_imagefolder(source) or any(_is_imagefolder(d) for d in _class_dirs(source) if d.name in _SPLIT_DIRS):
        return "imagefolder"
    raise ConvertError(f"{source}: neither CIFAR batches ({', '.join(_CIFAR_DIRS)}) nor an ImageFolder tree "
                       "(<class>/<image> or <split>/<class>/<image>)")  # fmt: skip
