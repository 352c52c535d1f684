"""The `purify-pipeline` console script, run as a subprocess: help, convert, the tiny demo, the subcommand
chain (poison -> fit -> purify -> train) and every user error (one line on stderr, non-zero exit)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from purify_pipeline import DVAE, DVAEConfig, Purifier, shards

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SUBCOMMANDS = ["convert", "poison", "fit", "purify", "train", "bench", "demo", "audit"]


def _cli() -> list[str]:
    """The installed console script (from pyproject's [project.scripts]), else the module."""
    script = Path(sys.executable).parent / "purify-pipeline"
    return [str(script)] if script.exists() else [sys.executable, "-m", "purify_pipeline.cli"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PURIFY_PIPELINE_NO_PROGRESS="1", RAY_DATA_DISABLE_PROGRESS_BARS="1", RAY_memory_usage_threshold="0.98")
    env.pop("RAY_ADDRESS", None)
    return env


def run(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*_cli(), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=_env(),
                          timeout=timeout)  # fmt: skip


def run_many(*commands: tuple, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Several CLI runs at once (each pays the interpreter + torch import; on 2 cores two overlap well)."""
    procs = [subprocess.Popen([*_cli(), *map(str, c)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env()) for c in commands]  # fmt: skip
    out = []
    for c, p in zip(commands, procs):
        so, se = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess([*_cli(), *map(str, c)], p.returncode, so, se))
    return out


def assert_one_line_error(p: subprocess.CompletedProcess, *needles: str) -> str:
    assert p.returncode != 0, p.stdout + p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("purify-pipeline: error: "), lines[0]
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------------ fixtures


def make_cifar10_python(root: Path, per_batch: int) -> None:
    """torchvision's on-disk CIFAR-10 layout (cifar-10-batches-py), pickled with protocol 2 as the originals."""
    import pickle

    import numpy as np

    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]:
        batch = {b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
                 b"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)}  # fmt: skip
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in CIFAR10_NAMES]}, protocol=2))


def _save_checkpoint(path: Path, **cfg_overrides) -> str:
    torch.manual_seed(0)
    cfg = DVAEConfig.preset("tiny", **cfg_overrides)
    Purifier(DVAE(cfg), DVAE(cfg)).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, cifar10_dir) -> Path:
    """Two 100-sample training shards (10 per class) and one 100-sample test shard + manifest, from CIFAR-10."""
    d = tmp_path_factory.mktemp("data")
    for split, src, n_shards in (("train", "train-000000.tar", 2), ("test", "test-000000.tar", 1)):
        samples = []
        for s in shards.iter_samples(str(cifar10_dir / src)):
            s.pop("__url__")
            samples.append(s)
            if len(samples) == 100 * n_shards:
                break
        for i in range(n_shards):
            shards.write_shard(str(d / shards.shard_name(split, i)), samples[100 * i : 100 * (i + 1)])
    shards.write_manifest(str(d), {"classes": CIFAR10_NAMES})
    return d


# ---------------------------------------------------------------------------------------------------- help


