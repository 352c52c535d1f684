"""The demo job: poison a CIFAR-10 subset with LSP, fit D-VAE, purify through `PurifyStage`, train classifiers.

    result = run_demo(DemoSettings.for_size(resolve_size("auto")), out="purify-demo", data="/data/cifar10")

Steps (each one's output lives under `out/` and is reused by ``resume=True`` when its settings match):
1. ``data/clean``: a class-balanced subset of the training shards (the source's own bytes).
2. ``data/poisoned``: the subset poisoned with LSP (or another `poisons` name), lossless PNG shards.
3. ``checkpoint``: `fit_purifier` (Ray Data input, one Ray Train worker by default).
4. ``data/purified``: `purify_shards` - the `PurifyStage` actor pool - with that checkpoint.
5. ``results/*.json``: the classifier trained on clean, poisoned, JPEG-10-compressed poisoned and purified
   shards, tested on clean test images.
6. ``report.md`` + ``grid.png`` (clean / poisoned / perturbation / purified) + ``accuracy.png``.

Sizes (`SIZES`): ``auto`` (the default) picks ``paper`` on a CUDA GPU (50k images, paper preset,
ResNet-18) and ``cpu-mini`` otherwise (10k images, ``cpu`` preset, an hour or more on 2 CPU cores); ``tiny``
checks the pipeline in minutes and its accuracies mean nothing. Before it starts, the demo prints what it
will do and a time estimate from a few-second probe of this machine.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from purify_pipeline._progress import progress_enabled
from purify_pipeline.data import shards
from purify_pipeline.data.subset import select_balanced, write_split
from purify_pipeline.demo.report import _bars, _grid, _machine, _report
from purify_pipeline.demo.settings import (
    DEMO_MARKER,
    DemoError,
    DemoSettings,
    estimate_seconds,
    plan,
)

__all__ = ["find_data", "run_demo"]

REPO = Path(__file__).resolve().parents[2]



# ------------------------------------------------------------------------------------------ the data


def _has_shards(d: Path) -> bool:
    return d.is_dir() and any(d.glob("train-*.tar")) and any(d.glob("test-*.tar"))


def find_data(data: str | os.PathLike | None = None, *, download_root: Path | None = None,
              progress: bool = True) -> Path:  # fmt: skip
    """CIFAR-10 shards: `data`, else $PURIFY_PIPELINE_DATA, else ../shared/data/cifar10 beside the repository,
    else torchvision's CIFAR-10 download converted to shards under `download_root`."""
    if data is not None:
        d = Path(data).expanduser()
        if not _has_shards(d):
            raise DemoError(f"no shards match {d}/train-*.tar and {d}/test-*.tar (expected CIFAR-10 WebDataset shards)")
        return d
    env = os.environ.get("PURIFY_PIPELINE_DATA")
    if env:
        d = Path(env).expanduser()
        if not _has_shards(d):
            raise DemoError(f"$PURIFY_PIPELINE_DATA={env}: no shards match train-*.tar and test-*.tar there")
        return d
    for d in (REPO.parent / "shared" / "data" / "cifar10", REPO / "shared" / "data" / "cifar10"):
        if _has_shards(d):
            return d
    from purify_pipeline.data.convert import ConvertError, convert

    root = download_root or Path.home() / ".cache" / "purify_pipeline"
    target = root / "cifar10-shards"
    if _has_shards(target) and (target / shards.MANIFEST_NAME).exists():
        return target
    print(f"CIFAR-10 shards not found (--data, $PURIFY_PIPELINE_DATA, {REPO.parent / 'shared/data/cifar10'}); "
          f"downloading with torchvision into {root}", file=sys.stderr)  # fmt: skip
    try:
        convert(root / "cifar10-download", target, download="cifar10", overwrite=True, progress=progress)
    except ConvertError as e:
        raise DemoError(f"no CIFAR-10 shards found and the download failed: {e}") from None
    return target


def _classes(data_dir: str | Path, k: int | None = None) -> list[str]:
    man = shards.read_manifest(str(data_dir)) or {}
    names = man.get("classes")
    if isinstance(names, list) and names:
        return [str(c) for c in names]
    if k is None:
        raise DemoError(f"{data_dir}: no manifest.json with 'classes'; cannot tell the number of classes")
    return [str(i) for i in range(k)]



def _arrays(urls: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    a = shards.load_arrays(list(urls), progress=False)
    return a.images, a.labels, a.keys


# ------------------------------------------------------------------------------------------ the report



# ------------------------------------------------------------------------------------------ the job


def _prepare_out(out: Path, settings: DemoSettings, data_dir: Path, overwrite: bool, resume: bool) -> None:
    marker = out / DEMO_MARKER
    record = {"settings": settings.to_dict(), "data": str(data_dir)}
    if out.exists() and any(out.iterdir()):
        if resume and marker.exists():
            old = json.loads(marker.read_text())
            if old.get("settings") != record["settings"]:
                raise DemoError(f"{out} holds a demo run with other settings ({old.get('settings', {}).get('size')}); "
                                "use another --out or --overwrite")  # fmt: skip
            return
        if not overwrite:
            raise DemoError(f"output {out} already exists (pass --overwrite to replace it or --resume to continue it)")
        if not marker.exists():
            raise DemoError(f"refusing to delete {out}: it is not a purify-pipeline demo output (no {DEMO_MARKER})")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(record, indent=1) + "\n")



