"""fit_purifier: the Ray Train job (2 CPU workers, resume after a crash, stage 2 on stage-1 outputs)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from purify_pipeline import DVAEConfig, Purifier, shards
from purify_pipeline.dvae.noise import sample_ids_for_keys
from purify_pipeline.stages.fit import fit_purifier
from purify_pipeline.stages.purify_shards import purify_shards

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory, cifar10_dir) -> str:
    """Two 192-sample shards cut from real CIFAR-10 shards, next to a copy of the class-name manifest."""
    d = tmp_path_factory.mktemp("cifar-small")
    for i in range(2):
        samples = []
        for s in shards.iter_samples(str(cifar10_dir / f"train-{i:06d}.tar")):
            samples.append({k: v for k, v in s.items() if k != "__url__"})
            if len(samples) == 192:
                break
        shards.write_shard(str(d / f"train-{i:06d}.tar"), samples)
    (d / "manifest.json").write_text((cifar10_dir / "manifest.json").read_text())
    return str(d / "train-{000000..000001}.tar")


def _cfg(**kw) -> DVAEConfig:
    return DVAEConfig.preset("tiny", batch_size=64, **kw)


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_worker_fit_gives_a_checkpoint_purify_shards_uses(small_shards, tmp_path, ray_session):
    out = fit_purifier(small_shards, preset=_cfg(), output=str(tmp_path / "ckpt"), num_workers=2,
                       storage_path=str(tmp_path / "runs"), run_name="two", progress=False)  # fmt: skip
    pur = Purifier.load(out)
    assert pur.num_classes == 10 and pur.class_names[0] == "airplane"
    assert [h["world_size"] for h in pur.metrics["stage1"]] == [2]
    # Ray gives a fractional-CPU worker OMP_NUM_THREADS=1; the fit splits the node's cores among its workers
    assert pur.metrics["stage1"][0]["torch_threads"] == max(1, (os.cpu_count() or 1) // 2)
    summary = purify_shards(small_shards, str(tmp_path / "purified"), out, progress=False)
    assert summary.samples_out == 384 and summary.quarantined == 0

    # stage 2 trained on the stage-1 outputs of the input shards, not on the input itself
    run = json.loads((tmp_path / "runs" / "two" / "summary.json").read_text())
    assert all("stage1-shards" in u for u in run["stage2_inputs"])
    inp = shards.load_arrays(small_shards, progress=False)
    s1 = shards.load_arrays(run["stage2_inputs"], progress=False)
    assert s1.keys == inp.keys
    half = Purifier.load(str(tmp_path / "runs" / "two" / "stage1-checkpoint"))
    want = half.purify_stage1(inp.images, inp.labels, mode="sample", seed=0, sample_ids=sample_ids_for_keys(inp.keys))
    assert np.array_equal(s1.images, want)
    assert not np.array_equal(s1.images, inp.images)

    # the same fit in this process (one seeded loop): a similar loss, as DDP averages gradients over the same
    # global batch (the one-worker run's exact weights are checked in the resume test below)
    l1, l2 = _in_process(small_shards, _cfg()).metrics["stage1"][-1]["loss"], pur.metrics["stage1"][-1]["loss"]
    assert abs(l1 - l2) / l1 < 0.25, (l1, l2)


def test_killed_run_resumes_from_its_last_checkpoint(small_shards, tmp_path, ray_session, monkeypatch):
    cfg = _cfg(epochs=3, epochs_stage2=1, tau_auto_ratio=0.5)  # the automatic tau chosen in epoch 0 must survive
    # relative paths, as in the module's example, with the run state in the default `<output>.runs`
    monkeypatch.chdir(tmp_path)
    kw = dict(preset=cfg, output="ckpt", num_workers=1, run_name="crashy", progress=False)
    with pytest.raises(Exception, match="injected failure after epoch 0"):
        fit_purifier(small_shards, max_failures=0, _crash_after_epoch=0, **kw)
    run_dir = tmp_path / "ckpt.runs" / "crashy"
    assert [h["epoch"] for h in _history(run_dir)] == [0]
    out = fit_purifier(small_shards, **kw)
    hist = _history(run_dir)
    assert [(h["stage"], h["epoch"], h["resumed_from"]) for h in hist] == [(1, 0, 0), (1, 1, 1), (1, 2, 1), (2, 0, 0)]
    auto_tau = 0.5 * hist[0]["kl"]
    assert [h["tau"] for h in hist[:3]] == [cfg.tau1, auto_tau, auto_tau] and hist[3]["tau"] == cfg.tau2
    # one Ray Train worker, killed and resumed, gives the weights of the uninterrupted in-process fit_two_stage
    pur, mem = Purifier.load(out), _in_process(small_shards, cfg)
    assert pur.metrics["stage1"][0]["torch_threads"] == (os.cpu_count() or 1)  # a lone worker gets every core
    assert _same_weights(pur.stage1, mem.stage1) and _same_weights(pur.stage2, mem.stage2)
    # a finished run is not trained again: re-running only rebuilds the output
    fit_purifier(small_shards, **kw)
    assert len(_history(run_dir)) == 4


def test_single_process_mode_and_label_errors(small_shards, tmp_path, ray_session):
    out = fit_purifier(small_shards, preset=_cfg(batch_size_stage2=100), output=str(tmp_path / "ckpt"), num_workers=0,
                       storage_path=str(tmp_path / "runs"), progress=False)  # fmt: skip
    metrics = Purifier.load(out).metrics
    assert metrics["stage2"][0]["world_size"] == 1
    mem = _in_process(small_shards, _cfg(batch_size_stage2=100))  # the same loop and seeds: the same weights
    assert _same_weights(Purifier.load(out).stage1, mem.stage1) and _same_weights(Purifier.load(out).stage2, mem.stage2)
    assert [h["loss"] for h in metrics["stage2"]] == [h["loss"] for h in mem.metrics["stage2"]]
    # 384 samples: stage 1 in 6 full batches of 64, stage 2 in 3 full batches of 100 (the last 84 dropped)
    assert [metrics["stage1"][0]["samples"], metrics["stage2"][0]["samples"]] == [384, 300]
    with pytest.raises(Exception, match=r"key 'train_\d+'.*label \d is outside the model's classes \[0, 3\)"):
        fit_purifier(small_shards, preset=_cfg(), num_classes=3, class_names=["a", "b", "c"], num_workers=0,
                     output=str(tmp_path / "bad"), storage_path=str(tmp_path / "runs"), progress=False)  # fmt: skip


class _ShuffledIterator:
    """Stands in for a Ray DataIterator whose read tasks finished in some order."""

    def __init__(self, chunks: list[dict]) -> None:
        self.chunks = chunks

    def iter_batches(self, **_: object):
        yield from self.chunks


def test_every_path_sees_one_seeded_permutation_of_all_samples_per_epoch(rng):
    from purify_pipeline.dvae.train import array_batches, resident
    from purify_pipeline.dvae.two_stage import rank_batches
    from purify_pipeline.stages.fit import load_training_arrays

    n = 40
    x = rng.integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8)
    y = rng.integers(0, 10, size=n)
    keys = np.array([f"k{i:03d}" for i in range(n)], dtype=object)
    parts = [slice(25, 40), slice(0, 10), slice(10, 25)]  # rows arrive in whatever order Ray's tasks finished
    got_x, got_y = load_training_arrays(_ShuffledIterator([{"image": x[p], "label": y[p], "key": keys[p]} for p in parts]))
    np.testing.assert_array_equal(got_x, x)  # back in key order: the shuffle below no longer depends on Ray
    np.testing.assert_array_equal(got_y, y)

    xt, yt = resident(x, y, "cpu")  # what an accelerator's fit indexes on the device
    for epoch in (0, 3):
        ref = list(array_batches(x, y, 8, seed=5, epoch=epoch))  # what the in-process fit_stage(images, labels) uses
        one = list(rank_batches(x, y, 8, seed=5, epoch=epoch))
        res = list(rank_batches(xt, yt, 8, seed=5, epoch=epoch))
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ref, res, strict=True))
        two = [list(rank_batches(x, y, 8, seed=5, epoch=epoch, rank=r, world=2)) for r in (0, 1)]
        assert len(ref) == len(one) == len(two[0]) == len(two[1]) == n // 8
        for b, (rx, ry) in enumerate(ref):
            assert torch.equal(one[b][0], rx) and torch.equal(one[b][1], ry)
            both = torch.cat([two[0][b][0], two[1][b][0]])  # the two ranks split each global batch, no overlap
            assert sorted(map(bytes, both.numpy())) == sorted(map(bytes, rx.numpy()))
    assert not torch.equal(ref[0][0], list(array_batches(x, y, 8, seed=5, epoch=1))[0][0])  # a new order each epoch


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _in_process(small_shards: str, cfg: DVAEConfig) -> Purifier:
    """fit_two_stage on the shards' key-sorted arrays and keys: what fit_purifier must reproduce."""
    from purify_pipeline.dvae.two_stage import fit_two_stage

    arr = shards.load_arrays(small_shards, progress=False)
    order = np.argsort(np.asarray(arr.keys, dtype=str), kind="stable")
    return fit_two_stage(arr.images[order], arr.labels[order], cfg, keys=[arr.keys[i] for i in order], progress=False)
