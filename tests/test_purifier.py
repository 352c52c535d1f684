"""Purifier: modes and seeds, input validation, checkpoints (safetensors + JSON, never pickle), fit_stage."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from purify_pipeline import (
    DVAE,
    CheckpointError,
    DVAEConfig,
    Purifier,
    fit_stage,
    fit_two_stage,
)


@pytest.fixture(scope="module")
def purifier() -> Purifier:
    torch.manual_seed(0)
    cfg = DVAEConfig.preset("tiny", num_classes=4)
    return Purifier(DVAE(cfg), DVAE(cfg), class_names=["a", "b", "c", "d"])


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(1)
    return r.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), r.integers(0, 4, 12)


def test_purify_shapes_and_dtype(purifier, batch):
    out = purifier.purify(*batch, mode="mean")
    assert out.shape == batch[0].shape and out.dtype == np.uint8


def test_mean_mode_is_deterministic(purifier, batch):
    a = purifier.purify(*batch, mode="mean", seed=0)
    b = purifier.purify(*batch, mode="mean", seed=123)
    assert np.array_equal(a, b)


def test_sample_mode_is_reproducible_under_a_seed(purifier, batch):
    a = purifier.purify(*batch, mode="sample", seed=7)
    b = purifier.purify(*batch, mode="sample", seed=7)
    c = purifier.purify(*batch, mode="sample", seed=8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sample_ids_make_results_independent_of_batching(purifier, batch):
    images, labels = batch
    ids = np.arange(100, 112)
    whole = purifier.purify(images, labels, mode="sample", seed=3, sample_ids=ids)
    parts = np.concatenate([
        purifier.purify(images[i : i + 5], labels[i : i + 5], mode="sample", seed=3, sample_ids=ids[i : i + 5])
        for i in range(0, 12, 5)
    ])
    assert np.array_equal(whole, parts)
    small_batches = purifier.purify(images, labels, mode="sample", seed=3, sample_ids=ids, batch_size=4)
    assert np.array_equal(whole, small_batches)
    threads = torch.get_num_threads()  # Ray actors run one torch thread; a notebook runs several
    try:
        torch.set_num_threads(1)
        one_by_one = purifier.purify(images, labels, mode="sample", seed=3, sample_ids=ids, batch_size=1)
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(whole, one_by_one)


def test_cpu_forward_passes_run_fixed_blocks_whatever_the_batch(purifier, batch, monkeypatch):
    from purify_pipeline.dvae import purifier as purifier_module

    sizes, passes = [], purifier_module.Purifier._passes

    def counted(self, x, *a, **k):
        sizes.append(len(x))
        return passes(self, x, *a, **k)

    monkeypatch.setattr(purifier_module.Purifier, "_passes", counted)
    for n in (1, 5, 12):
        purifier.purify(batch[0][:n], batch[1][:n], batch_size=n)
    assert set(sizes) == {purifier_module.CPU_BLOCK}


@pytest.mark.parametrize(
    "images,labels,match",
    [
        (np.zeros((2, 32, 32, 3), np.float32), [0, 1], "uint8"),
        (np.zeros((2, 32, 32), np.uint8), [0, 1], r"\(N, H, W, 3\)"),
        (np.zeros((2, 32, 32, 4), np.uint8), [0, 1], r"\(N, H, W, 3\)"),
        (np.zeros((2, 64, 64, 3), np.uint8), [0, 1], "expects 32x32"),
        (np.zeros((2, 32, 32, 3), np.uint8), [0, 4], r"outside the model's classes \[0, 4\)"),
        (np.zeros((2, 32, 32, 3), np.uint8), [-1, 0], "outside"),
        (np.zeros((2, 32, 32, 3), np.uint8), [0.0, 1.5], "integers"),
        (np.zeros((2, 32, 32, 3), np.uint8), [0, 1, 2], r"shape \(2,\)"),
    ],
)
def test_bad_input_says_what_was_expected(purifier, images, labels, match):
    with pytest.raises(ValueError, match=match):
        purifier.purify(images, np.asarray(labels))


def test_bad_mode(purifier, batch):
    with pytest.raises(ValueError, match="mode"):
        purifier.purify(*batch, mode="median")


def test_checkpoint_roundtrip_is_bit_exact_and_pickle_free(purifier, batch, tmp_path, monkeypatch):
    fp = purifier.save(tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert meta["class_names"] == ["a", "b", "c", "d"] and meta["image_size"] == 32 and meta["fingerprint"] == fp

    def forbidden(*a, **k):
        raise AssertionError("checkpoint loading must not unpickle")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    loaded = Purifier.load(tmp_path / "ck")
    monkeypatch.undo()
    for (k, a), (k2, b) in zip(sorted(purifier._tensors().items()), sorted(loaded._tensors().items())):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b)
    assert loaded.fingerprint == fp and loaded.class_names == purifier.class_names
    assert np.array_equal(purifier.purify(*batch, seed=5), loaded.purify(*batch, seed=5))
    loaded.save(tmp_path / "again")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "ck" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    # a safetensors file is an 8-byte length, a JSON header, raw tensor bytes: no pickle protocol marker
    assert not (tmp_path / "ck" / "model.safetensors").read_bytes().startswith(b"\x80")


def test_corrupt_and_mismatched_checkpoints_are_clear_errors(purifier, tmp_path):
    ck = tmp_path / "ck"
    purifier.save(ck)
    with pytest.raises(CheckpointError, match="no config.json"):
        Purifier.load(tmp_path / "nothing")
    w = ck / "model.safetensors"
    blob = bytearray(w.read_bytes())
    blob[-1] ^= 0xFF
    w.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="sha256"):
        Purifier.load(ck)
    purifier.save(ck)
    meta = json.loads((ck / "config.json").read_text())
    meta["config"]["width"] = 16  # weights are for width 8
    (ck / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match the config"):
        Purifier.load(ck)
    (ck / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt JSON"):
        Purifier.load(ck)


def test_checkpoint_over_fsspec_memory_filesystem(purifier, batch):
    fp = purifier.save("memory://ckpts/one")
    loaded = Purifier.load("memory://ckpts/one")
    assert loaded.fingerprint == fp
    assert np.array_equal(purifier.purify(*batch, mode="mean"), loaded.purify(*batch, mode="mean"))


def test_fit_stage_reports_metrics_and_resumes_identically():
    r = np.random.default_rng(0)
    x, y = r.integers(0, 256, (128, 32, 32, 3), dtype=np.uint8), r.integers(0, 4, 128)
    cfg = DVAEConfig.preset("tiny", num_classes=4, batch_size=32)
    torch.manual_seed(0)
    a = DVAE(cfg)
    b = DVAE(cfg)
    b.load_state_dict(a.state_dict())
    seen = []
    hist = fit_stage(a, x, y, tau=1.0, epochs=3, cfg=cfg, progress=False, on_epoch_end=lambda e, m: seen.append(e))
    assert seen == [0, 1, 2] and [h["epoch"] for h in hist] == [0, 1, 2]
    assert {"loss", "rec", "rec_p", "kl", "energy", "samples_per_s", "lr", "tau"} <= set(hist[0])
    assert hist[0]["samples"] == 128
    # resume: run epoch 0, then continue with the restored optimizer state from epoch 1
    from purify_pipeline.dvae.train import make_optimizer

    opt, sched = make_optimizer(b, cfg, 3)
    fit_stage(b, x, y, tau=1.0, epochs=1, cfg=cfg, progress=False, optimizer=opt, scheduler=sched)
    h2 = fit_stage(b, x, y, tau=1.0, epochs=3, cfg=cfg, progress=False, start_epoch=1, optimizer=opt, scheduler=sched)
    assert h2[-1]["loss"] == hist[-1]["loss"]
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k  # bit-exact: same seed, same bytes


def test_fit_stage_pins_kl_near_tau():
    """A few hundred steps: the rate hinge holds the KL near tau."""
    r = np.random.default_rng(0)
    x, y = r.integers(0, 256, (256, 32, 32, 3), dtype=np.uint8), r.integers(0, 2, 256)
    x = (x // 64 * 64).astype(np.uint8)  # some structure to encode
    cfg = DVAEConfig.preset("tiny", num_classes=2, batch_size=32, lr=5e-3)
    torch.manual_seed(0)
    hist = fit_stage(DVAE(cfg), x, y, tau=2.0, epochs=40, cfg=cfg, progress=False)  # 320 steps
    last = hist[-1]["kl"]
    assert 1.5 < last < 3.0, [round(h["kl"], 2) for h in hist]


def test_automatic_tau_binds_the_rate_hinge_after_warmup_and_resumes_identically():
    """tau_auto_ratio: epoch 0 runs under the hand-set tau (far above the natural KL here, so the hinge is flat);
    from then on tau = ratio x epoch 0's KL, and the hinge pulls KL down to it. Off by default (the paper)."""
    assert DVAEConfig.preset("paper").tau_auto_ratio == 0.0
    r = np.random.default_rng(0)
    x, y = r.integers(0, 256, (256, 32, 32, 3), dtype=np.uint8), r.integers(0, 2, 256)
    x = (x // 64 * 64).astype(np.uint8)
    cfg = DVAEConfig.preset("tiny", num_classes=2, batch_size=32, tau_auto_ratio=0.5)
    fixed = DVAEConfig.preset("tiny", num_classes=2, batch_size=32)
    torch.manual_seed(0)
    a = DVAE(cfg)
    b, c, d = DVAE(cfg), DVAE(cfg), DVAE(cfg)
    for m in (b, c, d):
        m.load_state_dict(a.state_dict())
    hist = fit_stage(a, x, y, tau=50.0, epochs=25, cfg=cfg, progress=False)
    free = fit_stage(c, x, y, tau=50.0, epochs=25, cfg=fixed, progress=False)
    auto_tau = 0.5 * hist[0]["kl"]
    assert hist[0]["tau"] == 50.0 and not hist[0]["kl_above_tau"] and hist[0]["tau_next"] == auto_tau
    assert all(h["tau"] == auto_tau for h in hist[1:])
    assert free[-1]["kl"] > 1.3 * auto_tau  # without the hinge KL stays up ...
    assert hist[-1]["kl"] < 1.15 * auto_tau, [round(h["kl"], 2) for h in hist]  # ... with it, KL is pulled to tau
    # the hinge's gradient is on only in steps whose KL is above tau: never in the warm-up, in some steps after it
    assert hist[0]["hinge_active"] == 0.0 and max(h["hinge_active"] for h in hist[1:]) > 0
    # resume after the warm-up from the recorded tau_next: the same bytes as an uninterrupted run
    from purify_pipeline.dvae.train import make_optimizer

    fit_stage(d, x, y, tau=50.0, epochs=3, cfg=cfg, progress=False)
    opt, sched = make_optimizer(b, cfg, 3)
    h1 = fit_stage(b, x, y, tau=50.0, epochs=1, cfg=cfg, progress=False, optimizer=opt, scheduler=sched)
    fit_stage(b, x, y, tau=h1[-1]["tau_next"], epochs=3, cfg=cfg, progress=False, start_epoch=1, optimizer=opt,
              scheduler=sched)  # fmt: skip
    for (k, vd), (_, vb) in zip(d.state_dict().items(), b.state_dict().items()):
        assert torch.equal(vd, vb), k
    with pytest.raises(ValueError, match="tau_auto_ratio"):
        DVAEConfig.preset("cpu", tau_auto_ratio=1.5)


def test_fit_two_stage_trains_stage2_on_stage1_outputs(monkeypatch):
    r = np.random.default_rng(0)
    x, y = r.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), r.integers(0, 2, 64)
    cfg = DVAEConfig.preset("tiny", num_classes=2, batch_size=32)
    import purify_pipeline.dvae.two_stage as F
    from purify_pipeline.dvae.noise import sample_ids_for_keys

    calls = []
    real = F.fit_one_stage
    monkeypatch.setattr(F, "fit_one_stage", lambda imgs, labs, c, stage, sess, **kw: calls.append((imgs.copy(), stage))
                        or real(imgs, labs, c, stage, sess, **kw))  # fmt: skip
    pur = fit_two_stage(x, y, cfg, progress=False)
    assert [c[1] for c in calls] == [1, 2]
    assert [h["tau"] for h in pur.metrics["stage1"] + pur.metrics["stage2"]] == [cfg.tau1] * cfg.epochs + [cfg.tau2] * cfg.epochs_for(2)
    assert np.array_equal(calls[0][0], x)
    assert not np.array_equal(calls[1][0], x)
    half = Purifier(pur.stage1, pur.stage2)  # stage-1 noise seeded by each sample's key, as purify_shards does
    want = half.purify_stage1(x, y, mode=cfg.stage1_mode, seed=cfg.seed, sample_ids=sample_ids_for_keys([f"{i:08d}" for i in range(64)]))
    assert np.array_equal(calls[1][0], want)
    assert set(pur.metrics) == {"stage1", "stage2"} and pur.data_fingerprint


