"""Benchmark: `purify_shards` end to end (read, decode, purify, encode PNG, write) vs a plain PyTorch loop.

Both paths process the same shards with the same checkpoint, seed and per-sample noise ids (so they
compute the same pixels; the script checks that the outputs are byte-identical) on the same machine, in one
run, alternating repeats so that background load hits both alike. Also reports FLOPs per image (torch's
FlopCounterMode on the fused three-pass purification) and the achieved fraction of the machine's measured
fp32 matmul rate.

    python benchmarks/bench_purify.py --preset cpu --shards 2 --repeats 2            # CPU (2 cores)
    python benchmarks/bench_purify.py --preset paper --device cuda --shards 10        # one GPU

The checkpoint is an *untrained* seeded model of the chosen preset: throughput does not depend on weights.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from purify_pipeline import DVAE, DVAEConfig, Purifier, shards  # noqa: E402
from purify_pipeline.dvae.noise import sample_ids_for_keys  # noqa: E402
from purify_pipeline.stages.purify_shards import purify_shards  # noqa: E402


def plain_loop(urls: list[str], out_dir: str, checkpoint: str, *, batch_size: int, device: str, mode: str) -> int:
    """The baseline a user would write: one process, shard by shard, batch by batch."""
    purifier = Purifier.load(checkpoint, device=device)
    n = 0
    for i, url in enumerate(urls):
        samples = list(shards.iter_samples(url))
        for s in range(0, len(samples), batch_size):
            chunk = samples[s : s + batch_size]
            x = np.stack([shards.decode_image(c["jpg"], "jpg") for c in chunk])
            y = np.array([shards.parse_label(c["cls"]) for c in chunk])
            ids = sample_ids_for_keys([c["__key__"] for c in chunk])
            out = purifier.purify(x, y, mode=mode, seed=0, sample_ids=ids, batch_size=batch_size)
            for c, img in zip(chunk, out):
                c["png"] = shards.encode_png(img)
                del c["jpg"]
        rows = [{"__key__": c["__key__"], **{k: c[k] for k in sorted(c) if not k.startswith("__")}} for c in samples]
        shards.write_shard(os.path.join(out_dir, shards.shard_name("purified", i)), rows)
        n += len(samples)
    return n


def flops_per_image(checkpoint: str, device: str, mode: str, n: int = 8) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    p = Purifier.load(checkpoint, device=device)
    x = torch.rand(n, 3, p.image_size, p.image_size, device=device)
    y = torch.arange(n, device=device) % p.num_classes
    with FlopCounterMode(display=False) as fc:
        p.purify_torch(x, y, mode=mode)
    return fc.get_total_flops() / n


def matmul_rate(device: str, n: int = 2048, iters: int = 10) -> float:
    """Measured fp32 matmul FLOP/s on this device with torch's threads (the machine's practical peak)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(iters):
            a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 * iters / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    ap.add_argument("--split", default="train")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mode", default="sample", choices=["sample", "mean"])
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--actors", type=int, default=None, help="default: CPU count on CPU, 1 per GPU")
    ap.add_argument("--actor-cpus", type=float, default=None, help="CPUs per actor (default: 0.75 on CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per actor (default 1 on CPU)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "purify"))
    ap.add_argument("--tag", default=None)
    args = ap.parse_args()

    os.environ.setdefault("PURIFY_PIPELINE_NO_PROGRESS", "1")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    ncpu = os.cpu_count() or 1
    gpu = args.device.startswith("cuda")
    actors = args.actors or (torch.cuda.device_count() if gpu else ncpu)
    actor_cpus = args.actor_cpus if args.actor_cpus is not None else (1.0 if gpu else 0.75)
    threads = args.threads or (None if gpu else 1)
    urls = [os.path.join(args.data, f"{args.split}-{i:06d}.tar") for i in range(args.shards)]
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench_purify_"))
    torch.manual_seed(0)
    cfg = DVAEConfig.preset(args.preset)
    ckpt = str(work / "ckpt")
    Purifier(DVAE(cfg), DVAE(cfg)).save(ckpt)

    ray.init(num_cpus=ncpu, num_gpus=torch.cuda.device_count() if gpu else 0, include_dashboard=False,
             log_to_driver=False, object_store_memory=1024**3)  # fmt: skip
    plain_s, ray_s, n = [], [], 0
    for r in range(args.repeats):
        d = work / f"plain{r}"
        d.mkdir()
        t = time.perf_counter()
        n = plain_loop(urls, str(d), ckpt, batch_size=args.batch_size, device=args.device, mode=args.mode)
        plain_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        summary = purify_shards(urls, str(work / f"ray{r}"), ckpt, mode=args.mode, batch_size=args.batch_size,
                                actors=actors, num_cpus=actor_cpus, num_gpus=1 if gpu else 0, threads=threads,
                                progress=False)  # fmt: skip
        ray_s.append(time.perf_counter() - t)
        assert summary.samples_out == n
        print(f"repeat {r}: plain {n / plain_s[-1]:.1f} img/s, purify_shards {n / ray_s[-1]:.1f} img/s", flush=True)
    identical = all((work / "plain0" / f).read_bytes() == (work / "ray0" / f).read_bytes()
                    for f in os.listdir(work / "plain0"))  # fmt: skip
    ray.shutdown()
    load_after = os.getloadavg()

    fpi = flops_per_image(ckpt, args.device, args.mode)
    peak = matmul_rate(args.device)
    plain_ips = n / statistics.median(plain_s)
    ray_ips = n / statistics.median(ray_s)
    result = {
        "command": "python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:]),
        "images": n, "shards": args.shards, "preset": args.preset, "mode": args.mode, "device": args.device,
        "batch_size": args.batch_size, "actors": actors, "actor_cpus": actor_cpus, "torch_threads_per_actor": threads,
        "plain_loop_s": plain_s, "purify_shards_s": ray_s,
        "plain_images_per_s": plain_ips, "purify_shards_images_per_s": ray_ips,
        "ratio_purify_shards_over_plain": ray_ips / plain_ips,
        "outputs_byte_identical": identical,
        "flops_per_image": fpi, "matmul_flops_per_s": peak,
        "achieved_fraction_of_matmul_rate": {"purify_shards": fpi * ray_ips / peak, "plain_loop": fpi * plain_ips / peak},
        "machine": {"cpu_count": ncpu, "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "ray": ray.__version__, "torch_threads_driver": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(0) if gpu else None,
                    "loadavg_before": load_before, "loadavg_after": load_after},
        "weights": f"untrained, seeded {args.preset} preset (throughput does not depend on weight values)",
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or f"{args.device.split(':')[0]}-{args.preset}-preset"
    (out / f"{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"# purify_shards vs plain PyTorch loop ({tag})", "",
        f"Command: `{result['command']}`", "",
        "| path | images/s (median of repeats) | seconds per repeat |", "|---|---|---|",
        f"| plain PyTorch loop | {plain_ips:.1f} | {', '.join(f'{s:.1f}' for s in plain_s)} |",
        f"| purify_shards (Ray Data) | {ray_ips:.1f} | {', '.join(f'{s:.1f}' for s in ray_s)} |", "",
        f"- ratio purify_shards / plain: **{ray_ips / plain_ips:.2f}** (goal >= 0.85); outputs byte-identical: {identical}",
        f"- {n} images ({args.shards} CIFAR-10 shards), preset `{args.preset}` ({result['weights']}), mode `{args.mode}`,"
        f" batch {args.batch_size}, {actors} actor(s) x {actor_cpus} CPU, torch threads/actor {threads}",
        f"- FLOPs per image (3 D-VAE passes): {fpi / 1e6:.1f} MFLOP; measured fp32 matmul rate: {peak / 1e9:.1f} GFLOP/s;"
        f" achieved fraction: purify_shards {fpi * ray_ips / peak:.3f}, plain {fpi * plain_ips / peak:.3f}",
        f"- machine: {ncpu} CPUs, {args.device}{' ' + str(result['machine']['gpu']) if gpu else ''}, torch {torch.__version__},"
        f" ray {ray.__version__}; load average before {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f},"
        f" after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} (includes this benchmark's own processes)",
    ]  # fmt: skip
    (out / f"{tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
