"""Per-sample perturbations computed during fit (EM, TAP), stored quantised and looked up by sample id."""
from __future__ import annotations

import numpy as np


class KeyedPerturbations:
    """int8 pixel perturbations (N, H, W, 3) indexed by uint64 sample keys."""

    def __init__(self, keys: np.ndarray, q: np.ndarray) -> None:
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]
        if len(self.keys) > 1 and np.any(self.keys[1:] == self.keys[:-1]):
            raise ValueError("sample_ids must be unique to key per-sample perturbations")
        self.q = np.ascontiguousarray(q[order].astype(np.int8))

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, keys: np.ndarray, poison: str) -> np.ndarray:
        """The stored perturbations for `keys` (int16); a clear error for ids not in the fit set."""
        pos = np.searchsorted(self.keys, keys)
        pos_c = np.minimum(pos, len(self.keys) - 1)
        missing = self.keys[pos_c] != keys
        if missing.any():
            raise ValueError(
                f"poison {poison!r} is sample-wise: its perturbations were optimised during fit for "
                f"{len(self.keys)} samples; {int(missing.sum())} of these {len(keys)} sample ids were not in "
                f"the fit set (first at batch index {int(np.flatnonzero(missing)[0])}). Fit on the whole "
                "dataset with the same sample_ids you apply with."
            )
        return self.q[pos_c].astype(np.int16)