def test_fit_two_stage_same_seed_same_bytes():
    r = np.random.default_rng(0)
    x, y = r.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), r.integers(0, 2, 64)
    cfg = DVAEConfig.preset("tiny", num_classes=2, batch_size=32)
    a = fit_two_stage(x, y, cfg, progress=False)
    b = fit_two_stage(x, y, cfg, progress=False)
    c = fit_two_stage(x, y, DVAEConfig.preset("tiny", num_classes=2, batch_size=32, seed=1), progress=False)
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_fit_two_stage_bf16_on_cpu_is_seeded_and_differs_from_fp32():
    r = np.random.default_rng(0)
    x, y = r.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), r.integers(0, 2, 64)
    cfg = DVAEConfig.preset("tiny", num_classes=2, batch_size=32, p_class_weight=1.0)
    a = fit_two_stage(x, y, cfg, progress=False, bf16=True)
    b = fit_two_stage(x, y, cfg, progress=False, bf16=True)
    c = fit_two_stage(x, y, cfg, progress=False)
    assert a.fingerprint == b.fingerprint != c.fingerprint  # autocast really ran, and is deterministic
    assert all(np.isfinite(h["loss"]) and "p_class_var" in h for h in a.metrics["stage1"])
    assert a.stage1.class_embedding.dtype == torch.float32  # weights stay fp32; only the compute is bf16


