"""EM: sample-wise error-minimising noise (Huang et al., ICLR 2021, "Unlearnable Examples"), and REM.

Bi-level min-min: alternate `train_steps` SGD steps of a surrogate on the perturbed data with
`pgd_steps` signed-gradient steps of `step_size` per sample that *minimise* the surrogate's loss,
projected to the L∞ ball (eps) and [0,1]; stop once the surrogate's error on the perturbed training set
is below `stop_error` (or after `max_rounds`). Paper values: eps 8/255, step 0.8/255, 20 steps, 10 train
steps, stop at 1 % error, ResNet-18. Knobs left at None resolve by device: on CUDA the paper values
(ResNet-18, 20 steps of 0.8/255); on CPU a small CNN of width 16 and 10 steps of 1.6/255 (the same total
travel, half the cost) so that 10k CIFAR images finish in minutes on 2 cores. The resolved values are
recorded in `config`.

The perturbation of each sample is optimised during `fit` over the whole set and stored (int8, keyed by
sample id); `apply` looks it up, so apply only to samples that were in the fit set.

REM (Fu et al., ICLR 2022, "Robust unlearnable examples") is EM against an adversary: the surrogate is
trained adversarially (PGD in an L∞ ball of `adv_radius`, 4/255 in the paper) on x + delta, and each noise
step minimises the loss at the worst point within `adv_radius` of x + delta, so the noise survives adversarial
training. Paper: adv_radius 4/255, 10 adversary steps of 0.8/255 (CUDA defaults here); CPU: 3 steps of
2/255. (The paper also averages over random augmentations, EOT; not done here.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ._base import Poison
from ._common import check_positive, quantise_linf, rng_for
from ._common import progress as progress_bar
from ._keyed import KeyedPerturbations
from ._surrogate import (
    SURROGATES,
    accuracy,
    batches,
    build_surrogate,
    linf_ascent,
    linf_pgd,
    resolve_device,
    resolve_knobs,
    robust_linf_pgd,
    to_nchw,
)


@dataclass(frozen=True)
class EMConfig:
    eps: float = 8 / 255
    step_size: float | None = None  # cuda: 0.8/255 (paper), cpu: 1.6/255
    pgd_steps: int | None = None  # cuda: 20 (paper), cpu: 10
    train_steps: int = 10
    stop_error: float = 0.01  # stop when the surrogate's error on the perturbed set is below this
    max_rounds: int = 30  # safety bound on train/perturb rounds
    surrogate: str = "auto"  # "auto" (resnet18 on cuda, small on cpu), "small", "resnet18"
    width: int | None = None  # surrogate width (cpu small CNN: 16, resnet18: 64)
    batch_size: int = 256
    lr: float = 0.1
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("eps", "step_size", "lr"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check_positive(name, getattr(self, name)))
        for name in ("pgd_steps", "train_steps", "max_rounds", "batch_size", "width"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check_positive(name, getattr(self, name), integer=True))
        object.__setattr__(self, "stop_error", check_positive("stop_error", self.stop_error, allow_zero=True))
        if self.eps > 1:
            raise ValueError(f"eps must be <= 1 (images are in [0,1]), got {self.eps}")
        if self.surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {SURROGATES}, got {self.surrogate!r}")


@dataclass(frozen=True)
class REMConfig(EMConfig):
    adv_radius: float = 4 / 255  # the adversary's L∞ radius (REM's rho_a)
    adv_steps: int | None = None  # cuda: 10 (paper), cpu: 3
    adv_step_size: float | None = None  # cuda: 0.8/255 (paper), cpu: 2/255

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "adv_radius", check_positive("adv_radius", self.adv_radius))
        if self.adv_steps is not None:
            object.__setattr__(self, "adv_steps", check_positive("adv_steps", self.adv_steps, integer=True))
        if self.adv_step_size is not None:
            object.__setattr__(self, "adv_step_size", check_positive("adv_step_size", self.adv_step_size))


class EM(Poison):
    name = "em"
    config_cls = EMConfig
    needs_data = True
    _cpu: dict = dict(surrogate="small", width=16, pgd_steps=10, step_size=1.6 / 255)
    _cuda: dict = dict(surrogate="resnet18", width=64, pgd_steps=20, step_size=0.8 / 255)

    def _fit(self, images, labels, keys, *, progress: bool) -> None:
        device = resolve_device(self.config.device)
        self.config = cfg = resolve_knobs(self.config, device, cpu=self._cpu, cuda=self._cuda)
        radius = getattr(cfg, "adv_radius", 0.0)  # REM: > 0
        x, y = to_nchw(images), torch.from_numpy(labels)
        n = len(x)
        gen = torch.Generator().manual_seed(self.seed)
        delta = (torch.rand(x.shape, generator=gen) * 2 - 1) * cfg.eps  # uniform start, as the paper
        delta = (x + delta).clamp(0, 1) - x
        model = build_surrogate(cfg.surrogate, self.num_classes, cfg.width, device, self.seed)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
        order = _BatchStream(n, min(cfg.batch_size, n), rng_for(self.seed, "em/order"))
        self.history: list[dict[str, float]] = []
        bar = progress_bar(range(cfg.max_rounds), enabled=progress, desc=f"{self.name}: rounds")
        for rnd in bar:
            model.train()
            for _ in range(cfg.train_steps):
                idx = order.next()
                xb = (x[idx] + delta[idx]).clamp(0, 1).to(device)
                yb = y[idx].to(device)
                if radius:  # REM: the surrogate trains adversarially
                    model.eval()
                    xb = (xb + linf_ascent(model, xb, yb, radius=radius, step_size=cfg.adv_step_size,
                                           steps=cfg.adv_steps)).clamp(0, 1)  # fmt: skip
                    model.train()
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            model.eval()
            for sl in batches(n, cfg.batch_size):
                if radius:
                    delta[sl] = robust_linf_pgd(model, x[sl].to(device), y[sl].to(device), delta[sl].to(device),
                                                eps=cfg.eps, step_size=cfg.step_size, steps=cfg.pgd_steps,
                                                radius=radius, adv_step_size=cfg.adv_step_size,
                                                adv_steps=cfg.adv_steps).cpu()  # fmt: skip
                else:
                    delta[sl] = linf_pgd(model, x[sl].to(device), y[sl].to(device), delta[sl].to(device),
                                         eps=cfg.eps, step_size=cfg.step_size, steps=cfg.pgd_steps).cpu()
            err = 1.0 - accuracy(model, x, y, cfg.batch_size, device, delta=delta)
            self.history.append({"round": rnd, "error": err})
            bar.set_postfix(error=f"{err:.4f}")
            if err < cfg.stop_error:
                break
        self.converged = self.history[-1]["error"] < cfg.stop_error
        q = quantise_linf(delta.permute(0, 2, 3, 1).numpy(), cfg.eps)
        self.table = KeyedPerturbations(keys, q)

    def _quantised(self, images: np.ndarray, labels: np.ndarray, keys: np.ndarray) -> np.ndarray:
        return self.table.lookup(keys, self.name)


class _BatchStream:
    """Endless seeded shuffled mini-batches of indices (a new permutation each pass)."""

    def __init__(self, n: int, size: int, rng: np.random.Generator) -> None:
        self.n, self.size, self.rng = n, size, rng
        self.perm, self.pos = rng.permutation(n), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.size > self.n:
            self.perm, self.pos = self.rng.permutation(self.n), 0
        idx = self.perm[self.pos : self.pos + self.size]
        self.pos += self.size
        return torch.from_numpy(idx)


class REM(EM):
    """Robust error-minimising noise (see the module docstring)."""

    name = "rem"
    config_cls = REMConfig
    _cpu = {**EM._cpu, "adv_steps": 3, "adv_step_size": 2 / 255}
    _cuda = {**EM._cuda, "adv_steps": 10, "adv_step_size": 0.8 / 255}
