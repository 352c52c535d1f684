"""Where `purify_shards` spends its CPU time: each step of a Ray actor's work timed alone, against the job end to end.

    python benchmarks/profile_purify.py        # writes benchmarks/results/purify/profile-<capability>.{json,md}

One Ray actor's work per image is: decode the JPEG, draw the per-sample latent noise, run the fused three forward
passes (blocks of `CPU_BLOCK`), round to uint8, encode the PNG. Each step is timed here in one process with one
torch thread (what an actor gets), on real CIFAR-10 images, and so is the whole actor UDF (`PurifyBatch` on Ray
batches of 256). Then `purify_shards` runs on the same shards with its default pool (one single-threaded actor per
CPU). `actors x UDF images/s` is what the pool could deliver if nothing else used the CPUs; the gap to the measured
end-to-end rate is what the rest of the job costs (Ray's scheduling and object transfers, the read tasks, the
driver's tar writes, the actor start). The checkpoint is an untrained, seeded `cpu`-preset model (speed does not
depend on the weights).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_facts  # noqa: E402

from purify_pipeline import DVAE, DVAEConfig, Purifier, shards  # noqa: E402
from purify_pipeline.data._samples import decode_image, encode_png  # noqa: E402
from purify_pipeline.dvae.noise import sample_ids_for_keys, sample_noise  # noqa: E402
from purify_pipeline.dvae.purifier import CPU_BLOCK  # noqa: E402
from purify_pipeline.stages.purify_stage import PurifyBatch  # noqa: E402


MODEL = f"model: 3 forward passes (blocks of {CPU_BLOCK})"


def rate(fn, n: int, repeats: int) -> float:
    """Median images/s of `fn()` (which handles n images) over repeats, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    ap.add_argument("--shards", type=int, default=5, help="train shards for the end-to-end job (1,000 images each)")
    ap.add_argument("--images", type=int, default=1024, help="images for the per-step timings")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "purify"))
    args = ap.parse_args()

    facts = machine_facts("cpu")
    urls = [f"{args.data}/train-{i:06d}.tar" for i in range(args.shards)]
    rows = list(itertools.islice((s for u in urls for s in shards.iter_samples(u)), args.images))
    n = len(rows)
    keys = [r["__key__"] for r in rows]
    jpgs = [r["jpg"] for r in rows]
    labels = np.asarray([int(r["cls"]) for r in rows], dtype=np.int64)

    tmp = Path(tempfile.mkdtemp(prefix="profile-purify-"))
    torch.manual_seed(0)
    cfg = DVAEConfig.preset("cpu")
    ckpt = str(tmp / "ckpt")
    Purifier(DVAE(cfg), DVAE(cfg)).save(ckpt)
    pur = Purifier.load(ckpt)
    torch.set_num_threads(1)  # what a single-threaded actor of the default pool gets

    images = np.stack([decode_image(b, "jpg") for b in jpgs])
    ids = sample_ids_for_keys(keys)
    shape = pur.stage1.latent_shape
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0).contiguous()
    y = torch.from_numpy(labels)
    eps = sample_noise(0, ids, shape)
    out_u8 = pur.purify(images[:64], labels[:64])

    def model() -> None:
        with torch.inference_mode():
            for i in range(0, n, 256):
                pur.purify_torch(x[i : i + 256], y[i : i + 256], mode="sample", eps=eps[i : i + 256])

    def convert() -> None:
        with torch.inference_mode():
            for i in range(0, n, 256):
                xb = torch.from_numpy(images[i : i + 256]).permute(0, 3, 1, 2).float().div_(255.0)
                torch.round(xb * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()

    udf = PurifyBatch(ckpt, threads=1)
    batches = [{"__key__": np.array(keys[i : i + 256], dtype=object), "jpg": np.array(jpgs[i : i + 256], dtype=object),
                "cls": np.array([r["cls"] for r in rows[i : i + 256]], dtype=object)} for i in range(0, n, 256)]  # fmt: skip

    steps = {
        "JPEG decode": lambda: [decode_image(b, "jpg") for b in jpgs],
        "sample ids + latent noise draw": lambda: sample_noise(0, sample_ids_for_keys(keys), shape),
        MODEL: model,
        "uint8 <-> float conversion": convert,
        "PNG encode": lambda: [encode_png(im) for im in out_u8.repeat(n // len(out_u8) + 1, 0)[:n]],
    }
    per_step = {k: rate(f, n, args.repeats) for k, f in steps.items()}
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        pur.purify_torch(x[:CPU_BLOCK], y[:CPU_BLOCK], mode="sample", eps=eps[:CPU_BLOCK])
    flops = fc.get_total_flops() / CPU_BLOCK
    a = torch.randn(1024, 1024)
    mm = rate(lambda: [a @ a for _ in range(4)], 4, args.repeats) * 2 * 1024**3  # fp32 matmul FLOP/s, 1 thread
    udf_rate = rate(lambda: [udf(b) for b in batches], n, args.repeats)
    torch.set_num_threads(os.cpu_count() or 1)

    import ray

    from purify_pipeline import purify_shards

    ray.init(include_dashboard=False, log_to_driver=False)
    cluster_cpus = ray.cluster_resources().get("CPU", 1)
    e2e = []
    for r in range(args.repeats):
        s = purify_shards(urls, str(tmp / f"out{r}"), ckpt, progress=False, audit=False)
        e2e.append(s.images_per_s)
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)  # the checkpoint and the purified copies
    actors = int(cluster_cpus)  # the default pool: one single-threaded actor per CPU
    e2e_med = statistics.median(e2e)
    facts["loadavg_at_end"] = os.getloadavg()

    ms = {k: 1000.0 / v for k, v in per_step.items()}
    total_ms = sum(ms.values())
    res = {"machine": facts, "images": n, "repeats": args.repeats, "step_images_per_s": per_step,
           "step_ms_per_image": ms, "model_flops_per_image": flops, "matmul_flops_per_s_1_thread": mm, "udf_images_per_s": udf_rate, "udf_ms_per_image": 1000.0 / udf_rate,
           "actors": actors, "pool_capacity_images_per_s": actors * udf_rate,
           "end_to_end_images_per_s": e2e, "end_to_end_median": e2e_med,
           "end_to_end_images": 1000 * args.shards}  # fmt: skip
    name = f"profile-{facts['cpu_capability'].lower()}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    lines = [f"# Where `purify_shards` spends its time ({facts['cpu_model']}, {facts['cpu_capability']})", "",
             f"Command: `{facts['command']}`", "",
             f"{facts['cpu_count']} CPUs, torch {facts['torch']}, ray {facts['ray']}; load average at start "
             f"{facts['loadavg_at_start'][0]:.1f}, at end {facts['loadavg_at_end'][0]:.1f}. Steps: {n} CIFAR-10 "
             f"images, one torch thread, medians of {args.repeats}; end to end: {1000 * args.shards} images, "
             "the default pool.", "",
             f"The model: {flops / 1e9:.3f} GFLOP per image (FlopCounterMode), {per_step[MODEL] * flops / 1e9:.1f} GFLOP/s "
             f"achieved on one thread, {100 * per_step[MODEL] * flops / mm:.0f}% of this machine's one-thread fp32 "
             f"matmul rate ({mm / 1e9:.1f} GFLOP/s, 1024x1024).", "",
             "| one actor's step (1 torch thread) | images/s | ms per image | share of the steps |", "|---|---|---|---|"]
    for k in steps:
        lines.append(f"| {k} | {per_step[k]:.0f} | {ms[k]:.2f} | {100 * ms[k] / total_ms:.0f}% |")
    lines += [f"| sum of the steps | {1000 / total_ms:.0f} | {total_ms:.2f} | 100% |",
              f"| the whole actor UDF (`PurifyBatch`, Ray batches of 256) | {udf_rate:.0f} | {1000 / udf_rate:.2f} | |",
              "", "| end to end | images/s |", "|---|---|",
              f"| pool capacity: {actors} actors x the UDF's rate | {actors * udf_rate:.0f} |",
              f"| `purify_shards` measured (median of {', '.join(f'{v:.0f}' for v in e2e)}) | {e2e_med:.0f} "
              f"({100 * e2e_med / (actors * udf_rate):.0f}% of capacity) |"]  # fmt: skip
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