def test_channels_last_fit_follows_the_standard_layout_loss_curve(cifar10_dir):
    """The fast CPU layout (channels-last, the default on a CPU) trains the same model: on real images the
    per-epoch losses and KL of a short fit agree with the NCHW fit's to float tolerance (only the convolution
    kernels, hence the rounding, differ)."""
    from purify_pipeline.data.shards import load_arrays

    data = load_arrays(str(cifar10_dir / "train-000000.tar"), progress=False)
    x, y = data.images[:256], data.labels[:256]
    cfg = DVAEConfig.preset("tiny", batch_size=32, epochs=3)
    curves = []
    for cl in (True, False):
        torch.manual_seed(0)
        h = fit_stage(DVAE(cfg), x, y, tau=cfg.tau1, epochs=3, cfg=cfg, progress=False, channels_last=cl)
        curves.append([(m["loss"], m["rec"], m["kl"]) for m in h])
    assert curves[0] != curves[1]  # the layouts really differ...
    np.testing.assert_allclose(np.array(curves[0]), np.array(curves[1]), rtol=1e-2)  # ...the training does not



def test_compiled_fit_follows_the_eager_loss_curve_and_leaves_an_eager_model(cifar10_dir):
    """`fit_stage(compile=True)` (torch.compile of the encoder, decoders and latent op) trains the same model: per-epoch losses
    and KL agree with the eager fit's to float tolerance; afterwards the model is eager again, with the same keys."""
    from purify_pipeline.data.shards import load_arrays
    from purify_pipeline.dvae.train import COMPILED_PARTS

    data = load_arrays(str(cifar10_dir / "train-000000.tar"), progress=False)
    x, y = data.images[:128], data.labels[:128]
    cfg = DVAEConfig.preset("tiny", batch_size=32, epochs=2)
    curves, models = [], []
    for comp in (True, False):
        torch.manual_seed(0)
        m = DVAE(cfg)
        h = fit_stage(m, x, y, tau=cfg.tau1, epochs=2, cfg=cfg, progress=False, compile=comp)
        curves.append([(e["loss"], e["rec"], e["kl"]) for e in h])
        models.append(m)
    assert curves[0] != curves[1]  # compiled kernels really ran (other rounding)...
    np.testing.assert_allclose(np.array(curves[0]), np.array(curves[1]), rtol=1e-3)  # ...the same training
    assert all(getattr(models[0], n)._compiled_call_impl is None for n in COMPILED_PARTS)  # eager again
    assert models[0].latent_op is None
    assert list(models[0].state_dict()) == list(models[1].state_dict())  # checkpoints load either way

