"""A simulated 2-node Ray cluster (ray.cluster_utils.Cluster): the job spreads over both nodes, and a killed
actor is restarted with the output still complete and exact. This module owns its Ray instance: it shuts any
session Ray down first; afterwards it leaves Ray shut down, or, if a session Ray was running (conftest's
cached `ray_session`), starts one again with the same settings so later modules still find Ray up."""
from __future__ import annotations

import os
import signal
import sys

import numpy as np
import pytest

from purify_pipeline import Purifier, shards
from purify_pipeline.dvae.noise import sample_ids_for_keys
from purify_pipeline.stages.purify_shards import purify_shards
from purify_pipeline.stages.purify_stage import PurifyBatch, PurifyStage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    was_running = ray.is_initialized()
    ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 200 * 1024**2,
                                                      "include_dashboard": False})  # fmt: skip
    c.add_node(num_cpus=1, object_store_memory=200 * 1024**2)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()
    if was_running:  # the session-scoped `ray_session` fixture (conftest) is cached: give it its Ray back
        ray.init(num_cpus=4, object_store_memory=512 * 1024 * 1024, include_dashboard=False, log_to_driver=False)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> str:
    return tiny_checkpoint


def _reference(checkpoint: str, samples: list[dict]) -> np.ndarray:
    x = np.stack([shards.decode_image(s["jpg"], "jpg") for s in samples])
    y = np.array([int(s["cls"]) for s in samples])
    return Purifier.load(checkpoint).purify(x, y, sample_ids=sample_ids_for_keys([s["__key__"] for s in samples]))


def _inputs(tmp_path, cifar10_dir, n_shards: int = 4, per_shard: int = 40) -> tuple[str, list[list[dict]]]:
    src = list(zip(range(n_shards * per_shard), shards.iter_samples(str(cifar10_dir / "test-000005.tar"))))
    groups = [[s for _, s in src[i : i + per_shard]] for i in range(0, len(src), per_shard)]
    for i, g in enumerate(groups):
        shards.write_shard(str(tmp_path / f"in-{i:06d}.tar"), g)
    return str(tmp_path / f"in-{{000000..{n_shards - 1:06d}}}.tar"), groups


def test_two_node_cluster_purify_shards(cluster, tmp_path, cifar10_dir, checkpoint):
    import ray

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    inputs, groups = _inputs(tmp_path, cifar10_dir)
    # 0.75 CPU per actor + 0.25 per read task: each 1-CPU node fits one actor, so the pool can span both nodes
    summary = purify_shards(inputs, str(tmp_path / "out"), checkpoint, batch_size=20, actors=2, num_cpus=0.75,
                            read_num_cpus=0.25, progress=False)  # fmt: skip
    assert (summary.shards_written, summary.samples_out) == (4, 160)
    for i, g in enumerate(groups):
        out = list(shards.iter_samples(str(tmp_path / "out" / f"purified-{i:06d}.tar")))
        assert [s["__key__"] for s in out] == [s["__key__"] for s in g]
        np.testing.assert_array_equal(np.stack([shards.decode_image(s["png"], "png") for s in out]),
                                      _reference(checkpoint, g))  # fmt: skip


class _NodeTaggingKillOnce(PurifyBatch):
    """PurifyBatch that records its node and kills its own process on its first batch (once per test)."""

    marker = ""

    def __call__(self, batch):
        import ray

        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        out = super().__call__(batch)
        out["node"] = np.array([ray.get_runtime_context().get_node_id()] * len(out["__key__"]), dtype=object)
        return out


def test_killed_actor_is_restarted_and_output_complete(cluster, tmp_path, cifar10_dir, checkpoint):
    import ray
    import ray.cloudpickle

    _, groups = _inputs(tmp_path, cifar10_dir, n_shards=1, per_shard=120)
    samples = groups[0]

    udf = type("KillOnce", (_NodeTaggingKillOnce,), {"marker": str(tmp_path / "killed-once")})
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module

    class Stage(PurifyStage):
        udf_class = udf

    ds = ray.data.from_items([{k: v for k, v in s.items()} for s in samples], override_num_blocks=6)
    rows = Stage(checkpoint, batch_size=20, actors=2, num_cpus=0.75, reserve_cpus=0.5)(ds).take_all()
    assert os.path.exists(tmp_path / "killed-once")  # an actor really died mid-job
    assert sorted(r["__key__"] for r in rows) == sorted(s["__key__"] for s in samples)  # complete, no duplicates
    assert len({r["node"] for r in rows}) == 2  # both nodes did work
    by_key = {r["__key__"]: r["png"] for r in rows}
    got = np.stack([shards.decode_image(by_key[s["__key__"]], "png") for s in samples])
    np.testing.assert_array_equal(got, _reference(checkpoint, samples))