def test_help_of_every_subcommand():
    procs = {c: subprocess.Popen([*_cli(), *([c] if c else []), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=_env()) for c in ["", *SUBCOMMANDS]}  # fmt: skip
    for c, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, (c, err)
        assert out.startswith(f"usage: purify-pipeline {c}".rstrip()), (c, out[:200])
        assert "--help" in out
    from purify_pipeline.cli_args import build_parser

    actions = [a for a in build_parser()._actions if a.choices and "fit" in a.choices]
    assert sorted(actions[0].choices) == sorted(SUBCOMMANDS)  # every subcommand is covered here


def test_import_and_help_do_not_load_torch_or_ray():
    """The package imports lazily, so `--help` and `import purify_pipeline` stay fast (no torch, no Ray)."""
    code = ("import sys, purify_pipeline, purify_pipeline.cli as c\n"
            "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('heavy:', sorted(m for m in ('torch', 'ray') if m in sys.modules))\n"
            "from purify_pipeline import PurifyStage, poisons\n"
            "print('loaded:', PurifyStage.__name__, 'torch' in sys.modules)")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    assert "heavy: []" in p.stdout and "loaded: PurifyStage True" in p.stdout, p.stdout


def test_stderr_filter_drops_ray_noise_and_keeps_everything_else():
    """The jobs' stderr filter: benign Ray lines written to fd 2 (as the C++ core worker does) vanish; Python and
    raw writes, progress-bar redraws ("\r", no newline) and the last unterminated text all come through."""
    code = ("import os, sys\nfrom purify_pipeline.ray_init import StderrFilter\nf = StderrFilter()\n"
            "os.write(2, b'[2026 E 1 1] core_worker.cc:2465: Actor with class name: x has constructor arguments in "
            "the object store and max_restarts > 0.\\n')\n"
            "print('kept line', file=sys.stderr)\nos.write(2, b'\\rbar 1/2')\nos.write(2, b'\\rbar 2/2\\n')\n"
            "os.write(2, b'(PlacementGroupCleaner) Failed to query Ray Train Controller actor state. x\\n')\n"
            "os.write(2, b'tail without newline')\nf.close()\nprint('after close', file=sys.stderr)\n")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)  # bytes: "\r" kept
    assert p.returncode == 0, p.stderr
    assert p.stderr == b"kept line\n\rbar 1/2\rbar 2/2\ntail without newlineafter close\n", p.stderr


def test_version_bench_and_no_command():
    version, none, bench, no_bench = run_many(("--version",), (), ("bench",), ("bench", "no_such_bench"))
    assert version.returncode == 0 and "purify-pipeline" in version.stdout
    assert none.returncode == 2 and "COMMAND" in none.stdout
    assert bench.returncode == 0 and "bench_purify" in bench.stdout, bench.stderr  # lists benchmarks/*.py
    assert_one_line_error(no_bench, "no benchmark 'no_such_bench'")


# ------------------------------------------------------------------------------------------------- convert


def test_convert_torchvision_cifar_directory(tmp_path):
    make_cifar10_python(tmp_path / "cifar", per_batch=20)
    p = run("convert", tmp_path / "cifar", tmp_path / "out", "--shard-size", "40")
    assert p.returncode == 0, p.stderr
    assert "train: 100 images in 3 shards" in p.stdout and "test: 20 images in 1 shards" in p.stdout
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["classes"] == CIFAR10_NAMES
    assert [e["samples"] for e in man["splits"]["train"]["shards"]] == [40, 40, 20]
    keys = [s["__key__"] for u in shards.expand(str(tmp_path / "out" / "train-*.tar")) for s in shards.iter_samples(u)]
    assert sorted(keys) == [f"train_{i:05d}" for i in range(100)]
    # the output exists now: a second run without --overwrite is refused in one line
    assert_one_line_error(run("convert", tmp_path / "cifar", tmp_path / "out"), "already exists", "--overwrite")
    p = run("convert", tmp_path / "cifar", tmp_path / "out", "--overwrite", "--splits", "test")
    assert p.returncode == 0, p.stderr


def test_convert_bad_source(tmp_path):
    (tmp_path / "nothing").mkdir()
    assert_one_line_error(run("convert", tmp_path / "nothing", tmp_path / "out"), "neither CIFAR")


# --------------------------------------------------------------------------------------------------- errors


def test_no_shards_match(tmp_path):
    ckpt = _save_checkpoint(tmp_path / "ckpt")
    pattern = str(tmp_path / "missing-{000000..000003}.tar")
    for p in run_many(("purify", pattern, tmp_path / "out", "--checkpoint", ckpt),
                      ("fit", str(tmp_path / "nope-*.tar"), "--out", tmp_path / "c"),
                      ("train", pattern, "--test", pattern),
                      ("poison", tmp_path, tmp_path / "p"),
                      ("demo", "--data", tmp_path, "--out", tmp_path / "d")):  # fmt: skip
        assert_one_line_error(p, "no shards match")


def test_checkpoint_classes_do_not_match_data(tmp_path, small_data):
    ckpt = _save_checkpoint(tmp_path / "ckpt100", num_classes=100)
    err = assert_one_line_error(run("purify", small_data / "train-000000.tar", tmp_path / "out", "--checkpoint", ckpt),
                                "100 classes", "has 10")  # fmt: skip
    assert "manifest.json" in err
    assert not (tmp_path / "out").exists()


