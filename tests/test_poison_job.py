"""The shard-to-shard poisoning job (Ray Data) on small real CIFAR-10 shards."""
from __future__ import annotations

import numpy as np
import pytest

from purify_pipeline import poisons, shards


def _write_small_shards(cifar10_dir, dest, n_per_shard=60, bad_label_key=None):
    """Two shards of real CIFAR-10 samples (JPEG + cls) plus an extra `.txt` member to pass through."""
    dest.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        src = str(cifar10_dir / f"train-{i:06d}.tar")
        samples = []
        for j, s in enumerate(shards.iter_samples(src)):
            if j == n_per_shard:
                break
            cls = b"12" if s["__key__"] == bad_label_key else s["cls"]
            samples.append({"__key__": s["__key__"], "jpg": s["jpg"], "cls": cls, "txt": f"note {s['__key__']}"})
        shards.write_shard(str(dest / f"train-{i:06d}.tar"), samples)
    return sorted(str(p) for p in dest.glob("*.tar"))


@pytest.fixture(scope="module")
def small_shards(cifar10_dir, tmp_path_factory):
    return _write_small_shards(cifar10_dir, tmp_path_factory.mktemp("clean"))


@pytest.mark.parametrize("name", ["lsp", "ops"])
def test_job_writes_poisoned_png_shards_and_manifest(ray_session, small_shards, tmp_path, name):
    out = tmp_path / "out"
    manifest = poisons.poison_shards(small_shards, str(out), name, seed=0, num_classes=10, progress=False)

    names = sorted(p.name for p in out.glob("*.tar"))
    assert names == ["train-000000.tar", "train-000001.tar"]
    assert shards.read_manifest(str(out)) == manifest
    assert manifest["poison"] == name and manifest["seed"] == 0 and manifest["num_classes"] == 10
    assert manifest["counts"]["samples"] == 120 and manifest["counts"]["shards"] == 2
    assert manifest["classes"] == [str(c) for c in range(10)]  # no input manifest: the label indices
    assert sum(manifest["counts"]["per_class"]) == 120
    if name == "lsp":
        assert manifest["budget"]["l2"] == pytest.approx(np.sqrt(3072) * 6 / 255)

    clean = shards.load_arrays(small_shards, progress=False)
    expected = poisons.fit(name, clean.images, clean.labels, num_classes=10, seed=0, sample_ids=clean.keys).apply(
        clean.images, clean.labels, sample_ids=clean.keys)
    got_images, got_keys = [], []
    for entry, src in zip(manifest["shards"], small_shards):
        assert entry["sha256"] == shards.sha256_file(entry["url"])
        assert entry["input"] == src and entry["count"] == 60
        src_samples = list(shards.iter_samples(src))
        out_samples = list(shards.iter_samples(entry["url"]))
        assert [s["__key__"] for s in out_samples] == [s["__key__"] for s in src_samples]
        for a, b in zip(src_samples, out_samples):
            assert set(b) - {"__url__", "__key__"} == {"png", "cls", "txt"}  # jpg replaced by lossless png
            assert b["cls"] == a["cls"] and b["txt"] == a["txt"]  # other members byte-identical
            got_images.append(shards.decode_image(b["png"], "png"))
            got_keys.append(b["__key__"])
    assert got_keys == clean.keys
    assert np.array_equal(np.stack(got_images), expected)  # stored losslessly, same bytes as the library


def test_job_is_deterministic_and_seed_dependent(ray_session, small_shards, tmp_path):
    a = poisons.poison_shards(small_shards, str(tmp_path / "a"), "ar", seed=1, num_classes=10, progress=False)
    b = poisons.poison_shards(small_shards, str(tmp_path / "b"), "ar", seed=1, num_classes=10, num_actors=1,
                              progress=False)
    c = poisons.poison_shards(small_shards, str(tmp_path / "c"), "ar", seed=2, num_classes=10, progress=False)
    assert [e["sha256"] for e in a["shards"]] == [e["sha256"] for e in b["shards"]]
    assert [e["sha256"] for e in a["shards"]] != [e["sha256"] for e in c["shards"]]


def test_job_reads_num_classes_from_the_input_manifest(ray_session, small_shards, tmp_path):
    shards.write_manifest(str(tmp_path / "in"), {"classes": [f"c{i}" for i in range(10)]})
    ins = _write_small_shards_copy(small_shards, tmp_path / "in")
    m = poisons.poison_shards(ins, str(tmp_path / "out"), "classwise", seed=0, prefix="cw", progress=False)
    assert m["num_classes"] == 10
    assert m["classes"] == [f"c{i}" for i in range(10)]  # the input's class names are carried over
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["cw-000000.tar", "cw-000001.tar"]
    with pytest.raises(ValueError, match="num_classes=3 but 10 class names"):
        poisons.poison_shards(ins, str(tmp_path / "y"), "lsp", seed=0, num_classes=3, classes=list("abcdefghij"),
                              progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="num_classes is needed"):
        poisons.poison_shards(small_shards, str(tmp_path / "x"), "lsp", seed=0, progress=False)


def _write_small_shards_copy(urls, dest):
    out = []
    for i, u in enumerate(urls):
        target = str(dest / f"train-{i:06d}.tar")
        shards.write_shard(target, ({k: v for k, v in s.items() if k != "__url__"} for s in shards.iter_samples(u)))
        out.append(target)
    return out


def test_job_names_shard_and_key_on_a_bad_label(ray_session, cifar10_dir, tmp_path):
    urls = _write_small_shards(cifar10_dir, tmp_path / "bad", n_per_shard=5, bad_label_key="train_01003")
    with pytest.raises(Exception) as err:
        poisons.poison_shards(urls, str(tmp_path / "out"), "random", seed=0, num_classes=10, progress=False)
    msg = str(err.value)
    assert "train-000001.tar" in msg and "train_01003" in msg and "label 12" in msg
    assert not list((tmp_path / "out").glob("train-000001.tar"))  # nothing half-written under the final name
