"""The D-VAE objective (METHOD.md "Loss"): two reconstructions of the poisoned input, a rate hinge, an energy hinge."""
from __future__ import annotations

import torch
from torch import Tensor

from purify_pipeline.dvae.model import DVAEOutput, kl_per_position


def dvae_loss(
    out: DVAEOutput,
    x: Tensor,
    *,
    tau: float,
    epoch: int,
    kl_weight: float = 0.01,
    energy_start_epoch: int = 10,
    energy_floor: float = 0.002,
    y: Tensor | None = None,
    p_class_weight: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss and its terms for one batch. `x` is the poisoned input, target of both reconstructions.

    rate: kl_weight * max(KL, tau) - flat (no gradient) while KL < tau, which pins KL at tau.
    energy: max(mean(p_hat^2), floor), only when epoch > energy_start_epoch (0-based).
    p_class_weight > 0 (opt-in, not in the paper): + weight * within-class variance of p_hat over the batch
    (labels `y`), per pixel.
    """
    assert out.x_hat is not None and out.p_hat is not None
    rec = torch.mean((out.x_hat - x) ** 2)
    rec_p = torch.mean((torch.clamp(out.x_hat + out.p_hat, 0.0, 1.0) - x) ** 2)
    kl = out.kl if out.kl is not None else kl_per_position(out.mu, out.logvar)  # the model's fused KL when sampled
    rate = kl_weight * torch.clamp(kl, min=tau)
    energy = torch.mean(out.p_hat**2)
    loss = rec + rec_p + rate
    energy_on = epoch > energy_start_epoch
    if energy_on:
        loss = loss + torch.clamp(energy, min=energy_floor)
    extra: dict[str, Tensor] = {}
    if p_class_weight > 0:
        if y is None:
            raise ValueError("p_class_weight > 0 needs the labels y")
        extra["p_class_var"] = within_class_variance(out.p_hat, y)
        loss = loss + p_class_weight * extra["p_class_var"]
    terms = {"loss": loss, "rec": rec, "rec_p": rec_p, "kl": kl, "energy": energy, **extra}
    return loss, {k: v.detach() for k, v in terms.items()}


def within_class_variance(p: Tensor, y: Tensor) -> Tensor:
    """Mean over samples and pixels of (p_i - mean of p over the batch's samples of class y_i)^2."""
    onehot = torch.nn.functional.one_hot(y, int(y.max()) + 1).to(p.dtype)  # N, K
    counts = onehot.sum(0).clamp_min(1)
    means = (onehot.T @ p.flatten(1)) / counts[:, None]  # K, D
    return torch.mean((p.flatten(1) - onehot @ means) ** 2)
