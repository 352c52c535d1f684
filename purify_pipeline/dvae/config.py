"""`DVAEConfig`: every knob of the D-VAE model and its two-stage schedule, with named presets.

`DVAEConfig.preset("paper")` is the authors' setting unchanged (METHOD.md); the smaller presets exist so the
method runs on a laptop CPU. Overrides are explicit keyword arguments, never silent edits of a preset.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

# name -> overrides of the dataclass defaults (the defaults ARE the paper preset).
_PRESETS: dict[str, dict[str, Any]] = {
    # Yu et al. ICML 2024: width 64, latent 256x16x16, embedding 128x16x16, Adam 5e-3, cosine, 60 epochs,
    # batch 128, clip 5.0, tau1 = 1.0, tau2 = 3.0, energy hinge after epoch 10.
    "paper": {},
    # Sized for a 2-core CPU: both stages on 10k CIFAR-10 images plus purification in 23-40 minutes (bf16 on an
    # AVX-512 CPU to itself; the cpu-mini matrix's step_seconds). Stage 2 runs at batch 32 (4x the optimiser steps
    # of batch 128 in about the same CPU time): the ablation measured 4-5 dB sharper outputs at about the same
    # poison retention, and D-VAE ahead of JPEG-10 on LSP, AR, OPS and EM (benchmarks/results/ablation/README.md).
    # Stage 1 at tau1 = 0.5, half the paper's KL target for stage 1's latent. End to end (fit_purifier +
    # purify_shards, 2 classifier seeds, benchmarks/results/cpu-mini/README.md) the first fits gave LSP/AR/OPS/EM
    # 71.9/72.8/72.0/70.8 against tau1 = 1's 71.4/72.2/72.3/69.5 at the same PSNR: a tie within the fit-to-fit
    # spread (over 2-4 fits per poison the `cpu` cells are 71.7/72.2/71.5/70.9, fits' means up to 2.6 apart), and
    # on matched EM/TAP poison bytes (benchmarks/results/cpu-mini-regen) too.
    "cpu": {"width": 32, "epochs": 15, "batch_size_stage2": 32, "tau1": 0.5},
    # `cpu` with the paper's tau1 = 1 (stage 2 at batch 32).
    "cpu-v2": {"width": 32, "epochs": 15, "batch_size_stage2": 32},
    # `cpu-v2` with stage 2 at batch 128: blurrier outputs, below JPEG-10 at 10k images.
    "cpu-v1": {"width": 32, "epochs": 15},
    # Quick look / demos: about 12 minutes on 10k images, 3 on 2,500 (projected in benchmarks/results/fit/cpu.json).
    "small": {"width": 16, "epochs": 8},
    # Unit tests and smoke runs: seconds.
    "tiny": {"width": 8, "latent_channels": 32, "epochs": 1, "batch_size": 64},
}


@dataclass
class DVAEConfig:
    """Model and schedule of a two-stage D-VAE fit. Defaults = the `paper` preset."""

    num_classes: int = 10
    image_size: int = 32
    width: int = 64  # channels of the first encoder stage; the latent grid has 2*width feature channels
    latent_channels: int = 256  # channels of the spatial latent z
    downsample: int | None = None  # stride-2 stages to the latent grid; None = auto (grid <= 16, 1 for 32 px)
    # optimisation (per stage)
    epochs: int = 60
    epochs_stage2: int | None = None  # None = same as `epochs`
    batch_size: int = 128
    batch_size_stage2: int | None = None  # None = same as `batch_size` (not in the paper: one batch size)
    lr: float = 5e-3
    grad_clip: float = 5.0
    # rate constraint: KL in nats per latent position (summed over channels), hinge 0.01 * max(KL, tau)
    tau1: float = 1.0
    tau2: float = 3.0
    kl_weight: float = 0.01
    # opt-in, beyond the paper (0 = off, the hand-set tau1/tau2): automatic tau. After `tau_auto_warmup` epochs
    # under the hand-set tau, a stage's tau becomes tau_auto_ratio x the KL its last warm-up epoch reached: a rate
    # target set relative to the data instead of in nats. Measured (benchmarks/results/ablation/README.md): the KL
    # follows tau; at 0.8 no accuracy gained
    tau_auto_ratio: float = 0.0
    tau_auto_warmup: int = 1
    # perturbation-energy hinge max(mean(p^2), floor), active when epoch > energy_start_epoch (0-based)
    energy_start_epoch: int = 10
    energy_floor: float = 0.002
    # opt-in, beyond the paper (0 = off): weight of the within-class variance of p_hat in a batch, which asks
    # the perturbation decoder for one pattern per class (class-wise poisons) instead of image detail
    p_class_weight: float = 0.0
    # how the training set is purified between the stages ("sample" = paper)
    stage1_mode: str = "sample"
    seed: int = 0
    preset_name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if self.width < 2 or self.width % 2:
            raise ValueError(f"width must be an even integer >= 2, got {self.width}")
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {self.latent_channels}")
        if self.stage1_mode not in ("sample", "mean"):
            raise ValueError(f"stage1_mode must be 'sample' or 'mean', got {self.stage1_mode!r}")
        if self.batch_size < 1 or (self.batch_size_stage2 is not None and self.batch_size_stage2 < 1):
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_size} / {self.batch_size_stage2}")
        if self.p_class_weight < 0:
            raise ValueError(f"p_class_weight must be >= 0, got {self.p_class_weight}")
        if self.tau1 < 0 or self.tau2 < 0:
            raise ValueError("tau1 and tau2 must be >= 0 (nats per latent position)")
        if not 0.0 <= self.tau_auto_ratio <= 1.0:
            raise ValueError(f"tau_auto_ratio must be in [0, 1] (0 = off), got {self.tau_auto_ratio}")
        if self.tau_auto_warmup < 1:
            raise ValueError(f"tau_auto_warmup must be >= 1 epoch, got {self.tau_auto_warmup}")
        n = self.num_downsample
        if self.image_size % (2**n):
            raise ValueError(f"image_size {self.image_size} is not divisible by 2**downsample = {2**n}")

    # ---- derived ----
    @property
    def num_downsample(self) -> int:
        """Stride-2 stages between the image and the latent grid (1 for 32 px, as in the paper)."""
        if self.downsample is not None:
            if self.downsample < 1:
                raise ValueError(f"downsample must be >= 1, got {self.downsample}")
            return self.downsample
        n = 1
        while self.image_size // (2**n) > 16 and self.image_size % (2 ** (n + 1)) == 0:
            n += 1
        return n

    @property
    def latent_size(self) -> int:
        """Side of the spatial latent grid (16 for 32 px)."""
        return self.image_size // (2**self.num_downsample)

    @property
    def stage2_epochs(self) -> int:
        return self.epochs if self.epochs_stage2 is None else self.epochs_stage2

    def tau(self, stage: int) -> float:
        return {1: self.tau1, 2: self.tau2}[stage]

    def epochs_for(self, stage: int) -> int:
        return {1: self.epochs, 2: self.stage2_epochs}[stage]

    def batch_size_for(self, stage: int) -> int:
        return {1: self.batch_size, 2: self.batch_size if self.batch_size_stage2 is None else self.batch_size_stage2}[stage]

    # ---- construction ----
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "DVAEConfig":
        """A named preset (`paper`, `cpu`, `small`, `tiny`) with explicit keyword overrides."""
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(_PRESETS)}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown DVAEConfig fields: {sorted(unknown)}")
        kw = {**_PRESETS[name], **overrides}
        kw.setdefault("preset_name", name if not overrides else f"{name}+overrides")
        return cls(**kw)

    @staticmethod
    def presets() -> list[str]:
        return list(_PRESETS)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DVAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown DVAEConfig fields: {sorted(unknown)}")
        return cls(**d)

    def steps_per_epoch(self, n: int) -> int:
        return max(1, math.floor(n / self.batch_size))
