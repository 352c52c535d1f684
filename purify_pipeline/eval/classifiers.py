"""Evaluation classifiers: the paper's CIFAR ResNet-18 and a fast CPU net, with `ClassifierConfig` presets.

A purifier is judged by training a *normal* classifier on its output and testing on clean data (METHOD.md).
`ClassifierConfig.preset("paper")` is that protocol unchanged (ResNet-18, SGD 0.1, momentum 0.9, wd 5e-4,
cosine over 60 epochs, batch 128, crop+flip, no normalisation). `preset("fast")` is a small BN conv net in
the spirit of airbench (Keller Jordan) sized for a 2-core CPU: >= 70% clean test accuracy from 10k CIFAR-10
images in a few minutes (measured in benchmarks/results/classifier/).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from purify_pipeline._blocks import BasicBlock

_PRESETS: dict[str, dict[str, Any]] = {
    # The evaluation protocol of Yu et al. (and ISS, UEraser, ...): the defaults of the dataclass.
    "paper": {},
    # Fast CPU evaluation: airbench-style VGG with BN (0.29 M parameters), label smoothing, Nesterov SGD with
    # linear warmup/decay, flip test-time augmentation. About 77% clean test accuracy from the 10k mini tier
    # at ~15 single-thread CPU-seconds per epoch (benchmarks/results/classifier/fast_mini.md, NOTES.md).
    "fast": {
        "arch": "fastnet",
        "width": 32,
        "epochs": 16,
        "batch_size": 256,
        "lr": 0.2,
        "momentum": 0.85,
        "nesterov": True,
        "weight_decay": 5e-4,
        "schedule": "linear",
        "warmup_epochs": 2,
        "label_smoothing": 0.2,
        "tta_flip": True,
        "eval_every": 0,
    },
    # Unit tests: seconds.
    "tiny": {"arch": "fastnet", "width": 8, "epochs": 1, "batch_size": 64, "lr": 0.2, "schedule": "linear"},
}

_ARCHS = ("resnet18", "fastnet")
_SCHEDULES = ("cosine", "linear")


@dataclass
class ClassifierConfig:
    """Architecture and training schedule of an evaluation classifier. Defaults = the `paper` preset."""

    arch: str = "resnet18"  # "resnet18" (CIFAR ResNet-18, 11.2 M params) or "fastnet"
    num_classes: int = 10
    width: int = 64  # channels of the first stage (ResNet-18: 64 -> 512; fastnet: w, 2w, 4w)
    epochs: int = 60
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # "cosine": annealed to 0 per step; "linear": warmup then linear decay to 0
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    # augmentation, on the batch in torch: random crop after zero padding + horizontal flip
    crop_padding: int = 4
    flip: bool = True
    tta_flip: bool = False  # average logits over the image and its mirror at test time
    drop_last: bool = False
    eval_every: int = 1  # test accuracy every n epochs (0 = only after the last epoch)
    eval_batch_size: int = 1000
    channels_last: bool = True  # faster convolutions on CPU (oneDNN); same maths
    # adversarial training (a training-time defense): PGD in an L-inf ball of radius adv_eps (0 = off; 8/255 is
    # the classic setting), adv_steps steps of adv_step_size (None: 2.5 * adv_eps / adv_steps), random start
    adv_eps: float = 0.0
    adv_steps: int = 10
    adv_step_size: float | None = None
    # UEraser (a training-time defense): 0 = off; 1 = UEraser-Lite (each batch through its augmentations);
    # K > 1 = UEraser-Max: K augmented views per image, the loss is each image's highest over its views, for the
    # first ueraser_max_fraction of the epochs, then one view (the reference code: the first 50 of 200 epochs)
    ueraser: int = 0
    ueraser_max_fraction: float = 0.25
    preset_name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if self.arch not in _ARCHS:
            raise ValueError(f"arch must be one of {_ARCHS}, got {self.arch!r}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
        for name in ("num_classes", "width", "epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.crop_padding < 0 or self.eval_every < 0 or self.warmup_epochs < 0:
            raise ValueError("crop_padding, eval_every and warmup_epochs must be >= 0")
        if not 0 <= self.adv_eps <= 1 or self.adv_steps < 1 or (self.adv_step_size is not None and self.adv_step_size <= 0):
            raise ValueError("adv_eps must be in [0, 1], adv_steps >= 1 and adv_step_size > 0")
        if self.ueraser < 0 or not 0 <= self.ueraser_max_fraction <= 1:
            raise ValueError(f"ueraser must be >= 0 (views) and ueraser_max_fraction in [0, 1], got {self.ueraser}, "
                             f"{self.ueraser_max_fraction}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ClassifierConfig":
        """A named preset (`paper`, `fast`, `tiny`) with explicit keyword overrides."""
        if name not in _PRESETS:
            raise ValueError(f"unknown classifier preset {name!r}; choose one of {sorted(_PRESETS)}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ClassifierConfig fields: {sorted(unknown)}")
        kw = {**_PRESETS[name], **overrides}
        kw.setdefault("preset_name", name if not overrides else f"{name}+overrides")
        return cls(**kw)

    @staticmethod
    def presets() -> list[str]:
        return list(_PRESETS)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClassifierConfig":
        d = dict(d)
        if d.pop("whiten", False):  # retired: configs recorded before it was removed carry "whiten": false
            raise ValueError("whiten=True (the patch-whitening stem) is no longer supported")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ClassifierConfig fields: {sorted(unknown)}")
        return cls(**d)


# ---------------------------------------------------------------- CIFAR ResNet-18 (the paper's evaluator)
# BasicBlock: the CIFAR ResNet block, shared with the D-VAE encoder (_blocks.py).


class ResNet18(nn.Module):
    """The CIFAR ResNet-18 used by the UE literature: 3x3 stem (no max-pool), 4 stages x 2 BasicBlocks."""

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        stages, cin = [], w
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = w * 2**i
            stages += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*stages)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


# ---------------------------------------------------------------- fast CPU net
class ConvGroup(nn.Module):
    """conv -> 2x2 max-pool -> BN -> GELU -> conv -> BN -> GELU (one resolution stage of airbench)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.bn1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.bn2(self.conv2(x)))


class FastNet(nn.Module):
    """Small VGG with BN for CPU evaluation: a stem, three conv stages (w, 2w, 4w) each halving the size, max-pool head.

    The stem is a learnable 3x3 conv-BN-GELU. Logits are scaled by 1/8 (airbench), which with label
    smoothing keeps the high learning rate stable.
    """

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w // 2, 3, padding=1, bias=False), nn.BatchNorm2d(w // 2))
        self.stages = nn.Sequential(ConvGroup(w // 2, w), ConvGroup(w, 2 * w), ConvGroup(2 * w, 4 * w))
        self.head = nn.Linear(4 * w, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(F.gelu(self.stem(x)))
        x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.head(x) / 8.0


def build_classifier(cfg: ClassifierConfig) -> nn.Module:
    """A freshly initialised classifier for `cfg` (seed the global torch RNG first for reproducibility)."""
    if cfg.arch == "resnet18":
        return ResNet18(cfg.num_classes, cfg.width)
    return FastNet(cfg.num_classes, cfg.width)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
