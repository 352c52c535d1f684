"""Learnability audit: determinism, poisoned vs clean twin, shards (serial and Ray Data), input errors."""
from __future__ import annotations

import numpy as np
import pytest

from purify_pipeline import audit as A
from purify_pipeline import poisons, shards

N = 800


@pytest.fixture(scope="module")
def clean_twin() -> tuple[np.ndarray, np.ndarray]:
    """Smooth random images (upsampled 8x8 noise) whose labels carry no learnable pattern."""
    rng = np.random.default_rng(0)
    low = rng.normal(128, 20, size=(N, 8, 8, 3))
    images = np.repeat(np.repeat(low, 4, axis=1), 4, axis=2).clip(0, 255).astype(np.uint8)
    labels = np.arange(N) % 10
    return images, labels


def _score(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> A.AuditResult:
    return A.audit(images, labels, num_classes=10, seed=seed)


def test_same_seed_same_result(clean_twin):
    a, b = _score(*clean_twin), _score(*clean_twin)
    da, db = a.to_dict(), b.to_dict()
    da.pop("seconds"), db.pop("seconds")
    assert da == db
    assert set(da) >= {"score", "verdict", "pixel_acc", "texture_acc", "n_images", "thresholds"}


@pytest.mark.parametrize("poison", ["lsp", "ar"])
def test_poisoned_twin_scores_above_clean(clean_twin, poison):
    images, labels = clean_twin
    clean = _score(images, labels)
    bad = _score(poisons.generate(poison, images, labels, num_classes=10, seed=0, progress=False), labels)
    assert clean.score < 0.3  # chance is 0.1: nothing to learn in the clean twin
    assert bad.score > clean.score + 0.3
    probe = bad.pixel_acc if poison == "lsp" else bad.texture_acc  # LSP is spatial, AR is texture
    assert probe == bad.score


def test_verdicts_follow_thresholds():
    lo, hi = A.THRESHOLDS
    assert 0.1 < lo < hi < 1
    assert A.verdict_for(lo) == "clean-like"
    assert A.verdict_for((lo + hi) / 2) == "suspicious"
    assert A.verdict_for(hi) == "poisoned"
    assert A.verdict_for(0.5, (0.6, 0.8)) == "clean-like"


def test_max_images_samples_and_summary(clean_twin):
    r = A.audit(*clean_twin, num_classes=10, seed=1, max_images=200)
    assert r.n_images == 200 and sum(r.class_counts) == 200
    text = r.summary()
    assert r.verdict.upper() in text and "pixel probe" in text and "texture probe" in text


@pytest.mark.parametrize(
    "images, labels, match",
    [
        (np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, int), "no images"),
        (np.zeros((100, 32, 32, 3), np.uint8), np.zeros(99, int), "100 images but labels"),
        (np.zeros((100, 32, 32, 3), np.uint8), np.full(100, 3), "at least two classes; all 100 images are class 3"),
        (np.zeros((100, 32, 32, 3), np.float32), np.arange(100) % 10, "uint8 NHWC"),
        (np.zeros((100, 32, 32, 3), np.uint8), np.arange(100) % 12, r"labels must lie in \[0, 10\)"),
        (np.zeros((100, 32, 32, 3), np.uint8), np.linspace(0, 1, 100), "labels must be integers"),
        (np.zeros((10, 32, 32, 3), np.uint8), np.arange(10), "too few images"),
    ],
)
def test_bad_inputs_are_clear_errors(images, labels, match):
    with pytest.raises(ValueError, match=match):
        A.audit(images, labels, num_classes=10)


def _write(tmp_path, images, labels) -> str:
    for s in range(4):
        rows = [{"__key__": f"k{i:05d}", "png": shards.encode_png(images[i]), "cls": str(int(labels[i])).encode()}
                for i in range(s, len(images), 4)]  # fmt: skip
        shards.write_shard(str(tmp_path / shards.shard_name("train", s)), rows)
    return str(tmp_path / "train-*.tar")


def test_audit_shards_sample_is_order_free_and_ray_agrees(tmp_path, clean_twin, ray_session):
    images, labels = clean_twin
    x = poisons.generate("lsp", images, labels, num_classes=10, seed=0, progress=False)
    urls = _write(tmp_path, x, labels)
    serial = A.audit_shards(urls, max_images=500, seed=3)
    reverse = A.audit_shards(list(reversed(shards.expand(urls))), max_images=500, seed=3)
    ray_r = A.audit_shards(urls, max_images=500, seed=3, use_ray=True)
    import ray

    ds = ray.data.read_webdataset(shards.expand(urls), decoder=None)  # any Ray Dataset with keys, images, labels
    ds_r = A.audit_dataset(ds, max_images=500, seed=3)
    few = A.audit_dataset(ds, max_images=40, seed=3)  # most batches hold no sampled row
    assert few.n_images == 40 and few.score == A.audit_shards(urls, max_images=40, seed=3).score
    for r in (reverse, ray_r, ds_r):
        assert (r.score, r.pixel_acc, r.texture_acc, r.class_counts) == (serial.score, serial.pixel_acc,
                                                                        serial.texture_acc, serial.class_counts)
    assert serial.n_images == 500 and serial.num_classes == 10
    assert serial.verdict == "poisoned"


def test_audit_shards_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        A.audit_shards(str(tmp_path / "missing-*.tar"))
    rows = [{"__key__": f"k{i}", "png": shards.encode_png(np.zeros((32, 32, 3), np.uint8)), "cls": b"1"}
            for i in range(30)]  # fmt: skip
    shards.write_shard(str(tmp_path / "one-000000.tar"), rows)
    with pytest.raises(ValueError, match="at least two classes"):
        A.audit_shards(str(tmp_path / "one-000000.tar"), num_classes=10)


def test_cli_prints_one_screen_verdict(tmp_path, clean_twin, capsys):
    from purify_pipeline.cli import main

    urls = _write(tmp_path, *clean_twin)
    assert main(["audit", urls, "--max-images", "400", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("learnability audit: CLEAN-LIKE") and "400 images, 10 classes" in out
    assert len(out.splitlines()) < 24
    assert main(["audit", str(tmp_path / "nothing-*.tar")]) == 1


def test_default_thresholds_on_data_unlike_their_calibration_warn_and_say_so(clean_twin):
    images, labels = clean_twin
    assert A.audit(images, labels, num_classes=10, max_images=200).calibrated  # 10 classes, 32x32: calibrated
    with pytest.warns(UserWarning, match="indicative only"):
        r = A.audit(images, labels % 5, num_classes=5, max_images=200)
    assert not r.calibrated and "NOT on data like this" in r.summary() and r.to_dict()["calibrated"] is False
    with pytest.warns(UserWarning, match="16x16"):
        assert not A.audit(images[:, ::2, ::2], labels, num_classes=10, max_images=200).calibrated
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # explicit thresholds: the user calibrated them, nothing to warn about
        assert A.audit(images, labels % 5, num_classes=5, max_images=200, thresholds=(0.3, 0.5)).calibrated
