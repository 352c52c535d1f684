"""The demo job: poison a CIFAR-10 subset with LSP, fit D-VAE, purify through `PurifyStage`, train classifiers.

    result = run_demo(DemoSettings.for_size(resolve_size("auto")), out="purify-demo", data="/data/cifar10")

Steps (each one's output lives under `out/` and is reused by ``resume=True`` when its settings match):
1. ``data/clean``: a class-balanced subset of the training shards (the source's own bytes).
2. ``data/poisoned``: the subset poisoned with LSP (or another `poisons` name), lossless PNG shards.
3. ``checkpoint``: `fit_purifier` (Ray Data input; Ray Train workers, or the same loop in the driver).
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

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import shards
from ._progress import progress_enabled

__all__ = ["DemoError", "DemoSettings", "SIZES", "estimate_seconds", "find_data", "poison_with_classes", "resolve_size",
           "run_demo", "select_balanced"]

REPO = Path(__file__).resolve().parents[1]
DEMO_MARKER = "demo.json"


class DemoError(RuntimeError):
    """A demo that cannot run as asked (missing data, an output that exists, changed settings on resume)."""


@dataclass(frozen=True)
class DemoSettings:
    """Everything that determines the demo's results (recorded in ``demo.json``; resume requires a match)."""

    size: str = "cpu-mini"
    train_images: int = 10000  # class-balanced subset of the training shards that gets poisoned
    test_images: int = 10000  # clean test images the classifiers are scored on
    poison: str = "lsp"
    preset: str = "cpu"  # DVAEConfig preset
    preset_overrides: Mapping[str, Any] = field(default_factory=dict)
    classifier: str = "fast"  # ClassifierConfig preset
    classifier_overrides: Mapping[str, Any] = field(default_factory=dict)
    mode: str = "sample"  # purification mode ("sample" = paper)
    shard_size: int = 250
    train_clean: bool = True  # also train on the clean subset (the reference row)
    seed: int = 0

    @classmethod
    def for_size(cls, size: str, **overrides: Any) -> "DemoSettings":
        kw = {**dataclasses.asdict(SIZES[resolve_size(size)]), **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["preset_overrides"], d["classifier_overrides"] = dict(self.preset_overrides), dict(self.classifier_overrides)
        return d


SIZES: dict[str, DemoSettings] = {
    # Pipeline check: a few hundred images, tiny D-VAE, a short classifier run. Its accuracies mean nothing.
    "tiny": DemoSettings(size="tiny", train_images=400, test_images=400, preset="tiny", shard_size=100,
                         classifier="fast", classifier_overrides={"width": 16, "epochs": 3, "batch_size": 100,
                                                                  "warmup_epochs": 1}),  # fmt: skip
    # The CPU default: the cpu-mini protocol (10k poisoned images, `cpu` preset, fast classifier, all 10k
    # clean test images), where benchmarks/results/cpu-mini measured D-VAE at ~72% against ~35% poisoned.
    "cpu-mini": DemoSettings(size="cpu-mini", train_images=10000, test_images=10000, shard_size=1000),
    # The GPU default: the paper's setting (all 50k images, `paper` preset, ResNet-18 for 60 epochs).
    "paper": DemoSettings(size="paper", train_images=50000, test_images=10000, preset="paper", classifier="paper",
                          shard_size=1000),  # fmt: skip
}
MEANINGFUL = {"cpu-mini", "paper"}  # sizes whose accuracies say something about the method


def resolve_size(size: str, gpu: bool | None = None) -> str:
    """``auto`` -> ``paper`` with a CUDA GPU, else ``cpu-mini``; other names are checked against `SIZES`."""
    if size == "auto":
        if gpu is None:
            import torch

            gpu = torch.cuda.is_available()
        return "paper" if gpu else "cpu-mini"
    if size not in SIZES:
        raise DemoError(f"unknown demo size {size!r}; choose auto or one of {list(SIZES)}")
    return size


def estimate_seconds(s: DemoSettings, num_classes: int, images: np.ndarray, labels: np.ndarray, device: str,
                     probe_steps: tuple[int, int] = (2, 6), bf16: bool = False) -> dict[str, float]:  # fmt: skip
    """A few-second probe of this machine, scaled to the demo's epochs and image counts (an estimate, +-30%).

    Each model is timed on two epoch lengths of real images and the per-sample time is their difference over
    the extra samples, so fixed per-epoch costs (shuffling, metrics) do not inflate the estimate."""
    import torch

    from .classifiers import ClassifierConfig
    from .config import DVAEConfig
    from .models import DVAE
    from .train import fit_stage
    from .train_classifier import train_classifier

    def per_sample(run: Any, bs: int) -> float:
        t = []
        for steps in probe_steps:
            t0 = time.perf_counter()
            run(steps * bs)
            t.append(time.perf_counter() - t0)
        return max(t[1] - t[0], 1e-9) / ((probe_steps[1] - probe_steps[0]) * bs)

    cfg = DVAEConfig.preset(s.preset, num_classes=num_classes, seed=s.seed, **dict(s.preset_overrides))
    fit = 0.0
    with torch.random.fork_rng(devices=[]):
        for stage, epochs in ((1, cfg.epochs), (2, cfg.stage2_epochs)):
            bs = cfg.batch_size_for(stage)
            model = DVAE(cfg)

            def dvae(n: int) -> None:
                fit_stage(model, np.resize(images, (n, *images.shape[1:])), np.resize(labels, n), tau=cfg.tau(stage),
                          epochs=1, cfg=cfg, device=device, progress=False, batch_size=bs,
                          autocast_dtype=torch.bfloat16 if bf16 else None)  # fmt: skip

            dvae(bs)  # warm-up
            fit += per_sample(dvae, bs) * s.train_images * epochs
        ccfg = ClassifierConfig.preset(s.classifier, num_classes=num_classes, **dict(s.classifier_overrides))
        probe = dataclasses.replace(ccfg, epochs=1, eval_every=0, warmup_epochs=0)

        def classifier(n: int) -> None:
            x, y = np.resize(images, (n, *images.shape[1:])), np.resize(labels, n)
            train_classifier(x, y, x[:2], y[:2], probe, seed=s.seed, device=device, progress=False)

        classifier(probe.batch_size)  # warm-up
        runs = 3 + int(s.train_clean)  # poisoned, JPEG-10, purified (+ clean)
        clf = per_sample(classifier, probe.batch_size) * s.train_images * ccfg.epochs * runs
    purify = fit / (cfg.epochs + cfg.stage2_epochs) / 3  # three forward passes per image, no backward
    return {"fit D-VAE": fit, "purify": purify, "classifiers": clf, "total": fit + purify + clf}


def plan(s: DemoSettings, estimate: Mapping[str, float], device: str) -> str:
    """What the demo will do and how long this machine should take (printed before it starts)."""
    lines = [f"demo size {s.size}: poison {s.train_images} CIFAR-10 training images with {s.poison.upper()}, fit D-VAE "
             f"(preset {s.preset}) on them, purify them, then train the {s.classifier} classifier on clean, poisoned, "
             f"JPEG-10 and purified images and test each on {s.test_images} clean test images ({device})."]  # fmt: skip
    lines.append("estimated time on this machine (a few-second probe, +-30%): " + ", ".join(
        f"{k} {v / 60:.0f} min" for k, v in estimate.items()))  # fmt: skip
    if s.size not in MEANINGFUL:
        lines.append(f"size {s.size} checks the pipeline only: its accuracies mean nothing (use the default size).")
    return "\n".join(lines)


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
    from .convert import ConvertError, convert

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


def select_balanced(urls: Sequence[str], per_class: int, num_classes: int) -> list[dict[str, Any]]:
    """The first `per_class` samples of every class, in shard order (raw sample dicts, no ``__url__``)."""
    counts = np.zeros(num_classes, dtype=np.int64)
    out: list[dict[str, Any]] = []
    for url in urls:
        for s in shards.iter_samples(url):
            y = shards.parse_label(s.get("cls"), shard=url, key=s["__key__"])
            if not 0 <= y < num_classes:
                raise shards.ShardError(f"label {y} is outside [0, {num_classes})", shard=url, key=s["__key__"])
            if counts[y] < per_class:
                counts[y] += 1
                out.append({k: v for k, v in s.items() if k != "__url__"})
            if counts.min() >= per_class:
                return out
    short = {i: int(c) for i, c in enumerate(counts) if c < per_class}
    raise DemoError(f"not enough samples: wanted {per_class} per class, classes short: {short}")


def _write_split(out: Path, prefix: str, samples: list[dict[str, Any]], shard_size: int, manifest: dict[str, Any]) -> list[str]:
    """Write samples as `<prefix>-NNNNNN.tar` shards of `shard_size` + manifest.json (last: it marks completion)."""
    out.mkdir(parents=True, exist_ok=True)
    entries, urls = [], []
    for j in range(0, len(samples), shard_size):
        name = shards.shard_name(prefix, j // shard_size)
        info = shards.write_shard(str(out / name), samples[j : j + shard_size])
        entries.append({"file": name, "samples": info.count, "sha256": info.sha256})
        urls.append(str(out / name))
    manifest = {**manifest, "splits": {prefix: {"samples": len(samples), "shards": entries}}}
    shards.write_manifest(str(out), manifest)
    return urls


def poison_with_classes(inputs: str | Sequence[str], output: str | os.PathLike, poison: str, *, seed: int,
                        classes: Sequence[str], progress: bool = True, **kw: Any) -> dict[str, Any]:  # fmt: skip
    """`poisons.job.poison_shards` with explicit class names (written to the output's manifest.json, which
    `fit_purifier` and the CLI read to size the model and to check checkpoints against the data)."""
    from .poisons.job import poison_shards

    return poison_shards(inputs, os.fspath(output), poison, seed=seed, classes=classes,
                         progress=progress_enabled(progress), **kw)  # fmt: skip


def _arrays(urls: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    a = shards.load_arrays(list(urls), progress=False)
    return a.images, a.labels, a.keys


# ------------------------------------------------------------------------------------------ the report


def _grid(path: Path, classes: Sequence[str], rows: Mapping[str, np.ndarray], labels: np.ndarray) -> None:
    """One example per class (columns); rows: clean, poisoned, amplified perturbation, purified."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [int(np.flatnonzero(labels == c)[0]) for c in range(len(classes)) if (labels == c).any()][:10]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.3 * len(cols), 1.45 * len(rows)), squeeze=False)
    for r, (name, imgs) in enumerate(rows.items()):
        for c, i in enumerate(cols):
            ax = axes[r][c]
            ax.imshow(imgs[i], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(classes[labels[i]], fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(path: Path, rows: list[dict[str, Any]], chance: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    names = [r["train_set"] for r in rows]
    accs = [100 * r["test_acc"] for r in rows]
    colors = {"clean": "#4c72b0", "poisoned": "#c44e52", "purified": "#55a868", "JPEG-10": "#dd8452"}
    bars = ax.bar(names, accs, color=[colors.get(n.split()[0], "#8172b2") for n in names])
    for b, a in zip(bars, accs):
        ax.text(b.get_x() + b.get_width() / 2, a + 1, f"{a:.1f}", ha="center", fontsize=9)
    ax.axhline(100 * chance, color="gray", ls="--", lw=1, label=f"chance ({100 * chance:.0f}%)")
    ax.set_ylabel("clean test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accuracy_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the classifier runs."""
    lines = ["| training set | images | clean test accuracy | train accuracy (last epoch) | train seconds |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['train_set']} | {r['train_images']} | {100 * r['test_acc']:.1f}% | "
                     f"{100 * r['train_acc']:.1f}% | {r['train_seconds']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def _verdict(s: DemoSettings, rows: list[dict[str, Any]]) -> str:
    """The report's closing sentence: what the numbers say, or that they say nothing at this size."""
    if s.size not in MEANINGFUL:
        return (f"Size `{s.size}` checks that the pipeline runs end to end: its models are far too small and short "
                "for the accuracies above to mean anything about the method. Run the default size for that.")
    acc = {r["train_set"].split()[0].lower(): 100 * r["test_acc"] for r in rows}
    gain = acc["purified"] - acc["poisoned"]
    text = (f"D-VAE purification moved clean test accuracy from {acc['poisoned']:.1f}% (trained on the poisoned images) "
            f"to {acc['purified']:.1f}% ({gain:+.1f} points); JPEG-10 reached {acc['jpeg-10']:.1f}%")
    if "clean" in acc:
        text += f", and the clean images {acc['clean']:.1f}%"
    return text + ". One D-VAE fit and one classifier seed: benchmarks/results/cpu-mini has the spread over seeds."


def _report(out: Path, s: DemoSettings, info: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    t = info["seconds"]
    md = [
        "# purify-pipeline demo report",
        "",
        f"An unlearnable-example poison (**{s.poison.upper()}**) was added to {s.train_images} CIFAR-10 training images "
        f"({s.train_images // info['num_classes']} per class). A classifier trained on them learns the poison's shortcut "
        "instead of the images. D-VAE (Yu et al., ICML 2024) was fitted on the poisoned images alone and used to purify "
        "them; the same classifier recipe was then trained on each version and tested on clean test images.",
        "",
        "![examples](grid.png)",
        "",
        "Rows: clean image, poisoned image, the perturbation (poisoned − clean, amplified ×8 around grey), purified image.",
        "",
        "## Accuracy",
        "",
        accuracy_table(rows),
        "",
        "![accuracy](accuracy.png)",
        "",
        f"Chance is {100 / info['num_classes']:.0f}%. Test set: {info['test_images']} clean CIFAR-10 test images. "
        f"Classifier: `{s.classifier}` preset {dict(s.classifier_overrides) or ''}, seed {s.seed}.",
        "",
        "## Purification",
        "",
        f"- PSNR to the clean images: poisoned {info['psnr_poisoned']:.2f} dB, purified {info['psnr_purified']:.2f} dB.",
        f"- Shortcut audit (labels only, no clean data; `purify-pipeline audit`): poisoned "
        f"{info['audit']['poisoned']['score']:.2f} ({info['audit']['poisoned']['verdict']}), purified "
        f"{info['audit']['purified']['score']:.2f} ({info['audit']['purified']['verdict']}); clean-like up to "
        f"{info['audit']['purified']['thresholds'][0]:.2f} (benchmarks/results/audit).",
        f"- Perturbation retained in the purified images (projection onto the poison, 1 = untouched, 0 = removed): "
        f"{info['retention']:.3f}.",
        f"- D-VAE: preset `{s.preset}` {dict(s.preset_overrides) or ''} (width {info['dvae']['width']}, "
        f"{info['dvae']['epochs']} epochs per stage{', bf16 autocast' if info['dvae'].get('bf16') else ', fp32'}), "
        f"checkpoint `checkpoint/` ({info['fingerprint'][:12]}).",
        f"- Purification through `PurifyStage` (`purify_shards`, mode `{s.mode}`): {info['purify']['images_per_s']:.0f} "
        "images/s.",
        "",
        "## Time",
        "",
        "| step | seconds | estimated before the run |",
        "|---|---|---|",
        *[f"| {k} | {v:.0f} | {info['estimate'][k]:.0f} |" if k in info.get("estimate", {}) else f"| {k} | {v:.0f} | |"
          for k, v in t.items()],
        "",
        f"Machine: {info['machine']}.",
        "",
        _verdict(s, rows),
        "",
        f"Reproduce: `{info['command']}`.",
        "",
    ]
    text = "\n".join(md)
    (out / "report.md").write_text(text)
    return text


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


def _machine() -> str:
    import platform

    import ray
    import torch

    dev = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs ({model}, {torch.backends.cpu.get_cpu_capability()}), {dev}, "
            f"torch {torch.__version__}, ray {ray.__version__}, Python {platform.python_version()}")  # fmt: skip


def _train(name: str, urls: Sequence[str], test: tuple[np.ndarray, np.ndarray], s: DemoSettings, k: int, device: str,
           path: Path, show: bool, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, Any]:  # fmt: skip
    """Train the classifier on shards (optionally transformed first, e.g. JPEG-10), test on clean images;
    cached in `path` (JSON)."""
    from .classifiers import ClassifierConfig
    from .train_classifier import train_classifier

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

    from . import DVAEConfig, psnr, retention
    from .ray_init import init_ray
    from .audit import audit
    from .defenses import jpeg
    from .fit import fit_purifier
    from .purify import purify_shards
    from .train import bf16_pays

    s = settings
    show = progress_enabled(progress)
    out = Path(out).expanduser().resolve()
    data_dir = find_data(data, progress=show)
    _prepare_out(out, s, data_dir, overwrite, resume)
    init_ray(address)
    device = "cuda" if gpu else "cpu"
    if gpu and not torch.cuda.is_available():
        raise DemoError("--gpu was given but torch sees no CUDA device")
    bf16 = bf16_pays(device)  # the D-VAE in bf16 where that is native (GPU, AMX CPU): same accuracy, ~2x faster
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
        clean_urls = _write_split(clean_dir, "train", subset, s.shard_size,
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
        poison_with_classes(clean_urls, poisoned_dir, s.poison, seed=s.seed, classes=classes, progress=show,
                            num_actors=1 if gpu else max(1, min(4, os.cpu_count() or 1)), actor_cpus=0.5)  # fmt: skip
        poisoned_urls = shards.expand(str(poisoned_dir / "train-*.tar"))
    seconds["poison"] = time.perf_counter() - t0

    # 3. fit D-VAE on the poisoned shards
    cfg = DVAEConfig.preset(s.preset, num_classes=k, seed=s.seed, **dict(s.preset_overrides))
    workers = fit_workers if fit_workers is not None else (1 if gpu else 0)
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
    from .purifier import Purifier

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
