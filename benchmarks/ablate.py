"""D-VAE ablations: which schedule, constraint and output recover the most accuracy?

    python benchmarks/ablate.py screen --poisons lsp --variants base bs32 ep30 tau2-1.5 pclass1  # 2k-image fits
    python benchmarks/ablate.py outputs --poisons lsp ar ops em    # x1 / x2' / x̂2 of the matrix's 10k fits
    python benchmarks/ablate.py refit2 --poisons em --variants bs32 # the matrix's stage 1, stage 2 refit
    python benchmarks/ablate.py checkpoint --poisons lsp --path CKPT --label paper-h200-50k-ep5 --precision bf16
    python benchmarks/ablate.py infer --poisons sep --fit-preset cpu --fit-seed 1 --infer base noise8 twice
    python benchmarks/ablate.py --report-only                       # rebuild the tables from the cache

`screen` fits both D-VAE stages in-process (`fit_two_stage`) on the first --images poisoned training images of
the cpu-mini tier (class-balanced shards; the poisoned sets come from the accuracy matrix's cache, made if
missing), one variant = the `cpu-v1` preset (width 32, 15+15 epochs, stage 2 at batch 128) plus the
overrides in VARIANTS. `outputs` re-uses the matrix's 10k `cpu-v1` `fit_purifier` checkpoints; `refit2` keeps
their stage 1 and refits stage 2 alone with a variant; `checkpoint`
measures any saved purifier (e.g. a `paper` fit on all 50k images from a GPU, benchmarks/paper_gpu.py) on the
same 10k images and classifier, so fits of other scales land in the same table. `infer` purifies with a matrix fit
(--fit-preset, --fit-seed) under purification-time variants (INFER_VARIANTS: input noise, stage 2 twice, a hotter
latent; no refit), the control `base` being the product's own sampled output. Every cell measures, for each output taken:
x1 = x - p̂1 (stage 1), x2' = x1 - p̂2, x̂2 = D2(x2') (the paper's output; "mean" = z = mu, "final" = the
product's sampled purification), the poison retention r and PSNR against the clean images, and for the
outputs in --classify the fast classifier's clean test accuracy (all 10k test images) when trained on them.
Baselines (none / JPEG-10 / grayscale / clean) are measured at the same training-set size. Every fit and
every classifier run is cached under benchmarks/cache/ablate/, so a stopped run resumes (a `screen` fit from its
last finished epoch: fits/<tag>.partial holds the per-epoch checkpoints). Results:
benchmarks/results/ablation/ablation.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_facts  # noqa: E402
from _restore import restore_cells  # noqa: E402
from diagnose_dvae import explain  # noqa: E402
from diagnose_dvae import run as stage_outputs  # noqa: E402
from matrix import DEFENSES, TIERS, _poisoned, matrix_fit_dir  # noqa: E402

from purify_pipeline import (  # noqa: E402
    DVAE,
    DVAEConfig,
    Purifier,
    fit_two_stage,
    psnr,
    retention,
    shards,
)
from purify_pipeline.dvae.noise import sample_noise  # noqa: E402
from purify_pipeline.dvae.purifier import CPU_BLOCK  # noqa: E402
from purify_pipeline.dvae.train import fit_stage, to_float_nchw  # noqa: E402
from purify_pipeline.eval.classifiers import ClassifierConfig  # noqa: E402
from purify_pipeline.eval.defenses import apply_defense  # noqa: E402
from purify_pipeline.eval.train_classifier import train_classifier  # noqa: E402

# name -> (DVAEConfig overrides of the `cpu-v1` preset, what the variant asks)
VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "base": ({}, "the cpu-v1 preset (width 32, 15+15 epochs, batch 128, tau 1/3)"),
    "bs32": ({"batch_size": 32}, "4x the optimiser steps for the same samples (batch 32)"),
    "ep30": ({"epochs": 30}, "twice the epochs per stage"),
    "ep60": ({"epochs": 60}, "the paper's 60 epochs per stage"),
    "ep15": ({"epochs": 15}, "15 epochs per stage: with `--preset paper`, the H100 50k fit's network and schedule "
             "on 10k images (the equal-width half of 10k vs 50k)"),
    "tau2-1.5": ({"tau2": 1.5}, "a stage-2 rate target the KL actually reaches (it sits at 2.7-2.95 < 3)"),
    "tau1-0.5": ({"tau1": 0.5}, "a tighter stage-1 rate: blurrier x̂1, more residual for p̂1"),
    "pclass1": ({"p_class_weight": 1.0}, "opt-in within-class variance penalty on p̂ (weight 1)"),
    "pclass10": ({"p_class_weight": 10.0}, "opt-in within-class variance penalty on p̂ (weight 10)"),
    "tauauto": ({"tau_auto_ratio": 0.8}, "automatic tau: after 1 epoch, each stage's tau = 0.8 x that epoch's KL, so "
                "the rate hinge binds (opt-in `tau_auto_ratio`)"),
    "bs32-tauauto": ({"batch_size": 32, "tau_auto_ratio": 0.8}, "`bs32` (the `cpu` preset's stage 2) with automatic "
                     "tau (0.8 x epoch 1's KL)"),
    "tau1-0.5-seed1": ({"tau1": 0.5, "seed": 1}, "`tau1-0.5` with D-VAE fit seed 1 (a second fit, not a second classifier)"),
    "tau1-0.5-seed2": ({"tau1": 0.5, "seed": 2}, "`tau1-0.5` with D-VAE fit seed 2 (the third fit)"),
    "seed1": ({"seed": 1}, "the preset with D-VAE fit seed 1: the fit-to-fit spread"),
    "seed2": ({"seed": 2}, "the preset with D-VAE fit seed 2: its third fit, paired with `tau1-0.5-seed2`"),
    "w16": ({"width": 16}, "half the width"),
    "w64": ({"width": 64}, "the paper's width"),
}
OUTPUTS = ("x1", "x2p", "xhat2_mean", "final")

# name -> (purification-time changes of a fitted purifier's final output, what the variant asks); `infer` only
INFER_VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "base": ({}, "the product's sampled final output, computed in-process (the control of the other rows)"),
    "noise4": ({"noise": 4 / 255}, "Gaussian noise (sigma 4/255) added to stage 2's input x1 before its passes"),
    "noise8": ({"noise": 8 / 255}, "the same with sigma 8/255 (the L-inf budget of most poisons)"),
    "noise16": ({"noise": 16 / 255}, "the same with sigma 16/255"),
    "twice": ({"passes": 2}, "stage 2 applied twice: the final output goes through stage 2's passes again"),
    "temp2": ({"temperature": 2.0}, "stage 2's latent drawn at twice the posterior's standard deviation"),
    "jpeg50in": ({"jpeg_in": 50}, "the poisoned images JPEG-compressed at quality 50 before purification (a mild "
                 "pre-filter; the fit saw uncompressed images)"),
    "ptwice": ({"p_steps": 2}, "stage 2's perturbation removed twice (x2' = x1 - p2(x1), then x2' - p2(x2')) before D2"),
    "sharp0.5": ({"sharpen": 0.5}, "unsharp mask on the final output: x + 0.5 (x - blur(x)), Gaussian blur sigma 1 "
                 "(gives back the detail the decoder's blur takes)"),
    "sharp1": ({"sharpen": 1.0}, "the same with amount 1"),
}


def _arrays(data: Path, cache: Path, poison: str, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    clean = shards.load_arrays(str(data / TIERS["cpu-mini"]["train"]), progress=False)
    poisoned, delta = _poisoned(cache, poison, clean)
    return clean.images[:n], clean.labels[:n], poisoned[:n], delta[:n]


def _outputs(pur: Purifier, clean: np.ndarray, poisoned: np.ndarray, labels: np.ndarray,
             final: bool = True) -> dict[str, np.ndarray]:  # fmt: skip
    torch.manual_seed(0)
    r = stage_outputs(pur, clean, poisoned, labels)
    outs = {"x1": r["x1"], "x2p": r["x2p"], "xhat2_mean": r["xhat2"], "_p1": r["p1"]}
    if final:
        outs["final"] = pur.purify(poisoned, labels, mode="sample", seed=0)
    return outs


def _classify(cache: Path, key: str, images: np.ndarray, labels: np.ndarray, test: Any, seed: int) -> dict:
    f = cache / "runs" / f"{key}__c{seed}.json"
    if f.exists():
        return json.loads(f.read_text())
    t0 = time.perf_counter()
    res = train_classifier(images, labels, test.images, test.labels, ClassifierConfig.preset("fast"), seed=seed,
                           progress=False)  # fmt: skip
    cell = {"key": key, "seed": seed, "test_acc": 100.0 * res["test_acc"], "seconds": time.perf_counter() - t0}
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(cell))
    print(f"  {key} seed {seed}: {cell['test_acc']:.1f}%", flush=True)
    return cell


def _measure(cache: Path, tag: str, outs: dict[str, np.ndarray], clean: np.ndarray, labels: np.ndarray,
             delta: np.ndarray, test: Any, classify: list[str], seeds: list[int]) -> dict[str, Any]:  # fmt: skip
    res: dict[str, Any] = {}
    for o in OUTPUTS:
        if o not in outs:
            continue
        runs = [_classify(cache, f"{tag}__{o}", outs[o], labels, test, s) for s in seeds] if o in classify else []
        done = {r["seed"] for r in runs}  # classifier runs cached by an earlier invocation count too
        runs += [json.loads(f.read_text()) for f in sorted((cache / "runs").glob(f"{tag}__{o}__c*.json"))
                 if json.loads(f.read_text())["seed"] not in done]  # fmt: skip
        accs = [r["test_acc"] for r in sorted(runs, key=lambda r: r["seed"])]
        res[o] = {"retention": retention(outs[o], clean, delta), "psnr": psnr(outs[o], clean), "acc": accs}
    if "_p1" in outs:
        d = delta.transpose(0, 3, 1, 2).reshape(len(delta), -1)
        res["p1_vs_delta"] = explain(outs["_p1"], d)
    return res


def baselines(cache: Path, poison: str, n: int, args, test: Any) -> None:
    clean, labels, poisoned, delta = _arrays(Path(args.data), args.matrix_cache, poison, n)
    outs = {"clean": clean, **{d: apply_defense(DEFENSES[d][0], poisoned, **DEFENSES[d][1]) for d in ("none", "jpeg10", "grayscale")}}
    cell = {"kind": "baseline", "poison": poison, "images": n, "results": {}}
    for name, x in outs.items():
        accs = [_classify(cache, f"n{n}__{'clean' if name == 'clean' else poison + '__' + name}", x, labels, test, s)["test_acc"]
                for s in args.seeds]  # fmt: skip
        cell["results"][name] = {"retention": retention(x, clean, delta), "psnr": psnr(x, clean) if name != "clean" else None,
                                 "acc": accs}  # fmt: skip
    _write_cell(cache, cell)


def _cached_fit(cache: Path, tag: str, fit: Callable[[Path], Purifier]) -> tuple[Purifier, dict[str, Any]]:
    """The purifier cached under fits/<tag>, or fit(partial) saved there; with the cell's timing, kept in
    fits/<tag>.seconds: {"fit_seconds": s}, plus "fit_resumed": True when the fit was resumed.

    fit gets fits/<tag>.partial for per-epoch checkpoints, so a stopped fit resumes from its last epoch; a resumed
    fit's seconds are the sum of its epoch times (the time of the stopped run is not known otherwise)."""
    ckpt, partial = cache / "fits" / tag, cache / "fits" / f"{tag}.partial"
    seconds = ckpt.parent / f"{tag}.seconds"
    if (ckpt / "config.json").exists():
        return Purifier.load(str(ckpt)), json.loads(seconds.read_text())
    resumed = partial.exists()
    t0 = time.perf_counter()
    pur = fit(partial)
    timing: dict[str, Any] = {"fit_seconds": time.perf_counter() - t0}
    if resumed:
        timing = {"fit_seconds": sum(e.get("seconds", 0.0) for h in pur.metrics.values() for e in h), "fit_resumed": True}
    pur.save(str(ckpt))
    seconds.write_text(json.dumps(timing))
    shutil.rmtree(partial, ignore_errors=True)
    return pur, timing


