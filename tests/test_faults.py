"""Fault injection for the shard jobs: every bad input a real dataset has, in raise and skip mode.

Each fault is built as its own small tar from real CIFAR-10 samples. Skip mode must account for every sample
group of every tar (N in = N out + N quarantined, exact per shard), keep the quarantined samples' original
members byte for byte in ``quarantine/``, and write byte-identical manifests on identical runs; raise mode
must stop with one error naming shard and key. The output-directory tests check that no run, refused or
successful, deletes or overwrites a file the job did not write.
"""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image
from test_purify_shards import JOB, _png, _save_untrained

from purify_pipeline import Purifier, poisons, shards
from purify_pipeline.data.shards import ShardError
from purify_pipeline.dvae.noise import sample_ids_for_keys
from purify_pipeline.stages.purify_shards import purify_shards


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return _save_untrained(tmp_path_factory.mktemp("ckpt") / "tiny", 0)


@pytest.fixture(scope="module")
def base(cifar10_dir) -> list[dict]:
    """80 real samples (jpg + cls) with keys not used by other test modules."""
    it = shards.iter_samples(str(cifar10_dir / "test-000002.tar"))
    return [{k: v for k, v in s.items() if k != "__url__"} for _, s in zip(range(80), it)]


def _encode(img: np.ndarray, fmt: str) -> bytes:
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, img, allow_pickle=False)
        return buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt.upper(), **({"lossless": True} if fmt == "webp" else {}))
    return buf.getvalue()


def _groups(samples: list[dict]) -> list[list[tuple[str, bytes]]]:
    return [[(f"{s['__key__']}.{c}", v) for c, v in s.items() if not c.startswith("__")] for s in samples]


def _mixed(base: list[dict]) -> list[dict]:
    """jpg / png / webp / npy samples in one shard (what `convert` writes from a mixed ImageFolder)."""
    out = []
    for i, s in enumerate(base[:12]):
        fmt = ("jpg", "png", "webp", "npy")[i % 4]
        img = shards.decode_image(s["jpg"], "jpg")
        out.append({"__key__": s["__key__"], fmt: s["jpg"] if fmt == "jpg" else _encode(img, fmt), "cls": s["cls"]})
    return out


def build_faults(base: list[dict], rng: np.random.Generator) -> dict[str, tuple[list, tuple[int, int, int], dict]]:
    """name -> (tar groups or raw bytes, expected (in, out, quarantined), {quarantined key: reason fragment})."""
    f: dict[str, tuple[list, tuple[int, int, int], dict]] = {}
    f["a-mixed"] = (_groups(_mixed(base)), (12, 12, 0), {})
    g = _groups(base[12:32])  # 20 good samples and a member without an extension after the 6th
    f["b-noext"] = (g[:6] + [[("README", b"not a sample")]] + g[6:], (21, 20, 1), {"README": "has no extension"})
    bad = [dict(s) for s in base[32:44]]
    bad[0]["jpg"] = b"\xff\xd8 not a jpeg"
    del bad[1]["cls"]
    bad[2]["cls"] = b"10"
    bad[3]["cls"] = b"3.5"
    bad[4]["jpg"] = _png(np.zeros((24, 24, 3), np.uint8))
    bad[5]["jpg"] = _png(rng.integers(0, 256, (32, 32), dtype=np.uint8))  # grayscale: converted, kept
    bad[6]["jpg"] = _png(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8))  # RGBA: converted, kept
    g = _groups(bad)
    g[7].append((f"{bad[7]['__key__']}.cls", b"1"))  # a duplicated member
    split = [g[8][0]], [g[8][1]]  # sample 8's .cls comes after sample 9: both parts are bad
    g = g[:8] + [split[0], g[9], split[1]] + g[10:]
    keys = [s["__key__"] for s in bad]
    f["c-bad"] = (g, (13, 5, 8), {keys[0]: "undecodable", keys[1]: "missing label", keys[2]: "outside the checkpoint",
                                  keys[3]: "not an integer", keys[4]: "24x24", keys[7]: "duplicate member",
                                  keys[8]: "not adjacent"})  # fmt: skip
    f["d-truncated"] = (_groups(base[44:54]), (7, 6, 1), {base[50]["__key__"]: "truncated"})  # cut inside sample 6
    f["e-empty"] = ([], (1, 0, 1), {"<after 0 samples>": "truncated or corrupt"})  # a 0-byte file
    dup = [dict(s) for s in base[54:59]]
    dup[1]["__key__"] = base[0]["__key__"]  # the key of a sample of a-mixed
    f["f-dupkey"] = (_groups(dup), (5, 4, 1), {base[0]["__key__"]: "duplicate key"})
    return f