def test_bf16_purification_is_seeded_close_to_fp32_and_the_stage_agrees(tiny_checkpoint, ray_session, cifar10_dir):
    from purify_pipeline.data.shards import load_arrays
    from purify_pipeline.dvae.noise import sample_ids_for_keys
    from purify_pipeline.stages.purify_stage import PurifyBatch

    data = load_arrays(str(cifar10_dir / "test-000000.tar"), progress=False)
    x, y, ids = data.images[:64], data.labels[:64], sample_ids_for_keys(data.keys[:64])
    pur = Purifier.load(tiny_checkpoint)
    a = pur.purify(x, y, sample_ids=ids, bf16=True)
    assert np.array_equal(a, pur.purify(x, y, sample_ids=ids, bf16=True))
    f = pur.purify(x, y, sample_ids=ids)
    d = np.abs(a.astype(int) - f)
    assert d.max() > 0 and d.mean() < 2.0, (d.max(), d.mean())  # rounding, not another purification
    udf = PurifyBatch(tiny_checkpoint, bf16=True, output_format="array")
    rows = {"__key__": np.array(data.keys[:64], dtype=object), "png": x, "cls": y}
    np.testing.assert_array_equal(np.stack(udf(rows)["png"]), a)


def _rank_tau(rank: int, port: int, q) -> None:
    import torch.distributed as dist

    from purify_pipeline.dvae.train import _mean_over_ranks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    q.put((rank, _mean_over_ranks(1.0 + 2.0 * rank, torch.device("cpu"))))
    dist.destroy_process_group()


