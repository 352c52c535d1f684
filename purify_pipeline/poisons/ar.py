"""AR: autoregressive perturbations (Sandoval-Segura et al., NeurIPS 2022).

Each class has one causal 3×3 AR process per channel: taps `w` (3×3, bottom-right tap 0, taps summing to
1). An image's perturbation starts from N(0,1) noise on a (H+crop)×(W+crop) grid and fills every pixel
(r, c) with r, c >= 2 in raster order as Σ w ⊙ window(r-2..r, c-2..c) - only pixels above or to the
left, so the process is causal; then the top-left `crop` rows/columns are dropped, the rest is scaled to
L2 = `l2` and added. Defaults: crop 4 (36→32 on CIFAR), l2 = 1.0·√(H·W/1024) (= 1.0 on 32 px).

Vectorised: instead of the reference per-pixel loop, each row is computed at once, for all images of a
class, by one batched matmul with a precomputed linear map: the causal-window contributions of the two
rows above, followed by the inverse of the in-row second-order recurrence (lower-triangular Toeplitz).

Class processes are chosen by a seeded search (`select_processes`): random causal taps (|tap| <= 1) whose
signals at the real image size do not explode into a corner (most random AR processes do), then, among
those, K whose AR *filters* (taps with -1 at the current pixel: exactly 0 on their own process) respond
as strongly as possible to each other's signals - the original paper's criterion of separable processes.
(METHOD.md words it as filters that "respond weakly to each other"; the reference search,
`autoregressive_param_finder.py --required_nm_response=10`, keeps coefficient sets whose *non-matching*
responses exceed a threshold, i.e. strong cross-responses, and a filter's response to its own class is 0
either way. We follow the reference: it is what makes the classes' perturbations separable.)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ._base import Poison
from ._common import check_positive, per_sample_normal, quantise_l2, rng_for

WINDOW = 3


@dataclass(frozen=True)
class ARConfig:
    l2: float | None = None  # None: 1.0 * sqrt(H*W/1024) (= 1.0 at 32x32)
    crop: int = 4  # rows/columns dropped at the top-left (the paper generates 36x36 and keeps 32x32)
    pool: int | None = None  # non-degenerate candidate processes to choose the K classes from (2K + 16)

    def __post_init__(self) -> None:
        if self.l2 is not None:
            object.__setattr__(self, "l2", check_positive("l2", self.l2))
        object.__setattr__(self, "crop", check_positive("crop", self.crop, integer=True, allow_zero=True))
        if self.pool is not None:
            object.__setattr__(self, "pool", check_positive("pool", self.pool, integer=True))


def random_taps(rng: np.random.Generator, n: int, *, max_abs: float = 3.0) -> np.ndarray:
    """n random causal tap sets (n, 3, 3, 3): bottom-right 0, each channel's taps summing to 1."""
    out = np.empty((n, 3, WINDOW, WINDOW))
    i = 0
    while i < n:
        t = rng.standard_normal((3, WINDOW, WINDOW))
        t[:, -1, -1] = 0.0
        s = t.sum(axis=(1, 2), keepdims=True)
        if np.any(np.abs(s) < 1e-3):
            continue
        t = t / s
        if np.abs(t).max() > max_abs:  # near-zero sums give huge, numerically wild taps: skip
            continue
        out[i] = t
        i += 1
    return out


def _row_inverse(taps: torch.Tensor, m: int) -> torch.Tensor:
    """Inverse of the (m×m) in-row recurrence y[c] - w[2,1]·y[c-1] - w[2,0]·y[c-2], per (set, channel).

    It is lower-triangular Toeplitz with the recurrence's impulse response h on its diagonals.
    taps: (B, 3, 3, 3) -> (B, 3, m, m).
    """
    a, b = taps[:, :, 2, 1], taps[:, :, 2, 0]
    h = [torch.ones_like(a), a.clone()]
    for _ in range(2, m):
        h.append(a * h[-1] + b * h[-2])
    hv = torch.stack(h[:m], dim=-1)  # (B, 3, m)
    i = torch.arange(m)
    lag = (i[:, None] - i[None, :]).clamp(min=0)
    return torch.where(i[:, None] >= i[None, :], hv[..., lag], torch.zeros((), dtype=hv.dtype))


