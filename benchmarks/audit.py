"""Learnability audit on the cpu-mini protocol: clean calibration, poisons, defended sets, runtime.

    nice -n 15 python benchmarks/audit.py                   # everything; cached sets are reused
    nice -n 15 python benchmarks/audit.py --skip-timing

Clean sets (calibration): train-{000000..000009}, {000010..000019}, ... {000040..000049} and the test split
(10k each), plus JPEG-10 / grayscale / BDR-2 / sharpen+filter of the first subset. Poisons: the cpu-mini accuracy matrix's own
poisoned sets (first 10k training images, seed 0), read from the matrix cache (--matrix-cache, default
benchmarks/cache/cpu-mini; the cheap poisons are generated there by matrix.py's code when missing, the optimised
ones - em, tap, rem, sep - only with --generate), each undefended and with JPEG-10, grayscale, BDR, sharpen+filter; and every
D-VAE-purified set the matrix cache holds (`dvae-<poison>-<preset>-s<fit seed>-*/purified`, one row per fit,
and one per `dvae+<defense>` post-transform the matrix scored on that fit).
Classifier accuracies come from the matrix's cells (its cache's cells/, the committed matrix.json and, for the
baselines, cpu-mini-regen/matrix.json: EM and TAP re-measured on the bytes the D-VAE fits saw), only for
cells whose poison_sha256 equals the digest of the bytes audited here (and, for D-VAE rows, the same fit seed).
Results: benchmarks/results/audit/.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import matrix  # noqa: E402
from _machine import machine_facts  # noqa: E402

from purify_pipeline import audit as A  # noqa: E402
from purify_pipeline import shards  # noqa: E402
from purify_pipeline.eval.defenses import apply_defense  # noqa: E402

DATA = Path(os.environ.get("PURIFY_PIPELINE_DATA", str(REPO.parent / "shared" / "data" / "cifar10")))
CACHE = REPO / "benchmarks" / "cache" / "audit"
OUT = REPO / "benchmarks" / "results" / "audit"
CLEAN = {f"train-{i:02d}k": f"train-{{{i:06d}..{i + 9:06d}}}.tar" for i in range(0, 50, 10)}
CLEAN["test"] = "test-{000000..000009}.tar"
POISONS = ["lsp", "ar", "ops", "classwise", "random", "em", "tap", "rem", "sep", "cuda"]
DATA_DEFENSES = ("none", "jpeg10", "grayscale", "bdr", "sharpen_ff")  # transforms of the data the audit can see
OPTIMISED = ("em", "tap", "rem", "sep")  # minutes to generate: audited when the matrix cache has them (or --generate)


def load(pattern: str) -> shards.ShardArrays:
    f = CACHE / f"clean-{pattern.replace('{', '').replace('}', '').replace('..', '-')}.npz"
    if not f.exists():
        a = shards.load_arrays(str(DATA / pattern), progress=False)
        CACHE.mkdir(parents=True, exist_ok=True)
        np.savez(f, images=a.images, labels=a.labels, keys=np.array(a.keys))
    z = np.load(f)
    return shards.ShardArrays(z["images"], z["labels"], [str(k) for k in z["keys"]], [])


def restore_rows(rows_dir: Path, committed: Path) -> int:
    """Seed the row cache with the committed report's rows it lacks, so that a fresh clone measuring one more set
    (--only, or a new D-VAE fit) keeps every committed row in the report. Returns how many were restored."""
    rows_dir.mkdir(parents=True, exist_ok=True)
    if not committed.exists():
        return 0
    n = 0
    for r in json.loads(committed.read_text()).get("rows", []):
        f = rows_dir / f"{r['set']}.json"
        if not f.exists():
            f.write_text(json.dumps({**r, "restored_from": committed.name}))
            n += 1
    return n


def cached_rows(pattern: str) -> list[dict]:
    """Rows in the row cache whose file names match `pattern` (a glob), in name order."""
    return [json.loads(f.read_text()) for f in sorted((CACHE / "rows").glob(pattern))]


def spearman(a: list[float], b: list[float]) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def auroc(pos: list[float], neg: list[float]) -> float:
    return float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--matrix-cache", default=str(REPO / "benchmarks" / "cache" / "cpu-mini"),
                    help="the cpu-mini matrix cache: its poisoned sets, D-VAE-purified sets and cells")
    ap.add_argument("--generate", action="store_true", help="also generate missing optimised poisons (minutes each)")
    ap.add_argument("--only", help="regex: measure only the sets it matches (parallel workers; rows are cached "
                    "under benchmarks/cache/audit/rows/), then run without it to assemble the report")
    ap.add_argument("--timing-only", action="store_true", help="measure runtime only (timing.json)")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.timing_only:
        t = measure_timing(load(CLEAN["train-00k"]), load(CLEAN["train-10k"]))
        (OUT / "timing.json").write_text(json.dumps({"machine": machine_facts(), **t}, indent=1))
        return
    facts = machine_facts()
    rows: list[dict] = []
    restored = restore_rows(CACHE / "rows", OUT / "audit.json")
    if restored:
        print(f"{restored} committed rows restored into {CACHE / 'rows'} (a set measured again replaces its row)")

    def run(name: str, kind: str, images: Callable[[], np.ndarray], labels: np.ndarray, **extra) -> None:
        """Audit the set `images()` builds (only when its row is neither cached nor filtered out by --only)."""
        f = CACHE / "rows" / f"{name}.json"
        if f.exists() and json.loads(f.read_text()).get("poison_sha256") == extra.get("poison_sha256"):
            rows.append({**json.loads(f.read_text()), **extra})
            return
        if args.only and not re.search(args.only, name):
            return
        r = A.audit(images(), labels, num_classes=10, seed=0)
        rows.append({"set": name, "kind": kind, **extra, **r.to_dict()})
        f.write_text(json.dumps(rows[-1]))
        print(f"{name:>22} {kind:>8} score {r.score:.3f} (pixel {r.pixel_acc:.3f}, texture {r.texture_acc:.3f}) "
              f"{r.seconds:.1f}s", flush=True)  # fmt: skip

    sub0 = load(CLEAN["train-00k"])
    for name, pat in CLEAN.items():
        a = load(pat)
        run(name, "clean", lambda: a.images, a.labels)
    for d in DATA_DEFENSES[1:]:
        run(f"train-00k+{d}", "clean", lambda: apply_defense(matrix.DEFENSES[d][0], sub0.images, **matrix.DEFENSES[d][1]),
            sub0.labels, defense=d)  # fmt: skip
    clean_scores = [r["score"] for r in rows] or [0.0]
    margin = max(max(clean_scores) - min(clean_scores), 0.02)
    thresholds = (max(clean_scores) + margin, max(clean_scores) + 4 * margin)

    mcache = Path(args.matrix_cache)
    cells = {matrix.cell_name(c): c for c in
             json.loads((REPO / "benchmarks" / "results" / "cpu-mini" / "matrix.json").read_text())["cells"]}
    cells.update({f.stem: json.loads(f.read_text()) for f in sorted((mcache / "cells").glob("*.json"))})
    cells = list(cells.values())  # a cell measured in the cache wins over the committed one of the same name
    regen = REPO / "benchmarks" / "results" / "cpu-mini-regen" / "matrix.json"  # EM / TAP baselines on the cached bytes
    cells += [c for c in json.loads(regen.read_text())["cells"] if not c["defense"].startswith("dvae")]

    def matched(p: str, d: str, digest: str, fit: int | None = None) -> tuple[float | None, float | None]:
        """Mean classifier accuracy of the matrix cells on exactly these bytes, and of cells on other bytes."""
        cs = [c for c in cells if c["poison"] == p and c["defense"] == d
              and (fit is None or (c.get("dvae_fit_seed") or 0) == fit)]  # fmt: skip
        same = [c["test_acc"] for c in cs if c.get("poison_sha256") == digest]
        other = [c["test_acc"] for c in cs if c.get("poison_sha256") != digest]
        return (float(np.mean(same)) if same else None), (float(np.mean(other)) if other and not same else None)

    for p in POISONS:
        if not (mcache / f"poisoned-{p}.npz").exists() and p in OPTIMISED and not args.generate:
            kept = cached_rows(f"{p}+*.json")
            rows += kept
            print(f"{p}: not generated ({mcache}/poisoned-{p}.npz missing; --generate makes it); "
                  f"its {len(kept)} cached rows kept", flush=True)  # fmt: skip
            continue
        x, _ = matrix._poisoned(mcache, p, sub0)
        digest = matrix.poison_digest(x)
        for d in DATA_DEFENSES:
            def xd(d: str = d) -> np.ndarray:
                return x if d == "none" else apply_defense(matrix.DEFENSES[d][0], x, **matrix.DEFENSES[d][1])

            acc, other = matched(p, d, digest)
            run(f"{p}+{d}", "poisoned", xd, sub0.labels, poison=p, defense=d, poison_sha256=digest,
                matrix_acc=acc, matrix_acc_unverified=other)  # fmt: skip
        for fit_dir in sorted(mcache.glob(f"dvae-{p}-*-s*-*")):
            man = fit_dir / "poisoned" / "manifest.json"
            if not (fit_dir / "purified").is_dir() or not man.exists():
                continue
            if json.loads(man.read_text()).get("poison_sha256") != digest:
                print(f"{fit_dir.name}: fitted on another generation of {p}; skipped", flush=True)
                continue
            fit = int(fit_dir.name.split("-s")[-1].split("-")[0])
            pur = shards.load_arrays(str(fit_dir / "purified" / "purified-*.tar"), progress=False)
            if pur.keys != sub0.keys:
                raise RuntimeError(f"{fit_dir}: purified keys differ from the poisoned subset's")
            for d in ("dvae", *sorted({c["defense"] for c in cells if c["defense"].startswith("dvae+")})):
                post = d.partition("+")[2]
                acc, other = matched(p, d, digest, fit)
                if post and acc is None:
                    continue  # a D-VAE output + post-transform the matrix did not score on this fit

                def xp(post: str = post, pur: shards.ShardArrays = pur) -> np.ndarray:
                    if not post:
                        return pur.images
                    return apply_defense(matrix.DEFENSES[post][0], pur.images, **matrix.DEFENSES[post][1])

                run(f"{p}+{d}-fit{fit}", "poisoned", xp, sub0.labels, poison=p, defense=d, dvae_fit_seed=fit,
                    poison_sha256=digest, matrix_acc=acc, matrix_acc_unverified=other)  # fmt: skip
        seen = {r["set"] for r in rows}  # D-VAE rows of fits this matrix cache does not hold: kept from the row cache
        rows += [r for r in cached_rows(f"{p}+dvae*-fit*.json") if r["set"] not in seen and r.get("poison_sha256") == digest]

    if args.only:
        return
    for r in rows:  # cached rows may predate the calibrated constants: verdicts from this run's clean thresholds
        r["verdict_calibrated"] = r["verdict"] = A.verdict_for(r["score"], thresholds)
        r["thresholds"] = list(thresholds)
    clean_s = [r["score"] for r in rows if r["kind"] == "clean"]
    below40 = [r for r in rows if r["kind"] == "poisoned" and r.get("defense") == "none"
               and r.get("matrix_acc") is not None and r["matrix_acc"] < 40]  # fmt: skip
    scored = [r for r in rows if r["kind"] == "poisoned" and r.get("matrix_acc") is not None]
    defended = [r for r in scored if r["defense"] != "none"]
    summary = {
        "thresholds": list(thresholds), "thresholds_in_code": list(A.THRESHOLDS), "clean_max": max(clean_s), "clean_min": min(clean_s), "margin": margin,
        "auroc_below40_vs_clean": auroc([r["score"] for r in below40], clean_s) if below40 else None,
        "below40_sets": [r["set"] for r in below40],
        "spearman_defended": spearman([r["score"] for r in defended], [r["matrix_acc"] for r in defended])
        if len(defended) > 2 else None,
        "spearman_defended_n": len(defended),
        "spearman_all_matched": spearman([r["score"] for r in scored], [r["matrix_acc"] for r in scored])
        if len(scored) > 2 else None,
        "spearman_all_matched_n": len(scored),
        "below40_not_clean_like": all(r["verdict_calibrated"] != "clean-like" for r in scored if r["matrix_acc"] < 40),
    }  # fmt: skip
    tf = OUT / "timing.json"
    timing = json.loads(tf.read_text()) if tf.exists() else None if args.skip_timing else measure_timing(sub0, load(CLEAN["train-10k"]))
    result = {"machine": facts, "summary": summary, "rows": rows, "timing": timing}
    (OUT / "audit.json").write_text(json.dumps(result, indent=1))
    write_md(result)
    print((OUT / "audit.md").read_text())


def measure_timing(a: shards.ShardArrays, b: shards.ShardArrays) -> dict:
    """audit() wall and process-CPU seconds at 2.5k..20k images (LSP-poisoned bytes are not needed: cost does
    not depend on content), and audit_shards end to end (read + decode + audit) on 10 shards."""
    import torch

    x = np.concatenate([a.images, b.images])
    y = np.concatenate([a.labels, b.labels])
    out = {"torch_threads": torch.get_num_threads(), "audit": []}
    for n in (2500, 5000, 10000, 20000):
        w, c = time.perf_counter(), time.process_time()
        A.audit(x[:n], y[:n], num_classes=10, seed=0, max_images=None)
        out["audit"].append({"n": n, "wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c,
                             "loadavg_1min": os.getloadavg()[0]})  # fmt: skip
        print(out["audit"][-1], flush=True)
    w, c = time.perf_counter(), time.process_time()
    A.audit_shards(str(DATA / CLEAN["train-00k"]), max_images=10000)
    out["audit_shards_10k"] = {"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c,
                               "loadavg_1min": os.getloadavg()[0]}  # fmt: skip
    print(out["audit_shards_10k"], flush=True)
    return out


def write_md(res: dict) -> None:
    s, f = res["summary"], res["machine"]
    lines = ["# Learnability audit, cpu-mini protocol (seed 0, 10k images per set)", "",
             f"Command: `{f['command']}`  ", f"Machine: {f['cpu_model']}, {f['cpu_count']} CPUs, torch {f['torch']}, "
             f"ray {f['ray']}, load average at start {f['loadavg_at_start'][0]:.1f}.", "",
             f"Thresholds from the clean sets only: clean max {s['clean_max']:.4f}, min {s['clean_min']:.4f}, margin "
             f"{s['margin']:.4f} -> clean-like <= {s['thresholds'][0]:.4f}, poisoned >= {s['thresholds'][1]:.4f} "
             f"(purify_pipeline/audit.py THRESHOLDS: {s['thresholds_in_code']}).", "",
             "| set | kind | score | pixel probe | texture probe | verdict | classifier acc % (matrix.json, same bytes) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in res["rows"]:
        acc = r.get("matrix_acc")
        acc_s = f"{acc:.1f}" if acc is not None else (f"({r['matrix_acc_unverified']:.1f}, other bytes)"
                                                    if r.get("matrix_acc_unverified") is not None else "—")  # fmt: skip
        lines.append(f"| {r['set']} | {r['kind']} | {r['score']:.3f} | {r['pixel_acc']:.3f} | {r['texture_acc']:.3f} | "
                     f"{r['verdict_calibrated']} | {acc_s} |")  # fmt: skip
    lines += ["", f"- AUROC (poisons whose undefended classifier accuracy < 40% vs every clean set): "
              f"{s['auroc_below40_vs_clean']} over {', '.join(s['below40_sets'])}",
              f"- Spearman(score, classifier accuracy), defended cells with matching poison bytes: "
              f"{s['spearman_defended']} (n = {s['spearman_defended_n']}); with the undefended cells too: "
              f"{s['spearman_all_matched']} (n = {s['spearman_all_matched_n']})",
              f"- every matched cell below 40% is not clean-like: {s['below40_not_clean_like']}"]  # fmt: skip
    t = res.get("timing")
    if t:
        lines += ["", f"Runtime of `audit()` (torch threads {t['torch_threads']}):", "", "| images | wall s | CPU s | load |",
                  "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {a['n']} | {a['wall_s']:.1f} | {a['cpu_s']:.1f} | {a['loadavg_1min']:.1f} |" for a in t["audit"]]
        a = t["audit_shards_10k"]
        lines += ["", f"`audit_shards` on 10 shards (10k JPEGs: read, decode, audit): wall {a['wall_s']:.1f} s, "
                  f"CPU {a['cpu_s']:.1f} s, load {a['loadavg_1min']:.1f}."]  # fmt: skip
    (OUT / "audit.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
