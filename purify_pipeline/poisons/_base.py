"""`Poison`: the two-phase interface every generator implements (fit class-level state once, apply per batch).

`fit` computes what is shared across a dataset: OPS pixels, LSP cluster centres, AR filters, class-wise
noise, or - for the sample-wise optimised EM and TAP - the per-sample perturbations of the whole fit set,
keyed by sample id. `apply` is then cheap and deterministic per sample: noise drawn per sample comes from
(seed, sample id), so how a pipeline batches the data never changes the bytes.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from ._common import (
    SampleIds,
    add_quantised,
    check_images,
    check_labels,
    check_num_classes,
    check_seed,
    sample_keys,
)


def make_config(config_cls: type, name: str, budget: dict[str, Any]) -> Any:
    """Build a family's config dataclass from keyword budget/knobs, naming the allowed keys on a typo."""
    allowed = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(budget) - set(allowed))
    if unknown:
        raise TypeError(f"poison {name!r} got unknown option(s) {unknown}; allowed: {allowed}")
    return config_cls(**budget)


class Poison(ABC):
    """A fitted poison for a fixed image size, number of classes and seed."""

    name: ClassVar[str]
    config_cls: ClassVar[type]
    needs_data: ClassVar[bool] = False  # True: fit reads the images (OPS, EM, TAP)

    def __init__(self, *, num_classes: int, seed: int, image_size: tuple[int, int], config: Any) -> None:
        self.num_classes = check_num_classes(num_classes)
        self.seed = check_seed(seed)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.config = config

    # ---- fit ------------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        images: np.ndarray | None = None,
        labels: Any = None,
        *,
        num_classes: int,
        seed: int,
        image_size: tuple[int, int] | int | None = None,
        sample_ids: SampleIds = None,
        progress: bool = True,
        **budget: Any,
    ) -> "Poison":
        """Compute the class-level state. `images` may be omitted (give `image_size`) when not `needs_data`."""
        config = make_config(cls.config_cls, cls.name, budget)
        num_classes = check_num_classes(num_classes)
        seed = check_seed(seed)
        if images is None:
            if cls.needs_data:
                raise ValueError(f"poison {cls.name!r} needs the images and labels to fit (got images=None)")
            if image_size is None:
                raise ValueError("give images or image_size=(H, W) to fit a poison")
            hw = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else tuple(image_size)
            if len(hw) != 2 or min(hw) < 1:
                raise ValueError(f"image_size must be (H, W) with H, W >= 1, got {image_size!r}")
            poison = cls(num_classes=num_classes, seed=seed, image_size=hw, config=config)
            poison._fit(None, None, None, progress=progress)
            return poison
        images = check_images(images)
        lab = check_labels(labels, images.shape[0], num_classes)
        poison = cls(num_classes=num_classes, seed=seed, image_size=images.shape[1:3], config=config)
        poison._fit(images, lab, sample_keys(sample_ids, images.shape[0]), progress=progress)
        return poison

    def _fit(self, images: np.ndarray | None, labels: np.ndarray | None, keys: np.ndarray | None,
             *, progress: bool) -> None:
        """Subclasses compute their class-level state here (default: nothing to do)."""

    # ---- apply ----------------------------------------------------------------------------------
    def _check(self, images: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
        images = check_images(images)
        if tuple(images.shape[1:3]) != self.image_size:
            raise ValueError(
                f"poison {self.name!r} was fitted for {self.image_size[0]}x{self.image_size[1]} images, "
                f"got {images.shape[1]}x{images.shape[2]}"
            )
        return images, check_labels(labels, images.shape[0], self.num_classes)

    @abstractmethod
    def _quantised(self, images: np.ndarray, labels: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Integer pixel perturbation q (int16 NHWC) within the budget; poisoned = clip(x + q, 0, 255)."""

    def quantised(self, images: np.ndarray, labels: Any, sample_ids: SampleIds = None) -> np.ndarray:
        """The perturbation actually added, in pixel units (int16 NHWC), before clipping to [0, 255]."""
        images, lab = self._check(images, labels)
        return self._quantised(images, lab, sample_keys(sample_ids, images.shape[0]))

    def perturbation(self, images: np.ndarray, labels: Any, sample_ids: SampleIds = None) -> np.ndarray:
        """The perturbation in [0,1] image units (float32 NHWC): quantised(...) / 255, before clipping."""
        return self.quantised(images, labels, sample_ids).astype(np.float32) / 255.0

    def apply(self, images: np.ndarray, labels: Any, sample_ids: SampleIds = None) -> np.ndarray:
        """Poisoned copies of `images` (uint8 NHWC). The input array is not modified."""
        return add_quantised(images, self.quantised(images, labels, sample_ids))

    # ---- description ----------------------------------------------------------------------------
    @property
    def budget(self) -> dict[str, Any]:
        """The family's budget and knobs as plain JSON-able values."""
        return {k: v for k, v in dataclasses.asdict(self.config).items()}

    def describe(self) -> dict[str, Any]:
        """What a manifest records about this poison."""
        return {
            "poison": self.name,
            "budget": self.budget,
            "seed": self.seed,
            "num_classes": self.num_classes,
            "image_size": list(self.image_size),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_classes={self.num_classes}, seed={self.seed}, {self.config})"
