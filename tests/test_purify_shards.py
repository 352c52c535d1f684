"""purify_shards: the streaming job end to end — counts, keys, pass-through, exact pixels, bad input, resume."""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from purify_pipeline import DVAE, DVAEConfig, Purifier, shards
from purify_pipeline.data.shards import ShardError
from purify_pipeline.dvae.noise import sample_ids_for_keys
from purify_pipeline.stages.purify_shards import purify_shards

JOB = {"batch_size": 64, "actors": 2, "num_cpus": 0.5, "progress": False}


def _save_untrained(path, seed: int) -> str:
    torch.manual_seed(seed)
    cfg = DVAEConfig.preset("tiny")
    Purifier(DVAE(cfg), DVAE(cfg)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A real (untrained, seeded) tiny two-stage checkpoint: the pipeline's plumbing does not need trained weights."""
    return _save_untrained(tmp_path_factory.mktemp("ckpt") / "tiny", 0)


@pytest.fixture(scope="module")
def purifier(checkpoint) -> Purifier:
    return Purifier.load(checkpoint)


def _reference(purifier: Purifier, samples: list[dict], seed: int = 0) -> np.ndarray:
    x = np.stack([shards.decode_image(s["jpg"], "jpg") for s in samples])
    y = np.array([int(s["cls"]) for s in samples])
    return purifier.purify(x, y, seed=seed, sample_ids=sample_ids_for_keys([s["__key__"] for s in samples]))


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory, cifar10_dir) -> list[list[dict]]:
    """Three 60-sample shards cut from real CIFAR-10 shards; some samples carry extra json/txt members."""
    samples = [s for _, s in zip(range(180), shards.iter_samples(str(cifar10_dir / "test-000001.tar")))]
    for i, s in enumerate(samples):
        del s["__url__"]
        if i % 3 == 0:
            s["json"] = b'{"source": "cifar", "i": %d}' % i
        if i % 5 == 0:
            s["txt"] = "caption \u00e9 %d\n" % i
    return [samples[i : i + 60] for i in range(0, 180, 60)]


def _write_inputs(d, groups: list[list[dict]]) -> str:
    d.mkdir(parents=True, exist_ok=True)
    for i, g in enumerate(groups):
        shards.write_shard(str(d / f"in-{i:06d}.tar"), g)
    return str(d / f"in-{{000000..{len(groups) - 1:06d}}}.tar")


@pytest.mark.slow
def test_real_cifar_shards_end_to_end(ray_session, tmp_path, cifar10_dir, checkpoint, purifier):
    inputs = str(cifar10_dir / "test-{000008..000009}.tar")
    summary = purify_shards(inputs, str(tmp_path / "out"), checkpoint, audit=True, **JOB)
    assert (summary.shards, summary.shards_written, summary.samples_in, summary.samples_out, summary.quarantined) == (
        2, 2, 2000, 2000, 0)  # fmt: skip
    # the audit of input and output, in the manifest and the summary (clean CIFAR-10 in: clean-like)
    assert summary.audit["input"]["verdict"] == "clean-like" and summary.audit["input"]["n_images"] == 2000
    assert summary.audit["output"]["n_images"] == 2000 and "shortcut score" in str(summary)
    assert summary.checkpoint_fingerprint == purifier.fingerprint
    outs = shards.expand(str(tmp_path / "out" / "purified-{000000..000001}.tar"))
    manifest = shards.read_manifest(str(tmp_path / "out"))
    assert manifest["complete"] and manifest["checkpoint_fingerprint"] == purifier.fingerprint
    assert manifest["audit"] == summary.audit and "seconds" not in manifest["audit"]["input"]
    assert sorted(os.listdir(tmp_path / "out")) == ["manifest.json", "purified-000000.tar", "purified-000001.tar"]
    for url_in, url_out, entry in zip(shards.expand(inputs), outs, manifest["shards"]):
        src, dst = list(shards.iter_samples(url_in)), list(shards.iter_samples(url_out))
        assert [s["__key__"] for s in dst] == [s["__key__"] for s in src]  # same samples, same order
        assert all(set(s) == {"__key__", "__url__", "cls", "png"} for s in dst)
        assert [s["cls"] for s in dst] == [s["cls"] for s in src]
        got = np.stack([shards.decode_image(s["png"], "png") for s in dst])
        np.testing.assert_array_equal(got, _reference(purifier, src))  # the pipeline adds no error
        assert entry["input"] == url_in and entry["input_count"] == entry["output_count"] == 1000
        assert entry["sha256"] == shards.sha256_file(url_out) and entry["quarantined"] == []


