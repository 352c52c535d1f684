"""PurifyStage / PurifyBatch: exact equality with Purifier.purify, pass-through columns, bad input per row."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from purify_pipeline import Purifier, shards
from purify_pipeline.data.shards import ShardError
from purify_pipeline.dvae.noise import sample_ids_for_keys
from purify_pipeline.stages.purify_stage import PurifyBatch, PurifyStage

N = 120  # samples of one CIFAR-10 shard used here (keeps the tiny model's CPU time to seconds)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> str:
    return tiny_checkpoint


@pytest.fixture(scope="module")
def purifier(checkpoint) -> Purifier:
    return Purifier.load(checkpoint)


@pytest.fixture(scope="module")
def cifar_samples(cifar10_dir) -> list[dict]:
    url = str(cifar10_dir / "test-000000.tar")
    return [s for _, s in zip(range(N), shards.iter_samples(url))]


def _batch(samples: list[dict], readonly: bool = True) -> dict[str, np.ndarray]:
    """A numpy batch as Ray Data hands it to a UDF (object columns, read-only buffers)."""
    out = {}
    for c in samples[0]:
        col = np.empty(len(samples), dtype=object)
        col[:] = [s.get(c) for s in samples]
        col.flags.writeable = not readonly
        out[c] = col
    return out


def _reference(purifier: Purifier, samples: list[dict], seed: int = 0, mode: str = "sample") -> np.ndarray:
    x = np.stack([shards.decode_image(s["jpg"], "jpg") for s in samples])
    y = np.array([int(s["cls"]) for s in samples])
    return purifier.purify(x, y, mode=mode, seed=seed, sample_ids=sample_ids_for_keys([s["__key__"] for s in samples]))


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _decode_all(col) -> np.ndarray:
    return np.stack([shards.decode_image(v, "png") for v in col])


def test_udf_equals_purifier_and_passes_columns_through(checkpoint, purifier, cifar_samples):
    samples = [dict(s, json=b'{"i": %d}' % i) for i, s in enumerate(cifar_samples)]
    batch = _batch(samples)
    out = PurifyBatch(checkpoint)(batch)
    assert set(out) == {"__key__", "__url__", "cls", "json", "png"}  # jpg replaced by lossless png
    assert list(out["__key__"]) == [s["__key__"] for s in samples]
    assert list(out["cls"]) == [s["cls"] for s in samples] and list(out["json"]) == [s["json"] for s in samples]
    ref = _reference(purifier, samples)
    np.testing.assert_array_equal(_decode_all(out["png"]), ref)
    # the seed matters (so the comparison above can fail), and batching does not
    other = PurifyBatch(checkpoint, seed=1)(_batch(samples[:10]))
    assert not np.array_equal(_decode_all(other["png"]), ref[:10])
    split = PurifyBatch(checkpoint)
    parts = [split(_batch(samples[i : i + 7])) for i in range(0, 21, 7)]
    np.testing.assert_array_equal(np.concatenate([_decode_all(p["png"]) for p in parts]), ref[:21])


@pytest.mark.parametrize("mode", ["sample", "mean"])
def test_accelerator_path_matches_purify(checkpoint, purifier, cifar_samples, mode):
    """The GPU code path (uint8 moved once, converted on the device, fused passes) run on the CPU device."""
    samples = cifar_samples[:24]
    x = np.stack([shards.decode_image(s["jpg"], "jpg") for s in samples])
    y = np.array([int(s["cls"]) for s in samples])
    ids = sample_ids_for_keys([s["__key__"] for s in samples])
    udf = PurifyBatch(checkpoint, mode=mode, model_batch_size=10)
    np.testing.assert_array_equal(udf._purify_accelerator(x, y, ids), _reference(purifier, samples, mode=mode))


def test_udf_mean_mode_and_array_output(checkpoint, purifier, cifar_samples):
    samples = cifar_samples[:16]
    decoded = {
        "__key__": np.array([s["__key__"] for s in samples], dtype=object),
        "jpg": np.stack([shards.decode_image(s["jpg"], "jpg") for s in samples]),  # read_webdataset's default decoder
        "cls": np.array([int(s["cls"]) for s in samples]),
    }
    decoded["jpg"].flags.writeable = False
    out = PurifyBatch(checkpoint, mode="mean", output_format="array")(decoded)
    assert out["jpg"].dtype == np.uint8 and out["jpg"].shape == (16, 32, 32, 3)
    np.testing.assert_array_equal(out["jpg"], _reference(purifier, samples, mode="mean"))


def test_image_column_autodetect_and_conversions(checkpoint, purifier, rng):
    rgb = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    gray = rgb[0, :, :, 0]
    rgba = np.concatenate([rgb[1], np.full((32, 32, 1), 7, np.uint8)], axis=2)
    buf = io.BytesIO()
    np.save(buf, rgb[2])
    samples = [
        {"__key__": "g", "png": _png(gray), "cls": b"1"},
        {"__key__": "a", "png": _png(rgba), "cls": b"2"},
        {"__key__": "n", "png": _png(rgb[2]), "cls": b"3"},
    ]
    out = PurifyBatch(checkpoint)(_batch(samples))
    expect_in = np.stack([np.repeat(gray[:, :, None], 3, axis=2), rgb[1], rgb[2]])
    ref = purifier.purify(expect_in, np.array([1, 2, 3]), sample_ids=sample_ids_for_keys(["g", "a", "n"]))
    np.testing.assert_array_equal(_decode_all(out["png"]), ref)
    npy = PurifyBatch(checkpoint)(_batch([{"__key__": "n", "npy": buf.getvalue(), "cls": b"3"}]))
    np.testing.assert_array_equal(_decode_all(npy["png"]), ref[2:])
    with pytest.raises(ShardError, match="no image member"):
        PurifyBatch(checkpoint)(_batch([{"__key__": "x", "__url__": "s.tar", "txt": b"hi", "cls": b"1"}]))


def _bad_samples(good: dict) -> dict[str, tuple[dict, str]]:
    small = np.zeros((16, 16, 3), np.uint8)
    return {
        "undecodable": (dict(good, __key__="bad_img", jpg=b"\xff\xd8garbage"), "undecodable"),
        "missing_label": ({k: v for k, v in good.items() if k != "cls"} | {"__key__": "no_cls"}, "missing label"),
        "non_integer_label": (dict(good, __key__="str_cls", cls=b"cat"), "not an integer"),
        "label_out_of_range": (dict(good, __key__="big_cls", cls=b"10"), "outside the checkpoint's classes"),
        "wrong_size": (dict(good, __key__="small", jpg=_png(small)), "16x16"),
    }


@pytest.mark.parametrize("kind", ["undecodable", "missing_label", "non_integer_label", "label_out_of_range", "wrong_size"])
def test_bad_row_raises_naming_shard_and_key(checkpoint, cifar_samples, kind):
    bad, msg = _bad_samples(cifar_samples[0])[kind]
    rows = [cifar_samples[1], bad, cifar_samples[2]]
    with pytest.raises(ShardError, match=msg) as ei:
        PurifyBatch(checkpoint)(_batch(rows))
    assert ei.value.key == bad["__key__"] and ei.value.shard == bad["__url__"]
    assert bad["__url__"] in str(ei.value) and repr(bad["__key__"]) in str(ei.value)


def test_bad_rows_skipped_or_quarantined(checkpoint, purifier, cifar_samples):
    bad = _bad_samples(cifar_samples[0])
    rows = [cifar_samples[1]] + [b for b, _ in bad.values()] + [cifar_samples[2]]
    dropped = PurifyBatch(checkpoint, on_error="skip")(_batch(rows))
    assert list(dropped["__key__"]) == [cifar_samples[1]["__key__"], cifar_samples[2]["__key__"]]
    np.testing.assert_array_equal(_decode_all(dropped["png"]), _reference(purifier, [cifar_samples[1], cifar_samples[2]]))
    kept = PurifyBatch(checkpoint, on_error="skip", quarantine_column="__error__")(_batch(rows))
    assert len(kept["__key__"]) == len(rows)  # one row out per row in
    errs = dict(zip(kept["__key__"], kept["__error__"]))
    assert errs[cifar_samples[1]["__key__"]] == "" and errs[cifar_samples[2]["__key__"]] == ""
    for sample, msg in bad.values():
        assert msg in errs[sample["__key__"]] and sample["__url__"] in errs[sample["__key__"]]
    assert [len(v) == 0 for v in kept["png"]] == [False] + [True] * len(bad) + [False]


def test_resize_option(checkpoint, purifier, rng):
    big = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    sample = {"__key__": "big", "png": _png(big), "cls": b"4"}
    with pytest.raises(ShardError, match="48x40"):
        PurifyBatch(checkpoint)(_batch([sample]))
    out = PurifyBatch(checkpoint, resize="bilinear")(_batch([sample]))
    resized = np.asarray(Image.fromarray(big).resize((32, 32), Image.Resampling.BILINEAR))
    ref = purifier.purify(resized[None], np.array([4]), sample_ids=sample_ids_for_keys(["big"]))
    np.testing.assert_array_equal(_decode_all(out["png"]), ref)


def test_stage_rejects_objects_and_bad_options(checkpoint, purifier):
    with pytest.raises(TypeError, match="path"):
        PurifyStage(purifier)
    with pytest.raises(ValueError, match="mode"):
        PurifyStage(checkpoint, mode="median")
    with pytest.raises(ValueError, match="on_error"):
        PurifyStage(checkpoint, on_error="ignore")
    kw = PurifyStage(checkpoint, batch_size=32, actors=2, num_cpus=0.5).map_batches_kwargs()
    assert kw["batch_size"] == 32 and kw["num_cpus"] == 0.5 and kw["udf_modifying_row_count"] is False
    assert PurifyStage(checkpoint, on_error="skip").map_batches_kwargs()["udf_modifying_row_count"] is True


def test_stage_on_ray_dataset(ray_session, checkpoint, purifier, cifar10_dir, cifar_samples):
    import ray

    url = str(cifar10_dir / "test-000000.tar")
    ds = ray.data.read_webdataset(url, decoder=None).limit(N)
    rows = PurifyStage(checkpoint, batch_size=32, actors=2, num_cpus=0.5)(ds).take_all()
    by_key = {r["__key__"]: r for r in rows}
    assert len(rows) == N and set(by_key) == {s["__key__"] for s in cifar_samples}
    assert all(by_key[s["__key__"]]["cls"] == s["cls"] for s in cifar_samples)
    got = np.stack([shards.decode_image(by_key[s["__key__"]]["png"], "png") for s in cifar_samples])
    np.testing.assert_array_equal(got, _reference(purifier, cifar_samples))
    # the UDF class directly, with Ray's own decoder (arrays + int labels) and array output
    ds2 = ray.data.read_webdataset(url).limit(40)
    out = ds2.map_batches(PurifyBatch, fn_constructor_kwargs={"checkpoint": checkpoint, "output_format": "array"},
                          batch_size=16, batch_format="numpy", num_cpus=0.5,
                          compute=ray.data.ActorPoolStrategy(size=1)).take_all()  # fmt: skip
    by_key2 = {r["__key__"]: r["jpg"] for r in out}
    np.testing.assert_array_equal(np.stack([by_key2[s["__key__"]] for s in cifar_samples[:40]]),
                                  _reference(purifier, cifar_samples[:40]))  # fmt: skip


def test_stage_error_on_ray_names_shard_and_key(ray_session, checkpoint, cifar_samples):
    import ray

    rows = [dict(s) for s in cifar_samples[:8]]
    rows[5]["cls"] = b"99"
    ds = ray.data.from_items(rows)
    with pytest.raises(ShardError) as ei:  # not Ray Data's UserCodeException wrapper: the user's except works
        PurifyStage(checkpoint, batch_size=4, num_cpus=0.5)(ds).take_all()
    assert ei.value.key == rows[5]["__key__"] and ei.value.shard == rows[5]["__url__"]
    assert "outside the checkpoint's classes" in str(ei.value)


def test_skipped_rows_are_logged(checkpoint, cifar_samples, caplog):
    rows = [dict(s) for s in cifar_samples[:3]]
    rows[1]["cls"] = b"99"
    with caplog.at_level("WARNING", logger="purify_pipeline.stages.purify_stage"):
        out = PurifyBatch(checkpoint, on_error="skip")(_batch(rows))
    assert len(out["__key__"]) == 2
    assert [r.getMessage() for r in caplog.records if rows[1]["__key__"] in r.getMessage()], caplog.text
