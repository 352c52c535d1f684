"""CIFAR-10 end to end with the library: poison -> fit D-VAE -> purify (PurifyStage) -> train and compare.

    python pipelines/cifar10_end_to_end.py --data ../shared/data/cifar10 --out /tmp/e2e --images 2000

What `purify-pipeline demo` does, as a script to copy and edit: every step is one library call on
WebDataset shards. Swap the poisoned shards for your own (labelled) data to purify a real dataset.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import ray

from purify_pipeline import (
    ClassifierConfig,
    DVAEConfig,
    fit_purifier,
    poisons,
    purify_shards,
    shards,
    train_classifier,
)
from purify_pipeline.data.subset import select_balanced


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="CIFAR-10 shards (train-*.tar, test-*.tar, manifest.json)")
    ap.add_argument("--out", required=True, help="working directory (created)")
    ap.add_argument("--images", type=int, default=2000, help="training images to poison (multiple of 10)")
    ap.add_argument("--test-images", type=int, default=2000)
    ap.add_argument("--preset", default="cpu", help="D-VAE preset: tiny | small | cpu | cpu-v2 | cpu-v1 | paper")
    ap.add_argument("--classifier", default="fast", help="classifier preset: tiny | fast | paper")
    ap.add_argument("--poison", default="lsp")
    ap.add_argument("--gpu", action="store_true")
    args = ap.parse_args()

    data, out = Path(args.data), Path(args.out)
    classes = shards.read_manifest(str(data))["classes"]
    k = len(classes)
    ray.init(num_cpus=4, include_dashboard=False)  # or ray.init(address="head:6379") on a cluster

    # 1. a class-balanced clean subset, written as shards (the source's JPEG bytes, untouched)
    subset = select_balanced(shards.expand(f"{data}/train-*.tar"), args.images // k, k)
    for i in range(0, len(subset), 500):
        shards.write_shard(str(out / "clean" / shards.shard_name("train", i // 500)), subset[i : i + 500])
    shards.write_manifest(str(out / "clean"), {"classes": classes})

    # 2. poison it (lossless PNG shards + manifest with the classes and the poison's parameters)
    poisons.poison_shards(f"{out}/clean/train-*.tar", str(out / "poisoned"), args.poison, seed=0, classes=classes)
    poisoned = f"{out}/poisoned/train-*.tar"

    # 3. fit the two-stage D-VAE on the poisoned shards (Ray Data feeds one Ray Train worker, or one per GPU)
    cfg = DVAEConfig.preset(args.preset, num_classes=k)
    ckpt = fit_purifier(poisoned, preset=cfg, output=str(out / "checkpoint"), num_workers=1,
                        use_gpu=args.gpu, class_names=classes)

    # 4. purify through PurifyStage: a Ray Data actor pool; shard boundaries, keys and labels are kept
    summary = purify_shards(poisoned, str(out / "purified"), ckpt, prefix="train", actors=1 if args.gpu else 2,
                            num_gpus=1 if args.gpu else 0)
    print(summary)

    # 5. train the same classifier on each version, test on clean test images
    test = shards.load_arrays(shards.expand(f"{data}/test-*.tar")[: max(1, -(-args.test_images // 1000))])
    ccfg = ClassifierConfig.preset(args.classifier, num_classes=k)
    device = "cuda" if args.gpu else "cpu"
    print("\n| training set | clean test accuracy |\n|---|---|")
    for name, pattern in (("clean", f"{out}/clean/train-*.tar"), ("poisoned", poisoned),
                          ("purified", f"{out}/purified/train-*.tar")):
        tr = shards.load_arrays(shards.expand(pattern), progress=False)
        r = train_classifier(tr.images, tr.labels, test.images[: args.test_images], test.labels[: args.test_images],
                             ccfg, seed=0, device=device, progress=False)
        print(f"| {name} | {100 * r['test_acc']:.1f}% |")


if __name__ == "__main__":
    main()
