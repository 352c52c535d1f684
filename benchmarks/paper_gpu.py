"""The paper tier on one GPU, in-process: poison -> D-VAE (`paper` preset) -> purify -> ResNet-18, side by side.

    python benchmarks/paper_gpu.py --data DIR/cifar10 --out OUT --poison lsp --budget-s 420
    python benchmarks/paper_gpu.py --smoke --device cpu --out /tmp/smoke     # every code path in a minute
    python benchmarks/paper_gpu.py ... --poison em --poison-set surrogate=small --poison-set max_rounds=10
                                          # EM within a short GPU run; the changed settings are recorded
    python benchmarks/paper_gpu.py --report RUN1/results.jsonl RUN2/results.jsonl --samples RUN1/samples.npz
                                          # -> benchmarks/results/paper/ (matrix.json/md, accuracy.png, grid-lsp.png)

Why not matrix.py: the GPU machines it ran on have PyTorch but no Ray, so matrix.py's product path
(`fit_purifier` on Ray Train, `purify_shards` on Ray Data) cannot run there. This script calls the same library
functions in-process (`fit_two_stage`, `Purifier.purify`, `train_classifier`) and writes cells in matrix.py's
format. Two phases:

- probe: alone on the GPU, a few hundred steps of each model: the paper D-VAE's fit in every FIT_VARIANTS way
  (host-fed batches as before; the training set resident on the GPU with fused Adam, in NCHW and NHWC, eager,
  compiled and with CUDA graphs), purification with numpy in and out in both layouts and precisions, ResNet-18
  training: the throughput figures side by side, and a smoke test of every GPU code path before the long jobs.
  The jobs then fit in the fastest variant and purify in the faster layout (both recorded in the cell).
- jobs: one process per cell, all at once on the one GPU: `dvae` (fit -> purify -> classify) and, as far as the
  probe says they fit in --budget-s, `none` (poisoned), `clean`, `jpeg10`, `grayscale`. If the paper's 60+60
  D-VAE epochs alone do not fit the budget, the D-VAE gets fewer epochs, said in its cell (`dvae_epochs`).

The shards travel well: `tar czf cifar10.tgz -C DATA_PARENT cifar10` is 20 MB (the tiny JPEGs share headers).
Everything lands in OUT as it happens (a killed run keeps what finished): results.jsonl (probe, progress and
cell records), jobs.log, samples.npz (a few clean / poisoned / purified images for the grid), checkpoint/.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _machine import machine_facts  # noqa: E402

from purify_pipeline import DVAEConfig, poisons, psnr, retention, shards  # noqa: E402
from purify_pipeline.cli import CLIError, parse_kv  # noqa: E402
from purify_pipeline.dvae.model import DVAE  # noqa: E402
from purify_pipeline.dvae.purifier import Purifier  # noqa: E402
from purify_pipeline.dvae.train import bf16_pays as use_bf16  # noqa: E402  (emulated bf16 would make a CPU smoke run crawl)
from purify_pipeline.dvae.train import array_batches, fit_stage, make_optimizer  # noqa: E402
from purify_pipeline.dvae.two_stage import fit_two_stage  # noqa: E402
from purify_pipeline.eval.classifiers import ClassifierConfig  # noqa: E402
from purify_pipeline.eval.defenses import apply_defense  # noqa: E402
from purify_pipeline.eval.train_classifier import train_classifier  # noqa: E402

from _defenses import DEFENSES, TRAINING_DEFENSES  # noqa: E402  (the matrix's columns)

PAPER_EPOCHS = 60


def emit(out: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to OUT/results.jsonl (small O_APPEND writes: safe from several processes)."""
    record = {"t": round(time.time(), 1), **record}
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record)[:400], flush=True)


def clf_config(args: argparse.Namespace) -> ClassifierConfig:
    if args.smoke:
        return ClassifierConfig.preset("paper", epochs=1, width=8)
    return ClassifierConfig.preset("paper") if args.clf_epochs == PAPER_EPOCHS else \
        ClassifierConfig.preset("paper", epochs=args.clf_epochs)


