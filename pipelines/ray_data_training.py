"""Insert `PurifyStage` into an existing Ray Data pipeline that ends in a training loop (no shards written).

    python pipelines/ray_data_training.py --data ../shared/data/cifar10 --checkpoint purify-demo/checkpoint

The pipeline below is "yours": it reads WebDataset shards, runs a stage of its own before purification
(decode + centre-crop/resize + label parsing), then `PurifyStage` (one line), then a stage of its own after
it (augmentation + float conversion), and streams the batches into a PyTorch training loop. Purified images
exist only in flight: nothing is written to disk. Purification happens again each epoch (the same pixels
every time: noise is seeded per sample key); add ``.materialize()`` after the stage to purify once and keep
the result in Ray's object store instead, if it fits there.

Without --checkpoint a tiny D-VAE is fitted on the first shard first, so the script runs stand-alone (the
purification is then poor; use a checkpoint from ``purify-pipeline fit`` or ``purify-pipeline demo``).
"""
from __future__ import annotations

import argparse
import io
import tempfile
import time

import numpy as np
import ray
import torch
import torch.nn.functional as F
from PIL import Image

from purify_pipeline import ClassifierConfig, PurifyStage
from purify_pipeline.eval.classifiers import build_classifier

SIZE = 32


# ---- your stage before purification: bytes -> uint8 image + int label (keep __key__: it seeds the noise)
def decode(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    images = []
    for data in batch["jpg"]:
        im = Image.open(io.BytesIO(data)).convert("RGB")
        s = min(im.size)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        images.append(np.asarray(im.crop((left, top, left + s, top + s)).resize((SIZE, SIZE), Image.BICUBIC)))
    labels = np.array([int(c) for c in batch["cls"]], dtype=np.int64)
    return {"__key__": batch["__key__"], "image": np.stack(images), "label": labels}


# ---- your stage after purification: random crop (pad 4) + flip, to float32 CHW in [0, 1]
def augment(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng()
    x = batch["image"].astype(np.float32) / 255.0  # read-only input: this makes a copy
    x = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    out = np.empty((len(x), 3, SIZE, SIZE), np.float32)
    for i, (dy, dx, flip) in enumerate(zip(rng.integers(0, 9, len(x)), rng.integers(0, 9, len(x)), rng.random(len(x)) < 0.5)):
        crop = x[i, dy : dy + SIZE, dx : dx + SIZE]
        out[i] = (crop[:, ::-1] if flip else crop).transpose(2, 0, 1)
    return {"x": out, "y": batch["label"]}


def tiny_checkpoint(url: str) -> str:
    """Fit a tiny D-VAE on one shard in memory (stand-alone runs only)."""
    from purify_pipeline import DVAEConfig, fit_two_stage, shards

    arr = shards.load_arrays(url)
    path = tempfile.mkdtemp(prefix="tiny-ckpt-")
    fit_two_stage(arr.images, arr.labels, DVAEConfig.preset("tiny")).save(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="directory of train-*.tar / test-*.tar shards (jpg + cls)")
    ap.add_argument("--checkpoint", help="D-VAE checkpoint (default: fit a tiny one first)")
    ap.add_argument("--train-shards", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--address", help="Ray cluster address (default: local)")
    args = ap.parse_args()

    ray.init(address=args.address) if args.address else ray.init(num_cpus=4, include_dashboard=False)
    train_urls = [f"{args.data}/train-{i:06d}.tar" for i in range(args.train_shards)]
    checkpoint = args.checkpoint or tiny_checkpoint(train_urls[0])

    # ---------------- the pipeline: read -> your stage -> PurifyStage -> your stage -> training loop
    ds = ray.data.read_webdataset(train_urls, decoder=None)
    ds = ds.map_batches(decode, batch_format="numpy", num_cpus=0.5)
    ds = PurifyStage(checkpoint, image_column="image", label_column="label", batch_size=128,
                     actors=2)(ds)  # arrays in, arrays out; + num_gpus=1 on a GPU node
    ds = ds.map_batches(augment, batch_format="numpy", num_cpus=0.5)

    test = ray.data.read_webdataset(f"{args.data}/test-000000.tar", decoder=None).map_batches(decode, batch_format="numpy")
    test_batch = test.take_batch(1000, batch_format="numpy")
    x_test = torch.from_numpy(test_batch["image"].astype(np.float32) / 255).permute(0, 3, 1, 2)
    y_test = torch.from_numpy(test_batch["label"].copy())  # Ray hands out read-only arrays

    cfg = ClassifierConfig.preset("fast", num_classes=10)
    model = build_classifier(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for epoch in range(args.epochs):
        model.train()
        t0, seen = time.perf_counter(), 0
        for batch in ds.iter_torch_batches(batch_size=args.batch_size, local_shuffle_buffer_size=1000):
            loss = F.cross_entropy(model(batch["x"]), batch["y"], label_smoothing=0.2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(batch["y"])
        model.eval()
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        print(f"epoch {epoch + 1}: {seen} purified images streamed in {time.perf_counter() - t0:.0f} s, "
              f"loss {loss.item():.3f}, clean test accuracy {100 * acc:.1f}%")


if __name__ == "__main__":
    main()