def test_automatic_tau_is_the_same_on_every_ddp_rank():
    """Each rank measures its own KL; the automatic tau comes from their mean, so DDP replicas stay identical."""
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank_tau, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert got == {0: 2.0, 1: 2.0}


def test_bf16_on_a_cpu_without_native_bf16_warns_and_fp32_does_not(monkeypatch) -> None:
    """Emulated bf16 is several times slower than fp32 (11x on an AVX2 EPYC, benchmarks/results/fit/epyc-avx2):
    say so instead of crawling."""
    import warnings

    from purify_pipeline.dvae import train as train_mod

    r = np.random.default_rng(0)
    x, y = r.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8), r.integers(0, 2, 32)
    cfg = DVAEConfig.preset("tiny", num_classes=2, batch_size=32)
    monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match="without native bfloat16"):
        fit_two_stage(x, y, cfg, progress=False, bf16=True)
    monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fit_two_stage(x, y, cfg, progress=False, bf16=True)  # native bf16: silent
    monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fit_two_stage(x, y, cfg, progress=False)  # fp32: silent


def test_classifier_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch) -> None:
    from purify_pipeline.dvae import train as train_mod
    from purify_pipeline.eval.classifiers import ClassifierConfig
    from purify_pipeline.eval.train_classifier import train_classifier

    r = np.random.default_rng(0)
    x, y = r.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), r.integers(0, 2, 64)
    monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match="without native bfloat16"):
        train_classifier(x, y, x, y, ClassifierConfig.preset("tiny", num_classes=2, epochs=1), bf16=True, progress=False)


