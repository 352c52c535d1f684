"""What a new user meets first: the README's PurifyStage snippet as written, the stage's output form and its
resource defaults on a 2-CPU Ray, and the demo's sizes."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from purify_pipeline import Purifier, shards
from purify_pipeline.dvae.noise import sample_ids_for_keys
from purify_pipeline.stages.purify_stage import PurifyStage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> str:
    return tiny_checkpoint


@pytest.fixture(scope="module")
def samples(cifar10_dir) -> list[dict]:
    return [s for _, s in zip(range(120), shards.iter_samples(str(cifar10_dir / "test-000000.tar")))]


def _reference(checkpoint: str, samples: list[dict]) -> np.ndarray:
    x = np.stack([shards.decode_image(s["jpg"], "jpg") for s in samples])
    y = np.array([int(s["cls"]) for s in samples])
    ids = sample_ids_for_keys([s["__key__"] for s in samples])
    return Purifier.load(checkpoint).purify(x, y, sample_ids=ids)


def readme_snippet() -> str:
    """The python block of the README's 'Insert PurifyStage' section, as written."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Insert `PurifyStage` into a Ray Data pipeline", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run(code: str, cwd: Path, timeout: float = 840) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)  # a new local Ray, never a cluster the caller points at
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def _workdir(tmp_path: Path, checkpoint: str, samples: list[dict]) -> Path:
    """`data/train-*.tar` (PNG images, like purified or poisoned shards) and `ckpt` under one folder."""
    (tmp_path / "data").mkdir()
    for i in range(2):
        rows = [{"__key__": s["__key__"], "png": shards.encode_png(shards.decode_image(s["jpg"], "jpg")), "cls": s["cls"]}
                for s in samples[i * 60 : (i + 1) * 60]]  # fmt: skip
        shards.write_shard(str(tmp_path / "data" / shards.shard_name("train", i)), rows)
    os.symlink(checkpoint, tmp_path / "ckpt")
    return tmp_path


def test_readme_purify_stage_snippet_runs_as_written_on_a_2_cpu_ray(tmp_path, checkpoint, samples):
    code = readme_snippet()
    assert code.count("ray.init()") == 1
    # the only change: pin the local Ray to 2 CPUs whatever machine runs the test (a 2-core laptop)
    code = code.replace("ray.init()", "ray.init(num_cpus=2, include_dashboard=False)")
    code += ("\nimport numpy as np, torch\n"
             "assert images.dtype == torch.uint8 and tuple(images.shape[1:]) == (32, 32, 3), (images.dtype, images.shape)\n"
             "rows = ds.take_all()\n"
             "np.savez('out.npz', keys=np.array([r['__key__'] for r in rows]), png=np.stack([r['png'] for r in rows]))\n")  # fmt: skip
    work = _workdir(tmp_path, checkpoint, samples)
    r = _run(code, work)
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.load(work / "out.npz")
    order = {k: i for i, k in enumerate(got["keys"])}
    assert sorted(order) == sorted(s["__key__"] for s in samples)  # every sample, once
    purified = got["png"][[order[s["__key__"]] for s in samples]]
    np.testing.assert_array_equal(purified, _reference(checkpoint, samples))


def test_two_cpu_pipeline_with_default_resources_completes_and_a_starving_setting_fails_fast(tmp_path, checkpoint,
                                                                                              samples):  # fmt: skip
    code = """
import ray
from purify_pipeline import PurifyStage, shards
ray.init(num_cpus=2, include_dashboard=False)
urls = shards.expand("data/train-*.tar")
n = PurifyStage("ckpt", actors=2, batch_size=32)(ray.data.read_webdataset(urls)).count()
assert n == 120, n
try:
    PurifyStage("ckpt", actors=2, num_cpus=0.75)(ray.data.read_webdataset(urls))
except ValueError as e:
    assert "num_cpus" in str(e) and "hang" in str(e), e
    print("refused:", e)
else:
    raise SystemExit("2 actors x 0.75 CPU on 2 CPUs was accepted")
"""
    r = _run(code, _workdir(tmp_path, checkpoint, samples))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "refused: PurifyStage would hang this pipeline" in r.stdout


