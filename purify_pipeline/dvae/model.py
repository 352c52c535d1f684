"""D-VAE: a rate-constrained VAE with a second decoder that explains the perturbation (Yu et al., ICML 2024).

Layout for 32 px with the paper preset (width w = 64, METHOD.md "Architecture"):
encoder = conv3x3(3->w)+BN+ReLU, 2 BasicBlocks(w), BasicBlock(w->2w, stride 2)          -> s: 2w x 16 x 16
latent  = 1x1 convs s -> mu, logvar (L x 16 x 16);  z = mu + sigma*eps;  1x1 conv z -> h (2w x 16 x 16)
D       = ConvT(2w->w,k4,s2) ConvT(w->w) IN ReLU ConvT(w->w/2) IN ReLU ConvT(w/2->3) Sigmoid  -> x_hat
D_p     = the same layers without the sigmoid, reading h + E[y]                                  -> p_hat
Larger images add stride-2 BasicBlocks (encoder) and ConvT(k4,s2)+IN+ReLU (decoders) so the latent stays a
spatial map of side <= 16; 32 px is exactly the paper's network.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from purify_pipeline._blocks import BasicBlock
from purify_pipeline.dvae.config import DVAEConfig


class DVAEOutput(NamedTuple):
    x_hat: Tensor | None  # reconstruction in [0, 1]
    p_hat: Tensor | None  # estimated perturbation (signed)
    mu: Tensor
    logvar: Tensor
    kl: Tensor | None = None  # KL to N(0, I) in nats per latent position (fp32), when sampled with gradients on


class _SampleWithKL(torch.autograd.Function):
    """z = mu + exp(logvar / 2) * eps and KL(q(z|x) || N(0, I)) summed over channels, averaged over positions and
    batch (`kl_per_position`), with a hand-written backward.

    On the 256-channel latent the element-wise reparameterisation and KL are ~40% of a CPU training step under
    autograd (some twenty passes over a tensor larger than the image batch, plus the dtype casts of bf16
    autocast); here they are six passes forward and six backward, in fp32 whatever the input dtype.
    """

    @staticmethod
    def forward(ctx: Any, mu: Tensor, logvar: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        m, lv = mu.float(), logvar.float()
        std = lv.mul(0.5).exp_()
        z = torch.addcmul(m, std, eps.float())
        positions = m.numel() // m.shape[1]
        # 0.5 * sum(mu^2 + sigma^2 - 1 - logvar) / positions, each sum one pass in any memory layout
        sq = torch.linalg.vector_norm(m).square() + torch.linalg.vector_norm(std).square()
        kl = (sq - lv.sum()) * (0.5 / positions) - 0.5 * m.shape[1]
        ctx.save_for_backward(m, std, eps)
        ctx.positions, ctx.dtypes = positions, (mu.dtype, logvar.dtype)
        return z, kl

    @staticmethod
    def backward(ctx: Any, gz: Tensor, gkl: Tensor) -> tuple[Tensor, Tensor, None]:
        m, std, eps = ctx.saved_tensors
        c = (gkl / ctx.positions).to(m.dtype)  # a 0-dim tensor: no host sync on an accelerator
        dmu = torch.addcmul(gz, m, c)  # dz/dmu = 1, dKL/dmu = mu / positions
        # dz/dlogvar = eps * std / 2, dKL/dlogvar = (sigma^2 - 1) / (2 * positions)
        dlv = torch.mul(gz, eps).addcmul_(std, c).mul_(std).sub_(c).mul_(0.5)
        return dmu.to(ctx.dtypes[0]), dlv.to(ctx.dtypes[1]), None


def sample_with_kl(mu: Tensor, logvar: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """(z, KL per latent position) in one fused op with its own backward (see `_SampleWithKL`)."""
    return _SampleWithKL.apply(mu, logvar, eps)


def kl_per_position(mu: Tensor, logvar: Tensor, var: Tensor | None = None) -> Tensor:
    """KL(q(z|x) || N(0, I)) summed over latent channels, averaged over positions and batch (nats/position).

    On a 16x16 grid tau = 1 is 256 nats per image: a per-image sum or a mean over all dimensions would move the
    operating point by a factor of 256. `var` = exp(logvar) when the caller already has it (no second exp).
    """
    kl = 0.5 * (mu.pow(2) + (logvar.exp() if var is None else var) - 1.0 - logvar)  # N, C, H, W
    return kl.sum(dim=1).mean()


def sample_with_kl_formulas(mu: Tensor, logvar: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """The same (z, KL) as the textbook formulas under autograd, in fp32, z returned in mu's dtype: what a compiled
    fit hands to `torch.compile` (`train.compiled`), which fuses forward and backward into a few loops each."""
    m, lv = mu.float(), logvar.float()
    std = torch.exp(0.5 * lv)
    return (m + std * eps).to(mu.dtype), kl_per_position(m, lv, var=std * std)


def _encoder(cfg: DVAEConfig) -> nn.Sequential:
    w = cfg.width
    layers: list[nn.Module] = [
        nn.Conv2d(3, w, 3, 1, 1, bias=False),
        nn.BatchNorm2d(w),
        nn.ReLU(inplace=True),
        BasicBlock(w, w),
        BasicBlock(w, w),
        BasicBlock(w, 2 * w, stride=2),
    ]
    layers += [BasicBlock(2 * w, 2 * w, stride=2) for _ in range(cfg.num_downsample - 1)]
    return nn.Sequential(*layers)


def _decoder(cfg: DVAEConfig, sigmoid: bool) -> nn.Sequential:
    w = cfg.width
    layers: list[nn.Module] = []
    for _ in range(cfg.num_downsample - 1):  # extra upsampling for images larger than 32 px
        layers += [nn.ConvTranspose2d(2 * w, 2 * w, 4, 2, 1), nn.InstanceNorm2d(2 * w), nn.ReLU(inplace=True)]
    layers += [
        nn.ConvTranspose2d(2 * w, w, 4, 2, 1),
        nn.ConvTranspose2d(w, w, 3, 1, 1),
        nn.InstanceNorm2d(w),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(w, w // 2, 3, 1, 1),
        nn.InstanceNorm2d(w // 2),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(w // 2, 3, 3, 1, 1),
    ]
    if sigmoid:
        layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


class DVAE(nn.Module):
    """Encoder, spatial latent, image decoder D, perturbation decoder D_p, class embedding E."""

    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c, g = 2 * cfg.width, cfg.latent_size
        self.encoder = _encoder(cfg)
        self.to_mu = nn.Conv2d(c, cfg.latent_channels, 1)
        self.to_logvar = nn.Conv2d(c, cfg.latent_channels, 1)
        self.from_z = nn.Conv2d(cfg.latent_channels, c, 1)
        self.decoder = _decoder(cfg, sigmoid=True)
        self.perturbation_decoder = _decoder(cfg, sigmoid=False)
        self.class_embedding = nn.Parameter(torch.randn(cfg.num_classes, c, g, g))
        self.latent_op: Any = None  # replaces `sample_with_kl` while a fit runs compiled (`train.compiled`)

    def embed(self, y: Tensor) -> Tensor:
        """E[y] as a one-hot matmul: its backward is deterministic on CPU (indexing's scatter-add is not)."""
        e = self.class_embedding
        onehot = torch.nn.functional.one_hot(y, e.shape[0]).to(e.dtype)
        return (onehot @ e.flatten(1)).view(len(y), *e.shape[1:])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        g = self.cfg.latent_size
        return (self.cfg.latent_channels, g, g)

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        *,
        sample: bool = True,
        eps: Tensor | None = None,
        generator: torch.Generator | None = None,
        decode_x: bool = True,
        decode_p: bool = True,
    ) -> DVAEOutput:
        """x: float NCHW in [0, 1]; y: long (N,). `eps` (N, *latent_shape) overrides the noise draw."""
        s = self.encoder(x)
        mu, logvar = self.to_mu(s), self.to_logvar(s)
        kl = None
        if sample:
            if eps is None:
                eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=torch.float32)
            if torch.is_grad_enabled():
                z, kl = (self.latent_op or sample_with_kl)(mu, logvar, eps)
            else:
                z = mu + torch.exp(0.5 * logvar) * eps.to(mu.dtype)
        else:
            z = mu
        h = self.from_z(z)
        x_hat = self.decoder(h) if decode_x else None
        p_hat = self.perturbation_decoder(h + self.embed(y)) if decode_p else None
        return DVAEOutput(x_hat, p_hat, mu, logvar, kl)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
