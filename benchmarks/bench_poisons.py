"""Generation throughput of each poison on real CIFAR-10 images (images/s, fit and apply timed apart).

    .venv/bin/python benchmarks/bench_poisons.py --n 10000 --n-optimised 1000

Writes benchmarks/results/poisons/bench_poisons.{json,md}. The machine may be shared: the 1-minute load
average before and after each measurement is recorded next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from purify_pipeline import poisons, shards  # noqa: E402

OPTIMISED = ("em", "tap", "rem", "sep")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    ap.add_argument("--n", type=int, default=10000, help="images for lsp/ar/ops/random/classwise")
    ap.add_argument("--n-optimised", type=int, default=1000, help="images for em/tap/rem/sep (default CPU knobs)")
    ap.add_argument("--poisons", nargs="+", default=list(poisons.POISONS))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "poisons"))
    args = ap.parse_args()
    os.environ.setdefault("PURIFY_PIPELINE_NO_PROGRESS", "1")

    n_max = max(args.n, args.n_optimised)
    urls = shards.expand(f"{args.data}/train-{{000000..{(n_max + 999) // 1000 - 1:06d}}}.tar")
    arr = shards.load_arrays(urls, progress=False)
    results = []
    for name in args.poisons:
        n = args.n_optimised if name in OPTIMISED else args.n
        x, y, keys = arr.images[:n], arr.labels[:n], arr.keys[:n]
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        p = poisons.fit(name, x, y, num_classes=10, seed=0, sample_ids=keys, progress=False)
        t1 = time.perf_counter()
        out = p.apply(x, y, sample_ids=keys)
        t2 = time.perf_counter()
        load1 = os.getloadavg()[0]
        row = {
            "poison": name, "images": n, "fit_s": round(t1 - t0, 3), "apply_s": round(t2 - t1, 3),
            "images_per_s": round(n / (t2 - t0), 1), "loadavg_1m_before": round(load0, 2),
            "loadavg_1m_after": round(load1, 2), "budget": p.budget,
            "changed_pixels_per_image": float((out != x).any(axis=-1).sum(axis=(1, 2)).mean()),
        }
        for k in ("history", "converged", "surrogate_accuracy", "target_rate"):
            if hasattr(p, k):
                row[k] = getattr(p, k)
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("budget", "history")}), flush=True)

    facts = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "numpy": np.__version__, "python": platform.python_version(), "device": "cpu",
        "platform": platform.platform(),
        "note": "shared machine: other jobs ran concurrently; see the load averages per row (2 cores)",
    }
    try:
        import ray

        facts["ray"] = ray.__version__
    except ImportError:
        pass
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_poisons.json").write_text(json.dumps({"machine": facts, "results": results}, indent=2) + "\n")
    lines = [
        "# Poison generation throughput (CIFAR-10, 32x32, CPU)", "",
        f"Command: `{facts['command']}`  ",
        f"Machine: {facts['cpu_count']} CPUs, torch {facts['torch']} ({facts['torch_threads']} threads), "
        f"ray {facts.get('ray', '-')}, python {facts['python']}, device cpu.  ",
        "The machine was shared with other jobs while this ran: the 1-minute load average before/after each "
        "row shows how contended it was (2 cores; load > 2 means the numbers are pessimistic).", "",
        "| poison | images | fit s | apply s | images/s | load before/after | notes |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        notes = []
        if "history" in r:
            notes.append(f"{len(r['history'])} rounds, final surrogate error {r['history'][-1]['error']:.3f}")
        if "target_rate" in r:
            notes.append(f"surrogate clean acc {r['surrogate_accuracy']:.2f}, target hit rate {r['target_rate']:.2f}")
        lines.append(f"| {r['poison']} | {r['images']} | {r['fit_s']} | {r['apply_s']} | {r['images_per_s']} | "
                     f"{r['loadavg_1m_before']}/{r['loadavg_1m_after']} | {'; '.join(notes)} |")
    (out / "bench_poisons.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
