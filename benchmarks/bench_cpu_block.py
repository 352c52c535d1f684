"""Benchmark: CPU purification throughput of the model alone against the number of images per forward pass.

`Purifier.purify_torch` runs its three forward passes on a CPU in blocks of exactly `CPU_BLOCK` images (the
last one zero-padded) so that bytes never depend on batching. This measures what that block size costs or gains:
images/s of the fused three passes (no decode, no noise draw, no encode) for each block size, with 1 torch thread
(a Ray actor) and with every core (one process), the sizes alternating within each repeat.

    python benchmarks/bench_cpu_block.py            # writes benchmarks/results/purify/cpu-block-<capability>.{json,md}

The model is an untrained, seeded `cpu`-preset D-VAE: throughput does not depend on the weights.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_facts  # noqa: E402

from purify_pipeline import DVAE, DVAEConfig, Purifier  # noqa: E402
from purify_pipeline.dvae.noise import sample_noise  # noqa: E402


def throughput(pur: Purifier, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, block: int) -> float:
    """Images/s of `_passes` over x in blocks of `block` (what purify_torch does with CPU_BLOCK = block)."""
    t0 = time.perf_counter()
    for i in range(0, len(x), block):
        pur._passes(x[i : i + block], y[i : i + block], mode="sample", eps=eps[i : i + block], generator=None, stages=2)
    return len(x) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "purify"))
    args = ap.parse_args()

    facts = machine_facts("cpu")
    torch.manual_seed(0)
    cfg = DVAEConfig.preset("cpu")
    pur = Purifier(DVAE(cfg), DVAE(cfg))
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((args.images, 3, 32, 32), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, cfg.num_classes, args.images))
    eps = sample_noise(0, np.arange(args.images), pur.stage1.latent_shape)
    all_threads = torch.get_num_threads()
    runs: dict[str, dict[int, list[float]]] = {}
    with torch.no_grad():
        for threads in sorted({1, all_threads}):
            torch.set_num_threads(threads)
            throughput(pur, x[:64], y[:64], eps[:64], 32)  # warm-up
            runs[str(threads)] = {b: [] for b in args.blocks}
            for _ in range(args.repeats):
                for b in args.blocks:
                    runs[str(threads)][b].append(throughput(pur, x, y, eps, b))
    torch.set_num_threads(all_threads)
    med = {t: {b: statistics.median(v) for b, v in r.items()} for t, r in runs.items()}
    facts["loadavg_at_end"] = os.getloadavg()
    name = f"cpu-block-{facts['cpu_capability'].lower()}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"machine": facts, "images": args.images, "repeats": runs,
                                                  "median_images_per_s": med}, indent=1))  # fmt: skip
    lines = [f"# CPU purification throughput against images per forward pass ({name})", "",
             f"Command: `{facts['command']}`", "",
             f"Machine: {facts['cpu_model']} ({facts['cpu_capability']}), {facts['cpu_count']} CPUs, torch "
             f"{facts['torch']}; load average at start {facts['loadavg_at_start'][0]:.1f}, at end "
             f"{facts['loadavg_at_end'][0]:.1f}. The fused three forward passes of an untrained `cpu`-preset D-VAE on "
             f"{args.images} images, medians of {args.repeats} repeats (block sizes alternating within a repeat).", "",
             "| images per forward pass | " + " | ".join(f"{t} torch thread(s), images/s" for t in med) + " |",
             "|---|" + "---|" * len(med)]  # fmt: skip
    for b in args.blocks:
        best = [f"**{med[t][b]:.0f}**" if med[t][b] == max(med[t].values()) else f"{med[t][b]:.0f}" for t in med]
        lines.append(f"| {b} | " + " | ".join(best) + " |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