def test_fit_two_stage_resumes_from_checkpoint_dir_with_the_same_bytes(tmp_path, monkeypatch):
    import purify_pipeline.dvae.two_stage as F

    r = np.random.default_rng(0)
    x, y = r.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), r.integers(0, 2, 64)
    cfg = DVAEConfig.preset("tiny", num_classes=2, batch_size=32, epochs=3, epochs_stage2=2)
    want = fit_two_stage(x, y, cfg, progress=False)
    real_report = F._LocalSession.report

    class Killed(Exception):
        pass

    def killed_after(stage: int, epoch: int):
        def report(self, metrics, ckpt_dir):  # killed right after the epoch's checkpoint is in place
            real_report(self, metrics, ckpt_dir)
            if metrics.get("stage") == stage and metrics.get("epoch") == epoch:
                raise Killed
        return report

    for stage, epoch in ((1, 0), (1, 2), (2, 0)):  # mid stage 1, stage 1 finished, mid stage 2
        d = tmp_path / f"s{stage}e{epoch}"
        monkeypatch.setattr(F._LocalSession, "report", killed_after(stage, epoch))
        with pytest.raises(Killed):
            fit_two_stage(x, y, cfg, progress=False, checkpoint_dir=d)
        monkeypatch.setattr(F._LocalSession, "report", real_report)
        assert (d / f"stage{stage}" / "state.json").exists()
        calls = []
        real_fit = F.fit_stage
        monkeypatch.setattr(F, "fit_stage", lambda *a, **kw: calls.append(kw["start_epoch"]) or real_fit(*a, **kw))
        got = fit_two_stage(x, y, cfg, progress=False, checkpoint_dir=d)
        monkeypatch.setattr(F, "fit_stage", real_fit)
        assert calls[stage - 1] == epoch + 1  # resumed after the saved epoch, not from scratch
        assert got.fingerprint == want.fingerprint, (stage, epoch)
        assert [len(got.metrics[s]) for s in ("stage1", "stage2")] == [3, 2]
        assert [h["epoch"] for h in got.metrics["stage1"]] == [0, 1, 2]
    again = fit_two_stage(x, y, cfg, progress=False, checkpoint_dir=d)  # both stages done: nothing retrained
    assert again.fingerprint == want.fingerprint
    with pytest.raises(ValueError, match="another config"):
        fit_two_stage(x, y, DVAEConfig.preset("tiny", num_classes=2, batch_size=32, epochs=4), progress=False, checkpoint_dir=d)
    with pytest.raises(ValueError, match="another data"):
        fit_two_stage(x[::-1].copy(), y, cfg, progress=False, checkpoint_dir=d)
    # automatic tau: a stage resumed after its warm-up continues under the tau it chose, not the preset's
    auto = DVAEConfig.preset("tiny", num_classes=2, batch_size=32, epochs=3, epochs_stage2=2, tau_auto_ratio=0.5)
    want_auto = fit_two_stage(x, y, auto, progress=False)
    assert want_auto.metrics["stage1"][1]["tau"] != auto.tau(1)  # the warm-up did change tau
    d = tmp_path / "auto"
    monkeypatch.setattr(F._LocalSession, "report", killed_after(1, 1))
    with pytest.raises(Killed):
        fit_two_stage(x, y, auto, progress=False, checkpoint_dir=d)
    monkeypatch.setattr(F._LocalSession, "report", real_report)
    assert fit_two_stage(x, y, auto, progress=False, checkpoint_dir=d).fingerprint == want_auto.fingerprint