def dvae_config(epochs: int, smoke: bool, seed: int = 0) -> DVAEConfig:
    """The paper preset (fewer epochs if asked); `seed` > 0 is another D-VAE fit (init, shuffling, noise)."""
    kw: dict[str, Any] = {"seed": seed} if seed else {}
    if smoke:
        return DVAEConfig.preset("paper", width=8, latent_channels=32, epochs=1, **kw)
    if epochs != PAPER_EPOCHS:
        kw["epochs"] = epochs
    return DVAEConfig.preset("paper", **kw)


# ----------------------------------------------------------------------------------------------- data
def _config_dict(p: Any) -> dict[str, Any]:
    """The poison's resolved settings (e.g. EM's surrogate and PGD steps once the device has chosen them)."""
    c = getattr(p, "config", None)
    return dataclasses.asdict(c) if dataclasses.is_dataclass(c) else {}


def prepare(args: argparse.Namespace, work: Path, out: Path) -> None:
    """Clean train/test arrays and the poisoned training set, as .npz files the job processes read."""
    limit = 1024 if args.smoke else args.limit
    t0 = time.perf_counter()
    train, test = _load_split(args.data, "train", limit), _load_split(args.data, "test", limit)
    if limit:
        train = shards.ShardArrays(train.images[:limit], train.labels[:limit], train.keys[:limit], train.urls[:limit])
        test = shards.ShardArrays(test.images[:limit], test.labels[:limit], test.keys[:limit], test.urls[:limit])
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        budget = parse_kv(args.poison_set)
    except CLIError as e:
        raise SystemExit(f"--poison-set: {e}") from None
    p = poisons.fit(args.poison, train.images, train.labels, num_classes=10, seed=0, sample_ids=train.keys,
                    progress=False, **budget)  # fmt: skip
    poisoned = p.apply(train.images, train.labels, sample_ids=train.keys)
    t_poison = time.perf_counter() - t0
    np.savez(work / "data.npz", clean=train.images, labels=train.labels, poisoned=poisoned,
             test=test.images, test_labels=test.labels)
    emit(out, {"kind": "data", "train": len(train.images), "test": len(test.images), "load_s": t_load,
               "poison": args.poison, "poison_s": t_poison, "poisoned_psnr": psnr(poisoned, train.images),
               "poison_overrides": budget, "poison_config": _config_dict(p)})  # fmt: skip


def _load_split(data: str, split: str, limit: int | None) -> shards.ShardArrays:
    """The split's shards in order, stopping once `limit` images are read (a smoke run needs two shards)."""
    urls = shards.expand(str(Path(data) / f"{split}-*.tar"))
    if limit:
        n, keep = 0, []
        for u in urls:
            keep.append(u)
            n += sum(1 for _ in shards.iter_samples(u))
            if n >= limit:
                break
        urls = keep
    return shards.load_arrays(urls, progress=False)


def load(work: Path) -> dict[str, np.ndarray]:
    z = np.load(work / "data.npz")
    return {k: z[k] for k in z.files}


# ---------------------------------------------------------------------------------------------- probe
# The D-VAE fit's variants the probe times side by side (the jobs' precision); the jobs fit with the fastest.
# `host`: the batches gathered on the host and copied per step, foreach Adam (the loop before resident data and
# fused Adam); the others: the training set resident on the device, fused Adam, and this layout / compile mode.
FIT_VARIANTS: dict[str, dict[str, Any]] = {
    "host_nchw": {"channels_last": False, "compile": False, "host": True},
    "nchw": {"channels_last": False, "compile": False},
    "nhwc": {"channels_last": True, "compile": False},
    "nhwc_compiled": {"channels_last": True, "compile": True},
    "nhwc_cudagraphs": {"channels_last": True, "compile": "reduce-overhead"},
}
EAGER_FALLBACK = "nchw"
# A full ResNet-18 run trains faster than the probe's 5,120-image epochs: 11,950 img/s over 60 epochs against the
# probe's 7,373 on the same H200 (raw/run1.jsonl, 1.62x); the plan divides by a little less.
CLF_PROBE_SPEEDUP = 1.5


