"""Unlearnable-example poison generators: seeded, vectorised, on uint8 NHWC arrays.

    poisoned = poisons.generate("lsp", images, labels, num_classes=10, seed=0)      # uint8 NHWC
    delta = poisons.perturbation("ar", images, labels, num_classes=10, seed=0)      # float32, [0,1] units
    p = poisons.fit("ops", images, labels, num_classes=10, seed=0)                 # class-level state once
    batch_out = p.apply(batch, batch_labels, sample_ids=batch_keys)                # cheap per batch
    poisons.poison_shards("clean/train-{000000..000049}.tar", "out/", "ar", seed=0)  # Ray Data job

Names (`POISONS`): lsp, ar, ops, em, random, classwise, tap, cuda (class-wise blur filters, not additive:
`quantised` is poisoned - clean), rem (EM against an adversary), sep (targeted PGD against the checkpoints of one
training run). Budgets default to the original papers'
values and are keyword options (`eps=`, `l2=`, ...); compute knobs for em/rem/tap/sep likewise. Per-sample noise
comes from (seed, sample id): pass `sample_ids` (ints or string keys) and the bytes do not depend on
batching. The poisoned image is clip(x + round(255·delta)) and every budget holds after that quantisation.
em, rem, tap and sep train a surrogate network: the same seed gives the same bytes on one machine, but other
bytes on another CPU model (its float kernels differ), so keep the poisoned shards when the exact bytes matter.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ._base import Poison
from ._common import SampleIds
from .ar import AR
from .cuda import CUDA
from .em import EM, REM
from .lsp import LSP
from .noise import ClasswiseNoise, RandomNoise
from .ops import OPS
from .sep import SEP
from .tap import TAP

_REGISTRY: dict[str, type[Poison]] = {c.name: c for c in (LSP, AR, OPS, EM, RandomNoise, ClasswiseNoise, TAP, CUDA, REM, SEP)}
POISONS: tuple[str, ...] = tuple(_REGISTRY)


def get(name: str) -> type[Poison]:
    """The Poison class registered under `name`."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown poison {name!r}; choose one of {list(POISONS)}") from None


def fit(name: str, images: np.ndarray | None = None, labels: Any = None, *, num_classes: int, seed: int,
        image_size: tuple[int, int] | int | None = None, sample_ids: SampleIds = None, progress: bool = True,
        **budget: Any) -> Poison:
    """Compute a poison's class-level state once (see `Poison.fit`); then `.apply(...)` per batch."""
    return get(name).fit(images, labels, num_classes=num_classes, seed=seed, image_size=image_size,
                         sample_ids=sample_ids, progress=progress, **budget)


def generate(name: str, images: np.ndarray, labels: Any, *, num_classes: int, seed: int,
             sample_ids: SampleIds = None, progress: bool = True, **budget: Any) -> np.ndarray:
    """Poisoned copies of uint8 NHWC `images` (fit on them, then apply)."""
    p = fit(name, images, labels, num_classes=num_classes, seed=seed, sample_ids=sample_ids, progress=progress,
            **budget)
    return p.apply(images, labels, sample_ids=sample_ids)


def perturbation(name: str, images: np.ndarray, labels: Any, *, num_classes: int, seed: int,
                 sample_ids: SampleIds = None, progress: bool = True, **budget: Any) -> np.ndarray:
    """The added perturbation (float32 NHWC, [0,1] units, quantised, before clipping) that `generate` uses."""
    p = fit(name, images, labels, num_classes=num_classes, seed=seed, sample_ids=sample_ids, progress=progress,
            **budget)
    return p.perturbation(images, labels, sample_ids=sample_ids)


def poison_shards(inputs: Any, output: str, name: str, *, seed: int, **kwargs: Any) -> dict[str, Any]:
    """Poison WebDataset shards with Ray Data and write PNG shards + manifest (see `poisons.job`)."""
    from .job import (
        poison_shards as _poison_shards,  # imports ray: only when the job is used
    )

    return _poison_shards(inputs, output, name, seed=seed, **kwargs)


__all__ = ["AR", "CUDA", "EM", "LSP", "OPS", "POISONS", "TAP", "ClasswiseNoise", "Poison", "REM", "RandomNoise", "SEP", "fit",
           "generate", "get", "perturbation", "poison_shards"]