def test_checkpoint_image_size_does_not_match_data(tmp_path, small_data):
    ckpt = _save_checkpoint(tmp_path / "ckpt64", image_size=64)
    assert_one_line_error(run("purify", small_data / "train-000000.tar", tmp_path / "out", "--checkpoint", ckpt),
                          "expects 64x64", "has 32x32", "train-000000.tar")  # fmt: skip


def test_bad_checkpoint(tmp_path, small_data):
    (tmp_path / "notackpt").mkdir()
    assert_one_line_error(run("purify", small_data / "train-000000.tar", tmp_path / "out", "--checkpoint",
                              tmp_path / "notackpt"), "not a purify_pipeline checkpoint")  # fmt: skip


def test_existing_output_is_refused(tmp_path, small_data):
    ckpt = _save_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    purify, fit, poison, demo, demo_overwrite = run_many(
        ("purify", small_data / "train-000000.tar", out, "--checkpoint", ckpt),
        ("fit", small_data / "train-000000.tar", "--out", ckpt),
        ("poison", small_data / "train-000000.tar", out),
        ("demo", "--data", small_data, "--out", out),
        ("demo", "--data", small_data, "--out", out, "--overwrite"))  # fmt: skip
    for p in (purify, fit, poison):
        assert_one_line_error(p, "already exists", "--overwrite")
    assert_one_line_error(demo, "already exists", "--resume")
    # --overwrite on a directory that is not a demo output is refused rather than deleted
    assert_one_line_error(demo_overwrite, "refusing to delete")
    assert (out / "something").exists()


def test_unreachable_ray_address(tmp_path, small_data):
    ckpt = _save_checkpoint(tmp_path / "ckpt")
    purify, fit, poison, bad = run_many(
        ("purify", small_data / "train-000000.tar", tmp_path / "out", "--checkpoint", ckpt, "--address", "127.0.0.1:1"),
        ("fit", small_data / "train-000000.tar", "--out", tmp_path / "c", "--address", "127.0.0.1:1"),
        ("poison", small_data / "train-000000.tar", tmp_path / "p", "--address", "127.0.0.1:1"),
        ("fit", small_data, "--out", tmp_path / "c", "--address", "nonsense"), timeout=120)  # fmt: skip
    for p in (purify, fit, poison):
        assert_one_line_error(p, "cannot reach a Ray cluster at 127.0.0.1:1")
    assert_one_line_error(bad, "not host:port")


def test_bad_preset_and_option(tmp_path, small_data):
    preset, option, images = run_many(
        ("fit", small_data / "train-000000.tar", "--out", tmp_path / "c", "--preset", "huge"),
        ("poison", small_data / "train-000000.tar", tmp_path / "p", "--option", "bogus"),
        ("demo", "--data", small_data, "--out", tmp_path / "d", "--images", "15"))  # fmt: skip
    assert_one_line_error(preset, "unknown preset 'huge'")
    assert_one_line_error(option, "not key=value")
    assert_one_line_error(images, "multiples")


# ------------------------------------------------------------------------------------------- end to end


