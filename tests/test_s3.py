"""purify_shards against a real S3-compatible server (moto's server mode) on loopback: s3:// in, s3:// out."""
from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from purify_pipeline import DVAE, DVAEConfig, Purifier, shards
from purify_pipeline.dvae.noise import sample_ids_for_keys
from purify_pipeline.stages.purify_shards import purify_shards

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 and the fsspec storage_options that reach it (dummy credentials)."""
    import fsspec

    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    so = {"key": "testing", "secret": "testing", "skip_instance_cache": True,
          "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"}}  # fmt: skip
    import boto3

    boto3.client("s3", endpoint_url=so["client_kwargs"]["endpoint_url"], region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket="purify-test")  # fmt: skip
    fs = fsspec.filesystem("s3", **so)
    yield fs, so
    server.stop()


def test_s3_in_s3_out(ray_session, s3, tmp_path, cifar10_dir):
    fs, so = s3
    groups = [[s for _, s in zip(range(50), shards.iter_samples(str(cifar10_dir / f"test-00000{i}.tar")))] for i in (3, 4)]
    for i, g in enumerate(groups):  # upload two input shards
        shards.write_shard(f"s3://purify-test/in/part-{i:06d}.tar", g, storage_options=so)
    torch.manual_seed(0)
    cfg = DVAEConfig.preset("tiny")
    local = Purifier(DVAE(cfg), DVAE(cfg))
    fp = local.save("s3://purify-test/ckpt", **so)  # the checkpoint lives on S3 too
    assert fs.ls("purify-test/in", detail=False) == ["purify-test/in/part-000000.tar", "purify-test/in/part-000001.tar"]

    summary = purify_shards("s3://purify-test/in/part-{000000..000001}.tar", "s3://purify-test/out",
                            "s3://purify-test/ckpt", storage_options=so, batch_size=32, actors=1, num_cpus=0.5,
                            progress=False)  # fmt: skip
    assert (summary.samples_in, summary.samples_out, summary.checkpoint_fingerprint) == (100, 100, fp)
    assert sorted(fs.ls("purify-test/out", detail=False)) == [
        "purify-test/out/manifest.json", "purify-test/out/purified-000000.tar", "purify-test/out/purified-000001.tar"]
    manifest = shards.read_manifest("s3://purify-test/out", storage_options=so)
    assert manifest["complete"] and [e["output_count"] for e in manifest["shards"]] == [50, 50]
    for i, g in enumerate(groups):
        url = f"s3://purify-test/out/purified-{i:06d}.tar"
        assert shards.sha256_file(url, storage_options=so) == manifest["shards"][i]["sha256"]
        out = list(shards.iter_samples(url, storage_options=so))
        assert [s["__key__"] for s in out] == [s["__key__"] for s in g]
        assert [s["cls"] for s in out] == [s["cls"] for s in g]
        x = np.stack([shards.decode_image(s["jpg"], "jpg") for s in g])
        ref = local.purify(x, np.array([int(s["cls"]) for s in g]), sample_ids=sample_ids_for_keys([s["__key__"] for s in g]))
        np.testing.assert_array_equal(np.stack([shards.decode_image(s["png"], "png") for s in out]), ref)
    # resuming against S3: nothing left to do, the manifest's checksums still match the objects
    again = purify_shards("s3://purify-test/in/part-*.tar", "s3://purify-test/out", "s3://purify-test/ckpt",
                          storage_options=so, batch_size=32, actors=1, num_cpus=0.5, progress=False)  # fmt: skip
    assert (again.shards_resumed, again.shards_written) == (2, 0)