def test_resource_defaults_leave_the_reserve_free() -> None:
    assert PurifyStage("ckpt", actors=2).resolve_num_cpus(2.0) == 0.5
    assert PurifyStage("ckpt", actors=1).resolve_num_cpus(2.0) == 1.0
    assert PurifyStage("ckpt", actors=(1, 8)).resolve_num_cpus(1.0) == 0.0  # a 1-CPU box: logical-only actors
    assert PurifyStage("ckpt", actors=4, reserve_cpus=0.25).resolve_num_cpus(64.0) == 1.0
    assert PurifyStage("ckpt", actors=2, num_cpus=0.75, reserve_cpus=0).resolve_num_cpus(2.0) == 0.75
    with pytest.raises(ValueError, match=r"num_cpus=0\.5"):
        PurifyStage("ckpt", actors=2, num_cpus=0.75).resolve_num_cpus(2.0)
    assert PurifyStage("ckpt", actors=2).config.threads == max(1, (os.cpu_count() or 1) // 2)


def test_default_pool_is_one_single_threaded_actor_per_cpu_or_one_per_gpu() -> None:
    from ray.data import ActorPoolStrategy

    stage = PurifyStage("ckpt")
    assert stage.config.threads == 1  # single-threaded actors: one per CPU keeps both cores busy on a 2-core box
    assert stage.resolve_actors(2.0) == 2 and stage.resolve_num_cpus(2.0) == 0.5  # still leaves 1 CPU to reads
    assert stage.resolve_actors(64.0) == 64 and stage.resolve_num_cpus(64.0) == 63 / 64
    assert stage.resolve_actors(None) == (os.cpu_count() or 1)  # Ray not started: this machine's CPUs
    kw = stage.map_batches_kwargs(4.0)
    assert isinstance(kw["compute"], ActorPoolStrategy) and kw["compute"].max_size == 4 and kw["num_cpus"] == 0.75
    gpu = PurifyStage("ckpt", num_gpus=0.5)
    assert gpu.resolve_actors(16.0, 4.0) == 8 and gpu.resolve_actors(16.0, None) == 1
    assert gpu.config.device == "cuda" and gpu.config.threads is None
    assert PurifyStage("ckpt", actors=3).resolve_actors(64.0, 8.0) == 3  # an explicit pool is kept
    with pytest.raises(ValueError, match="actors"):
        PurifyStage("ckpt", actors=0)


def test_decoded_arrays_come_back_as_arrays_and_bytes_as_png(ray_session, cifar10_dir, checkpoint, samples):
    import ray.data

    url = str(cifar10_dir / "test-000000.tar")
    want = _reference(checkpoint, samples)
    keys = [s["__key__"] for s in samples]
    keyset = set(keys)

    ds = ray.data.read_webdataset([url]).filter(lambda r: r["__key__"] in keyset)  # Ray's default decoding
    rows = {r["__key__"]: r for r in PurifyStage(checkpoint, batch_size=32)(ds).take_all()}
    assert "png" not in next(iter(rows.values()))  # the column keeps its name and its form
    got = np.stack([rows[k]["jpg"] for k in keys])
    assert got.dtype == np.uint8 and got.shape == (len(keys), 32, 32, 3)
    np.testing.assert_array_equal(got, want)

    raw = ray.data.read_webdataset([url], decoder=None).filter(lambda r: r["__key__"] in keyset)
    rows = {r["__key__"]: r for r in PurifyStage(checkpoint, batch_size=32)(raw).take_all()}
    got = np.stack([shards.decode_image(rows[k]["png"], "png") for k in keys])  # encoded in -> lossless PNG out
    np.testing.assert_array_equal(got, want)

    forced = PurifyStage(checkpoint, batch_size=32, output_format="png")(ds).take(1)[0]
    assert isinstance(forced["png"], bytes)  # output_format stays the explicit choice


def test_demo_sizes_follow_the_hardware_and_tiny_says_its_numbers_mean_nothing() -> None:
    from purify_pipeline.demo import SIZES, DemoError, DemoSettings, resolve_size
    from purify_pipeline.demo.report import _verdict

    assert resolve_size("auto", gpu=True) == "paper" and resolve_size("auto", gpu=False) == "cpu-mini"
    cpu = DemoSettings.for_size("cpu-mini")
    assert (cpu.train_images, cpu.test_images, cpu.preset, cpu.classifier) == (10000, 10000, "cpu", "fast")
    assert SIZES["paper"].preset == "paper" and SIZES["paper"].train_images == 50000
    with pytest.raises(DemoError, match="unknown demo size"):
        resolve_size("default")
    rows = [{"train_set": n, "test_acc": a} for n, a in
            (("clean", 0.1), ("poisoned (lsp)", 0.1), ("JPEG-10 (baseline)", 0.1), ("purified (D-VAE)", 0.1))]
    assert "mean anything" in _verdict(DemoSettings.for_size("tiny"), rows)
    assert "+0.0 points" in _verdict(cpu, rows)
