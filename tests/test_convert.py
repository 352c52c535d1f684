"""convert: torchvision CIFAR (python + binary), ImageFolder and NumPy sources -> class-balanced shards."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from purify_pipeline import shards
from purify_pipeline.data.convert import (
    ConvertError,
    SafeUnpickler,
    balanced_order,
    convert,
)

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar_arrays(n: int, k: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, k, size=n)]
    return data, labels


def make_cifar10_python(root, per_batch: int = 20, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """torchvision's on-disk CIFAR-10 layout (cifar-10-batches-py), pickled with protocol 2 as the originals."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    out: dict[str, tuple[np.ndarray, list[int]]] = {}
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        data, labels = _cifar_arrays(per_batch, 10, seed + i)
        with open(d / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"f%d.png" % j for j in range(per_batch)]}, f, protocol=2)  # fmt: skip
        out[name] = (data, labels)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072}, f, protocol=2)
    return out


def _read_split(out, split: str) -> tuple[np.ndarray, np.ndarray, list[str], list[list[int]]]:
    urls = sorted(str(p) for p in out.glob(f"{split}-*.tar"))
    imgs, labs, keys, per_shard = [], [], [], []
    for u in urls:
        ls = []
        for s in shards.iter_samples(u):
            col = shards.find_image_column(s)
            imgs.append(shards.decode_image(s[col], col))
            ls.append(shards.parse_label(s["cls"]))
            keys.append(s["__key__"])
        labs += ls
        per_shard.append(ls)
    return np.stack(imgs), np.asarray(labs), keys, per_shard