def _keep(procs: list, p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    procs.append(p)
    return p


@pytest.mark.slow
def test_subcommand_chain_poison_fit_purify_train(tmp_path, small_data):
    """poison -> fit (tiny preset, loop in this process) -> purify (PurifyStage) -> train, via the CLI."""
    train = str(small_data / "train-{000000..000001}.tar")
    procs = []
    p = _keep(procs, run("poison", train, tmp_path / "lsp", "--poison", "lsp", "--seed", "1"))
    assert p.returncode == 0, p.stderr
    man = json.loads((tmp_path / "lsp" / "manifest.json").read_text())
    assert man["classes"] == CIFAR10_NAMES and man["poison"] == "lsp" and man["counts"]["samples"] == 200
    p = _keep(procs, run("fit", tmp_path / "lsp", "--out", tmp_path / "ckpt", "--preset", "tiny", "--workers", "0", timeout=900))
    assert p.returncode == 0, p.stderr[-3000:]
    pur = Purifier.load(str(tmp_path / "ckpt"))
    assert pur.num_classes == 10 and pur.class_names == CIFAR10_NAMES
    p = _keep(procs, run("purify", tmp_path / "lsp", tmp_path / "pur", "--checkpoint", tmp_path / "ckpt", "--actors", "1",
            "--cpus-per-actor", "0.5", "--batch-size", "50", timeout=900))  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    urls = shards.expand(str(tmp_path / "pur" / "purified-*.tar"))
    assert len(urls) == 2
    got = shards.load_arrays(urls, progress=False)
    src = shards.load_arrays(shards.expand(str(tmp_path / "lsp")), progress=False)
    assert got.keys == src.keys and (got.labels == src.labels).all() and got.images.shape == src.images.shape
    # resume is explicit: a re-run without --resume is refused, with --resume it finds nothing left to do
    assert_one_line_error(run("purify", tmp_path / "lsp", tmp_path / "pur", "--checkpoint", tmp_path / "ckpt"),
                          "already exists")  # fmt: skip
    p = _keep(procs, run("train", *urls, "--test", small_data / "test-000000.tar", "--preset", "tiny", "--out", tmp_path / "m.json"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "clean test accuracy" in p.stdout
    for q in procs:  # no Ray core-worker line (poison's pool has no restarts; purify's filtered) and no traceback
        assert "core_worker.cc" not in q.stderr and "Traceback" not in q.stderr, q.stderr[-3000:]
    m = json.loads((tmp_path / "m.json").read_text())
    assert 0.0 <= m["test_acc"] <= 1.0 and m["config"]["num_classes"] == 10


@pytest.mark.slow
def test_demo_tiny_end_to_end(tmp_path, cifar10_dir):
    out = tmp_path / "demo"
    p = run("demo", "--size", "tiny", "--data", cifar10_dir, "--out", out, timeout=1500)
    assert p.returncode == 0, p.stderr[-5000:]
    assert "| poisoned (lsp) | 400 |" in p.stdout and "| purified (D-VAE) | 400 |" in p.stdout
    assert "| JPEG-10 (baseline) | 400 |" in p.stdout  # users ask "why not just JPEG?"
    assert "estimated time on this machine" in p.stderr
    for name in ("report.md", "grid.png", "accuracy.png", "results.json", "checkpoint/config.json"):
        assert (out / name).exists(), name
    for name in ("grid.png", "accuracy.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 300
    res = json.loads((out / "results.json").read_text())
    assert [r["train_set"] for r in res["rows"]] == ["clean", "poisoned (lsp)", "JPEG-10 (baseline)", "purified (D-VAE)"]
    assert all(0.0 <= r["test_acc"] <= 1.0 and r["train_images"] == 400 for r in res["rows"])
    purified = shards.load_arrays(shards.expand(str(out / "data" / "purified")), progress=False)
    poisoned = shards.load_arrays(shards.expand(str(out / "data" / "poisoned")), progress=False)
    assert purified.keys == poisoned.keys and len(purified.keys) == 400
    assert (purified.images != poisoned.images).any()  # the purifier did something
    man = json.loads((out / "data" / "purified" / "manifest.json").read_text())
    assert man["complete"] and man["totals"]["output_count"] == 400
    report = (out / "report.md").read_text()
    assert "grid.png" in report and "accuracy.png" in report and "| purified (D-VAE) |" in report
    assert "far too small and short for the accuracies above to mean anything" in report
    assert "Shortcut audit" in report and set(res["audit"]) == {"poisoned", "purified"}
    # the output exists: refused without --resume; --resume reuses every finished step and reproduces the table
    assert_one_line_error(run("demo", "--size", "tiny", "--data", cifar10_dir, "--out", out), "already exists")
    p2 = run("demo", "--size", "tiny", "--data", cifar10_dir, "--out", out, "--resume", timeout=900)
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["rows"] == res["rows"]
    assert_one_line_error(run("demo", "--size", "tiny", "--images", "200", "--data", cifar10_dir, "--out", out,
                              "--resume"), "other settings")  # fmt: skip