def test_epoch_checkpoints_survive_a_kill_at_every_step_of_the_swap(tmp_path, monkeypatch):
    """fit_purifier's local session (and fit_two_stage) swap each epoch's checkpoint in through replace_dir; killed
    while moving it in, after deleting the old one or before the rename, the newest complete epoch is what resumes."""
    from purify_pipeline.dvae.train import (
        load_train_state,
        make_optimizer,
        save_train_state,
    )
    from purify_pipeline.dvae.two_stage import _LocalSession

    cfg = DVAEConfig.preset("tiny", num_classes=2)
    model = torch.nn.Linear(3, 2)
    opt, _ = make_optimizer(model, cfg, epochs=5)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sess = _LocalSession(tmp_path / "local-checkpoint")
    ckpt, tmp = tmp_path / "local-checkpoint", tmp_path / "local-checkpoint.tmp"

    def report(epoch: int) -> None:
        with torch.no_grad():
            model.weight.fill_(epoch)  # each epoch's checkpoint is told apart by its weights
        src = Path(tempfile.mkdtemp(dir=tmp_path))  # what a worker's save_train_state wrote
        save_train_state(str(src), model, opt, epoch, [{"epoch": e} for e in range(epoch + 1)])
        sess.report({}, str(src))

    def resumes_at() -> int | None:
        d = sess.restore_dir()
        if d is None:
            return None
        m = torch.nn.Linear(3, 2)
        o, s = make_optimizer(m, cfg, epochs=5)
        start, history = load_train_state(d, m, o, s)
        assert [h["epoch"] for h in history] == list(range(start)) and bool((m.weight == start - 1).all())
        return start

    def kill_os_replace_when(hit):
        real = os.replace

        def replace(src, dst):
            if hit(Path(src), Path(dst)):
                raise KeyboardInterrupt
            real(src, dst)

        monkeypatch.setattr(os, "replace", replace)

    assert resumes_at() is None
    report(0)
    assert resumes_at() == 1 and not tmp.exists()
    kill_os_replace_when(lambda src, dst: dst == ckpt)
    with pytest.raises(KeyboardInterrupt):
        report(1)  # epoch 0's checkpoint deleted, epoch 1's complete in .tmp
    monkeypatch.undo()
    assert not ckpt.exists() and (tmp / "state.json").exists()
    assert resumes_at() == 2 and not tmp.exists()  # .tmp renamed into place, so the next save cannot delete it
    kill_os_replace_when(lambda src, dst: dst.parent == tmp and src.name == "state.json")
    with pytest.raises(KeyboardInterrupt):
        report(2)  # killed while moving epoch 2's files in: both safetensors there, state.json (the mark) not
    monkeypatch.undo()
    assert (tmp / "model.safetensors").exists() and not (tmp / "state.json").exists()
    assert resumes_at() == 2
    report(2)
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda p, **kw: (Path(p, "model.safetensors").unlink(missing_ok=True)
                                                           if Path(p) == ckpt else real_rmtree(p, **kw)))  # fmt: skip
    with pytest.raises(OSError):  # deleting epoch 2's checkpoint stopped halfway, so renaming onto it failed
        report(3)
    monkeypatch.undo()
    assert (ckpt / "state.json").exists() and not (ckpt / "model.safetensors").exists()
    assert resumes_at() == 4  # the complete epoch 3 in .tmp, not the half-deleted epoch 2
