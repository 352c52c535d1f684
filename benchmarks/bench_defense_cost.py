"""Benchmark: what a training-time defense costs per epoch against standard training, side by side in one run.

    python benchmarks/bench_defense_cost.py                  # writes benchmarks/results/classifier/defense-cost.{json,md}

The matrix's classifier (`fast` preset) trains one epoch on --images CIFAR-10 training images with each defense of
the matrix's TRAINING_DEFENSES (benchmarks/_defenses.py) (PGD adversarial training, UEraser-Lite, UEraser-Max) and without one;
the defenses alternate repeat by repeat in this one process, so all see the same machine state. Reported: seconds
per epoch scaled to 10,000 images (the cpu-mini tier's epoch) and the ratio to standard training (median over
repeats). A timing benchmark: run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_facts  # noqa: E402
from _defenses import TRAINING_DEFENSES  # noqa: E402

from purify_pipeline import shards  # noqa: E402
from purify_pipeline.eval.classifiers import ClassifierConfig  # noqa: E402
from purify_pipeline.eval.train_classifier import train_classifier  # noqa: E402


def epoch_seconds(data: shards.ShardArrays, test: shards.ShardArrays, cfg: ClassifierConfig) -> float:
    """Wall seconds of one training epoch (the evaluation after it is not counted)."""
    res = train_classifier(data.images, data.labels, test.images, test.labels, cfg, seed=0, progress=False)
    return float(res["history"][0]["epoch_seconds"])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    ap.add_argument("--images", type=int, default=1280, help="training images per timed epoch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--defenses", nargs="+", default=["none", *TRAINING_DEFENSES])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "classifier"))
    ap.add_argument("--name", default="defense-cost")
    args = ap.parse_args(argv)
    facts = machine_facts("cpu")
    tr = shards.load_arrays(str(Path(args.data) / "train-{000000..000001}.tar"), progress=False)
    te = shards.load_arrays(str(Path(args.data) / "test-000000.tar"), progress=False)
    n = min(args.images, len(tr.images))
    tr = shards.ShardArrays(tr.images[:n], tr.labels[:n], tr.keys[:n], tr.urls[:n])
    te = shards.ShardArrays(te.images[:200], te.labels[:200], te.keys[:200], te.urls[:200])
    # ueraser_max_fraction=1: UEraser-Max's one timed epoch is one of its K-view epochs (the first quarter of training)
    base = dataclasses.replace(ClassifierConfig.preset("fast"), epochs=1, ueraser_max_fraction=1.0)
    cfgs = {d: dataclasses.replace(base, **({} if d == "none" else TRAINING_DEFENSES[d])) for d in args.defenses}
    epoch_seconds(tr, te, base)  # warm-up (oneDNN primitive caches, allocator)
    times: dict[str, list[float]] = {d: [] for d in cfgs}
    for r in range(args.repeats):
        for d, cfg in cfgs.items():
            times[d].append(epoch_seconds(tr, te, cfg))
            print(f"repeat {r} {d:>12}: {times[d][-1]:.2f} s for {n} images", flush=True)
    ref = statistics.median(times["none"]) if "none" in times else None
    rows = [{"defense": d, "overrides": {} if d == "none" else TRAINING_DEFENSES[d], "seconds": ts,
             "median_s": statistics.median(ts), "s_per_10k_epoch": statistics.median(ts) * 10_000 / n,
             "ratio_to_standard": statistics.median(ts) / ref if ref else None} for d, ts in times.items()]  # fmt: skip
    facts["loadavg_at_end"] = os.getloadavg()
    doc = {"benchmark": "defense-cost", "classifier": base.to_dict(), "images": n, "repeats": args.repeats,
           "rows": rows, "machine": facts, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(doc, indent=1))
    lines = [f"# Training-time defenses: cost per epoch against standard training (`fast` classifier)", "",
             f"Command: `{facts['command']}`  ", f"Machine: {facts['cpu_model']}, {facts['cpu_count']} CPUs "
             f"({facts['cpu_capability']}), torch {facts['torch']}, ray {facts['ray']}, device cpu; load average "
             f"{facts['loadavg_at_start'][0]:.1f} at start, {facts['loadavg_at_end'][0]:.1f} at end. One epoch on "
             f"{n} CIFAR-10 images per measurement, medians of {args.repeats} alternating repeats.", "",
             "| defense | settings | s per epoch of 10k images | x standard training |", "|---|---|---|---|"]
    for r in rows:
        ov = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["overrides"].items())
        ratio = f"{r['ratio_to_standard']:.1f}x" if r["ratio_to_standard"] else "—"
        lines.append(f"| {r['defense']} | {ov or '—'} | {r['s_per_10k_epoch']:.1f} | {ratio} |")
    lines += ["", "UEraser-Max's row is an epoch of its K-view phase (each image's highest loss over K views, forward and "
              "backward through all K): the first `ueraser_max_fraction` (0.25) of training; its other epochs cost what "
              "UEraser-Lite's do."]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return doc


if __name__ == "__main__":
    main()
