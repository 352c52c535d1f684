"""Benchmark: the D-VAE fit and `purify_shards` of this tree against an earlier commit's, side by side in one run.

    python benchmarks/bench_speedup.py --base 5aa7fe2          # writes benchmarks/results/speed/<cpu>.{json,md}

Each measurement runs in a fresh child process importing one tree (`git archive` of --base into a temporary
folder, or this working tree), and the trees alternate repeat by repeat, so both see the same machine state.
- fit: `fit_stage` on real CIFAR-10 images with the `cpu` preset, stage 1's batch (128) and stage 2's (32): one call of
  two epochs of --steps optimiser steps, the second epoch timed (the first warms up, and with compile compiles; a
  separate warm-up call would make a compiled fit trace again inside the timed one). What every Ray Train worker runs.
- purify: `purify_shards` end to end on --shards CIFAR-10 shards (read tar, decode JPEG, purify, encode PNG,
  write, manifest) with an untrained, seeded `cpu`-preset checkpoint, a local 2-CPU Ray started before the clock.
Variants of this tree: its defaults (fp32), and bf16 autocast (only on a CPU with native bfloat16); with --compile
also the fit with `compile=True` (torch.compile of the convolution stacks) in each precision (purify: not timed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

FIT_CHILD = r"""
import json, sys, torch
from purify_pipeline import DVAE, DVAEConfig, fit_stage, shards
data_dir, steps, bf16, comp = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4:5] == ["1"]
data = shards.load_arrays(f"{data_dir}/train-{{000000..000003}}.tar", progress=False)  # 4,000 images: 24 steps of 128
cfg = DVAEConfig.preset("cpu")
out = {}
for stage in (1, 2):
    bs = cfg.batch_size_for(stage)
    x, y = data.images[: bs * steps], data.labels[: bs * steps]
    torch.manual_seed(0)
    # two epochs of `steps` steps in one call: the first warms up (and compiles), the second is timed
    h = fit_stage(DVAE(cfg), x, y, tau=cfg.tau(stage), epochs=2, cfg=cfg, progress=False, batch_size=bs,
                  autocast_dtype=torch.bfloat16 if bf16 else None, **({"compile": True} if comp else {}))
    out[f"stage{stage}_samples_per_s"] = h[1]["samples_per_s"]
print("RESULT " + json.dumps(out))
"""

PURIFY_CHILD = r"""
import json, sys, time, ray
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
from purify_pipeline import purify_shards
urls, out, ckpt, bf16 = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
kw = {"bf16": True} if bf16 else {}
t0 = time.perf_counter()
s = purify_shards(urls, out, ckpt, progress=False, overwrite=True, **kw)
dt = time.perf_counter() - t0
print("RESULT " + json.dumps({"images_per_s": s.samples_out / dt, "seconds": dt, "images": s.samples_out}))
"""


def run_child(tree: Path, code: str, args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PURIFY_PIPELINE_NO_PROGRESS": "1"}
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=tree)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise SystemExit(f"child failed in {tree} ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the commit to compare against (e.g. before a speed change)")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    ap.add_argument("--steps", type=int, default=8, help="timed optimiser steps per stage")
    ap.add_argument("--shards", type=int, default=5, help="CIFAR-10 shards (1,000 images each) to purify")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time the fit with compile=True")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "speed"))
    args = ap.parse_args()

    import torch
    from _machine import machine_facts

    from purify_pipeline import DVAE, DVAEConfig, Purifier
    from purify_pipeline.dvae.train import cpu_has_native_bf16

    base_sha = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    head_sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "purify_pipeline"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip())  # fmt: skip
    facts = machine_facts("cpu")
    work = Path(tempfile.mkdtemp(prefix="bench-speedup-"))
    base = work / "base"
    base.mkdir()
    subprocess.run(f"git archive {args.base} purify_pipeline | tar -x -C {base}", shell=True, cwd=REPO, check=True)
    torch.manual_seed(0)
    cfg = DVAEConfig.preset("cpu")
    ckpt = str(work / "ckpt")
    Purifier(DVAE(cfg), DVAE(cfg)).save(ckpt)
    urls = [f"{args.data}/train-{i:06d}.tar" for i in range(args.shards)]

    variants = [("base", base, False, False), ("this tree", REPO, False, False)]
    if cpu_has_native_bf16():
        variants.append(("this tree, bf16", REPO, True, False))
    if args.compile:
        variants += [(f"{name}, compiled", REPO, bf16, True) for name, tree, bf16, _ in variants if tree == REPO]
    runs: dict[str, list[dict]] = {name: [] for name, *_ in variants}
    for r in range(args.repeats):
        for name, tree, bf16, comp in variants:
            fit = run_child(tree, FIT_CHILD, [args.data, str(args.steps), "1" if bf16 else "0"] + (["1"] if comp else []))
            if not comp:  # compile is a fit option: purification is the same code as the uncompiled variant's
                pur = run_child(tree, PURIFY_CHILD, [json.dumps(urls), str(work / f"out-{len(runs[name])}-{r}"), ckpt,
                                                     "1" if bf16 else "0"])  # fmt: skip
                fit.update(purify_images_per_s=pur["images_per_s"], purify_seconds=pur["seconds"])
            runs[name].append(fit)
            print(name, runs[name][-1], flush=True)

    keys = ["stage1_samples_per_s", "stage2_samples_per_s", "purify_images_per_s"]
    med = {name: {k: statistics.median(x[k] for x in rs) if k in rs[0] else None for k in keys} for name, rs in runs.items()}
    ratio = {name: {k: med[name][k] / med["base"][k] if med[name][k] else None for k in keys} for name in med}
    facts["loadavg_at_end"] = os.getloadavg()
    res = {"base": base_sha, "head": head_sha, "uncommitted_changes": dirty, "steps": args.steps, "compile": args.compile,
           "shards": args.shards, "repeats": args.repeats, "runs": runs, "median": med, "ratio_to_base": ratio,
           "machine": facts}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = facts["cpu_capability"].lower() + ("-compile" if args.compile else "")
    (out / f"speedup-{tag}.json").write_text(json.dumps(res, indent=1))
    lines = [f"# Fit and purification speed: this tree ({head_sha}{' + changes' if dirty else ''}) against {base_sha}",
             "", f"Command: `{facts['command']}`", "",
             f"Machine: {facts['cpu_model']} ({facts['cpu_capability']}), {facts['cpu_count']} CPUs, torch "
             f"{facts['torch']}, ray {facts['ray']}; load average at start {facts['loadavg_at_start'][0]:.1f}, at end "
             f"{facts['loadavg_at_end'][0]:.1f}. Medians of {args.repeats} alternating repeats, each in a fresh process.",
             "", "| code | fit, stage 1 (batch 128) samples/s | fit, stage 2 (batch 32) samples/s | "
             f"`purify_shards` images/s ({args.shards}k images) |", "|---|---|---|---|"]  # fmt: skip
    for name in med:
        cells = [f"{med[name][k]:.1f} ({ratio[name][k]:.2f}x)" if med[name][k] else "—" for k in keys]
        lines.append(f"| {name if name != 'base' else f'base ({base_sha})'} | " + " | ".join(cells) + " |")
    (out / f"speedup-{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
