"""The accuracy matrix: train a classifier on poisoned / defended / D-VAE-purified data, test on clean data.

    python benchmarks/matrix.py --tier cpu-mini                      # whole matrix, resumable, in the background
    python benchmarks/matrix.py --tier cpu-mini --poisons lsp --seeds 0 1
    python benchmarks/matrix.py --tier paper --poisons lsp --device cuda

Tiers: `cpu-mini` trains on train-{000000..000009}.tar (10k images) with the fast CPU classifier and the `cpu`
D-VAE preset; `paper` on all 50k with ResNet-18 and the `paper` presets; `smoke` (a few hundred images, tiny
presets) checks the machinery. Every step is cached under --cache (poisoned sets, D-VAE checkpoints,
purified shards, one JSON per cell), so an interrupted run picks up where it stopped. The D-VAE column goes
through the product path: poisoned shards -> `fit_purifier` (Ray Train) -> `purify_shards` (Ray Data).
Results: benchmarks/results/<tier>/ matrix.json, matrix.md, accuracy.png, grid-<poison>.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _defenses import DEFENSES, TRAINING_DEFENSES  # noqa: E402, F401  (re-exported: ablate.py, audit.py)
from _machine import machine_facts  # noqa: E402
from _plots import save_image_grid  # noqa: E402
from _restore import restore_cells  # noqa: E402

from purify_pipeline import DVAEConfig, poisons, psnr, retention, shards  # noqa: E402
from purify_pipeline.eval.classifiers import ClassifierConfig  # noqa: E402
from purify_pipeline.eval.defenses import apply_defense  # noqa: E402
from purify_pipeline.eval.train_classifier import train_classifier  # noqa: E402

TIERS: dict[str, dict[str, Any]] = {
    "cpu-mini": {"train": "train-{000000..000009}.tar", "test": "test-{000000..000009}.tar", "limit": None,
                 "classifier": "fast", "dvae": "cpu", "poisons": ["lsp", "ar", "ops", "em", "classwise", "tap", "rem", "sep", "cuda"]},
    "paper": {"train": "train-{000000..000049}.tar", "test": "test-{000000..000009}.tar", "limit": None,
              "classifier": "paper", "dvae": "paper", "poisons": ["lsp", "em"]},
    "smoke": {"train": "train-000000.tar", "test": "test-000000.tar", "limit": 512,
              "classifier": "tiny", "dvae": "tiny", "poisons": ["lsp", "ops"]},
}  # fmt: skip
def _load(data: Path, pattern: str, limit: int | None) -> shards.ShardArrays:
    a = shards.load_arrays(str(data / pattern), progress=False)
    if limit:
        a = shards.ShardArrays(a.images[:limit], a.labels[:limit], a.keys[:limit], a.urls[:limit])
    return a


def _poisoned(cache: Path, name: str, clean: shards.ShardArrays, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Poisoned training images and the exact added perturbation (cached)."""
    f = cache / f"poisoned-{name}.npz"
    if not f.exists():
        f.parent.mkdir(parents=True, exist_ok=True)  # a fresh clone has no cache yet
        t0 = time.perf_counter()
        p = poisons.fit(name, clean.images, clean.labels, num_classes=10, seed=seed, sample_ids=clean.keys)
        x = p.apply(clean.images, clean.labels, sample_ids=clean.keys)
        np.savez(f.with_suffix(".tmp.npz"), images=x, seconds=time.perf_counter() - t0)
        os.replace(f.with_suffix(".tmp.npz"), f)
    z = np.load(f)
    x = z["images"]
    return x, (x.astype(np.float64) - clean.images) / 255.0


def poison_digest(poisoned: np.ndarray) -> str:
    """Which generation of a poison a cell saw: EM and TAP train a surrogate, so the same seed gives other bytes
    on another CPU (measured: EM regenerated on an AVX-512 CPU differs from its first, AVX2-era generation)."""
    return hashlib.sha256(np.ascontiguousarray(poisoned).tobytes()).hexdigest()[:16]


