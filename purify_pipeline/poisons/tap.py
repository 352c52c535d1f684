"""TAP: targeted adversarial poisoning (Fowl et al., NeurIPS 2021, "Adversarial examples make strong poisons").

Train a surrogate on the clean data, then run targeted L∞ PGD per sample towards class (y + 1) mod K
(minimising the cross-entropy to that target), eps 8/255. The paper uses a pretrained ResNet-18 and 250
steps; here the surrogate, its epochs and the PGD steps are knobs. Knobs left at None resolve by device
(our choices, not tuned): CUDA - ResNet-18 trained 30 epochs, 100 PGD steps; CPU - a small CNN of width
16 trained 8 epochs, 20 PGD steps. A batch stops early once `stop_rate` of it hits the target.

Like EM, the per-sample perturbations are computed during `fit` over the whole set and stored keyed by
sample id; `apply` looks them up.
"""
from __future__ import annotations

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
class TAPConfig:
    eps: float = 8 / 255
    step_size: float = 1 / 255
    pgd_steps: int | None = None  # cuda: 100, cpu: 20
    stop_rate: float = 1.0  # a batch stops once this fraction hits the target (checked every 10 steps)
    surrogate_epochs: int | None = None  # cuda: 30, cpu: 8
    surrogate: str = "auto"  # "auto" (resnet18 on cuda, small on cpu), "small", "resnet18"
    width: int | None = None
    batch_size: int = 256
    lr: float = 0.05
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("eps", "step_size", "lr", "stop_rate"):
            object.__setattr__(self, name, check_positive(name, getattr(self, name)))
        for name in ("pgd_steps", "surrogate_epochs", "batch_size", "width"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check_positive(name, getattr(self, name), integer=True))
        if self.eps > 1:
            raise ValueError(f"eps must be <= 1 (images are in [0,1]), got {self.eps}")
        if self.surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {SURROGATES}, got {self.surrogate!r}")


class TAP(Poison):
    name = "tap"
    config_cls = TAPConfig
    needs_data = True

    def _fit(self, images, labels, keys, *, progress: bool) -> None:
        device = resolve_device(self.config.device)
        self.config = cfg = resolve_knobs(self.config, device,
                                          cpu=dict(surrogate="small", width=16, pgd_steps=20, surrogate_epochs=8),
                                          cuda=dict(surrogate="resnet18", width=64, pgd_steps=100,
                                                    surrogate_epochs=30))
        x, y = to_nchw(images), torch.from_numpy(labels)
        target = (y + 1) % self.num_classes
        model = build_surrogate(cfg.surrogate, self.num_classes, cfg.width, device, self.seed)
        train_surrogate(model, x, y, epochs=cfg.surrogate_epochs, batch_size=min(cfg.batch_size, len(x)),
                        lr=cfg.lr, device=device, rng=rng_for(self.seed, "tap/order"), progress=progress,
                        desc="tap: surrogate epochs")
        model.eval()
        self.surrogate_accuracy = accuracy(model, x, y, cfg.batch_size, device)
        gen = torch.Generator().manual_seed(self.seed)
        delta = (torch.rand(x.shape, generator=gen) * 2 - 1) * cfg.eps
        delta = (x + delta).clamp(0, 1) - x
        for sl in progress_bar(batches(len(x), cfg.batch_size), enabled=progress, desc="tap: pgd"):
            xb, tb, db = x[sl].to(device), target[sl].to(device), delta[sl].to(device)
            done = 0
            while done < cfg.pgd_steps:
                k = min(10, cfg.pgd_steps - done)
                db = linf_pgd(model, xb, tb, db, eps=cfg.eps, step_size=cfg.step_size, steps=k)
                done += k
                with torch.no_grad():
                    rate = float((model((xb + db).clamp(0, 1)).argmax(1) == tb).float().mean())
                if rate >= cfg.stop_rate:
                    break
            delta[sl] = db.cpu()
        self.target_rate = accuracy(model, x, y, cfg.batch_size, device, delta=delta, target=target)
        self.table = KeyedPerturbations(keys, quantise_linf(delta.permute(0, 2, 3, 1).numpy(), cfg.eps))

    def _quantised(self, images: np.ndarray, labels: np.ndarray, keys: np.ndarray) -> np.ndarray:
        return self.table.lookup(keys, self.name)
