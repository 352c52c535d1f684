"""Shard I/O: listing, streaming reads, strict truncation errors, decoding, atomic deterministic writes."""
from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from purify_pipeline import shards
from purify_pipeline.data.shards import ShardError


def _tar(path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return str(path)


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_expand_braces_globs_dirs(cifar10_dir):
    d = str(cifar10_dir)
    braces = shards.expand(f"{d}/train-{{000000..000002}}.tar")
    assert braces == [f"{d}/train-00000{i}.tar" for i in range(3)]
    assert shards.expand(f"{d}/test-*.tar") == [f"{d}/test-{i:06d}.tar" for i in range(10)]
    assert len(shards.expand(d)) == 60
    assert shards.expand([braces[2], braces[0], braces[0]]) == [braces[0], braces[2]]
    with pytest.raises(FileNotFoundError, match="nothing|no file|does not exist"):
        shards.expand(f"{d}/nope-{{000000..000001}}.tar")
    with pytest.raises(FileNotFoundError):
        shards.expand(f"{d}/nope-*.tar")


def test_expand_globs_without_braceexpand(cifar10_dir, monkeypatch):
    """Globs and plain paths need no braceexpand (a bare PyTorch machine, e.g. the lent GPU, lacks it)."""
    import sys

    monkeypatch.setitem(sys.modules, "braceexpand", None)  # import braceexpand -> ImportError
    d = str(cifar10_dir)
    assert len(shards.expand(f"{d}/train-*.tar")) == 50
    assert shards.expand(f"{d}/test-000003.tar") == [f"{d}/test-000003.tar"]
    with pytest.raises(ImportError):
        shards.expand(f"{d}/train-{{000000..000001}}.tar")


def test_iter_samples_cifar(cifar10_dir):
    url = str(cifar10_dir / "train-000000.tar")
    samples = list(shards.iter_samples(url))
    assert len(samples) == 1000
    assert [s["__key__"] for s in samples[:2]] == ["train_00000", "train_00001"]
    assert all(set(s) == {"__key__", "__url__", "jpg", "cls"} for s in samples)
    assert all(s["__url__"] == url for s in samples)
    with tarfile.open(url) as tf:  # raw bytes, exactly as stored
        assert samples[0]["jpg"] == tf.extractfile("train_00000.jpg").read()
    labels = [shards.parse_label(s["cls"]) for s in samples]
    assert np.bincount(labels).tolist() == [100] * 10


@pytest.mark.parametrize("cut", ["mid_data", "mid_header", "member_boundary"])
def test_truncated_tar_names_shard_and_key(tmp_path, cut):
    members = []
    for i in range(4):
        members += [(f"k{i}.txt", b"x" * 700), (f"k{i}.cls", b"1")]
    src = _tar(tmp_path / "full.tar", members)
    raw = open(src, "rb").read()
    # layout: [hdr k0.txt][2 data blocks][hdr k0.cls][1 data block][hdr k1.txt]... 5 blocks per sample
    boundary = 512 * 5 * 2 + 512 * 3  # after k2.txt's data, before k2.cls's header
    cut_at = {"mid_data": boundary - 100, "mid_header": boundary + 200, "member_boundary": boundary}[cut]
    bad = tmp_path / "cut.tar"
    bad.write_bytes(raw[:cut_at])
    got = []
    with pytest.raises(ShardError) as ei:
        for s in shards.iter_samples(str(bad)):
            got.append(s["__key__"])
    assert ei.value.shard == str(bad) and ei.value.key == "k2"
    assert str(bad) in str(ei.value) and "'k2'" in str(ei.value) and "truncated" in str(ei.value)
    assert got == ["k0", "k1"]  # complete samples before the damage still stream out
    assert [s["__key__"] for s in shards.iter_samples(src)] == ["k0", "k1", "k2", "k3"]


def test_malformed_tars(tmp_path):
    split = _tar(tmp_path / "split.tar", [("a.jpg", b"1"), ("b.jpg", b"2"), ("a.cls", b"3")])
    with pytest.raises(ShardError, match="not adjacent") as ei:
        list(shards.iter_samples(split))
    assert ei.value.key == "a"
    noext = _tar(tmp_path / "noext.tar", [("README", b"hi")])
    with pytest.raises(ShardError, match="no extension"):
        list(shards.iter_samples(noext))
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(ShardError, match="garbage.tar"):
        list(shards.iter_samples(str(garbage)))
    with pytest.raises(FileNotFoundError):
        list(shards.iter_samples(str(tmp_path / "missing.tar")))


def test_member_names_split_like_webdataset():
    assert shards.split_member_name("dir/train_00042.seg.png") == ("dir/train_00042", "seg.png")
    assert shards.split_member_name("a.jpg") == ("a", "jpg")


def test_decode_image_conversions(rng):
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(shards.decode_image(_png(rgb), "png"), rgb)
    gray = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    out = shards.decode_image(_png(gray), "png")
    assert out.shape == (5, 7, 3) and all(np.array_equal(out[..., c], gray) for c in range(3))
    rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    assert np.array_equal(shards.decode_image(_png(rgba), "png"), rgba[..., :3])  # alpha dropped
    buf = io.BytesIO()
    np.save(buf, gray)
    assert np.array_equal(shards.decode_image(buf.getvalue(), "npy")[..., 1], gray)
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ShardError, match="npy"):
        shards.decode_image(buf.getvalue(), "npy", shard="s.tar", key="k")
    jpg = io.BytesIO()
    Image.fromarray(rgb).save(jpg, format="JPEG")
    assert shards.decode_image(jpg.getvalue(), "jpg").shape == (5, 7, 3)
    with pytest.raises(ShardError) as ei:
        shards.decode_image(b"\xff\xd8 not really a jpeg", "jpg", shard="s.tar", key="k9")
    assert (ei.value.shard, ei.value.key) == ("s.tar", "k9") and "undecodable" in str(ei.value)


