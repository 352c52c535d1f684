"""SEP: self-ensemble protection (Chen et al., ICLR 2023, "Self-ensemble protection: training checkpoints are
good data protectors").

Train one surrogate on the clean data and keep `checkpoints` equidistant checkpoints of that single run (the
paper: 30 of 120 epochs); then run targeted L∞ PGD per sample towards class (y + `target_shift`) mod K
(the paper's shift is 5), each signed step on the gradient of the cross-entropy averaged over the checkpoints,
eps 8/255, 30 steps of 1/255 from a zero start. The checkpoints act as an ensemble of diverse models at the
cost of one training run. (The paper's stronger variants, feature alignment and variance reduction, are not
implemented.) Knobs left at None resolve by device: CUDA - the paper's ResNet-18, 120 epochs, 30 checkpoints,
30 steps of 1/255; CPU - a small CNN of width 16, 10 epochs, 5 checkpoints and 15 steps of 2/255 (the same
total travel, half the steps), so that 10k CIFAR images finish in minutes on 2 cores.

Like TAP, the per-sample perturbations are computed during `fit` and stored keyed by sample id.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from ._base import Poison
from ._common import check_positive, quantise_linf, rng_for
from ._common import progress as progress_bar
from ._keyed import KeyedPerturbations
from ._surrogate import (
    SURROGATES,
    accuracy,
    batches,
    build_surrogate,
    linf_pgd,
    resolve_device,
    resolve_knobs,
    to_nchw,
    train_surrogate,
)


@dataclass(frozen=True)
class SEPConfig:
    eps: float = 8 / 255
    step_size: float | None = None  # cuda: 1/255 (paper), cpu: 2/255
    pgd_steps: int | None = None  # cuda: 30 (paper), cpu: 15
    target_shift: int = 5  # target class (y + target_shift) mod K
    checkpoints: int | None = None  # ensemble size, equidistant over the run; cuda: 30 (paper), cpu: 5
    surrogate_epochs: int | None = None  # cuda: 120 (paper), cpu: 10
    surrogate: str = "auto"  # "auto" (resnet18 on cuda, small on cpu), "small", "resnet18"
    width: int | None = None
    batch_size: int = 256
    lr: float = 0.05
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("eps", "lr"):
            object.__setattr__(self, name, check_positive(name, getattr(self, name)))
        if self.step_size is not None:
            object.__setattr__(self, "step_size", check_positive("step_size", self.step_size))
        for name in ("pgd_steps", "checkpoints", "surrogate_epochs", "batch_size", "width", "target_shift"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check_positive(name, getattr(self, name), integer=True))
        if self.eps > 1:
            raise ValueError(f"eps must be <= 1 (images are in [0,1]), got {self.eps}")
        if self.surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {SURROGATES}, got {self.surrogate!r}")
        if None not in (self.checkpoints, self.surrogate_epochs) and self.checkpoints > self.surrogate_epochs:
            raise ValueError(f"checkpoints ({self.checkpoints}) must be <= surrogate_epochs ({self.surrogate_epochs}): "
                             "one checkpoint per epoch at most")  # fmt: skip


def checkpoint_epochs(epochs: int, n: int) -> list[int]:
    """The n equidistant epochs (1-based) whose weights join the ensemble; the last epoch is always one."""
    return sorted({max(1, round(epochs * (i + 1) / n)) for i in range(n)})


class SEP(Poison):
    name = "sep"
    config_cls = SEPConfig
    needs_data = True

    def _fit(self, images, labels, keys, *, progress: bool) -> None:
        device = resolve_device(self.config.device)
        self.config = cfg = resolve_knobs(self.config, device,
                                          cpu=dict(surrogate="small", width=16, pgd_steps=15, step_size=2 / 255,
                                                   surrogate_epochs=10, checkpoints=5),
                                          cuda=dict(surrogate="resnet18", width=64, pgd_steps=30, step_size=1 / 255,
                                                    surrogate_epochs=120, checkpoints=30))  # fmt: skip
        if cfg.checkpoints > cfg.surrogate_epochs:
            raise ValueError(f"checkpoints ({cfg.checkpoints}) must be <= surrogate_epochs ({cfg.surrogate_epochs})")
        x, y = to_nchw(images), torch.from_numpy(labels)
        target = (y + cfg.target_shift) % self.num_classes
        model = build_surrogate(cfg.surrogate, self.num_classes, cfg.width, device, self.seed)
        keep = set(checkpoint_epochs(cfg.surrogate_epochs, cfg.checkpoints))
        ensemble: list[torch.nn.Module] = []

        def snapshot(epoch: int) -> None:
            if epoch in keep:
                ensemble.append(copy.deepcopy(model).eval().requires_grad_(False))

        train_surrogate(model, x, y, epochs=cfg.surrogate_epochs, batch_size=min(cfg.batch_size, len(x)), lr=cfg.lr,
                        device=device, rng=rng_for(self.seed, "sep/order"), progress=progress,
                        desc="sep: surrogate epochs", on_epoch=snapshot)  # fmt: skip
        self.checkpoint_epochs = sorted(keep)
        self.surrogate_accuracy = accuracy(ensemble[-1], x, y, cfg.batch_size, device)
        delta = torch.zeros_like(x)
        for sl in progress_bar(batches(len(x), cfg.batch_size), enabled=progress, desc="sep: ensemble pgd"):
            xb, tb = x[sl].to(device), target[sl].to(device)
            delta[sl] = linf_pgd(ensemble, xb, tb, torch.zeros_like(xb), eps=cfg.eps, step_size=cfg.step_size,
                                 steps=cfg.pgd_steps).cpu()  # fmt: skip
        # how often the last checkpoint reads x + delta as the target class
        self.target_rate = accuracy(ensemble[-1], x, y, cfg.batch_size, device, delta=delta, target=target)
        self.table = KeyedPerturbations(keys, quantise_linf(delta.permute(0, 2, 3, 1).numpy(), cfg.eps))

    def _quantised(self, images: np.ndarray, labels: np.ndarray, keys: np.ndarray) -> np.ndarray:
        return self.table.lookup(keys, self.name)
