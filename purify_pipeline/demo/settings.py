"""What the demo runs: its settings and sizes (`tiny`, `cpu-mini`, `paper`), and the plan and time estimate it
prints before it starts."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

__all__ = ["DemoError", "DemoSettings", "SIZES", "estimate_seconds", "plan", "resolve_size"]


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

    from purify_pipeline.dvae.config import DVAEConfig
    from purify_pipeline.dvae.model import DVAE
    from purify_pipeline.dvae.train import fit_stage
    from purify_pipeline.eval.classifiers import ClassifierConfig
    from purify_pipeline.eval.train_classifier import train_classifier

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
