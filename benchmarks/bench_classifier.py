"""Benchmark an evaluation classifier preset on clean CIFAR-10: accuracy, wall time, CPU time, machine load.

    python benchmarks/bench_classifier.py --preset fast --seeds 0 1 2          # the mini tier (10k train)

Writes benchmarks/results/classifier/<name>.json and .md (per-seed accuracy, per-epoch metrics, the exact
command, machine facts). Wall time on a shared machine depends on the load, so the process CPU time and
os.getloadavg() before/after every run are recorded beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from purify_pipeline import shards  # noqa: E402
from purify_pipeline.eval.classifiers import ClassifierConfig  # noqa: E402
from purify_pipeline.eval.train_classifier import train_classifier  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "cifar10"


def _parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def _print_epoch(epoch: int, metrics: dict, model: object) -> None:
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}), flush=True)


def machine_facts(threads: int) -> dict:
    cpu_model = ""
    try:
        cpu_model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import ray

    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "torch_threads": threads,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "python": platform.python_version(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fast", choices=ClassifierConfig.presets())
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="ClassifierConfig overrides")
    ap.add_argument("--train", default=str(DATA / "train-{000000..000009}.tar"))
    ap.add_argument("--test", default=str(DATA / "test-{000000..000009}.tar"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name", default=None, help="results file stem (default: <preset>_mini)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "classifier"))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    cfg = ClassifierConfig.preset(args.preset, **{k: _parse_value(v) for k, v in overrides.items()})
    tr = shards.load_arrays(args.train, progress=False)
    te = shards.load_arrays(args.test, progress=False)
    print(f"train {tr.images.shape} test {te.images.shape} preset {cfg.preset_name}", flush=True)

    out = {
        "benchmark": "classifier",
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO)] +
                                        (argv if argv is not None else sys.argv[1:])),
        "preset": args.preset,
        "config": cfg.to_dict(),
        "train": args.train,
        "test": args.test,
        "num_train": int(len(tr.images)),
        "num_test": int(len(te.images)),
        "seeds_requested": args.seeds,
        "runs": [],
        "machine": machine_facts(args.threads),
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"{args.preset}_mini"
    for seed in args.seeds:
        load_before = os.getloadavg()
        cpu0, t0 = time.process_time(), time.perf_counter()
        res = train_classifier(tr.images, tr.labels, te.images, te.labels, cfg, seed=seed, device=args.device,
                               progress=False, on_epoch_end=_print_epoch)
        run = {
            "seed": seed,
            "test_acc": res["test_acc"],
            "test_loss": res["test_loss"],
            "wall_seconds": time.perf_counter() - t0,  # training + evaluation
            "process_cpu_seconds": time.process_time() - cpu0,  # all threads of this process
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "history": res["history"],
        }
        out["runs"].append(run)
        print(f"seed {seed}: test_acc {run['test_acc']:.4f}  wall {run['wall_seconds']:.1f}s  "
              f"cpu {run['process_cpu_seconds']:.1f}s  load {load_before} -> {run['loadavg_after']}", flush=True)
        # written after every seed, so a long run that is stopped keeps the seeds it finished
        accs = np.array([r["test_acc"] for r in out["runs"]])
        out.update(num_parameters=res["num_parameters"], test_acc_mean=float(accs.mean()),
                   test_acc_std=float(accs.std()), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
        (out_dir / f"{stem}.json").write_text(json.dumps(out, indent=1))
        (out_dir / f"{stem}.md").write_text(to_markdown(out))
    print(f"wrote {out_dir / stem}.json/.md")
    return out


def to_markdown(out: dict) -> str:
    m = out["machine"]
    lines = [
        f"# Classifier benchmark: preset `{out['preset']}` ({out['config']['arch']}, "
        f"{out['num_parameters']:,} parameters)",
        "",
        f"Train: {out['num_train']:,} clean CIFAR-10 images (`{os.path.basename(out['train'])}`), "
        f"test: {out['num_test']:,} clean test images. Final-epoch test accuracy.",
        "",
        "| seed | test acc | wall s | process CPU s | loadavg (1/5/15 min) before → after |",
        "|---|---|---|---|---|",
    ]
    for r in out["runs"]:
        lb = "/".join(f"{v:.1f}" for v in r["loadavg_before"])
        la = "/".join(f"{v:.1f}" for v in r["loadavg_after"])
        lines.append(f"| {r['seed']} | {100 * r['test_acc']:.2f}% | {r['wall_seconds']:.0f} | "
                     f"{r['process_cpu_seconds']:.0f} | {lb} → {la} |")
    lines += [
        "",
        f"Mean test accuracy: **{100 * out['test_acc_mean']:.2f}%** (std {100 * out['test_acc_std']:.2f}, "
        f"{len(out['runs'])} of {len(out['seeds_requested'])} requested seed(s) finished).",
        "",
        "Wall time includes whatever else ran on the machine (see the load averages: this machine has "
        f"{m['cpu_count']} cores); process CPU seconds (all threads of this process) are the compute actually used.",
        "",
        f"Command: `{out['command']}`",
        "",
        f"Machine: {m['cpu_count']} CPUs ({m['cpu_model']}), torch {m['torch']} with {m['torch_threads']} threads, "
        f"ray {m['ray']}, Python {m['python']}, device {m['device']}. Run {out['date']}.",
        "",
        "Config: `" + json.dumps(out["config"]) + "`",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