def test_extra_members_pass_through_byte_identical(ray_session, tmp_path, checkpoint, small_shards):
    inputs = _write_inputs(tmp_path / "in", small_shards[:2])
    purify_shards(inputs, str(tmp_path / "out"), checkpoint, prefix="p", **JOB)
    for i, group in enumerate(small_shards[:2]):
        out = {s["__key__"]: s for s in shards.iter_samples(str(tmp_path / "out" / f"p-{i:06d}.tar"))}
        assert list(out) == [s["__key__"] for s in group]
        for s in group:
            o = out[s["__key__"]]
            assert set(o) - {"__url__"} == (set(s) - {"jpg"}) | {"png"}
            for col in ("json", "txt", "cls"):
                if col in s:
                    assert o[col] == (s[col].encode() if isinstance(s[col], str) else s[col])


def test_default_pool_starts_no_actor_that_no_batch_can_reach(ray_session, tmp_path, checkpoint, small_shards,
                                                              purifier, monkeypatch):  # fmt: skip
    """Three 60-sample shards at batch 64 are three batches: the default pool (one actor per CPU, 4 in this Ray)
    shrinks to three actors (each would import torch and load the model), and the pixels do not change."""
    from purify_pipeline.stages.purify_shards import _pool_for
    from purify_pipeline.stages.purify_stage import PurifyStage

    pools = []
    real = PurifyStage.map_batches_kwargs

    def spy(self, *a, **k):
        kw = real(self, *a, **k)
        pools.append((kw["compute"].min_size, kw["compute"].max_size))
        return kw

    monkeypatch.setattr(PurifyStage, "map_batches_kwargs", spy)
    assert ray_session.cluster_resources()["CPU"] >= 4
    summary = purify_shards(_write_inputs(tmp_path / "in", small_shards), str(tmp_path / "out"), checkpoint, prefix="p",
                            batch_size=64, progress=False)  # fmt: skip
    assert pools == [(3, 3)] and summary.samples_out == 180
    for i, group in enumerate(small_shards):
        got = shards.load_arrays([str(tmp_path / "out" / f"p-{i:06d}.tar")], progress=False).images
        assert np.array_equal(got, _reference(purifier, group))
    stage = PurifyStage(checkpoint)
    assert [_pool_for(stage, b, 16.0, None) for b in (0, 3, 40)] == [1, 3, 16]
    assert _pool_for(PurifyStage(checkpoint, actors=(1, 8)), 2, 16.0, None) == (1, 8)  # an explicit pool is the user's


def _bad_group(good: list[dict], rng) -> tuple[list[dict], dict[str, str]]:
    """Good samples with one of each bad kind mixed in, plus gray/RGBA images that are converted, not rejected."""
    g = [dict(s) for s in good[:12]]
    g[1]["jpg"] = b"\xff\xd8 not a jpeg"
    del g[3]["cls"]
    g[4]["cls"] = b"3.5"
    g[6]["cls"] = b"10"
    g[8]["jpg"] = _png(np.zeros((24, 24, 3), np.uint8))
    g[9]["jpg"] = _png(rng.integers(0, 256, (32, 32), dtype=np.uint8))  # grayscale: converted
    g[10]["jpg"] = _png(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8))  # RGBA: converted
    expected = {g[1]["__key__"]: "undecodable", g[3]["__key__"]: "missing label", g[4]["__key__"]: "not an integer",
                g[6]["__key__"]: "outside the checkpoint's classes", g[8]["__key__"]: "24x24"}  # fmt: skip
    return g, expected