def fit_variant(m: DVAE, x: np.ndarray, y: np.ndarray, cfg: DVAEConfig, dev: str, amp: Any, v: dict[str, Any],
                epochs: int) -> list[dict[str, float]]:  # fmt: skip
    """One stage-1 fit of `epochs` epochs on (x, y) with variant `v`'s options; its epoch history."""
    kw: dict[str, Any] = {"channels_last": v["channels_last"], "compile": v["compile"]}
    if v.get("host"):
        opt, sched = make_optimizer(m, cfg, epochs, fused=False)
        return fit_stage(m, lambda e: array_batches(x, y, cfg.batch_size, seed=0, epoch=e), tau=cfg.tau1,
                         epochs=epochs, cfg=cfg, device=dev, progress=False, autocast_dtype=amp, optimizer=opt,
                         scheduler=sched, steps=len(x) // cfg.batch_size, **kw)  # fmt: skip
    return fit_stage(m, x, y, tau=cfg.tau1, epochs=epochs, cfg=cfg, device=dev, progress=False, autocast_dtype=amp,
                     **kw)  # fmt: skip


def probe(args: argparse.Namespace, d: dict[str, np.ndarray], out: Path) -> dict[str, Any]:
    """Throughput of each model alone on the device (warm epoch after a warm-up epoch); smoke-tests the paths.

    D-VAE fit: every FIT_VARIANTS entry in the jobs' precision (compiled ones only on a GPU or with --compile; a
    variant that fails is recorded as such), plus the host path in the other precision; purification with numpy in
    and out in both layouts and precisions, and on device-resident batches; ResNet-18 training."""
    dev, n = args.device, min(len(d["poisoned"]), 256 if args.smoke else 10240)
    x, y = d["poisoned"][:n], d["labels"][:n]
    cfg = dvae_config(PAPER_EPOCHS, args.smoke)
    res: dict[str, Any] = {"probe_images": n}
    fast = "bf16" if use_bf16(dev) else "fp32"  # the precision the jobs train in
    amp = torch.bfloat16 if fast == "bf16" else None
    for name, v in FIT_VARIANTS.items():
        if v["compile"] and not (args.compile or dev.startswith("cuda")):
            continue
        torch.manual_seed(0)
        try:
            t0 = time.perf_counter()
            h = fit_variant(DVAE(cfg), x, y, cfg, dev, amp, v, epochs=3 if v["compile"] else 2)
        except Exception as e:  # noqa: BLE001  (a variant that cannot run here is a finding, not a crash)
            res[f"dvae_train_{fast}_{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            continue
        res[f"dvae_train_{fast}_{name}_img_s"] = h[-1]["samples_per_s"]
        res[f"dvae_train_{fast}_{name}_first_epoch_s"] = h[0]["seconds"]  # compile / graph capture included
        res[f"dvae_train_{fast}_{name}_wall_s"] = time.perf_counter() - t0
    if fast == "bf16":  # the host path in fp32 too, as the earlier probes had it
        torch.manual_seed(0)
        h = fit_variant(DVAE(cfg), x, y, cfg, dev, None, FIT_VARIANTS["host_nchw"], epochs=2)
        res["dvae_train_fp32_host_nchw_img_s"] = h[-1]["samples_per_s"]
    rates = {k: res[f"dvae_train_{fast}_{k}_img_s"] for k in FIT_VARIANTS if f"dvae_train_{fast}_{k}_img_s" in res}
    res["fit_variant"] = max((k for k in rates if k != "host_nchw"), key=rates.__getitem__, default="host_nchw")
    res["dvae_train_img_s"] = rates[res["fit_variant"]]
    torch.manual_seed(0)
    m = DVAE(cfg)
    fit_variant(m, x[: 4 * cfg.batch_size], y[: 4 * cfg.batch_size], cfg, dev, amp, FIT_VARIANTS["nchw"], epochs=1)
    pur = Purifier(m, DVAE(cfg), device=dev)
    reps = max(1, n // 1024)
    for layout in ("nchw", "nhwc"):
        pur.to(dev, channels_last=layout == "nhwc")
        for prec in ("fp32", "bf16") if fast == "bf16" else ("fp32",):
            for bs in (256, 1024) if layout == "nchw" and prec == "fp32" else (1024,):
                pur.purify(x[:bs], y[:bs], batch_size=bs, bf16=prec == "bf16")  # warm-up
                t0 = time.perf_counter()
                for _ in range(reps):
                    pur.purify(x[:1024], y[:1024], batch_size=bs, bf16=prec == "bf16")
                rate = reps * 1024 / (time.perf_counter() - t0)
                res[f"purify_numpy_b{bs}_{prec}_{layout}_img_s"] = rate
    res["purify_numpy_b1024_img_s"] = res["purify_numpy_b1024_fp32_nchw_img_s"]  # the earlier probes' figure
    res["purify_numpy_b256_img_s"] = res["purify_numpy_b256_fp32_nchw_img_s"]
    res["purify_layout"] = max(("nchw", "nhwc"), key=lambda k: res[f"purify_numpy_b1024_fp32_{k}_img_s"])
    pur.to(dev, channels_last=False)
    xt = torch.from_numpy(x[:1024]).permute(0, 3, 1, 2).float().div(255).to(dev)
    yt = torch.from_numpy(y[:1024]).long().to(dev)
    for label, amp_on in (("fp32", False), ("bf16", True)):
        if amp_on and fast == "fp32":
            continue
        with torch.no_grad(), torch.autocast(torch.device(dev).type, dtype=torch.bfloat16, enabled=amp_on):
            pur.purify_torch(xt, yt, generator=torch.Generator(device=dev).manual_seed(0))
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                pur.purify_torch(xt, yt, generator=torch.Generator(device=dev).manual_seed(0))
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
        res[f"purify_torch_b1024_{label}_img_s"] = 10 * len(xt) / (time.perf_counter() - t0)
    nc = min(n, 5120)
    ccfg = ClassifierConfig.preset("paper", epochs=2, width=8 if args.smoke else 64)
    r = train_classifier(x[:nc], y[:nc], d["test"][:1000], d["test_labels"][:1000], ccfg, device=dev,
                         bf16=fast == "bf16", progress=False)  # fmt: skip
    res[f"resnet18_train_{fast}_img_s"] = nc / r["history"][-1]["epoch_seconds"]
    res["jobs_precision"] = fast
    emit(out, {"kind": "probe", **res})
    return res


def plan(args: argparse.Namespace, pr: dict[str, Any], n: int, budget_s: float) -> tuple[int, list[str]]:
    """D-VAE epochs and jobs that fit `budget_s` (what is left of --budget-s after loading, poisoning and the
    probe), counting GPU work as serial (processes time-slice one GPU).

    Priority: the D-VAE cell at the paper's 60+60 epochs, then `none`, `clean`, `jpeg10`, `grayscale`; the D-VAE
    gets fewer epochs only if it alone (fit + its classifier) would not fit. The fit runs in the probe's fastest
    variant (plus one compile per stage when that variant is compiled).
    """
    fast = pr.get("jobs_precision", "bf16")
    clf_s = args.clf_epochs * n / (CLF_PROBE_SPEEDUP * pr[f"resnet18_train_{fast}_img_s"])
    epoch_s = 2 * n / pr["dvae_train_img_s"]  # one epoch of each stage
    setup_s = 2 * pr.get(f"dvae_train_{fast}_{pr['fit_variant']}_first_epoch_s", 0.0)  # compile, once per stage
    spare = budget_s - clf_s - setup_s
    epochs = PAPER_EPOCHS if spare >= PAPER_EPOCHS * epoch_s else max(5, int(spare // epoch_s))
    jobs = ["dvae"]
    for extra in ("none", "clean", "jpeg10", "grayscale"):
        if setup_s + epochs * epoch_s + (len(jobs) + 1) * clf_s <= budget_s:
            jobs.append(extra)
    emit(out_dir(args), {"kind": "plan", "clf_s_est": clf_s, "dvae_fit_s_est": setup_s + epochs * epoch_s,
                         "dvae_epochs": epochs, "fit_variant": pr["fit_variant"], "jobs": jobs,
                         "budget_s": budget_s})  # fmt: skip
    return epochs, jobs


def out_dir(args: argparse.Namespace) -> Path:
    return Path(args.out)


# ----------------------------------------------------------------------------------------------- jobs
def classify(args: argparse.Namespace, d: dict[str, np.ndarray], x: np.ndarray, defense: str, out: Path,
             extra: dict[str, Any] | None = None) -> None:  # fmt: skip
    cfg = clf_config(args)
    if defense in TRAINING_DEFENSES:  # adversarial training / UEraser: the same data, another training
        cfg = dataclasses.replace(cfg, **TRAINING_DEFENSES[defense])
        extra = {**(extra or {}), "classifier_overrides": TRAINING_DEFENSES[defense]}

    def tick(epoch: int, m: dict[str, Any], _model: Any) -> None:
        if (epoch + 1) % 10 == 0 or epoch == 0:
            emit(out, {"kind": "progress", "job": defense, "epoch": epoch + 1, "train_acc": m["train_acc"],
                       "test_acc": m.get("test_acc"), "epoch_seconds": m["epoch_seconds"]})

    poison = "clean" if defense == "clean" else args.poison
    r = train_classifier(x, d["labels"], d["test"], d["test_labels"], cfg, seed=args.seed, device=args.device,
                         bf16=use_bf16(args.device), progress=False, on_epoch_end=tick)  # fmt: skip
    delta = (d["poisoned"].astype(np.float64) - d["clean"]) / 255.0
    cell = {"kind": "cell", "tier": "paper", "poison": poison, "defense": "none" if defense == "clean" else defense,
            "seed": args.seed, "test_acc": 100.0 * r["test_acc"], "train_seconds": r["train_seconds"],
            "torch_threads": torch.get_num_threads(),
            "classifier_epochs": cfg.epochs, "bf16": use_bf16(args.device), "train_images": len(x), "device": args.device,
            "psnr_vs_clean": psnr(x, d["clean"]) if defense != "clean" else None,
            "retention": retention(x, d["clean"], delta) if defense != "clean" else None, **(extra or {})}  # fmt: skip
    emit(out, cell)


def job(args: argparse.Namespace) -> None:
    # 3 threads per job (5 jobs share a 16-core GPU host), never more than the cores: with more threads than
    # cores, torch 2.14.1's oneDNN AVX-512 kernels corrupt the heap (the ResNet-18 backward crashed with a
    # double free on a 2-core AVX-512 EPYC; 2 threads, or AVX2 kernels, ran clean).
    torch.set_num_threads(min(3, len(os.sched_getaffinity(0))))
    torch.backends.cudnn.benchmark = True
    out, work = Path(args.out), Path(args.work)
    res = out / "results.jsonl"
    if not res.exists() or '"kind": "facts"' not in res.read_text():  # a standalone --job (e.g. on a warm machine)
        emit(out, {"kind": "facts", **machine_facts(args.device)})
    d = load(work)
    name = args.job
    if name == "clean":
        classify(args, d, d["clean"], "clean", out)
    elif name == "none":
        classify(args, d, d["poisoned"], "none", out)
    elif name in TRAINING_DEFENSES:
        classify(args, d, d["poisoned"], name, out)
    elif name in DEFENSES:
        kind, kw = DEFENSES[name]
        classify(args, d, apply_defense(kind, d["poisoned"], **kw), name, out)
    elif name == "dvae":
        cfg = dvae_config(args.dvae_epochs, args.smoke, seed=args.seed)  # seed 1: a second fit, a second classifier
        variant = args.fit_variant or EAGER_FALLBACK
        t0 = time.perf_counter()
        try:
            v = FIT_VARIANTS[variant]
            pur = fit_two_stage(d["poisoned"], d["labels"], cfg, device=args.device, progress=False,
                                bf16=use_bf16(args.device), compile=v["compile"], channels_last=v["channels_last"])
        except Exception as e:  # noqa: BLE001  (keep the cell: refit eagerly, and say so)
            emit(out, {"kind": "error", "job": "dvae", "fit_variant": variant, "error": f"{type(e).__name__}: {e}"[:500]})
            variant, t0 = EAGER_FALLBACK, time.perf_counter()
            pur = fit_two_stage(d["poisoned"], d["labels"], cfg, device=args.device, progress=False,
                                bf16=use_bf16(args.device), channels_last=False)
        fit_s = time.perf_counter() - t0
        pur.to(args.device, channels_last=args.purify_layout == "nhwc")  # the probe's faster layout (same maths)
        hist = {k: [{m: round(float(e[m]), 5) for m in ("loss", "kl", "seconds") if m in e} for e in v]
                for k, v in pur.metrics.items()}  # fmt: skip
        pur.save(out / "checkpoint")  # safetensors + config.json (1.2 M parameters per stage at the paper width)
        t0 = time.perf_counter()
        x = pur.purify(d["poisoned"], d["labels"], mode="sample", seed=0, batch_size=1024)
        purify_s = time.perf_counter() - t0
        n = len(x)
        emit(out, {"kind": "dvae_fit", "preset": cfg.preset_name, "epochs": cfg.epochs, "fit_s": fit_s,
                   "fit_variant": variant, "purify_layout": args.purify_layout,
                   "fit_img_s": n * (cfg.epochs + cfg.stage2_epochs) / fit_s, "purify_s": purify_s,
                   "purify_img_s": n / purify_s, "history": hist})  # fmt: skip
        k = 8
        np.savez(out / "samples.npz", clean=d["clean"][:k], poisoned=d["poisoned"][:k], dvae=x[:k],
                 stage1=pur.purify(d["poisoned"][:k], d["labels"][:k], stages=1))
        classify(args, d, x, "dvae", out, extra={"dvae_preset": cfg.preset_name, "dvae_epochs": cfg.epochs, "dvae_seed": cfg.seed,
                                                 "dvae_fit_s": fit_s, "dvae_bf16": use_bf16(args.device),
                                                 "dvae_compile": FIT_VARIANTS[variant]["compile"],
                                                 "dvae_fit_variant": variant})
    else:
        raise SystemExit(f"unknown job {name!r}")


# --------------------------------------------------------------------------------------------- report
PAPER_REF = {"clean": "94–95", ("lsp", "none"): "13–19", ("lsp", "dvae"): "90.0", ("lsp", "jpeg10"): "80–83",
             ("lsp", "grayscale"): "65–82", ("em", "none"): "21", ("em", "dvae"): "88.8"}  # METHOD.md


def report(runs: list[Path], samples: Path | None, out: Path) -> None:
    """benchmarks/results/paper/ from the results.jsonl files of device runs (copied to out/raw/ too)."""
    import shutil

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _plots import save_image_grid
    from matrix import report as matrix_report

    out.mkdir(parents=True, exist_ok=True)
    (out / "raw").mkdir(exist_ok=True)
    cells, probes, fits, runs_meta = [], [], [], []
    for i, f in enumerate(runs, 1):
        recs = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        shutil.copyfile(f, out / "raw" / f"run{i}.jsonl")
        fact = next((r for r in recs if r["kind"] == "facts"), None)
        if fact is None:  # files from before standalone --job runs recorded their facts: the previous run's machine
            if not runs_meta:
                raise SystemExit(f"{f}: no facts record, and no earlier run to take the machine from")
            prev = runs_meta[-1]
            fact = {"command": f"a --job run on run {i - 1}'s warm machine (command not recorded)", "gpu": prev["gpu"],
                    "torch": prev["torch"], "cpu_count": prev["cpu_count"]}  # fmt: skip
        runs_meta.append({"run": i, "command": fact["command"], "gpu": fact.get("gpu"), "torch": fact["torch"],
                          "cpu_count": fact["cpu_count"], "plan": next((r for r in recs if r["kind"] == "plan"), None),
                          "total_s": next((r["total_s"] for r in recs if r["kind"] == "done"), None),
                          "ran": next((list(r["exit_codes"]) for r in recs if r["kind"] == "done"), None),
                          "poison_overrides": next((r.get("poison_overrides") for r in recs if r["kind"] == "data"),
                                                   None)})  # fmt: skip
        cells += [{**r, "run": i, "poison_overrides": runs_meta[-1]["poison_overrides"]} for r in recs
                  if r["kind"] == "cell"]  # fmt: skip
        probes += [{**r, "run": i} for r in recs if r["kind"] == "probe"]
        fits += [{**r, "run": i} for r in recs if r["kind"] == "dvae_fit"]
    for c in cells:  # one column per D-VAE schedule, so a shortened fit is never read as the paper's
        if c["defense"] == "dvae" and c.get("dvae_epochs") != PAPER_EPOCHS:
            c["defense"] = f"dvae-ep{c['dvae_epochs']}"
        if c["defense"] in TRAINING_DEFENSES and c.get("classifier_epochs") != PAPER_EPOCHS:  # e.g. AT in 15 epochs
            c["defense"] = f"{c['defense']}-clf{c['classifier_epochs']}"
    first = runs_meta[0]
    gpus: dict[str, list[int]] = {}
    for r in runs_meta:
        gpus.setdefault(str(r["gpu"]), []).append(r["run"])
    facts_ = {"cpu_count": first["cpu_count"], "torch": first["torch"], "ray": "not used (in-process; no Ray on "
              "the GPU machine)", "device": "cuda (" + "; ".join(f"{g}: runs {', '.join(map(str, rs))}"
                                                               for g, rs in gpus.items()) + ")",
              "command": " ; ".join(r["command"] for r in runs_meta)}  # fmt: skip
    for c in cells:
        c["gpu"] = runs_meta[c["run"] - 1]["gpu"]
    total = sum(r["total_s"] or 0 for r in runs_meta)
    matrix_report(out, cells, facts_, "paper", total, extra={"runs": runs_meta, "probes": probes, "dvae_fits": fits,
                                                              "paper_reference": {str(k): v for k, v in PAPER_REF.items()}},
                  total_what="the GPU runs' summed wall time")  # fmt: skip
    md = [(out / "matrix.md").read_text(), "## Paper reference (METHOD.md, ResNet-18 on CIFAR-10)", "",
          "| cell | paper | here |", "|---|---|---|"]
    summary = json.loads((out / "matrix.json").read_text())["summary"]  # the matrix's mean over seeds
    here = {(r["poison"], r["defense"]): r["mean"] for r in summary}
    for k, v in PAPER_REF.items():
        key = ("clean", "none") if k == "clean" else k
        got, note = here.get(key), ""
        if got is None and key[1] == "dvae":  # the longest shortened fit, labelled as such
            short = sorted(((int(d.removeprefix("dvae-ep")), a) for (p, d), a in here.items()
                            if p == key[0] and d.startswith("dvae-ep")), reverse=True)  # fmt: skip
            if short:
                ep, got = short[0]
                note = f" (`dvae-ep{ep}`: D-VAE {ep}+{ep} epochs, not 60+60)"
        md.append(f"| {' / '.join(key)} | {v} | {'—' if got is None else f'{got:.1f}'}{note} |")
    keys = list(dict.fromkeys(k for p in probes for k in p if k.endswith("_img_s")))
    md += ["", "## Throughput on the GPU (alone on it; img/s; one column per probe)", "",
           "| figure | " + " | ".join(f"run {p['run']}" for p in probes) + " |", "|---|" + "---|" * len(probes)]
    for k in keys:
        md.append(f"| {k.removesuffix('_img_s')} | " + " | ".join(f"{p[k]:,.0f}" if k in p else "—" for p in probes)
                  + " |")  # fmt: skip
    for p in probes:
        chosen = [f"{k} {p[k]}" for k in ("fit_variant", "purify_layout") if k in p]
        errors = [f"{k.removesuffix('_error')}: {v}" for k, v in p.items() if k.endswith("_error")]
        if chosen or errors:
            md.append(f"\nrun {p['run']}: chose {', '.join(chosen) or '—'}" + (f"; failed: {'; '.join(errors)}" if errors else ""))
    md += ["", "Plans (the probe's estimates -> D-VAE epochs and jobs within --budget-s; --jobs / --dvae-epochs "
           "override them) and what ran:", ""]
    for r in runs_meta:
        pl = r["plan"]
        if pl is None:
            md.append(f"- run {r['run']}: a standalone job, no plan; `{r['command']}`")
            continue
        md.append(f"- run {r['run']}: ResNet-18 run est. {pl.get('clf_s_est', 0):.0f} s, D-VAE fit est. "
                  f"{pl.get('dvae_fit_s_est', 0):.0f} s -> {pl.get('dvae_epochs')} epochs, jobs {pl.get('jobs')}; "
                  f"ran {r['ran']}; wall {r['total_s'] or 0:.0f} s; `{r['command']}`"
                  + (f"; **poison settings changed from the paper's: {r['poison_overrides']}**"
                     if r.get("poison_overrides") else ""))  # fmt: skip
    md += ["", "D-VAE fits (both stages, bf16 autocast; the jobs of one run share its GPU, so a fit beside "
           "classifier jobs is slower than the probe's figure):", ""]
    for f in fits:
        meta = runs_meta[f["run"] - 1]
        beside = [j for j in (meta["ran"] or []) if j != "dvae"]
        md.append(f"- run {f['run']} ({meta['gpu']}; beside {', '.join(beside) or 'nothing'}): preset "
                  f"`{f['preset']}`, {f['epochs']}+{f['epochs']} epochs on 50,000 images in "
                  f"{f['fit_s']:.0f} s ({f['fit_img_s']:,.0f} img/s); purified 50,000 in {f['purify_s']:.1f} s "
                  f"({f['purify_img_s']:,.0f} img/s, numpy in / out)")  # fmt: skip
    (out / "matrix.md").write_text("\n".join(md) + "\n")
    if samples is not None:
        z = np.load(samples)
        k = min(6, len(z["clean"]))
        rows = [("clean", z["clean"][:k]), ("poisoned", z["poisoned"][:k]), ("D-VAE stage 1", z["stage1"][:k]),
                ("D-VAE", z["dvae"][:k])]  # fmt: skip
        rows += [(f"{n} - clean (x8, grey = 0)", np.clip(128 + 8 * (z[n][:k].astype(int) - z["clean"][:k]), 0, 255)
                  .astype(np.uint8)) for n in ("poisoned", "dvae")]  # fmt: skip
        save_image_grid(out / "grid-lsp.png", rows)
    print((out / "matrix.md").read_text())


# ---------------------------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    ap.add_argument("--out", default=None, help="run: where results land; --report: default benchmarks/results/paper")
    ap.add_argument("--report", nargs="+", type=Path, help="build the committed results from these results.jsonl")
    ap.add_argument("--samples", type=Path, help="with --report: a samples.npz for the image grid")
    ap.add_argument("--work", default=None, help="scratch dir for arrays and the checkpoint (default OUT/../work)")
    ap.add_argument("--poison", default="lsp")
    ap.add_argument("--poison-set", action="append", metavar="KEY=VALUE",
                    help="poison budget/config override, e.g. surrogate=small max_rounds=10 for a faster EM (recorded)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clf-epochs", type=int, default=PAPER_EPOCHS)
    ap.add_argument("--dvae-epochs", type=int, default=None, help="default: the paper's 60, fewer if over budget")
    ap.add_argument("--jobs", nargs="+", default=None, help="default: chosen by the probe to fit --budget-s")
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--smoke", action="store_true", help="1k images, tiny widths, 1 epoch: every code path")
    ap.add_argument("--compile", action="store_true",
                    help="probe the compiled fit variants on a CPU too (always on a GPU); the jobs fit with the fastest")
    ap.add_argument("--fit-variant", default=None, choices=sorted(FIT_VARIANTS),
                    help="fit the D-VAE this way (default: the probe's fastest)")
    ap.add_argument("--purify-layout", default=None, choices=["nchw", "nhwc"], help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.report:
        return report(args.report, args.samples, Path(args.out or REPO / "benchmarks" / "results" / "paper"))
    if not args.out:
        ap.error("--out is required")
    out = Path(args.out)
    args.work = args.work or str(out.parent / (out.name + "-work"))
    out.mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.job:
        return job(args)

    t_start = time.perf_counter()
    torch.backends.cudnn.benchmark = True  # as in the jobs, so the probe measures what they will see
    emit(out, {"kind": "facts", **machine_facts(args.device)})
    prepare(args, Path(args.work), out)
    d = load(Path(args.work))
    pr = probe(args, d, out)
    args.fit_variant = args.fit_variant or pr["fit_variant"]
    args.purify_layout = pr["purify_layout"]
    epochs, jobs = plan(args, pr, len(d["clean"]), args.budget_s - (time.perf_counter() - t_start))
    args.dvae_epochs = args.dvae_epochs or epochs
    jobs = args.jobs or jobs
    del d
    procs = []
    with open(out / "jobs.log", "a") as log:
        for name in jobs:
            cmd = [sys.executable, __file__, "--job", name, "--out", str(out), "--work", args.work, "--data", args.data,
                   "--poison", args.poison, "--device", args.device, "--seed", str(args.seed),
                   "--clf-epochs", str(args.clf_epochs), "--dvae-epochs", str(args.dvae_epochs)]  # fmt: skip
            cmd += ["--smoke"] if args.smoke else []
            cmd += ["--fit-variant", args.fit_variant, "--purify-layout", args.purify_layout]
            procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
        codes = {name: p.wait() for name, p in procs}
    emit(out, {"kind": "done", "exit_codes": codes, "total_s": time.perf_counter() - t_start})
    if any(codes.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
