"""Fit and purify on a Ray cluster: GPU workers and actors, shards on object storage.

    # on the head node (or anywhere that can reach it), with the dataset's shards on S3:
    python pipelines/cluster.py --address head-node:6379 \
        --train "s3://my-bucket/cifar10-poisoned/train-{000000..000049}.tar" \
        --checkpoint s3://my-bucket/ckpt/dvae-paper --output s3://my-bucket/cifar10-purified \
        --gpus 8 --preset paper

    # the same script on one machine, local paths, no GPU (a smoke run):
    python pipelines/cluster.py --train "data/train-{000000..000001}.tar" --checkpoint /tmp/ckpt \
        --output /tmp/purified --gpus 0 --preset tiny

Object storage: every path may be an fsspec URL (s3://, gs://, ...). Credentials come from the usual
environment (AWS_ACCESS_KEY_ID, ..., or an instance role); a custom endpoint (MinIO, Ceph) goes in
--endpoint-url. Every node must be able to read the shards and the checkpoint: Ray Data read tasks and
PurifyStage actors open them where they run. `fit_purifier` keeps its run state (epoch checkpoints for
resuming, and the stage-1 shards that stage 2 trains on) under --storage-path, a local directory: on a
multi-node cluster it must be a filesystem every node mounts at the same path (NFS, EFS, Lustre, ...).
"""
from __future__ import annotations

import argparse

import ray

from purify_pipeline import DVAEConfig, fit_purifier, purify_shards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", help="Ray head address, e.g. head-node:6379 or 'auto' (default: local Ray)")
    ap.add_argument("--train", required=True, help="poisoned training shards (pattern / URL)")
    ap.add_argument("--checkpoint", required=True, help="where to write (or find) the D-VAE checkpoint")
    ap.add_argument("--output", required=True, help="directory / URL for the purified shards")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs to use: Ray Train workers and PurifyStage actors")
    ap.add_argument("--storage-path", default="purify-runs", help="fit run state: a directory all nodes mount")
    ap.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, Ceph, ...)")
    ap.add_argument("--skip-fit", action="store_true", help="use an existing --checkpoint")
    args = ap.parse_args()

    # 1. join the cluster (or start a local Ray when no address is given)
    ray.init(address=args.address) if args.address else ray.init(include_dashboard=False)
    print(f"cluster: {ray.cluster_resources()}")
    storage = {"client_kwargs": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else {}

    # 2. fit: one Ray Train worker per GPU (DDP over nccl); fault-tolerant and resumable by run name
    if not args.skip_fit:
        fit_purifier(args.train, preset=DVAEConfig.preset(args.preset), output=args.checkpoint,
                     num_workers=max(1, args.gpus), use_gpu=args.gpus > 0, bf16=args.gpus > 0,
                     storage_path=args.storage_path, storage_options=storage, max_failures=3)

    # 3. purify: a PurifyStage actor per GPU, big batches; output shards keep names, keys and labels
    summary = purify_shards(args.train, args.output, args.checkpoint, actors=max(1, args.gpus),
                            num_gpus=1 if args.gpus else 0,
                            batch_size=1024 if args.gpus else 128, storage_options=storage)
    print(summary)


if __name__ == "__main__":
    main()