def test_bad_input_quarantined_with_skip(ray_session, tmp_path, checkpoint, small_shards, rng):
    bad, expected = _bad_group(small_shards[0], rng)
    inputs = _write_inputs(tmp_path / "in", [bad, small_shards[1]])
    truncated = tmp_path / "in" / "in-000002.tar"  # a third shard, cut in the middle of a sample
    shards.write_shard(str(truncated), small_shards[2][:10])
    raw = truncated.read_bytes()
    truncated.write_bytes(raw[: len(raw) // 2])
    summary = purify_shards(str(tmp_path / "in" / "in-*.tar"), str(tmp_path / "out"), checkpoint, on_error="skip", **JOB)
    manifest = shards.read_manifest(str(tmp_path / "out"))
    e0, e1, e2 = manifest["shards"]
    got = {q["key"]: q["error"] for q in e0["quarantined"]}
    assert set(got) == set(expected)
    for key, msg in expected.items():
        assert msg in got[key] and key in got[key] and "in-000000.tar" in got[key]
    out0 = [s["__key__"] for s in shards.iter_samples(str(tmp_path / "out" / "purified-000000.tar"))]
    assert out0 == [s["__key__"] for s in bad if s["__key__"] not in expected]  # gray + RGBA kept
    assert (e1["input_count"], e1["output_count"], e1["quarantined"]) == (60, 60, [])
    assert len(e2["quarantined"]) == 1 and "truncated" in e2["quarantined"][0]["error"]
    assert e2["output_count"] >= 1
    for e in manifest["shards"]:  # input = output + quarantined, always
        assert e["input_count"] == e["output_count"] + len(e["quarantined"])
    assert summary.samples_in == summary.samples_out + summary.quarantined
    assert summary.quarantined == len(expected) + 1


@pytest.mark.parametrize("kind", ["undecodable", "missing label", "not an integer", "outside", "24x24", "truncated"])
def test_bad_input_raises_naming_shard_and_key(ray_session, tmp_path, checkpoint, small_shards, rng, kind):
    bad, expected = _bad_group(small_shards[0], rng)
    if kind == "truncated":
        url = str(tmp_path / "in" / "in-000000.tar")
        (tmp_path / "in").mkdir()
        shards.write_shard(url, small_shards[1][:10])
        raw = open(url, "rb").read()
        open(url, "wb").write(raw[: len(raw) // 2])
        key = None
    else:
        key = next(k for k, m in expected.items() if kind in m)
        url = _write_inputs(tmp_path / "in", [[s for s in bad if s["__key__"] == key or s["__key__"] not in expected]])
        url = shards.expand(url)[0]
    with pytest.raises(ShardError, match=kind) as ei:
        purify_shards(url, str(tmp_path / "out"), checkpoint, **JOB)
    assert ei.value.shard == url and url in str(ei.value)
    assert ei.value.key is not None and (key is None or ei.value.key == key)
    assert not [p for p in os.listdir(tmp_path / "out") if p.endswith(".tar")]


def test_interrupted_then_resumed_equals_uninterrupted(ray_session, tmp_path, checkpoint, small_shards):
    inputs = _write_inputs(tmp_path / "in", small_shards)
    full = purify_shards(inputs, str(tmp_path / "full"), checkpoint, **JOB)
    assert full.shards_written == 3

    class Interrupt(KeyboardInterrupt):
        pass

    def stop(entry):
        raise Interrupt  # as if the user pressed Ctrl-C right after the first shard was written

    out = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        purify_shards(inputs, str(out), checkpoint, write_threads=1, on_shard_written=stop, **JOB)
    first = shards.read_manifest(str(out))
    assert len(first["shards"]) == 1 and not first["complete"]
    done = first["shards"][0]["output"]
    stamp = os.stat(out / done).st_mtime_ns
    (out / "purified-000002.tar.tmp-0123456789ab").write_bytes(b"half a shard from a crash")
    resumed = purify_shards(inputs, str(out), checkpoint, **JOB)
    assert (resumed.shards_resumed, resumed.shards_written) == (1, 2)
    assert os.stat(out / done).st_mtime_ns == stamp  # the finished shard was not redone
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "full"))  # crash leftovers cleaned
    a, b = shards.read_manifest(str(tmp_path / "full")), shards.read_manifest(str(out))
    assert [e["sha256"] for e in a["shards"]] == [e["sha256"] for e in b["shards"]]
    for name in os.listdir(out):
        if name.endswith(".tar"):
            assert (out / name).read_bytes() == (tmp_path / "full" / name).read_bytes()
    # a finished run is a no-op; a damaged output shard is detected by its sha256 and redone
    assert purify_shards(inputs, str(out), checkpoint, **JOB).shards_written == 0
    (out / "purified-000001.tar").write_bytes(b"corrupted")
    again = purify_shards(inputs, str(out), checkpoint, **JOB)
    assert (again.shards_written, again.shards_resumed) == (1, 2)
    assert (out / "purified-000001.tar").read_bytes() == (tmp_path / "full" / "purified-000001.tar").read_bytes()


def test_output_of_another_checkpoint_is_not_mixed(ray_session, tmp_path, checkpoint, small_shards):
    inputs = _write_inputs(tmp_path / "in", small_shards[:1])
    purify_shards(inputs, str(tmp_path / "out"), checkpoint, **JOB)
    other = _save_untrained(tmp_path / "other", 1)
    with pytest.raises(ValueError, match="another checkpoint"):
        purify_shards(inputs, str(tmp_path / "out"), other, **JOB)
    assert purify_shards(inputs, str(tmp_path / "out"), other, overwrite=True, **JOB).shards_written == 1


def test_an_output_the_audit_still_finds_poisoned_is_announced(ray_session, tmp_path, checkpoint, small_shards,
                                                                monkeypatch):
    from purify_pipeline.stages import purify_shards as ps

    scores = iter([0.84, 0.72])  # input, then output: a poison that passed through the purifier (CUDA-like)
    monkeypatch.setattr(ps, "_audit_record", lambda urls, seed, so: {"score": (s := next(scores)),
                        "verdict": "poisoned" if s > 0.53 else "clean-like", "n_images": 120})  # fmt: skip
    inputs = _write_inputs(tmp_path / "in", small_shards[:2])
    with pytest.warns(ps.StillPoisonedWarning, match=r"out: the purified output still scores as poisoned .*0\.840 -> 0\.720"):
        summary = purify_shards(inputs, str(tmp_path / "out"), checkpoint, audit=True, **JOB)
    assert summary.audit["output"]["verdict"] == "poisoned" and summary.samples_out == 120
    # a purified output the audit finds clean-like says nothing more than its summary
    scores = iter([0.84, 0.36])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ps.StillPoisonedWarning)
        purify_shards(inputs, str(tmp_path / "out2"), checkpoint, audit=True, **JOB)
