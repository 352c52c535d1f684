"""Surrogate classifiers for the optimised poisons (EM, REM, TAP, SEP): a small CNN for CPU, ResNet-18 on GPU."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import progress as progress_bar

SURROGATES = ("auto", "small", "resnet18")


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU-maxpool stages (w, 2w, 4w channels), global average pool, linear. Any image size."""

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for cout in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2, ceil_mode=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_knobs(config: Any, device: torch.device, *, cpu: dict[str, Any], cuda: dict[str, Any]) -> Any:
    """Fill the config's None knobs (and surrogate="auto") with the device's defaults."""
    defaults = cuda if device.type == "cuda" else cpu
    updates = {k: v for k, v in defaults.items() if k not in ("surrogate", "width") and getattr(config, k) is None}
    kind = defaults["surrogate"] if config.surrogate == "auto" else config.surrogate
    updates["surrogate"] = kind
    if config.width is None:
        updates["width"] = 64 if kind == "resnet18" else 16
    return dataclasses.replace(config, **updates)


def build_surrogate(kind: str, num_classes: int, width: int | None, device: torch.device, seed: int) -> nn.Module:
    """A freshly initialised surrogate, its weights drawn from `seed` (global RNG state left untouched)."""
    if kind not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {kind!r}")
    if kind == "auto":
        kind = "resnet18" if device.type == "cuda" else "small"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "resnet18":
            from purify_pipeline.eval.classifiers import ResNet18

            model = ResNet18(num_classes, width or 64)
        else:
            model = SmallCNN(num_classes, width or 16)
    return model.to(device)


def to_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [0,1] (CPU)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)


def batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device,
             delta: torch.Tensor | None = None, target: torch.Tensor | None = None) -> float:
    """Fraction of (x + delta) classified as `target` (default: the true labels y), model in eval mode."""
    model.eval()
    want = y if target is None else target
    hits = 0
    for sl in batches(len(x), batch_size):
        xb = x[sl] if delta is None else (x[sl] + delta[sl]).clamp_(0, 1)
        hits += int((model(xb.to(device)).argmax(1).cpu() == want[sl]).sum())
    return hits / len(x)


def train_surrogate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
                    device: torch.device, rng: np.random.Generator, progress: bool, desc: str,
                    on_epoch: Callable[[int], None] | None = None) -> None:  # fmt: skip
    """Plain SGD (momentum 0.9, wd 5e-4, cosine per step) with random flips, on the clean images.
    `on_epoch(e)` runs after each epoch e = 1..epochs (SEP keeps checkpoints of the run there)."""
    n = len(x)
    steps = epochs * max(1, n // batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for epoch in progress_bar(range(1, epochs + 1), enabled=progress, desc=desc):
        perm = rng.permutation(n)
        for i in range(max(1, n // batch_size)):
            idx = torch.from_numpy(perm[i * batch_size : (i + 1) * batch_size])
            xb = x[idx]
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            loss = F.cross_entropy(model(xb.to(device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if on_epoch is not None:
            on_epoch(epoch)
            model.train()


def linf_pgd(model: nn.Module | Sequence[nn.Module], x: torch.Tensor, target: torch.Tensor, delta: torch.Tensor, *,
             eps: float, step_size: float, steps: int) -> torch.Tensor:  # fmt: skip
    """Signed-gradient steps that *minimise* CE(model(x + delta), target), projected to the L∞ ball and [0,1].

    EM minimises towards the true label (error-minimising noise); TAP towards a wrong target class; SEP passes
    several models (checkpoints of one run) and steps on the gradient of their mean loss.
    """
    models = [model] if isinstance(model, nn.Module) else list(model)
    delta = delta.clone()
    for _ in range(steps):
        delta.requires_grad_(True)
        xa = (x + delta).clamp(0, 1)
        loss = sum(F.cross_entropy(m(xa), target) for m in models) / len(models)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = delta - step_size * grad.sign()
            delta = delta.clamp(-eps, eps)
            delta = (x + delta).clamp(0, 1) - x
    return delta.detach()


def linf_ascent(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, radius: float, step_size: float,
                steps: int) -> torch.Tensor:
    """rho that *maximises* CE(model(x + rho), y) in the L∞ ball of `radius` (zero start, signed steps; x + rho
    kept in [0,1]): the adversary REM's noise must survive."""
    rho = torch.zeros_like(x)
    for _ in range(steps):
        rho.requires_grad_(True)
        loss = F.cross_entropy(model((x + rho).clamp(0, 1)), y)
        (grad,) = torch.autograd.grad(loss, rho)
        with torch.no_grad():
            rho = (rho + step_size * grad.sign()).clamp(-radius, radius)
            rho = (x + rho).clamp(0, 1) - x
    return rho.detach()


def robust_linf_pgd(model: nn.Module, x: torch.Tensor, target: torch.Tensor, delta: torch.Tensor, *, eps: float,
                    step_size: float, steps: int, radius: float, adv_step_size: float,
                    adv_steps: int) -> torch.Tensor:  # fmt: skip
    """REM's noise step: signed-gradient steps that minimise CE(model(x + delta + rho*), target), rho* the
    worst case in the L∞ ball of `radius` around x + delta (recomputed every step), delta projected to eps."""
    delta = delta.clone()
    for _ in range(steps):
        rho = linf_ascent(model, (x + delta).clamp(0, 1), target, radius=radius, step_size=adv_step_size,
                          steps=adv_steps)  # fmt: skip
        delta.requires_grad_(True)
        loss = F.cross_entropy(model((x + delta + rho).clamp(0, 1)), target)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = (delta - step_size * grad.sign()).clamp(-eps, eps)
            delta = (x + delta).clamp(0, 1) - x
    return delta.detach()