def _train(name: str, urls: Sequence[str], test: tuple[np.ndarray, np.ndarray], s: DemoSettings, k: int, device: str,
           path: Path, show: bool, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, Any]:  # fmt: skip
    """Train the classifier on shards (optionally transformed first, e.g. JPEG-10), test on clean images;
    cached in `path` (JSON)."""
    from purify_pipeline.eval.classifiers import ClassifierConfig
    from purify_pipeline.eval.train_classifier import train_classifier

    if path.exists():
        return json.loads(path.read_text())
    x, y, _ = _arrays(urls)
    if transform is not None:
        x = transform(x)
    cfg = ClassifierConfig.preset(s.classifier, num_classes=k, **dict(s.classifier_overrides))
    if show:
        print(f"training the {s.classifier} classifier on {name} images ({len(x)})", file=sys.stderr)
    r = train_classifier(x, y, test[0], test[1], cfg, seed=s.seed, device=device, progress=show)
    row = {"train_set": name, "train_images": int(len(x)), "test_acc": float(r["test_acc"]),
           "test_loss": float(r["test_loss"]), "train_acc": float(r["history"][-1]["train_acc"]),
           "train_seconds": float(r["train_seconds"]), "epochs": cfg.epochs, "classifier": cfg.to_dict()}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=1) + "\n")
    return row