def test_parse_label():
    assert shards.parse_label(b"7") == 7 and shards.parse_label(b" 12\n") == 12 and shards.parse_label(3) == 3
    for bad in (b"", b"3.0", b"cat", "1e3"):
        with pytest.raises(ShardError, match="not an integer") as ei:
            shards.parse_label(bad, shard="s.tar", key="k")
        assert (ei.value.shard, ei.value.key) == ("s.tar", "k")
    with pytest.raises(ShardError, match="missing label"):
        shards.parse_label(None, shard="s.tar", key="k")


def test_encode_png_is_lossless(rng):
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    png = shards.encode_png(img)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(shards.decode_image(png, "png"), img)
    assert shards.encode_png(img) == png


def test_write_shard_roundtrip_deterministic(tmp_path, cifar10_dir):
    samples = list(shards.iter_samples(str(cifar10_dir / "test-000000.tar")))[:50]
    samples[3]["json"] = '{"a": 1}'
    a = shards.write_shard(str(tmp_path / "out" / shards.shard_name("p", 0)), samples)
    b = shards.write_shard(str(tmp_path / "out" / shards.shard_name("p", 1)), samples)
    assert a.url.endswith("p-000000.tar") and a.count == 50
    assert a.sha256 == b.sha256 == shards.sha256_file(a.url)
    back = list(shards.iter_samples(a.url))
    assert [s["__key__"] for s in back] == [s["__key__"] for s in samples]
    assert back[0]["jpg"] == samples[0]["jpg"] and back[3]["json"] == b'{"a": 1}'
    assert shards.expand(str(tmp_path / "out" / "p-{000000..000001}.tar")) == [a.url, b.url]


def test_write_shard_is_atomic(tmp_path):
    final = tmp_path / "o-000000.tar"

    def boom():
        yield {"__key__": "a", "txt": b"1"}
        raise RuntimeError("crash mid-shard")

    with pytest.raises(RuntimeError):
        shards.write_shard(str(final), boom())
    assert list(tmp_path.iterdir()) == []
    shards.write_shard(str(final), [{"__key__": "a", "txt": b"old"}])
    with pytest.raises(RuntimeError):
        shards.write_shard(str(final), boom())
    assert [s["txt"] for s in shards.iter_samples(str(final))] == [b"old"]  # previous shard untouched
    assert [p.name for p in tmp_path.iterdir()] == ["o-000000.tar"]
    with pytest.raises(ShardError, match="no __key__"):
        shards.write_shard(str(final), [{"txt": b"1"}])


def test_fsspec_and_pyarrow_filesystems(tmp_path):
    import fsspec
    import pyarrow.fs as pafs

    url = "memory://bucket/out/m-000000.tar"
    info = shards.write_shard(url, [{"__key__": "a", "cls": b"1"}, {"__key__": "b", "cls": b"2"}])
    assert shards.expand("memory://bucket/out/m-{000000..000000}.tar") == [url]
    assert [s["cls"] for s in shards.iter_samples(url)] == [b"1", b"2"]
    assert fsspec.filesystem("memory").ls("/bucket/out", detail=False) == ["/bucket/out/m-000000.tar"]
    assert info.count == 2
    path = str(tmp_path / "pa-000000.tar")
    shards.write_shard(path, [{"__key__": "a", "cls": b"1"}], filesystem=pafs.LocalFileSystem())
    assert [s["__key__"] for s in shards.iter_samples(path, filesystem=pafs.LocalFileSystem())] == ["a"]


def test_load_arrays(cifar10_dir):
    arr = shards.load_arrays(str(cifar10_dir / "test-{000000..000001}.tar"))
    assert arr.images.shape == (2000, 32, 32, 3) and arr.images.dtype == np.uint8
    assert arr.labels.dtype == np.int64 and np.bincount(arr.labels).tolist() == [200] * 10
    assert arr.keys[0] == "test_00000" and len(set(arr.keys)) == 2000
    assert arr.urls[0].endswith("test-000000.tar") and arr.urls[-1].endswith("test-000001.tar")


def test_manifest_roundtrip(tmp_path):
    assert shards.read_manifest(str(tmp_path)) is None
    url = shards.write_manifest(str(tmp_path), {"shards": [{"count": 3}], "fingerprint": "abc"})
    assert url.endswith("manifest.json")
    assert shards.read_manifest(str(tmp_path)) == {"shards": [{"count": 3}], "fingerprint": "abc"}


def test_shard_error_survives_pickling():
    e = pickle.loads(pickle.dumps(ShardError("bad", shard="s.tar", key="k")))
    assert (e.shard, e.key) == ("s.tar", "k") and str(e) == "shard 's.tar', key 'k': bad"