def _row_operator(taps: torch.Tensor, wp: int) -> torch.Tensor:
    """Linear map from (two rows above, the row's first two pixels) to the row's updated pixels.

    Per (set, channel) a (2·W' + 2) × m matrix G, m = W' - 2: the causal-window contributions (a banded
    matrix K) followed by the in-row recurrence's inverse, G = K · inv^T. taps (B, 3, 3, 3).
    """
    b = taps.shape[0]
    m = wp - (WINDOW - 1)
    k = torch.zeros(b, 3, 2 * wp + 2, m, dtype=torch.float64)
    cols = torch.arange(m)
    for a in range(2):
        for d in range(WINDOW):
            k[:, :, a * wp + cols + d, cols] = taps[:, :, a, d, None]
    k[:, :, 2 * wp, 0] = taps[:, :, 2, 0]  # x[r, 0] -> y[2]
    k[:, :, 2 * wp + 1, 0] = taps[:, :, 2, 1]  # x[r, 1] -> y[2]
    if m > 1:
        k[:, :, 2 * wp + 1, 1] = taps[:, :, 2, 0]  # x[r, 1] -> y[3]
    return k @ _row_inverse(taps, m).transpose(-1, -2)


def ar_generate(taps: np.ndarray | torch.Tensor, start: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Run 3-channel AR processes over start signals (n, 3, H', W') -> (n, 3, H', W') float64.

    taps: (3, 3, 3) for one process shared by all n signals, or (n, 3, 3, 3), one per signal. Rows 0-1
    and columns 0-1 of `start` are kept; every other pixel is overwritten in raster order from its causal
    window - the reference loop's result up to floating point. Each row costs one batched matmul. An image
    is rescaled by a positive factor whenever its values pass 1e100 (harmless: the output gets
    L2-normalised).
    """
    w = torch.as_tensor(taps, dtype=torch.float64)
    w = w[None] if w.ndim == 3 else w  # (B, 3, 3, 3), B in {1, n}
    x = torch.as_tensor(start, dtype=torch.float64).clone()
    n, _, hp, wp = x.shape
    if hp < WINDOW or wp < WINDOW:
        return x
    g = _row_operator(w, wp)  # (B, 3, 2*wp + 2, m)
    for r in range(WINDOW - 1, hp):
        feat = torch.cat([x[:, :, r - 2 : r, :].reshape(n, 3, 2 * wp), x[:, :, r, :2]], dim=2)
        if g.shape[0] == 1:
            x[:, :, r, 2:] = torch.einsum("ncf,cfv->ncv", feat, g[0])
        else:
            x[:, :, r, 2:] = torch.einsum("ncf,ncfv->ncv", feat, g)
        big = x[:, :, r].abs().amax(dim=(1, 2))
        if bool((big > 1e100).any()):
            x /= torch.where(big > 1e100, big, torch.ones_like(big))[:, None, None, None]
    return x


def ar_residual(taps: np.ndarray | torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
    """The AR filter: x[r,c] - Σ w ⊙ window, at every position with a full causal window. Zero on own process."""
    w = torch.as_tensor(taps, dtype=torch.float64)
    kernel = w.clone()
    kernel[:, -1, -1] = -1.0
    return -F.conv2d(torch.as_tensor(signal, dtype=torch.float64), kernel[:, None], groups=3)


def spread(signals: torch.Tensor) -> torch.Tensor:
    """Participation ratio of each signal's energy: 1 = uniform, 1/3 = white noise, ~0 = a few pixels."""
    e = signals.flatten(1) ** 2
    e = e / e.sum(dim=1, keepdim=True)
    return 1.0 / ((e**2).sum(dim=1) * e.shape[1])


def select_processes(num_classes: int, rng: np.random.Generator, *, size: tuple[int, int] = (32, 32),
                     crop: int = 4, pool: int | None = None, min_spread: float = 0.1, probes: int = 2,
                     max_draws: int = 200_000) -> np.ndarray:
    """Pick K AR tap sets (K, 3, 3, 3): non-degenerate, and with filters that tell the classes apart.

    1. Draw random causal tap sets and keep those whose cropped signals at the real image size are
       spread out (participation ratio >= `min_spread`); most random AR processes explode towards the
       bottom-right corner and would put the whole budget on a few pixels.
    2. Among `pool` survivors, greedily choose K maximising the smallest cross-response: the norm of
       class i's AR filter applied to class j's (unit-L2) signals, which is 0 for i = j.
    """
    pool = pool or 2 * num_classes + 16
    h, w = size[0] + crop, size[1] + crop
    chunk = int(max(8, min(512, 2**23 // (3 * h * w))))
    kept: list[np.ndarray] = []
    drawn = 0
    while sum(len(k) for k in kept) < pool:
        if drawn >= max_draws:
            raise RuntimeError(
                f"AR: found only {sum(len(k) for k in kept)} non-degenerate processes for {size[0]}x{size[1]} "
                f"images in {drawn} draws (need {pool}); lower `min_spread` or use smaller images"
            )
        t = random_taps(rng, chunk, max_abs=1.0)
        sig = ar_generate(t, torch.from_numpy(rng.standard_normal((chunk, 3, h, w))))[:, :, crop:, crop:]
        kept.append(t[(spread(sig) >= min_spread).numpy()])
        drawn += chunk
    cand = np.concatenate(kept)[:pool]
    n = len(cand)
    start = torch.from_numpy(rng.standard_normal((n * probes, 3, h, w)))
    signals = ar_generate(np.repeat(cand, probes, axis=0), start)[:, :, crop:, crop:]
    signals = signals / signals.flatten(1).norm(dim=1)[:, None, None, None]
    # resp[i, j] = ||filter_i * signals_j||: a quadratic form in filter i's kernel over the 3x3-window
    # Gram matrices of process j's signals (9x9 per channel), so all n^2 pairs cost one einsum.
    patches = F.unfold(signals.reshape(-1, 1, *signals.shape[2:]), WINDOW)  # (n*probes*3, 9, L)
    gram = (patches @ patches.transpose(1, 2)).view(n, probes, 3, 9, 9).mean(dim=1)
    kernels = torch.from_numpy(cand).clone()
    kernels[:, :, -1, -1] = -1.0
    kernels = kernels.reshape(n, 3, 9)
    resp = torch.einsum("ica,jcab,icb->ij", kernels, gram, kernels).clamp(min=0).sqrt()
    sym = torch.minimum(resp, resp.T)
    sym.fill_diagonal_(float("inf"))
    chosen = [int(torch.argmax(sym.min(dim=1).values))]
    score = sym[chosen[0]].clone()
    while len(chosen) < num_classes:
        score[chosen] = -1.0
        j = int(torch.argmax(score))
        chosen.append(j)
        score = torch.minimum(score, sym[j])
    return cand[chosen]


class AR(Poison):
    name = "ar"
    config_cls = ARConfig

    def _fit(self, images, labels, keys, *, progress: bool) -> None:
        h, w = self.image_size
        if self.config.l2 is None:
            self.config = dataclasses.replace(self.config, l2=1.0 * math.sqrt(h * w / 1024.0))
        if self.config.pool is not None and self.config.pool < self.num_classes:
            raise ValueError(f"AR pool must be >= num_classes={self.num_classes}, got {self.config.pool}")
        self.taps = select_processes(self.num_classes, rng_for(self.seed, "ar/processes"), size=(h, w),
                                     crop=self.config.crop, pool=self.config.pool)

    def signals(self, labels: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Uncropped AR signals (N, 3, H+crop, W+crop) float64, before scaling."""
        h, w = self.image_size
        c = self.config.crop
        start = per_sample_normal(self.seed, "ar/start", keys, (3, h + c, w + c))
        out = np.empty_like(start)
        for k in np.unique(labels):
            idx = np.flatnonzero(labels == k)
            out[idx] = ar_generate(self.taps[k], torch.from_numpy(start[idx])).numpy()
        return out

    def _quantised(self, images: np.ndarray, labels: np.ndarray, keys: np.ndarray) -> np.ndarray:
        c = self.config.crop
        d = self.signals(labels, keys)[:, :, c:, c:].transpose(0, 2, 3, 1)
        d = d * (self.config.l2 / np.sqrt((d**2).sum(axis=(1, 2, 3)))).reshape(-1, 1, 1, 1)
        return quantise_l2(d, self.config.l2)