def _final_epoch(metrics: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    return {s: {k: h[-1][k] for k in ("rec", "rec_p", "kl", "energy", "tau", "hinge_active") if k in h[-1]} for s, h in metrics.items() if h}


def _steps(v: Any) -> str:
    """Optimiser steps per stage: one number, or 'stage 1 / stage 2' where the stages differ (the `cpu` preset)."""
    return str(v) if not isinstance(v, list) else (str(v[0]) if v[0] == v[1] else f"{v[0]} / {v[1]}")


def _kl_tau(c: dict[str, Any]) -> str:
    """Each stage's last-epoch KL and tau, e.g. 's1 1.05 (1) / s2 2.91 (3)'; tau from the overrides if not recorded."""
    fe, ov = c.get("final_epoch") or {}, c.get("overrides") or {}
    parts = []
    for i, s in ((1, "stage1"), (2, "stage2")):
        if s in fe and "kl" in fe[s]:
            tau = fe[s].get("tau", ov.get(f"tau{i}", DVAEConfig().tau(i)))
            hinge = f", hinge on in {fe[s]['hinge_active']:.0%} of steps" if "hinge_active" in fe[s] else ""
            parts.append(f"s{i} {fe[s]['kl']:.2f} ({tau:.3g}{hinge})")
    return " / ".join(parts)


def cell_name(c: dict[str, Any]) -> str:
    """A cell's cache file name (`screen__lsp__n10000__cpu-w16__bf16`, ...): the one rule for writing and restoring."""
    if c["kind"] == "baseline":
        return f"baseline__{c['poison']}__n{c['images']}"
    prec = f"__{c['precision']}" if c["kind"] in ("screen", "refit2") else ""
    return f"{c['kind']}__{c['poison']}__n{c['images']}__{c['variant']}{prec}"


def _write_cell(cache: Path, cell: dict[str, Any]) -> None:
    name = cell_name(cell)
    f = cache / "cells" / f"{name}.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(cell, indent=1))
    print(f"{name}: " + ", ".join(f"{o} r={v['retention']:.2f} acc={v['acc']}" for o, v in cell["results"].items() if o in OUTPUTS))


def screen(cache: Path, poison: str, variant: str, n: int, args, test: Any) -> None:
    overrides, _ = VARIANTS[variant]
    prec = "bf16" if args.bf16 else "fp32"
    name = variant if args.preset == "cpu-v1" else f"{args.preset}-{variant}"
    tag = f"{poison}__n{n}__{name}__{prec}"
    clean, labels, poisoned, delta = _arrays(Path(args.data), args.matrix_cache, poison, n)
    pur, timing = _cached_fit(cache, tag, lambda partial: fit_two_stage(
        poisoned, labels, DVAEConfig.preset(args.preset, **overrides), progress=not args.quiet, bf16=args.bf16,
        checkpoint_dir=partial))  # fmt: skip
    cell = {"kind": "screen", "poison": poison, "variant": name, "overrides": overrides, "images": n, "precision": prec,
            **timing,
            "steps_per_stage": [max(1, n // pur.cfg.batch_size_for(s)) * pur.cfg.epochs_for(s)
                                                      for s in (1, 2)],  # fmt: skip
            "final_epoch": _final_epoch(pur.metrics),
            "results": _measure(cache, tag, _outputs(pur, clean, poisoned, labels), clean, labels, delta, test,
                                args.classify, args.seeds)}  # fmt: skip
    _write_cell(cache, cell)


def refit_stage2(cache: Path, poison: str, variant: str, args, test: Any) -> None:
    """Keep the matrix fit's stage 1, refit stage 2 alone with the variant's overrides (half a fit's cost).

    Stage 2 trains on the stage-1 outputs x1 as fit_purifier does (mode cfg.stage1_mode, seed cfg.seed); for
    ar/ops/em stage 1 leaves x1 ≈ x (p̂1 explains ~0 of δ), so the final output is stage 2's work alone."""
    root = matrix_fit_dir(args.matrix_cache, poison, args.fit_preset, args.fit_seed) / "checkpoint"
    if not (root / "config.json").exists():
        print(f"{poison}: no matrix fit at {root} yet; skipped")
        return
    n = 10_000
    overrides, _ = VARIANTS[variant]
    prec = "bf16" if args.bf16 else "fp32"
    of = "" if (args.fit_preset, args.fit_seed) == ("cpu-v1", 0) else f"__of-{args.fit_preset}-s{args.fit_seed}"
    tag = f"{poison}__n{n}__s2-{variant}{of}__{prec}"
    clean, labels, poisoned, delta = _arrays(Path(args.data), args.matrix_cache, poison, n)
    base = Purifier.load(str(root))
    cfg = DVAEConfig.from_dict({**base.cfg.to_dict(), **overrides})

    def fit(_partial: Path) -> Purifier:  # half a fit: no per-epoch checkpoints
        x1 = base.purify_stage1(poisoned, labels, mode=cfg.stage1_mode, seed=cfg.seed, progress=False)
        torch.manual_seed(cfg.seed + 1)
        stage2 = DVAE(base.cfg)  # same network (a Purifier's stages share one config); trained with cfg's settings
        hist = fit_stage(stage2, x1, labels, tau=cfg.tau2, epochs=cfg.stage2_epochs, cfg=cfg, seed=cfg.seed + 1,
                         progress=not args.quiet, desc="stage 2", batch_size=cfg.batch_size_for(2),
                         autocast_dtype=torch.bfloat16 if args.bf16 else None)  # fmt: skip
        return Purifier(base.stage1, stage2, class_names=base.class_names, metrics={"stage2": hist})

    pur, timing = _cached_fit(cache, tag, fit)
    cell = {"kind": "refit2", "poison": poison, "variant": f"s2-{variant}{of.replace('__', ' ')}", "overrides": overrides,
            "of_fit": {"preset": args.fit_preset, "seed": args.fit_seed, "checkpoint": root.parent.name}, "images": n,
            "precision": prec, **timing, "steps_per_stage": cfg.steps_per_epoch(n) * cfg.stage2_epochs,
            "final_epoch": _final_epoch(pur.metrics),
            "results": _measure(cache, tag, _outputs(pur, clean, poisoned, labels), clean, labels, delta, test,
                                args.classify, args.seeds)}  # fmt: skip
    _write_cell(cache, cell)


def outputs_of_matrix_fit(cache: Path, poison: str, args, test: Any) -> None:
    root = matrix_fit_dir(args.matrix_cache, poison, "cpu-v1")
    if not (root / "checkpoint" / "config.json").exists():
        print(f"{poison}: no matrix fit at {root} yet (python benchmarks/matrix.py --poisons {poison} --defenses dvae "
              "--dvae-preset cpu-v1); skipped")
        return
    n = 10_000
    clean, labels, poisoned, delta = _arrays(Path(args.data), args.matrix_cache, poison, n)
    pur = Purifier.load(str(root / "checkpoint"))
    outs = _outputs(pur, clean, poisoned, labels, final=False)  # the matrix's D-VAE cells are the final output
    tag = f"{poison}__n{n}__matrix-cpu"
    seconds = json.loads((root / "seconds.json").read_text()) if (root / "seconds.json").exists() else {}
    cell = {"kind": "outputs", "poison": poison, "variant": "matrix-cpu", "images": n, "fit": seconds,
            "steps_per_stage": pur.cfg.steps_per_epoch(n) * pur.cfg.epochs,
            "results": _measure(cache, tag, outs, clean, labels, delta, test, args.classify, args.seeds)}
    mcells = [json.loads(p.read_text()) for p in (args.matrix_cache / "cells").glob(f"{poison}__dvae-cpu-v1__s*.json")]
    if mcells:
        cell["results"]["final"] = {"retention": mcells[0]["retention"], "psnr": mcells[0]["psnr_vs_clean"],
                                    "acc": [c["test_acc"] for c in sorted(mcells, key=lambda c: c["seed"])],
                                    "from": "accuracy matrix dvae cells"}  # fmt: skip
    _write_cell(cache, cell)


def outputs_of_checkpoint(cache: Path, poison: str, args, test: Any) -> None:
    """Every output of a saved purifier on the cpu-mini 10k poisoned images (it must have been fit on them,
    or on a superset such as all 50k poisoned training images)."""
    if not args.path or not args.label:
        raise SystemExit("checkpoint needs --path CKPT and --label NAME")
    n = 10_000
    clean, labels, poisoned, delta = _arrays(Path(args.data), args.matrix_cache, poison, n)
    pur = Purifier.load(str(args.path))
    meta = json.loads((Path(args.path) / "config.json").read_text())
    tag = f"{poison}__n{n}__{args.label}"
    cell = {"kind": "outputs", "poison": poison, "variant": args.label, "images": n, "checkpoint": str(args.path),
            "checkpoint_fingerprint": pur.fingerprint, "config": pur.cfg.to_dict(),
            "fit_epochs": {k: len(v) for k, v in (meta.get("metrics") or {}).items()}, "precision": args.precision,
            "fit_seconds": sum(e.get("seconds", 0.0) for h in (meta.get("metrics") or {}).values() for e in h),
            "steps_per_stage": sum(e.get("samples", 0) for e in (meta.get("metrics") or {}).get("stage1", []))
            // pur.cfg.batch_size_for(1),
            "results": _measure(cache, tag, _outputs(pur, clean, poisoned, labels), clean, labels, delta, test,
                                args.classify, args.seeds)}  # fmt: skip
    _write_cell(cache, cell)


@torch.no_grad()
def _infer_final(pur: Purifier, images: np.ndarray, labels: np.ndarray, *, noise: float = 0.0, passes: int = 1,
                 temperature: float = 1.0, p_steps: int = 1, jpeg_in: int = 0, sharpen: float = 0.0,
                 seed: int = 0) -> np.ndarray:  # fmt: skip
    """The sampled final output with purification-time changes; with none it is `pur.purify(mode="sample")`."""
    if jpeg_in:
        images = apply_defense("jpeg", images, quality=jpeg_in)
    n, shape, fmt = len(images), pur.stage1.latent_shape, pur._format
    pad = -n % CPU_BLOCK  # blocks of CPU_BLOCK images, as `Purifier.purify_torch` runs them on a CPU
    images, labels = (np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in (images, labels))
    out = np.empty_like(images)
    for i in range(0, len(images), CPU_BLOCK):
        ids = np.arange(i, i + CPU_BLOCK)
        x = to_float_nchw(images[ids]).contiguous(memory_format=fmt)
        y = torch.from_numpy(labels[ids])
        eps = [sample_noise(seed + k, ids, shape) for k in range(passes)]
        xs = pur.purify_torch(x, y, eps=eps[0], stages=1)
        for k in range(passes):
            if noise:
                pix = sample_noise(seed + 1000 + k, ids, xs.shape[1:], passes=1)[:, 0]  # per image: batch-independent
                xs = torch.clamp(xs + noise * pix, 0, 1).contiguous(memory_format=fmt)
            x2 = xs
            for _ in range(p_steps):
                p2 = pur.stage2(x2, y, eps=temperature * eps[k][:, 1], decode_x=False).p_hat
                x2 = torch.clamp(x2 - p2, 0, 1).contiguous(memory_format=fmt)
            xs = pur.stage2(x2, y, eps=temperature * eps[k][:, 2], decode_p=False).x_hat
        if sharpen:
            from torchvision.transforms.functional import gaussian_blur

            xs = torch.clamp(xs + sharpen * (xs - gaussian_blur(xs, [5, 5], [1.0, 1.0])), 0, 1)
        out[ids] = torch.round(xs * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out[:n]


def infer_variants(cache: Path, poison: str, args, test: Any) -> None:
    """The matrix fit (--fit-preset, --fit-seed) purifying its own 10k images with each --infer variant."""
    root = matrix_fit_dir(args.matrix_cache, poison, args.fit_preset, args.fit_seed) / "checkpoint"
    if not (root / "config.json").exists():
        print(f"{poison}: no matrix fit at {root} yet; skipped")
        return
    n = 10_000
    clean, labels, poisoned, delta = _arrays(Path(args.data), args.matrix_cache, poison, n)
    pur = Purifier.load(str(root))
    for v in args.infer:
        changes, _ = INFER_VARIANTS[v]
        tag = f"{poison}__n{n}__infer-{v}__of-{args.fit_preset}-s{args.fit_seed}"
        t0 = time.perf_counter()
        final = _infer_final(pur, poisoned, labels, **changes)
        if v == "base":  # the control must be the product's own output
            assert np.array_equal(final[:64], pur.purify(poisoned[:64], labels[:64], mode="sample", seed=0))
        cell = {"kind": "infer", "poison": poison, "variant": f"infer-{v} of-{args.fit_preset}-s{args.fit_seed}",
                "changes": changes, "of_fit": {"preset": args.fit_preset, "seed": args.fit_seed,
                                               "checkpoint": root.parent.name},
                "images": n, "purify_seconds": time.perf_counter() - t0,
                "results": _measure(cache, tag, {"final": final}, clean, labels, delta, test, ["final"], args.seeds)}
        _write_cell(cache, cell)


def _fmt(v: dict | None) -> str:
    if not v:
        return "—"
    acc = v.get("acc") or []
    a = "" if not acc else f"{statistics.mean(acc):.1f}" + (f" ± {(max(acc) - min(acc)) / 2:.1f}" if len(acc) > 1 else "")
    rp = f"({v['retention']:.2f} / " + ("—" if v.get("psnr") is None else f"{v['psnr']:.1f}") + ")"
    return f"{a} {rp}" if a else rp


def report(cache: Path, out: Path, total_s: float | None = None) -> None:
    restored = restore_cells(cache / "cells", out / "ablation.json", cell_name)
    if restored and restored[1] == len(restored[0]["cells"]):  # the cache had lost them all: keep their classifier time
        doc = restored[0]
        fits = sum(c.get("fit_seconds", 0) for c in doc["cells"])
        (cache / "restored_classifier_seconds.json").write_text(json.dumps(doc["compute_seconds"] - fits))
    cells = [json.loads(f.read_text()) for f in sorted((cache / "cells").glob("*.json"))]
    facts = machine_facts("cpu")
    runs = [json.loads(f.read_text()) for f in sorted((cache / "runs").glob("*.json"))]
    prior = cache / "restored_classifier_seconds.json"
    compute_s = sum(r["seconds"] for r in runs) + sum(c.get("fit_seconds", 0) for c in cells)
    compute_s += json.loads(prior.read_text()) if prior.exists() else 0.0
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps({"cells": cells, "compute_seconds": compute_s, "machine": facts}, indent=1))
    lines = ["# D-VAE ablations", "", f"Command: `{facts['command']}`  ",
             f"Machine: {facts['cpu_count']} CPUs, torch {facts['torch']}, ray {facts['ray']}, CPU. Summed compute of "
             f"every cached fit and classifier run: {compute_s / 60:.1f} min.", "",
             "Each entry: fast-classifier clean test accuracy % on all 10k test images (mean ± half-range over "
             "classifier seeds) (poison retention r / PSNR vs clean, dB). x1 = x − p̂1, x2′ = x1 − p̂2, "
             "x̂2 = D2(x2′) with z = μ, final = the product's sampled output. Screens fit on the first N poisoned "
             "training images and train the classifier on those N.", ""]  # fmt: skip
    for n in sorted({c["images"] for c in cells}):
        group = [c for c in cells if c["images"] == n]
        lines += [f"## {n} training images", "", "| poison | cell | precision | fit min | steps/stage | x1 | x2′ | x̂2 (mean z) | final | p̂1 explains δ "
                  "| last epoch's KL (τ) |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for c in sorted(group, key=lambda c: (c["poison"], c["kind"], c.get("variant", ""))):
            r = c["results"]
            if c["kind"] == "baseline":
                lines.append(f"| {c['poison']} | baselines: clean {_fmt(r['clean'])}, none {_fmt(r['none'])}, "
                             f"JPEG-10 {_fmt(r['jpeg10'])}, grayscale {_fmt(r['grayscale'])} | | | | | | | | | |")  # fmt: skip
                continue
            fit_min = (c.get("fit_seconds") or (c.get("fit") or {}).get("fit_and_purify_s") or 0) / 60
            p1 = r.get("p1_vs_delta")
            p1s = "" if not p1 else f"{p1['projection']:.2f} (cos {p1['cosine']:.2f})"
            prec = c.get("precision") or ("bf16" if (c.get("fit") or {}).get("bf16") else "fp32")
            lines.append(f"| {c['poison']} | {c['variant']} | {prec} "
                         f"| {fit_min:.1f}{' (resumed)' if c.get('fit_resumed') else ''} | {_steps(c.get('steps_per_stage', ''))} | {_fmt(r.get('x1'))} | {_fmt(r.get('x2p'))} "
                         f"| {_fmt(r.get('xhat2_mean'))} | {_fmt(r.get('final'))} "
                         f"| {p1s} | {_kl_tau(c)} |")  # fmt: skip
        lines.append("")
    lines += ["Cells: `matrix-cpu` = the accuracy matrix's `fit_purifier` checkpoint (`cpu-v1` preset: stage 2 at "
              "batch 128, 10k poisoned images; "
              "fit min = fit + purify through Ray); `s2-<variant>` = that checkpoint's stage 1 with stage 2 refitted "
              "in-process with the variant (fit min = stage 2 alone; `s2-<variant> of-<preset>-s<seed>`: the same on the "
              "matrix's fit of that preset and D-VAE seed, stage 2 at the preset's batch); screens = both stages fitted "
              "(a fit min marked resumed: continued from per-epoch checkpoints, the sum of its epoch times) "
              "in-process on the first N images, `cpu-v2-<variant>` from the `cpu-v2` preset (`cpu` with "
              "the paper's tau1 = 1; `--preset cpu-v2` re-runs or restores them), `<preset>-<variant>` from another --preset, a bare "
              "variant from `cpu-v1`; `infer-<variant> of-<preset>-s<seed>` = that matrix fit purifying with a "
              "purification-time variant (`ablate.py infer`, no refit: fit min 0), `infer-base` its control; any other name = `ablate.py checkpoint`: a purifier fit elsewhere "
              "(its cell's `fit_on` says where; `paper-h200-50k-ep5` / `paper-h100-50k-ep15` = the `paper` preset, "
              "5+5 / 15+15 epochs on all 50k poisoned images on a GPU, a superset of these 10k; fit min = its epochs' "
              "GPU seconds).", "",
              "Variants: " + "; ".join(f"`{k}` = {v[1]}" for k, v in VARIANTS.items()), ""]  # fmt: skip
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    _plot(out / "ablation.png", cells)
    print("\n".join(lines))


def _plot(path: Path, cells: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for c in cells:
        for o, v in c["results"].items():
            if not isinstance(v, dict) or not v.get("acc") or "retention" not in v:
                continue
            label = f"{c['poison']} {c.get('variant', 'baseline')} {o} (n={c['images']})"
            ax.scatter(v["retention"], statistics.mean(v["acc"]), s=18)
            ax.annotate(label, (v["retention"], statistics.mean(v["acc"])), fontsize=5)
    ax.set(xlabel="poison retention r of the training images", ylabel="clean test accuracy (%)",
           title="accuracy vs retention (all ablation cells)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", choices=["screen", "outputs", "baselines", "refit2", "checkpoint", "infer"],
                    default=None)  # fmt: skip
    ap.add_argument("--poisons", nargs="+", default=["lsp"])
    ap.add_argument("--variants", nargs="+", default=["base"], choices=sorted(VARIANTS))
    ap.add_argument("--infer", nargs="+", default=["base"], choices=sorted(INFER_VARIANTS),
                    help="infer: purification-time variants of the matrix fit (--fit-preset, --fit-seed)")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--preset", default="cpu-v1", help="the preset the variants override (tiny: a smoke run)")
    ap.add_argument("--classify", nargs="+", default=["final", "x1"], choices=OUTPUTS,
                    help="outputs a classifier is trained on (retention/PSNR are measured for all)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="classifier seeds")
    ap.add_argument("--bf16", action="store_true", help="fit with bfloat16 autocast (AMX CPU / GPU)")
    ap.add_argument("--data", default=os.environ.get("PURIFY_PIPELINE_DATA", str(REPO.parent / "shared" / "data" / "cifar10")))
    ap.add_argument("--cache", default=str(REPO / "benchmarks" / "cache" / "ablate"))
    ap.add_argument("--matrix-cache", type=Path, default=REPO / "benchmarks" / "cache" / "cpu-mini")
    ap.add_argument("--fit-preset", default="cpu-v1", help="refit2: the preset of the matrix fit whose stage 1 is kept")
    ap.add_argument("--fit-seed", type=int, default=0, help="refit2: that matrix fit's D-VAE seed")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ablation"))
    ap.add_argument("--path", type=Path, help="checkpoint: the purifier directory (model.safetensors + config.json)")
    ap.add_argument("--label", help="checkpoint: the cell's name in the table")
    ap.add_argument("--precision", default="?", help="checkpoint: how it was fit (bf16 / fp32), for the table")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    cache, out = Path(args.cache), Path(args.out)
    if not args.report_only:
        if args.what is None:
            ap.error("choose screen, outputs, baselines, refit2 or checkpoint (or --report-only)")
        test = shards.load_arrays(str(Path(args.data) / TIERS["cpu-mini"]["test"]), progress=False)
        for p in args.poisons:
            if args.what == "baselines":
                baselines(cache, p, args.images, args, test)
            elif args.what == "outputs":
                outputs_of_matrix_fit(cache, p, args, test)
            elif args.what == "checkpoint":
                outputs_of_checkpoint(cache, p, args, test)
            elif args.what == "infer":
                infer_variants(cache, p, args, test)
            elif args.what == "refit2":
                for v in args.variants:
                    refit_stage2(cache, p, v, args, test)
            else:
                for v in args.variants:
                    screen(cache, p, v, args.images, args, test)
    report(cache, out)


if __name__ == "__main__":
    main()