def test_cifar10_python_roundtrip(tmp_path):
    src = make_cifar10_python(tmp_path / "src")
    man = convert(tmp_path / "src", tmp_path / "out", shard_size=30, progress=False)
    assert man["classes"] == CIFAR10_NAMES
    assert man["splits"]["train"]["samples"] == 100 and man["splits"]["test"]["samples"] == 20
    assert [e["file"] for e in man["splits"]["train"]["shards"]] == [f"train-{i:06d}.tar" for i in range(4)]
    for e in man["splits"]["train"]["shards"]:  # manifest sha256 = file bytes
        assert hashlib.sha256((tmp_path / "out" / e["file"]).read_bytes()).hexdigest() == e["sha256"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["classes"] == CIFAR10_NAMES
    x, y, keys, _ = _read_split(tmp_path / "out", "train")
    data = np.concatenate([src[f"data_batch_{j}"][0] for j in range(1, 6)])
    labels = sum((src[f"data_batch_{j}"][1] for j in range(1, 6)), [])
    for img, lab, key in zip(x, y, keys):  # each key maps back to its source row, pixels exact (PNG)
        i = int(key.split("_")[1])
        assert key.startswith("train_")
        assert lab == labels[i]
        np.testing.assert_array_equal(img, data[i].reshape(3, 32, 32).transpose(1, 2, 0))
    assert sorted(int(k.split("_")[1]) for k in keys) == list(range(100))


def test_shards_are_class_balanced(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(300, 8, 8, 3), dtype=np.uint8)
    y = np.repeat(np.arange(3), 100)  # sorted by class on input
    np.savez(tmp_path / "d.npz", images=x, labels=y)
    convert(tmp_path / "d.npz", tmp_path / "out", shard_size=30, progress=False)
    _, _, _, per_shard = _read_split(tmp_path / "out", "train")
    assert len(per_shard) == 10
    for ls in per_shard:
        assert np.bincount(ls, minlength=3).tolist() == [10, 10, 10]


def test_balanced_order_prefixes_are_proportional():
    labels = np.array([0] * 50 + [1] * 100 + [2] * 150)
    order = balanced_order(labels, seed=3)
    assert sorted(order.tolist()) == list(range(300))
    for n in (6, 60, 150, 299):
        counts = np.bincount(labels[order[:n]], minlength=3)
        np.testing.assert_allclose(counts, n * np.array([1, 2, 3]) / 6, atol=1.01)


def test_conversion_is_deterministic(tmp_path):
    make_cifar10_python(tmp_path / "src")
    a = convert(tmp_path / "src", tmp_path / "a", shard_size=25, seed=5, progress=False)
    b = convert(tmp_path / "src", tmp_path / "b", shard_size=25, seed=5, progress=False)
    c = convert(tmp_path / "src", tmp_path / "c", shard_size=25, seed=6, progress=False)
    sha = lambda m: [e["sha256"] for e in m["splits"]["train"]["shards"]]  # noqa: E731
    assert sha(a) == sha(b)
    assert sha(a) != sha(c)


def test_cifar100_python_and_limit(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    names = [f"c{i}" for i in range(100)]
    for split, n in (("train", 200), ("test", 100)):
        data, _ = _cifar_arrays(n, 100, 7)
        fine = [i % 100 for i in range(n)]
        with open(d / split, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": fine, b"coarse_labels": [0] * n}, f, protocol=2)
    with open(d / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": [b"x"]}, f, protocol=2)
    man = convert(tmp_path, tmp_path / "out", splits=["train"], limit=100, progress=False)
    assert man["classes"] == names and list(man["splits"]) == ["train"]
    assert man["splits"]["train"]["class_counts"] == [1] * 100  # a balanced limit: one of each class


def test_cifar10_binary(tmp_path):
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    rng = np.random.default_rng(0)
    rec = {}
    for name in [f"data_batch_{j}.bin" for j in range(1, 6)] + ["test_batch.bin"]:
        r = rng.integers(0, 256, size=(10, 3073), dtype=np.uint8)
        r[:, 0] = rng.integers(0, 10, size=10)
        r.tofile(d / name)
        rec[name] = r
    (d / "batches.meta.txt").write_text("\n".join(CIFAR10_NAMES) + "\n\n")
    convert(tmp_path, tmp_path / "out", progress=False)
    x, y, keys, _ = _read_split(tmp_path / "out", "test")
    for img, lab, key in zip(x, y, keys):
        r = rec["test_batch.bin"][int(key.split("_")[1])]
        assert lab == r[0]
        np.testing.assert_array_equal(img, r[1:].reshape(3, 32, 32).transpose(1, 2, 0))


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_malicious_pickle_is_refused(tmp_path):
    make_cifar10_python(tmp_path / "src")
    target = tmp_path / "pwned"
    with open(tmp_path / "src" / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Evil(str(target)), b"labels": []}, f, protocol=2)
    with pytest.raises(ConvertError, match="data_batch_3.*refusing"):
        convert(tmp_path / "src", tmp_path / "out", progress=False)
    assert not target.exists()


def test_safe_unpickler_rejects_object_arrays():
    blob = pickle.dumps({b"data": np.array([1, "x"], dtype=object)}, protocol=2)
    with pytest.raises(ConvertError, match="dtype object"):
        SafeUnpickler(io.BytesIO(blob), encoding="bytes").load()


def _save(path, arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def test_imagefolder_with_splits(tmp_path):
    rng = np.random.default_rng(0)
    raw = {}
    for split in ("train", "val"):
        for cls, fmt, ext in (("cat", "JPEG", "jpg"), ("dog", "PNG", "png"), ("emu", "BMP", "bmp")):
            (tmp_path / "tree" / split / cls).mkdir(parents=True)
            for i in range(4):
                img = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
                raw[(split, cls, i)] = (_save(tmp_path / "tree" / split / cls / f"im.{i}.{ext}", img, fmt), img)
    man = convert(tmp_path / "tree", tmp_path / "out", progress=False)
    assert man["classes"] == ["cat", "dog", "emu"] and set(man["splits"]) == {"train", "val"}
    members = {}
    for s in shards.iter_samples(str(tmp_path / "out" / "val-000000.tar")):
        members[s["__key__"]] = s
    assert len(members) == 12
    exts = sorted({next(c for c in s if c in ("jpg", "png")) for s in members.values()})
    assert exts == ["jpg", "png"]
    jpg_bytes = {raw[("val", "cat", i)][0] for i in range(4)}
    assert {s["jpg"] for s in members.values() if "jpg" in s} == jpg_bytes  # JPEG kept byte for byte
    bmp = [s for s in members.values() if s["cls"] == b"2"]
    got = sorted(shards.decode_image(s["png"], "png").tobytes() for s in bmp)  # BMP -> lossless PNG
    assert got == sorted(raw[("val", "emu", i)][1].tobytes() for i in range(4))


def test_imagefolder_resize(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        _save(tmp_path / "tree" / cls / "x.png", np.zeros((40, 60, 3), np.uint8), "PNG")
    convert(tmp_path / "tree", tmp_path / "out", image_size=32, split="train", progress=False)
    x, y, _, _ = _read_split(tmp_path / "out", "train")
    assert x.shape == (2, 32, 32, 3) and sorted(y.tolist()) == [0, 1]


def test_numpy_sources(tmp_path):
    rng = np.random.default_rng(0)
    xtr = rng.integers(0, 256, size=(20, 3, 8, 8), dtype=np.uint8)  # NCHW is recognised
    ytr = (np.arange(20) % 4).reshape(-1, 1)  # Keras-style (N, 1) labels
    xte = rng.integers(0, 256, size=(8, 8, 8), dtype=np.uint8)  # grayscale
    np.savez(tmp_path / "k.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=np.arange(8) % 4,
             classes=np.array(["a", "b", "c", "d"]))  # fmt: skip
    man = convert(tmp_path / "k.npz", tmp_path / "out", progress=False)
    assert man["classes"] == ["a", "b", "c", "d"] and set(man["splits"]) == {"train", "test"}
    x, _, keys, _ = _read_split(tmp_path / "out", "train")
    i = int(keys[0].split("_")[1])
    np.testing.assert_array_equal(x[0], xtr[i].transpose(1, 2, 0))
    xt, _, keys, _ = _read_split(tmp_path / "out", "test")
    np.testing.assert_array_equal(xt[0], np.repeat(xte[int(keys[0].split("_")[1])][..., None], 3, axis=2))

    np.save(tmp_path / "x.npy", xtr.transpose(0, 2, 3, 1))
    np.save(tmp_path / "y.npy", ytr[:, 0])
    man = convert(tmp_path / "x.npy", tmp_path / "out2", labels=tmp_path / "y.npy", split="mine", progress=False)
    assert list(man["splits"]) == ["mine"] and man["classes"] == ["0", "1", "2", "3"]


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda p: np.savez(p / "s.npz", images=np.zeros((2, 4, 4, 3), np.float32), labels=[0, 1]), "uint8"),
        (lambda p: np.savez(p / "s.npz", images=np.zeros((2, 4, 4, 3), np.uint8), labels=[0]), "labels must be 2"),
        (lambda p: np.savez(p / "s.npz", pictures=np.zeros((2, 4, 4, 3), np.uint8)), "expected arrays"),
    ],
)
def test_bad_numpy_input(tmp_path, setup, match):
    setup(tmp_path)
    with pytest.raises(ConvertError, match=match):
        convert(tmp_path / "s.npz", tmp_path / "out", progress=False)


def test_existing_output_needs_overwrite(tmp_path):
    make_cifar10_python(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "out", shard_size=10, progress=False)
    with pytest.raises(ConvertError, match="already exists"):
        convert(tmp_path / "src", tmp_path / "out", progress=False)
    man = convert(tmp_path / "src", tmp_path / "out", shard_size=50, overwrite=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert len(man["splits"]["train"]["shards"]) == 2


def test_unknown_source(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match="neither CIFAR"):
        convert(tmp_path / "empty", tmp_path / "out", progress=False)


def test_demo_data_falls_back_to_a_converted_download(tmp_path, monkeypatch):
    """find_data: --data, $PURIFY_PIPELINE_DATA, ../shared/data/cifar10, else torchvision's download + convert
    (the downloader is replaced by a fake here: no network in tests)."""
    import purify_pipeline.data.convert as conv
    import purify_pipeline.demo.run as demo

    calls = []

    def fake_download(root, which):
        calls.append(which)
        make_cifar10_python(root, per_batch=10)

    monkeypatch.setattr(conv, "download_cifar", fake_download)
    monkeypatch.setattr(demo, "REPO", tmp_path / "repo")  # no shared/data beside this "repository"
    monkeypatch.delenv("PURIFY_PIPELINE_DATA", raising=False)
    found = demo.find_data(download_root=tmp_path / "cache", progress=False)
    assert calls == ["cifar10"]
    assert found == tmp_path / "cache" / "cifar10-shards"
    assert json.loads((found / "manifest.json").read_text())["classes"] == CIFAR10_NAMES
    assert (found / "train-000000.tar").exists() and (found / "test-000000.tar").exists()
    assert demo.find_data(download_root=tmp_path / "cache") == found and calls == ["cifar10"]  # reused
    monkeypatch.setenv("PURIFY_PIPELINE_DATA", str(found))
    assert demo.find_data() == found
    with pytest.raises(demo.DemoError, match="no shards match"):
        demo.find_data(tmp_path / "repo")
