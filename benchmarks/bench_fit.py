"""Benchmark: D-VAE training throughput per preset, and the projected time of a full paper-preset fit.

Times `fit_stage` (the loop every Ray Train worker runs) on real CIFAR-10 images for a fixed number of
optimiser steps per preset, after one warm-up step, and projects both stages on 50k images:
    time = 50,000 * (epochs_stage1 + epochs_stage2) / samples_per_s

    python benchmarks/bench_fit.py                          # all presets on the CPU
    python benchmarks/bench_fit.py --presets paper --device cuda --steps 200
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_facts  # noqa: E402

from purify_pipeline import DVAE, DVAEConfig, fit_stage, shards  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    ap.add_argument("--presets", nargs="+", default=["tiny", "small", "cpu", "paper"])
    ap.add_argument("--steps", type=int, default=8, help="timed optimiser steps per preset")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fit"))
    args = ap.parse_args()

    data = shards.load_arrays(f"{args.data}/train-000000.tar", progress=False)
    rows = []
    for name in args.presets:
        cfg = DVAEConfig.preset(name)
        n = cfg.batch_size * (args.steps + 1)
        reps = -(-n // len(data.images))
        x = data.images.repeat(reps, 0)[:n]
        y = data.labels.repeat(reps, 0)[:n]
        torch.manual_seed(0)
        model = DVAE(cfg)
        warm = fit_stage(model, x[: cfg.batch_size], y[: cfg.batch_size], tau=cfg.tau1, epochs=1, cfg=cfg,
                         device=args.device, progress=False)  # fmt: skip
        t0 = time.perf_counter()
        hist = fit_stage(model, x[cfg.batch_size :], y[cfg.batch_size :], tau=cfg.tau1, epochs=1, cfg=cfg,
                         device=args.device, progress=False,
                         autocast_dtype=torch.bfloat16 if args.bf16 else None)  # fmt: skip
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        sec = time.perf_counter() - t0
        sps = hist[0]["samples"] / sec
        total_epochs = cfg.epochs + cfg.stage2_epochs
        rows.append({"preset": name, "width": cfg.width, "latent_channels": cfg.latent_channels,
                     "batch_size": cfg.batch_size, "steps": args.steps, "samples_per_s": sps,
                     "epochs_both_stages": total_epochs,
                     "projected_10k_own_epochs_min": 10_000 * total_epochs / sps / 60,
                     "projected_50k_own_epochs_h": 50_000 * total_epochs / sps / 3600,
                     "projected_paper_schedule_50k_h": 50_000 * 120 / sps / 3600,
                     "warmup_s": warm[0]["seconds"]})  # fmt: skip
        print(f"{name}: {sps:.1f} samples/s", flush=True)
    facts = machine_facts(args.device)
    facts["loadavg_at_end"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = ("gpu" if args.device.startswith("cuda") else "cpu") + ("-bf16" if args.bf16 else "")
    (out / f"{tag}.json").write_text(json.dumps({"rows": rows, "machine": facts}, indent=1))
    lines = [f"# D-VAE training throughput ({tag})", "", f"Command: `{facts['command']}`", "",
             f"Machine: {facts['cpu_count']} CPUs, torch {facts['torch']} ({facts['torch_threads']} threads), "
             f"ray {facts['ray']}, device {facts['device']}, load average at start {facts['loadavg_at_start'][0]:.1f}, "
             f"at end {facts['loadavg_at_end'][0]:.1f}", "",
             "| preset | width | samples/s | both stages on 10k (own epochs) | both stages on 50k (own epochs) | paper schedule (50k x 120 epochs) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['preset']} | {r['width']} | {r['samples_per_s']:.1f} | {r['projected_10k_own_epochs_min']:.0f} min "
                     f"| {r['projected_50k_own_epochs_h']:.1f} h | {r['projected_paper_schedule_50k_h']:.1f} h |")  # fmt: skip
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
