"""The paper-tier campaign: whenever a GPU is lent, measure the most valuable paper-tier cells still missing.

    python benchmarks/campaign.py --out /root/out --budget-s 520          # on the GPU machine (no Ray needed)
    python benchmarks/campaign.py --plan                                   # what the next run would do
    python benchmarks/paper_gpu.py --report benchmarks/results/paper/raw/*.jsonl /root/out/*/results.jsonl

It reads which cells are already measured (every `kind: cell` record in the committed
benchmarks/results/paper/raw/*.jsonl, plus the results.jsonl of runs under --out that are not committed yet),
walks the priority list below, and runs `paper_gpu.py` for the first missing step, then the next, while the
wall budget lasts (each step's jobs share the one GPU as separate processes). Every step writes its own
OUT/<step>/results.jsonl in the matrix's cell format, so copying them into raw/ and re-running --report
commits them, and the next campaign continues from there.

Priority: (1) D-VAE on EM, AR, OPS, TAP at full scale, each with its undefended row (D-VAE epochs fitted to the
budget, recorded in the cell); (2) second seeds (a second D-VAE fit and classifier seed) of every D-VAE cell;
(3) the paper's full 60 + 60-epoch fit on LSP; (4) the rest of the threat model, D-VAE and undefended on CUDA, SEP
and REM; (5) the other defenses' columns on every poison: sharpen + filter and UEraser-Lite, then PGD adversarial
training (with 15 classifier epochs, said in its cells), then UEraser-Max. A step needs at least --min-step-s of
budget left.
"""
from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RAW = REPO / "benchmarks" / "results" / "paper" / "raw"
POISONS = ["em", "ar", "ops", "tap"]
LATER_POISONS = ["cuda", "sep", "rem"]  # after the first four's second seeds and the full LSP fit
PAPER_EPOCHS = 60
DEFENSE_COLUMNS = ["sharpen_ff", "ueraser"]  # one ResNet-18 run each (UEraser-Lite ~1.3x standard training)
# PGD-10 adversarial training costs ~9x standard training per epoch (benchmarks/results/classifier/defense-cost.md),
# so the paper's 60 classifier epochs would not fit one call: AT cells train 15 (recorded in the cell, shown as
# `at-clf15` in the tables)
AT_CLF_EPOCHS = 15
# the optimised poisons' surrogates at the paper's settings take most of a short GPU run; the changed settings
# are recorded in each cell's poison budget
POISON_SET = {"em": ["surrogate=small", "max_rounds=10"], "rem": ["surrogate=small", "max_rounds=10"],
              "sep": ["surrogate_epochs=40", "checkpoints=10"]}  # fmt: skip
SMOKE_SET = {"em": ["surrogate=small", "max_rounds=1"], "rem": ["surrogate=small", "max_rounds=1", "adv_steps=1"],
             "tap": ["surrogate=small", "surrogate_epochs=1", "pgd_steps=2"],
             "sep": ["surrogate=small", "surrogate_epochs=2", "checkpoints=2", "pgd_steps=2"]}  # fmt: skip


def measured(paths: list[str]) -> set[tuple[str, str, int, int | None]]:
    """(poison, defense, seed, D-VAE epochs or None) of every cell record in these results.jsonl files."""
    have = set()
    for p in paths:
        for line in Path(p).read_text().splitlines():
            r = json.loads(line)
            if r.get("kind") == "cell":
                have.add((r["poison"], r["defense"], int(r["seed"]), r.get("dvae_epochs")))
    return have


def _has(have: set, poison: str, defense: str, seed: int, full: bool = False) -> bool:
    return any(p == poison and d == defense and s == seed and (not full or e == PAPER_EPOCHS)
               for p, d, s, e in have)  # fmt: skip


