"""The benchmarks' defense columns, one table for the matrix (CPU, Ray) and paper_gpu.py (GPU, no Ray)."""
from __future__ import annotations

from typing import Any

# data defenses: `eval.defenses.apply_defense(kind, images, **kw)` on the poisoned training images
DEFENSES: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("none", {}), "jpeg10": ("jpeg", {"quality": 10}), "grayscale": ("grayscale", {}),
    "bdr": ("bdr", {"bits": 2}), "sharpen_ff": ("sharpen_ff", {})}  # fmt: skip
# defenses that change the classifier's training, not the data: ClassifierConfig overrides
TRAINING_DEFENSES: dict[str, dict[str, Any]] = {
    "at": {"adv_eps": 8 / 255, "adv_steps": 10}, "ueraser": {"ueraser": 1}, "ueraser-max": {"ueraser": 5}}  # fmt: skip