def dvae_fit_config(preset: str, fit_seed: int) -> DVAEConfig:
    """The resolved D-VAE config of one fit of the matrix (fit seed 0 = the preset as it is)."""
    return DVAEConfig.preset(preset, seed=fit_seed) if fit_seed else DVAEConfig.preset(preset)


def dvae_cache_dir(cache: Path, name: str, cfg: DVAEConfig, bf16: bool, compile: bool = False) -> Path:
    """Where one fit lives: keyed by the full resolved config (and the precision, and compile when on), never by the
    preset's name alone, so a preset changed since a fit was cached can never reuse that fit."""
    what = {"config": {**cfg.to_dict(), "preset_name": None}, "bf16": bf16} | ({"compile": True} if compile else {})
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]
    return cache / f"dvae-{name}-{cfg.preset_name.split('+')[0]}-s{cfg.seed}-{key}"


def matrix_fit_dir(cache: Path, name: str, preset: str, fit_seed: int = 0) -> Path:
    """The cached fit of (poison, preset, fit seed) for tools that read the matrix cache (ablate.py,
    diagnose_dvae.py): the one `dvae_cache_dir` with a checkpoint, else a cache's older `dvae-<poison>-<preset>`."""
    found = sorted(p for p in cache.glob(f"dvae-{name}-{preset}-s{fit_seed}-*") if (p / "checkpoint" / "config.json").exists())
    if len(found) > 1:
        raise RuntimeError(f"{len(found)} cached {name}/{preset} fits with seed {fit_seed} (other configs or precisions): "
                           + ", ".join(p.name for p in found))  # fmt: skip
    return found[0] if found else cache / f"dvae-{name}-{preset}"