def run_demo(settings: DemoSettings, out: str | os.PathLike = "purify-demo", *, data: str | os.PathLike | None = None,
             address: str | None = None, gpu: bool = False, fit_workers: int | None = None,
             overwrite: bool = False, resume: bool = False, progress: bool = True,
             command: str = "purify-pipeline demo") -> dict[str, Any]:  # fmt: skip
    """Run the demo end to end (see the module docstring); returns the results dict also written to
    ``out/results.json``. Ray: connects to `address`, else starts a local Ray sized for this machine."""
    import torch

    from purify_pipeline import DVAEConfig, psnr, retention
    from purify_pipeline.dvae.train import bf16_pays
    from purify_pipeline.eval.audit import audit
    from purify_pipeline.eval.defenses import jpeg
    from purify_pipeline.poisons.job import poison_shards
    from purify_pipeline.ray_init import init_ray
    from purify_pipeline.stages.fit import fit_purifier
    from purify_pipeline.stages.purify_shards import purify_shards

    s = settings
    show = progress_enabled(progress)
    out = Path(out).expanduser().resolve()
    data_dir = find_data(data, progress=show)
    _prepare_out(out, s, data_dir, overwrite, resume)
    init_ray(address)
    device = "cuda" if gpu else "cpu"
    if gpu and not torch.cuda.is_available():
        raise DemoError("--gpu was given but torch sees no CUDA device")
    bf16 = bf16_pays(device)  # the D-VAE in bf16 where that is native (GPU, AMX CPU): same accuracy, 1.4-1.6x faster
    classes = _classes(data_dir)
    k = len(classes)
    if s.train_images % k or s.test_images % k:
        raise DemoError(f"train_images and test_images must be multiples of the {k} classes")
    seconds: dict[str, float] = {}

    def step(name: str) -> Any:
        if show:
            print(f"\n== {name}", file=sys.stderr)
        return time.perf_counter()

    # 1. a class-balanced clean subset, and the clean test images
    t0 = step(f"select {s.train_images} training and {s.test_images} test images from {data_dir}")
    clean_dir, poisoned_dir, purified_dir = out / "data" / "clean", out / "data" / "poisoned", out / "data" / "purified"
    if (clean_dir / shards.MANIFEST_NAME).exists():
        clean_urls = shards.expand(str(clean_dir / "train-*.tar"))
    else:
        subset = select_balanced(shards.expand(str(data_dir / "train-*.tar")), s.train_images // k, k)
        clean_urls = write_split(clean_dir, "train", subset, s.shard_size,
                                  {"classes": classes, "source": str(data_dir)})  # fmt: skip
    test_samples = select_balanced(shards.expand(str(data_dir / "test-*.tar")), s.test_images // k, k)
    test_x = np.stack([shards.decode_image(t[shards.find_image_column(t)], shards.find_image_column(t)) for t in test_samples])
    test_y = np.asarray([shards.parse_label(t["cls"]) for t in test_samples], dtype=np.int64)
    seconds["select data"] = time.perf_counter() - t0
    est_path = out / "estimate.json"
    if est_path.exists():
        estimate = json.loads(est_path.read_text())
    else:
        clean_x, clean_y, _ = _arrays(clean_urls[:1])
        estimate = estimate_seconds(s, k, clean_x, clean_y, device, bf16=bf16)
        est_path.write_text(json.dumps(estimate, indent=1) + "\n")
    print(plan(s, estimate, device), file=sys.stderr)  # always: what will run, and for how long

    # 2. poison
    t0 = step(f"poison the training subset with {s.poison}")
    if (poisoned_dir / shards.MANIFEST_NAME).exists():
        poisoned_urls = shards.expand(str(poisoned_dir / "train-*.tar"))
    else:
        poison_shards(clean_urls, str(poisoned_dir), s.poison, seed=s.seed, classes=classes, progress=show,
                      num_actors=1 if gpu else max(1, min(4, os.cpu_count() or 1)), actor_cpus=0.5)  # fmt: skip
        poisoned_urls = shards.expand(str(poisoned_dir / "train-*.tar"))
    seconds["poison"] = time.perf_counter() - t0

    # 3. fit D-VAE on the poisoned shards
    cfg = DVAEConfig.preset(s.preset, num_classes=k, seed=s.seed, **dict(s.preset_overrides))
    workers = 1 if fit_workers is None else fit_workers  # the product's path: a Ray Train worker, CPU or GPU
    t0 = step(f"fit D-VAE (preset {s.preset}: width {cfg.width}, {cfg.epochs} epochs x 2 stages{', bf16' if bf16 else ''}) on "
              f"{s.train_images} poisoned images, {'Ray Train with ' + str(workers) + ' worker(s)' if workers else 'in this process'}")  # fmt: skip
    ckpt = out / "checkpoint"
    if not (ckpt / "config.json").exists():
        fit_purifier(poisoned_urls, preset=cfg, output=str(ckpt), num_workers=workers, use_gpu=gpu,
                     storage_path=str(out / "fit-runs"), class_names=classes, progress=show, bf16=bf16)  # fmt: skip
    seconds["fit D-VAE"] = time.perf_counter() - t0

    # 4. purify through PurifyStage
    t0 = step("purify the poisoned shards through PurifyStage")
    ncpu = os.cpu_count() or 1
    actors = 1 if gpu else max(1, min(4, ncpu))
    summary = purify_shards(poisoned_urls, str(purified_dir), str(ckpt), prefix="train", mode=s.mode, seed=s.seed,
                            actors=actors, num_gpus=1 if gpu else 0, batch_size=128 if not gpu else 1024,
                            progress=show, bf16=bf16)  # fmt: skip
    purified_urls = shards.expand(str(purified_dir / "train-*.tar"))
    seconds["purify"] = time.perf_counter() - t0

    # 5. classifiers
    t0 = step(f"train the {s.classifier} classifier on each training set")
    res = out / "results"
    runs = [("clean", clean_urls)] if s.train_clean else []
    runs += [(f"poisoned ({s.poison})", poisoned_urls), ("JPEG-10 (baseline)", poisoned_urls),
             ("purified (D-VAE)", purified_urls)]  # fmt: skip
    rows = [_train(n, u, (test_x, test_y), s, k, device, res / f"{n.split()[0].lower()}.json", show,
                   transform=jpeg if n.startswith("JPEG") else None) for n, u in runs]  # fmt: skip
    seconds["classifiers"] = time.perf_counter() - t0

    # 6. report
    t0 = time.perf_counter()
    cx, cy, ckeys = _arrays(clean_urls)
    px, py, pkeys = _arrays(poisoned_urls)
    ux, uy, ukeys = _arrays(purified_urls)
    if not (ckeys == pkeys == ukeys and (cy == py).all() and (cy == uy).all()):
        raise RuntimeError("clean, poisoned and purified shards disagree on keys or labels")
    delta = px.astype(np.float32) / 255 - cx.astype(np.float32) / 255
    amplified = np.clip(0.5 + 8 * delta, 0, 1)
    _grid(out / "grid.png", classes, {"clean": cx, "poisoned": px, "perturbation x8": amplified, "purified": ux}, cy)
    _bars(out / "accuracy.png", rows, 1 / k, f"{s.poison.upper()} on {s.train_images} CIFAR-10 images; "
          f"{s.classifier} classifier")  # fmt: skip
    from purify_pipeline.dvae.purifier import Purifier

    pur = Purifier.load(str(ckpt))
    info = {
        "num_classes": k, "test_images": int(len(test_y)), "fingerprint": pur.fingerprint,
        "dvae": {"width": pur.cfg.width, "epochs": pur.cfg.epochs, "preset": s.preset, "bf16": bf16},
        "psnr_poisoned": float(psnr(px, cx)), "psnr_purified": float(psnr(ux, cx)),
        "retention": float(retention(ux, cx, delta)),
        "audit": {name: audit(x, cy, num_classes=k, seed=s.seed).to_dict() for name, x in (("poisoned", px), ("purified", ux))},
        "purify": {"images_per_s": summary.images_per_s if summary.samples_in else float("nan"),
                   "samples": summary.samples_out, "resumed_shards": summary.shards_resumed},
        "machine": _machine(), "command": command, "seconds": seconds, "estimate": estimate,
    }  # fmt: skip
    seconds["report"] = time.perf_counter() - t0
    _report(out, s, info, rows)
    result = {"settings": s.to_dict(), "data": str(data_dir), "output": str(out), "rows": rows, **info}
    (out / "results.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    return result