def next_step(have: set, poisons: list[str], later: list[str] = LATER_POISONS) -> dict | None:
    """The first missing step of the priority list: {"name", "poison", "jobs", "seed", "dvae_epochs"}."""
    for p in poisons:
        jobs = [j for j in ("dvae", "none") if not _has(have, p, j, 0)]
        if jobs:
            return {"name": f"{p}-s0", "poison": p, "jobs": jobs, "seed": 0, "dvae_epochs": None}
    for p in ["lsp", *poisons]:
        if _has(have, p, "dvae", 0) and not _has(have, p, "dvae", 1):
            return {"name": f"{p}-s1", "poison": p, "jobs": ["dvae"], "seed": 1, "dvae_epochs": None}
    if not _has(have, "lsp", "dvae", 0, full=True):
        return {"name": "lsp-full", "poison": "lsp", "jobs": ["dvae"], "seed": 0, "dvae_epochs": PAPER_EPOCHS}
    for p in later:
        jobs = [j for j in ("dvae", "none") if not _has(have, p, j, 0)]
        if jobs:
            return {"name": f"{p}-s0", "poison": p, "jobs": jobs, "seed": 0, "dvae_epochs": None}
    rows = ["lsp", *poisons, *later]
    for p in rows:  # the other defenses' columns: cheap ones first, then adversarial training
        jobs = [j for j in DEFENSE_COLUMNS if not _has(have, p, j, 0)]
        if jobs:
            return {"name": f"{p}-defenses", "poison": p, "jobs": jobs, "seed": 0, "dvae_epochs": None}
    for p in rows:
        if not _has(have, p, "at", 0):
            return {"name": f"{p}-at", "poison": p, "jobs": ["at"], "seed": 0, "dvae_epochs": None,
                    "clf_epochs": AT_CLF_EPOCHS}
    for p in rows:  # UEraser-Max: its 5-view quarter of training makes a run ~2.4x a standard one, a step of its own
        if not _has(have, p, "ueraser-max", 0):
            return {"name": f"{p}-ueraser-max", "poison": p, "jobs": ["ueraser-max"], "seed": 0, "dvae_epochs": None}
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="campaign-out", help="each step's results land in OUT/<step>/")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    ap.add_argument("--budget-s", type=float, default=520.0, help="wall budget of this call (<= 9 min a call)")
    ap.add_argument("--min-step-s", type=float, default=240.0, help="start no step with less budget than this left")
    ap.add_argument("--poisons", nargs="+", default=POISONS, help="priority order of the poisons to add")
    ap.add_argument("--later-poisons", nargs="+", default=LATER_POISONS,
                    help="poisons added after the first ones' second seeds and the full LSP fit")
    ap.add_argument("--committed", default=str(RAW), help="folder of the committed results.jsonl files")
    ap.add_argument("--device", default=None, help="passed to paper_gpu.py (default: cuda when present)")
    ap.add_argument("--smoke", action="store_true", help="paper_gpu.py --smoke (tiny widths, 1k images): CPU check")
    ap.add_argument("--compile", action="store_true", help="paper_gpu.py --compile: D-VAE fits with torch.compile")
    ap.add_argument("--plan", action="store_true", help="print the next step and exit")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    args = ap.parse_args(argv)
    out = Path(args.out)
    t_end = time.monotonic() + args.budget_s
    ran = []
    while True:
        files = sorted(glob.glob(f"{args.committed}/*.jsonl")) + sorted(glob.glob(f"{out}/*/results.jsonl"))
        step = next_step(measured(files), args.poisons, args.later_poisons)
        left = t_end - time.monotonic()
        print(json.dumps({"next": step, "budget_left_s": round(left), "measured_from": len(files)}), flush=True)
        if args.plan or step is None or left < args.min_step_s or step["name"] in ran or len(ran) == args.max_steps:
            break
        cmd = [sys.executable, str(REPO / "benchmarks" / "paper_gpu.py"), "--data", args.data,
               "--out", str(out / step["name"]), "--poison", step["poison"], "--seed", str(step["seed"]),
               "--budget-s", str(int(left - 30)), "--jobs", *step["jobs"]]  # fmt: skip
        if step["dvae_epochs"]:
            cmd += ["--dvae-epochs", str(step["dvae_epochs"])]
        if step.get("clf_epochs"):
            cmd += ["--clf-epochs", str(step["clf_epochs"])]
        sets = (SMOKE_SET if args.smoke else POISON_SET).get(step["poison"], [])
        for kv in sets:
            cmd += ["--poison-set", kv]
        if args.device:
            cmd += ["--device", args.device]
        cmd += ["--smoke"] if args.smoke else []
        cmd += ["--compile"] if args.compile else []
        print("$ " + " ".join(cmd), flush=True)
        rc = subprocess.run(cmd).returncode
        ran.append(step["name"])
        if rc != 0:
            print(f"step {step['name']} exited {rc}; its finished cells are kept in {out / step['name']}", flush=True)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