def _dvae(cache: Path, name: str, poisoned: np.ndarray, clean: shards.ShardArrays, preset: str, args,
          fit_seed: int = 0) -> np.ndarray:  # fmt: skip
    """Poisoned shards -> fit_purifier (Ray Train) -> purify_shards (Ray Data) -> purified images (cached)."""
    from purify_pipeline import fit_purifier, purify_shards

    cfg = dvae_fit_config(preset, fit_seed)
    root = dvae_cache_dir(cache, name, cfg, args.dvae_bf16, args.dvae_compile)
    src = root / "poisoned"
    digest = poison_digest(poisoned)
    if (src / "manifest.json").exists():
        have = json.loads((src / "manifest.json").read_text()).get("poison_sha256")
        if have not in (None, digest):  # fits cached before digests were recorded carry none
            raise RuntimeError(f"{src}: shards of poison generation {have}, but the cached {name} poison is {digest}; "
                               f"move {root} away to refit on the current poison")  # fmt: skip
    else:
        src.mkdir(parents=True, exist_ok=True)
        per = 1000
        for i in range(0, len(poisoned), per):
            rows = [{"__key__": k, "png": shards.encode_png(img), "cls": str(int(y)).encode()}
                    for k, img, y in zip(clean.keys[i : i + per], poisoned[i : i + per], clean.labels[i : i + per])]  # fmt: skip
            shards.write_shard(str(src / shards.shard_name("train", i // per)), rows)
        shards.write_manifest(str(src), {"classes": [str(c) for c in range(10)], "poison": name, "poison_sha256": digest})
    ckpt = root / "checkpoint"
    t0 = time.perf_counter()
    fitted = not (ckpt / "config.json").exists()
    if fitted:
        fit_purifier(str(src / "train-*.tar"), preset=cfg, output=str(ckpt), num_workers=1,
                     use_gpu=args.device.startswith("cuda"), storage_path=str(root / "runs"), run_name="fit", bf16=args.dvae_bf16,
                     compile=args.dvae_compile, progress=not args.quiet)  # fmt: skip
    t1 = time.perf_counter()
    purify_shards(str(src / "train-*.tar"), str(root / "purified"), str(ckpt), mode="sample", seed=0,
                  num_gpus=1 if args.device.startswith("cuda") else 0, progress=not args.quiet,
                  bf16=args.dvae_bf16)  # fmt: skip
    t2 = time.perf_counter()
    out = shards.load_arrays(str(root / "purified" / "purified-*.tar"), progress=False)
    assert out.keys == clean.keys, "purified shards lost or reordered samples"
    if not (root / "seconds.json").exists():  # first (real) fit + purify only; cached re-runs take seconds
        meta = json.loads((ckpt / "config.json").read_text()).get("metrics", {})
        (root / "seconds.json").write_text(json.dumps(dvae_seconds(fitted, t1 - t0, t2 - t1, meta)
                                                      | {"bf16": args.dvae_bf16, "compile": args.dvae_compile}))
    return out.images


def dvae_seconds(fitted: bool, fit_s: float, purify_s: float, metrics: dict[str, list[dict]]) -> dict[str, Any]:
    """A fit's time record: fit and purification apart. A fit finished by an earlier, interrupted run is timed by
    its epochs (the checkpoint's per-epoch seconds; without Ray's start-up and stage 1's purification)."""
    if not fitted:
        fit_s = sum(float(e.get("seconds", 0.0)) for v in metrics.values() for e in v)
    return {"fit_and_purify_s": fit_s + purify_s, "fit_s": fit_s, "purify_s": purify_s,
            "fit_timed_by": "wall clock" if fitted else "epoch seconds of the checkpoint",
            "fit_epochs": {k: len(v) for k, v in metrics.items()}}

    return out.images


def cell_name(c: dict[str, Any]) -> str:
    """A cell's cache file name (`lsp__dvae__s0`, `lsp__dvae__s0__fit1` for a second D-VAE fit): the one rule for
    writing and restoring cells."""
    fit = c.get("dvae_fit_seed") or 0
    return f"{c['poison']}__{c['defense']}__s{c['seed']}" + (f"__fit{fit}" if fit else "")


def run_cell(cache: Path, poison: str, defense: str, seed: int, train_x: np.ndarray, clean: shards.ShardArrays,
             delta: np.ndarray | None, test: shards.ShardArrays, clf: ClassifierConfig, args,
             poison_sha: str | None = None, fit: dict[str, Any] | None = None) -> None:  # fmt: skip
    """One classifier on one training set. `fit`: {"dvae_fit_seed", "dvae_config"} of a D-VAE cell."""
    f = cache / "cells" / f"{cell_name({'poison': poison, 'defense': defense, 'seed': seed, **(fit or {})})}.json"
    if f.exists():
        return
    t0 = time.perf_counter()
    res = train_classifier(train_x, clean.labels, test.images, test.labels, clf, seed=seed, device=args.device,
                           progress=not args.quiet)  # fmt: skip
    cell = {"poison": poison, "defense": defense, "seed": seed, "test_acc": 100.0 * res["test_acc"],
            "train_seconds": time.perf_counter() - t0, "psnr_vs_clean": psnr(train_x, clean.images) if poison != "clean" else None,
            "retention": retention(train_x, clean.images, delta) if delta is not None else None,
            "poison_sha256": poison_sha, "train_loss": [round(h["train_loss"], 4) for h in res["history"]],
            **(fit or {})}  # fmt: skip
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(cell))
    fit_txt = f" (D-VAE fit seed {fit['dvae_fit_seed']})" if fit else ""
    print(f"{poison:>9} {defense:>9} seed {seed}{fit_txt}: {cell['test_acc']:.1f}%", flush=True)


def _grid(path: Path, clean: np.ndarray, poisoned: np.ndarray, purified: dict[str, np.ndarray], n: int = 6) -> None:
    rows = [("clean", clean[:n]), ("poisoned", poisoned[:n])] + [(k, v[:n]) for k, v in purified.items()]
    rows += [(f"{k} - clean (x8, grey = 0)", np.clip(128 + 8 * (v[:n].astype(int) - clean[:n]), 0, 255).astype(np.uint8))
             for k, v in {"poisoned": poisoned, **purified}.items()]  # fmt: skip
    save_image_grid(path, rows)


def report(out: Path, cells: list[dict], facts: dict, tier: str, total_s: float, extra: dict | None = None,
           total_what: str = "the summed time of every cell, poison and D-VAE fit in the table, cached or restored "
                             "ones included") -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[dict]] = {}
    for c in cells:
        groups.setdefault((c["poison"], c["defense"]), []).append(c)
    summary = []
    for (p, d), cs in groups.items():
        accs = [c["test_acc"] for c in cs]
        ret = [c["retention"] for c in cs if c["retention"] is not None]
        per_fit: dict[int, list[float]] = {}
        for c in cs:
            per_fit.setdefault(c.get("dvae_fit_seed") or 0, []).append(c["test_acc"])
        fit_means = [statistics.mean(v) for v in per_fit.values()]
        summary.append({"poison": p, "defense": d, "seeds": [c["seed"] for c in cs], "mean": statistics.mean(accs),
                        "spread": (max(accs) - min(accs)) / 2 if len(accs) > 1 else None,
                        "fits": sorted(per_fit) if d.startswith("dvae") else None,
                        "fit_spread": (max(fit_means) - min(fit_means)) / 2 if len(fit_means) > 1 else None,
                        "retention": ret[0] if ret else None, "psnr": cs[0]["psnr_vs_clean"]})  # fmt: skip
    (out / "matrix.json").write_text(json.dumps({"tier": tier, "cells": cells, "summary": summary,
                                                 "total_seconds": total_s, "machine": facts, **(extra or {})}, indent=1))  # fmt: skip
    known = ["none", "dvae", *sorted({s["defense"] for s in summary if s["defense"].startswith(("dvae-", "dvae+"))}), "jpeg10", "grayscale",
             "bdr", "sharpen_ff", *TRAINING_DEFENSES]
    defs = [d for d in known if any(s["defense"] == d for s in summary)]
    defs += sorted({s["defense"] for s in summary} - set(known))  # e.g. `at-clf15`: a shortened schedule's column
    pois = list(dict.fromkeys(s["poison"] for s in summary))
    get = {(s["poison"], s["defense"]): s for s in summary}
    def fmt(s: dict | None) -> str:
        if s is None:
            return "—"
        txt = f"{s['mean']:.1f}" + (f" ± {s['spread']:.1f}" if s["spread"] is not None else "")
        if s.get("fits"):  # D-VAE cells say how many fits they rest on, and the spread of the fits' means
            n = len(s["fits"])
            txt += f" ({n} fit{'s' if n > 1 else ''}" + (f", fits ± {s['fit_spread']:.1f})" if n > 1 else ")")
        return txt

    lines = [f"# Accuracy matrix, tier `{tier}` (clean test accuracy %, mean ± half-range over seeds; D-VAE cells: "
             "over every fit and classifier seed, with the number of D-VAE fits and the half-range of their means)", "",
             f"Command: `{facts['command']}`  ", f"Machine: {facts['cpu_count']} CPUs, torch {facts['torch']}, "
             f"ray {facts['ray']}, device {facts['device']}; total {total_s / 60:.1f} min ({total_what}).", "",
             "| poison | " + " | ".join(defs) + " |", "|---|" + "---|" * len(defs)]  # fmt: skip
    for p in pois:
        lines.append(f"| {p} | " + " | ".join(fmt(get.get((p, d))) for d in defs) + " |")
    lines += ["", "Poison retention r of the training images (1 = perturbation intact) / PSNR vs clean (dB):", "",
              "| poison | " + " | ".join(defs) + " |", "|---|" + "---|" * len(defs)]  # fmt: skip
    for p in pois:
        if p == "clean":
            continue
        lines.append(f"| {p} | " + " | ".join(
            "—" if (s := get.get((p, d))) is None or s["retention"] is None else f"{s['retention']:.2f} / {s['psnr']:.1f}"
            for d in defs) + " |")  # fmt: skip
    gens = {p: {c.get("poison_sha256") for c in cells if c["poison"] == p} for p in pois if p != "clean"}
    mixed = {p: g for p, g in gens.items() if len(g) > 1 or (g - {None} and None in g)}
    if mixed:  # a cached poison regenerated (EM/TAP on another CPU) after some of its cells were measured
        lines += ["", "Rows whose cells saw different poison generations (sha256 prefix of the poisoned training images; "
                  "`unrecorded` = measured before cells recorded it):", ""]  # fmt: skip
        for p in mixed:
            by = {}
            for c in cells:
                if c["poison"] == p:
                    by.setdefault(c.get("poison_sha256") or "unrecorded", set()).add(c["defense"])
            lines.append(f"- {p}: " + "; ".join(f"{g}: {', '.join(sorted(ds))}" for g, ds in by.items()))
    (out / "matrix.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(pois), 3.4))
    w = 0.8 / max(len(defs), 1)
    for j, d in enumerate(defs):
        ys = [get[(p, d)]["mean"] if (p, d) in get else 0 for p in pois]
        ax.bar(np.arange(len(pois)) + j * w, ys, w, label=d)
    ax.set_xticks(np.arange(len(pois)) + w * (len(defs) - 1) / 2, pois)
    ax.set_ylabel("clean test accuracy (%)")
    ax.legend(fontsize=7, ncol=max(len(defs), 1))
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)


def cached_compute_seconds(cache: Path, cells: list[dict]) -> float:
    """Compute time of everything behind these cells: classifier runs + poison generation + D-VAE fit/purify."""
    total = sum(c["train_seconds"] for c in cells)
    for f in cache.glob("poisoned-*.npz"):
        total += float(np.load(f)["seconds"])
    for f in cache.glob("dvae-*/seconds.json"):
        total += json.loads(f.read_text())["fit_and_purify_s"]
    return total


def report_from_cache(cache: Path, out: Path, args) -> None:
    """matrix.json/md and accuracy.png from every cached cell (the committed cells the cache lacks restored), so
    a partial run (one poison, one defense) updates its cells without dropping the others."""
    tier = TIERS[args.tier]
    restored = restore_cells(cache / "cells", out / "matrix.json", cell_name)
    cells = [json.loads(f.read_text()) for f in sorted((cache / "cells").glob("*.json"))]
    order = ["clean"] + tier["poisons"]
    cells.sort(key=lambda c: (order.index(c["poison"]) if c["poison"] in order else 99, c["defense"], c["seed"]))
    steps = {f.parent.name: json.loads(f.read_text())["fit_and_purify_s"] for f in sorted(cache.glob("dvae-*/seconds.json"))}
    steps.update({f.stem: float(np.load(f)["seconds"]) for f in sorted(cache.glob("poisoned-*.npz"))})
    lost = {k: v for k, v in (restored[0].get("step_seconds", {}) if restored else {}).items() if k not in steps}
    report(out, cells, machine_facts(args.device), args.tier, cached_compute_seconds(cache, cells) + sum(lost.values()),
           extra={"step_seconds": {**steps, **lost}})  # poisons / fits behind restored cells keep their time


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tier", choices=sorted(TIERS), default="cpu-mini")
    ap.add_argument("--data", default=os.environ.get("PURIFY_PIPELINE_DATA", str(REPO.parent / "shared" / "data" / "cifar10")))
    ap.add_argument("--poisons", nargs="+", help="poisons of the tier (default: all); `clean` = the clean training "
                    "set under the given defenses")
    ap.add_argument("--defenses", nargs="+", default=["none", "dvae", "jpeg10", "grayscale", "bdr"],
                    help="also: sharpen_ff (data), at, ueraser, ueraser-max (training-time defenses), dvae+<data "
                    "defense> (the D-VAE output, then that transform: dvae+jpeg10)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--extra-seed-defenses", nargs="+", default=["none", "dvae"],
                    help="defenses run with every seed; the others with the first seed only")
    ap.add_argument("--dvae-preset")
    ap.add_argument("--dvae-seeds", nargs="+", type=int, default=[0, 1],
                    help="D-VAE fit seeds: a D-VAE cell rests on every fit, each with every classifier seed")
    ap.add_argument("--dvae-bf16", action="store_true",
                    help="fit and apply the D-VAE with bfloat16 autocast (GPU or AMX CPU)")
    ap.add_argument("--dvae-compile", action="store_true", help="fit the D-VAE with fit_purifier(compile=True)")
    ap.add_argument("--no-clean", action="store_true", help="leave out the clean-training row (already measured)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--report-only", action="store_true",
                    help="compute nothing: rebuild matrix.json/md and accuracy.png from every cached cell")
    args = ap.parse_args(argv)
    tier = TIERS[args.tier]
    cache = Path(args.cache or REPO / "benchmarks" / "cache" / args.tier)
    out = Path(args.out or REPO / "benchmarks" / "results" / args.tier)
    cache.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        report_from_cache(cache, out, args)
        print((out / "matrix.md").read_text())
        return
    # the committed cells first, so a fresh clone measures only what the committed table lacks (a second D-VAE
    # fit, a new row) instead of re-measuring every restored cell
    restore_cells(cache / "cells", out / "matrix.json", cell_name)
    data = Path(args.data)
    t0 = time.perf_counter()
    clean = _load(data, tier["train"], tier["limit"])
    test = _load(data, tier["test"], tier["limit"])
    clf = ClassifierConfig.preset(tier["classifier"])
    preset = args.dvae_preset or tier["dvae"]
    for s in [] if args.no_clean else args.seeds:
        run_cell(cache, "clean", "none", s, clean.images, clean, None, test, clf, args)
    for name in args.poisons or tier["poisons"]:
        if name == "clean":  # the clean row under other defenses: what a defense costs when nothing is poisoned
            poisoned, delta, psha = clean.images, None, None
        else:
            poisoned, delta = _poisoned(cache, name, clean)
            psha = poison_digest(poisoned)
        purified: dict[str, np.ndarray] = {}
        for d in args.defenses:
            base, _, post = d.partition("+")  # "dvae+jpeg10": the D-VAE output, then a data defense on it
            label = f"dvae-{preset}" if base == "dvae" and preset != tier["dvae"] else base
            label += f"+{post}" if post else ""  # a cell per preset and post-transform
            seeds = args.seeds if d in args.extra_seed_defenses or base == "dvae" else args.seeds[:1]
            if base == "dvae":  # every D-VAE fit seed, each scored with every classifier seed
                for f in args.dvae_seeds:
                    if all((cache / "cells" / f"{cell_name({'poison': name, 'defense': label, 'seed': s, 'dvae_fit_seed': f})}.json").exists()
                           for s in seeds):  # fmt: skip
                        continue  # this fit's cells are measured (or restored): no refit for a cache that lacks it
                    x = _dvae(cache, name, poisoned, clean, preset, args, fit_seed=f)
                    if post:
                        x = apply_defense(DEFENSES[post][0], x, **DEFENSES[post][1])
                    purified.setdefault(label, x)
                    fit = {"dvae_fit_seed": f, "dvae_config": dvae_fit_config(preset, f).to_dict(),
                           "dvae_bf16": args.dvae_bf16} | ({"dvae_compile": True} if args.dvae_compile else {})
                    for s in seeds:
                        run_cell(cache, name, label, s, x, clean, delta, test, clf, args, poison_sha=psha, fit=fit)
                continue
            clf_d = clf
            if d in TRAINING_DEFENSES:  # the poisoned data as it is; the classifier trains differently
                x, clf_d = poisoned, dataclasses.replace(clf, **TRAINING_DEFENSES[d])
            else:
                x = apply_defense(DEFENSES[d][0], poisoned, **DEFENSES[d][1])
            if d != "none" and d not in TRAINING_DEFENSES:
                purified[label] = x
            for s in seeds:
                run_cell(cache, name, label, s, x, clean, delta, test, clf_d, args, poison_sha=psha)
        if name != "clean" and ({"dvae", "jpeg10", "grayscale"} <= set(args.defenses)
                                or not (out / f"grid-{name}.png").exists()):
            _grid(out / f"grid-{name}.png", clean.images, poisoned, purified)  # a partial re-run keeps the full grid
        report_from_cache(cache, out, args)
    report_from_cache(cache, out, args)
    print((out / "matrix.md").read_text())
    print(f"this invocation: {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