def write_faults(d, faults: dict, names: list[str] | None = None) -> list[str]:
    d.mkdir(parents=True, exist_ok=True)
    urls = []
    for name in names or sorted(faults):
        url = str(d / f"{name}.tar")
        groups = faults[name][0]
        if name.startswith("e-empty"):
            open(url, "wb").close()
        else:
            shards.write_members(url, groups)
        if name.startswith("d-truncated"):
            with tarfile.open(url) as tf:
                m = [m for m in tf.getmembers() if m.name.endswith(".jpg")][6]
            raw = open(url, "rb").read()
            open(url, "wb").write(raw[: m.offset_data + m.size // 2])
        urls.append(url)
    return urls


def _input_members(url: str) -> dict[str, list[bytes]]:
    """Member name -> bytes as stored in an input tar, read with plain tarfile up to any damage."""
    out: dict[str, list[bytes]] = {}
    try:
        with tarfile.open(url, mode="r|*") as tf:
            for m in tf:
                out.setdefault(m.name, []).append(tf.extractfile(m).read())
    except (tarfile.TarError, EOFError):
        pass
    return out


@pytest.fixture(scope="module")
def faults(base) -> dict:
    return build_faults(base, np.random.default_rng(0))


def test_every_fault_is_accounted_for_and_kept_with_skip(ray_session, tmp_path, checkpoint, base, faults):
    urls = write_faults(tmp_path / "in", faults)
    summary = purify_shards(urls, str(tmp_path / "out"), checkpoint, on_error="skip", **JOB)
    raw = (tmp_path / "out" / "manifest.json").read_bytes()
    manifest = json.loads(raw)
    assert manifest["complete"] and len(manifest["shards"]) == len(faults)
    for entry, name in zip(manifest["shards"], sorted(faults)):
        _, (n_in, n_out, n_q), reasons = faults[name]
        assert (entry["input_count"], entry["output_count"], len(entry["quarantined"])) == (n_in, n_out, n_q), name
        got = {q["key"]: q["error"] for q in entry["quarantined"]}
        assert set(got) == set(reasons), name
        for key, frag in reasons.items():
            assert frag in got[key] and entry["input"] in got[key], (name, got[key])
        out = list(shards.iter_samples(str(tmp_path / "out" / entry["output"])))
        assert len(out) == n_out and all(set(s) == {"__key__", "__url__", "png", "cls"} for s in out), name
        if n_q:  # the quarantine shard holds every quarantined sample's original members, byte for byte
            original = _input_members(entry["input"])
            with tarfile.open(str(tmp_path / "out" / entry["quarantine"])) as tf:
                members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
            reasons_found = [json.loads(v) for k, v in members.items() if k.endswith(".quarantine.json")]
            assert sorted(r["key"] for r in reasons_found) == sorted(q["key"] for q in entry["quarantined"])
            for k, v in members.items():
                if not k.endswith(".quarantine.json"):
                    assert v in original[k.split("/", 1)[1]], (name, k)
            if name == "b-noext":
                assert members["000006/README"] == b"not a sample"
    assert summary.samples_in == summary.samples_out + summary.quarantined == sum(f[1][0] for f in faults.values())
    assert b" at 0x" not in raw  # no object reprs: messages are the same on every run
    # identical runs (another actor count) write identical bytes: manifest, shards, quarantine shards
    purify_shards(urls, str(tmp_path / "again"), checkpoint, on_error="skip", **{**JOB, "actors": 1})
    for root, _, files in os.walk(tmp_path / "out"):
        for fn in files:
            rel = os.path.relpath(os.path.join(root, fn), tmp_path / "out")
            assert (tmp_path / "again" / rel).read_bytes() == (tmp_path / "out" / rel).read_bytes(), rel


def test_mixed_formats_purify_per_sample(ray_session, tmp_path, checkpoint, base, faults):
    urls = write_faults(tmp_path / "in", faults, ["a-mixed"])
    summary = purify_shards(urls, str(tmp_path / "out"), checkpoint, **{**JOB, "batch_size": 12})  # one batch
    assert (summary.samples_in, summary.samples_out, summary.quarantined) == (12, 12, 0)
    src = list(shards.iter_samples(urls[0]))
    got = list(shards.iter_samples(str(tmp_path / "out" / "purified-000000.tar")))
    assert [s["__key__"] for s in got] == [s["__key__"] for s in src]
    assert all(set(s) == {"__key__", "__url__", "png", "cls"} for s in got)  # the source member is replaced
    x = np.stack([shards.decode_image(s[shards.find_image_column(s)], shards.find_image_column(s)) for s in src])
    y = np.array([int(s["cls"]) for s in src])
    ref = Purifier.load(checkpoint).purify(x, y, seed=0, sample_ids=sample_ids_for_keys([s["__key__"] for s in src]))
    np.testing.assert_array_equal(np.stack([shards.decode_image(s["png"], "png") for s in got]), ref)
    with pytest.raises(ShardError, match=r"missing image \(.webp\)|no .webp member"):  # a named column is required on every sample
        purify_shards(urls, str(tmp_path / "named"), checkpoint, image_column="webp", **JOB)


@pytest.mark.parametrize("name", ["b-noext", "c-bad", "d-truncated", "e-empty", "f-dupkey"])
def test_every_fault_raises_naming_shard_and_key(ray_session, tmp_path, checkpoint, faults, name):
    urls = write_faults(tmp_path / "in", faults, ["a-mixed", name] if name == "f-dupkey" else [name])
    reasons = faults[name][2]
    with pytest.raises(ShardError) as ei:
        purify_shards(urls, str(tmp_path / "out"), checkpoint, **JOB)
    msg = str(ei.value)
    assert urls[-1] in msg and len(msg.splitlines()) == 1
    if name == "e-empty":
        assert "truncated or corrupt" in msg
    else:  # the first bad sample of the shard, named with its reason
        assert ei.value.key in reasons and reasons[ei.value.key] in msg
    assert os.listdir(tmp_path / "out") == []  # a first run that wrote no shard leaves the directory as it was


def test_user_files_survive_every_refused_or_successful_run(ray_session, tmp_path, checkpoint, base):
    ins = tmp_path / "in"
    urls = [str(ins / f"in-{i:06d}.tar") for i in range(3)]
    ins.mkdir()
    for i, u in enumerate(urls):
        shards.write_shard(u, base[60 + 5 * i : 65 + 5 * i])
    out = tmp_path / "out"
    out.mkdir()
    user = {"report.tmp-final.txt": b"mine", "notes.txt": b"also mine", "purified-000000.tar": b"my own tar",
            "purified-000001.tar.tmp-final": b"mine too"}  # fmt: skip
    for n, b in user.items():
        (out / n).write_bytes(b)

    def intact():
        for n, b in user.items():
            assert (out / n).read_bytes() == b, n

    with pytest.raises(ValueError, match="purified-000000.tar, which this job would overwrite"):
        purify_shards(urls, str(out), checkpoint, **JOB)  # no manifest: a resume is refused, nothing deleted
    intact()
    with pytest.raises(ValueError, match="would overwrite"):
        purify_shards(urls, str(out), checkpoint, overwrite=True, **JOB)
    intact()
    del user["purified-000000.tar"]
    os.remove(out / "purified-000000.tar")
    assert purify_shards(urls, str(out), checkpoint, **JOB).shards_written == 3
    intact()
    (out / "purified-000002.tar.tmp-0123456789ab").write_bytes(b"a crashed write of the job")
    fewer = purify_shards(urls[:2], str(out), checkpoint, **JOB)  # resume with fewer inputs
    assert (fewer.shards_resumed, fewer.shards_written) == (2, 0)
    names = sorted(os.listdir(out))
    assert names == sorted(["manifest.json", "purified-000000.tar", "purified-000001.tar", *user])  # stale one gone
    assert shards.read_manifest(str(out))["complete"]
    intact()
    (out / "purified-000007.tar").write_bytes(b"someone else's shard")
    with pytest.raises(ValueError, match="not written by it"):
        purify_shards(urls[:2], str(out), checkpoint, **JOB)
    assert (out / "purified-000007.tar").read_bytes() == b"someone else's shard"
    os.remove(out / "purified-000007.tar")
    assert purify_shards(urls[:2], str(out), checkpoint, overwrite=True, **JOB).shards_written == 2
    intact()
    shards.write_manifest(str(ins), {"classes": list("abcdefghij")})  # the inputs' own manifest
    before = (ins / "manifest.json").read_bytes()
    for kw in ({}, {"overwrite": True}):  # input == output is refused, with or without overwrite
        with pytest.raises(ValueError, match="directory of the input"):
            purify_shards(urls, str(ins), checkpoint, **kw, **JOB)
    assert (ins / "manifest.json").read_bytes() == before and sorted(os.listdir(ins))[:3] == sorted(
        os.path.basename(u) for u in urls)  # fmt: skip
    other = tmp_path / "other"
    shards.write_manifest(str(other), {"format": "something else"})
    with pytest.raises(ValueError, match="not a purify_shards manifest"):
        purify_shards(urls, str(other), checkpoint, overwrite=True, **JOB)
    assert json.loads((other / "manifest.json").read_bytes()) == {"format": "something else"}


def test_poison_job_mixed_formats_counts_and_duplicate_keys(ray_session, tmp_path, base, faults):
    urls = write_faults(tmp_path / "in", faults, ["a-mixed"])
    m = poisons.poison_shards(urls, str(tmp_path / "out"), "random", seed=0, num_classes=10, progress=False)
    e = m["shards"][0]
    assert (e["input_count"], e["output_count"], e["quarantined"]) == (12, 12, [])
    assert m["counts"]["input"] == m["counts"]["output"] == 12
    out = list(shards.iter_samples(e["url"]))
    assert all(set(s) == {"__key__", "__url__", "png", "cls"} for s in out)
    dup = write_faults(tmp_path / "in", faults, ["f-dupkey"])
    with pytest.raises(ShardError, match="duplicate key") as ei:
        poisons.poison_shards(urls + dup, str(tmp_path / "dup"), "random", seed=0, num_classes=10, progress=False)
    assert ei.value.key == base[0]["__key__"] and "f-dupkey.tar" in str(ei.value)
    with pytest.raises(ValueError, match="directory of the input"):
        poisons.poison_shards(urls, str(tmp_path / "in"), "random", seed=0, num_classes=10, progress=False)


def test_cli_preflight_honours_on_error_and_fit_rejects_remote_out(tmp_path, checkpoint, faults, monkeypatch):
    from purify_pipeline.cli import main
    from purify_pipeline.stages.preflight import check_checkpoint

    urls = write_faults(tmp_path / "in", faults, ["e-empty", "c-bad"])  # a 0-byte first shard, a bad first sample
    for first in (urls, urls[1:]):
        with pytest.raises(ShardError):
            check_checkpoint(checkpoint, first)
        assert check_checkpoint(checkpoint, first, on_error="skip").image_size == 32
    monkeypatch.chdir(tmp_path)
    assert main(["fit", urls[1], "--out", "s3://bucket/ckpt"]) == 1
    assert not os.path.exists(tmp_path / "s3:")


def test_poison_job_quarantines_with_skip_and_raises_shard_error(ray_session, tmp_path, faults):
    names = ["b-noext", "c-bad", "d-truncated", "e-empty"]
    urls = write_faults(tmp_path / "in", faults, names)
    em = dict(width=8, pgd_steps=2, step_size=4 / 255, train_steps=2, max_rounds=1, batch_size=64)  # seconds
    for poison in ("random", "em"):  # em is fitted on the data: on the usable samples only
        m = poisons.poison_shards(urls, str(tmp_path / poison), poison, seed=0, num_classes=10, on_error="skip",
                                  progress=False, **(em if poison == "em" else {}))  # fmt: skip
        for entry, name in zip(m["shards"], names):
            _, (n_in, n_out, n_q), reasons = faults[name]
            assert (entry["input_count"], entry["output_count"], len(entry["quarantined"])) == (n_in, n_out, n_q), name
            assert {q["key"] for q in entry["quarantined"]} == set(reasons), name
            assert len(list(shards.iter_samples(entry["url"]))) == n_out
            if n_q:
                with tarfile.open(str(tmp_path / poison / entry["quarantine"])) as tf:
                    assert sum(n.endswith(".quarantine.json") for n in tf.getnames()) == n_q
        c = m["counts"]
        assert c["input"] == c["output"] + c["quarantined"] == sum(faults[n][1][0] for n in names)
    with pytest.raises(ShardError, match="has no extension") as ei:  # raised in a Ray actor, caught as itself
        poisons.poison_shards(urls[:1], str(tmp_path / "raise"), "random", seed=0, num_classes=10, progress=False)
    assert ei.value.key == "README" and ei.value.shard == urls[0]
