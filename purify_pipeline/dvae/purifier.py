"""`Purifier`: the two fitted D-VAE stages and the purification they perform (`two_stage.fit_two_stage` trains them).

Stage 1:  x1 = clamp(x - p1(x, y), 0, 1), quantised to uint8 (the stage-2 model is trained on such images).
Stage 2:  x2' = clamp(x1 - p2(x1, y), 0, 1);  x_final = D2(x2') — three D-VAE forward passes per image.
`mode="sample"` draws z as the authors do (seeded), `mode="mean"` uses z = mu (deterministic).
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from purify_pipeline._progress import progress as _progress
from purify_pipeline.dvae.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from purify_pipeline.dvae.config import DVAEConfig
from purify_pipeline.dvae.model import DVAE
from purify_pipeline.dvae.noise import sample_noise
from purify_pipeline.dvae.train import (
    to_float_nchw,
    use_channels_last,
    warn_if_emulated_bf16,
)

MODES = ("sample", "mean")
CPU_BLOCK = 32  # images per forward pass on a CPU (see `Purifier.purify_torch`)


def _pad(t: Tensor, n: int) -> Tensor:
    """Append zero rows so that `t` has `n` rows (`t` itself when it has them)."""
    return t if len(t) == n else torch.cat([t, t.new_zeros((n - len(t), *t.shape[1:]))])


def validate_batch(images: Any, labels: Any, *, num_classes: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Check uint8 NHWC RGB images of the model's size and integer labels in range; say what was expected."""
    if isinstance(images, Tensor):
        images = images.cpu().numpy()
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ValueError(f"images must be a uint8 numpy array (N, H, W, 3), got {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (N, H, W, 3) (uint8 RGB, NHWC), got {images.shape}")
    if images.shape[1:3] != (image_size, image_size):
        raise ValueError(f"images are {images.shape[1]}x{images.shape[2]}, the model expects {image_size}x{image_size}")
    labels = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)
    if labels.shape != (len(images),):
        raise ValueError(f"labels must have shape ({len(images)},) to match the images, got {labels.shape}")
    if len(labels) and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise ValueError(f"label {bad} is outside the model's classes [0, {num_classes})")
    return images, labels.astype(np.int64)


class Purifier:
    """Two fitted D-VAE stages. `purify(images, labels)`: uint8 NHWC in, uint8 NHWC out."""

    def __init__(self, stage1: DVAE, stage2: DVAE, *, class_names: Sequence[str] | None = None,
                 metrics: dict[str, Any] | None = None, data_fingerprint: str | None = None,
                 fingerprint: str | None = None, device: str | torch.device = "cpu") -> None:  # fmt: skip
        if stage1.cfg != stage2.cfg:
            raise ValueError("stage-1 and stage-2 models must share one DVAEConfig")
        self.cfg: DVAEConfig = stage1.cfg
        self.stage1, self.stage2 = stage1.eval(), stage2.eval()
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(self.cfg.num_classes)]
        if len(self.class_names) != self.cfg.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.cfg.num_classes} classes")
        self.metrics = metrics or {}
        self.data_fingerprint = data_fingerprint
        self._fingerprint = fingerprint
        self.device = torch.device("cpu")
        self.to(device)

    # ---- properties ----
    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    @property
    def fingerprint(self) -> str:
        """sha256 identity of the weights + config (set by save/load; computed on demand otherwise)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for k, v in sorted(self._tensors().items()):
                h.update(k.encode())
                h.update(v.cpu().numpy().tobytes())
            h.update(repr(sorted(self.cfg.to_dict().items())).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def to(self, device: str | torch.device, *, channels_last: bool | None = None) -> "Purifier":
        """Move both stages to `device`; channels-last (NHWC) layout as asked, else on a CPU only
        (`train.use_channels_last`)."""
        self.device = torch.device(device)
        self._format = torch.channels_last if use_channels_last(self.device, channels_last) else torch.contiguous_format
        for m in (self.stage1, self.stage2):
            m.to(self.device, memory_format=self._format)
        return self

    # ---- purification ----
    @torch.no_grad()
    def purify_torch(self, x: Tensor, y: Tensor, *, mode: str = "sample", eps: Tensor | None = None,
                     generator: torch.Generator | None = None, stages: int = 2, bf16: bool = False) -> Tensor:  # fmt: skip
        """Fused no-grad purification of a float NCHW batch already on the device; returns float NCHW in [0, 1].

        On a CPU the passes run on blocks of exactly `CPU_BLOCK` images (the last one zero-padded): CPU kernels
        pick their algorithm by batch shape, so this keeps an image's bytes independent of how the data was
        batched, and a small block is also the fastest on the CPUs measured. GPUs run the batch as given.

        eps: optional noise (N, 3, *latent) for the three passes; otherwise drawn from `generator`.
        bf16: bfloat16 autocast for the three forward passes (a GPU, or a CPU with AMX / AVX512-BF16).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if bf16:
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                return self.purify_torch(x, y, mode=mode, eps=eps, generator=generator, stages=stages).float()
        if self.device.type != "cpu" or len(x) == CPU_BLOCK:
            return self._passes(x, y, mode=mode, eps=eps, generator=generator, stages=stages)
        if mode == "sample" and eps is None:
            eps = torch.randn((len(x), 3, *self.stage1.latent_shape), generator=generator, device=x.device)
        out = x.new_empty(x.shape)
        for i in range(0, len(x), CPU_BLOCK):  # fixed-size blocks, the last one zero-padded
            xb, yb, eb = (None if t is None else _pad(t[i : i + CPU_BLOCK], CPU_BLOCK) for t in (x, y, eps))
            k = min(CPU_BLOCK, len(x) - i)
            out[i : i + k] = self._passes(xb, yb, mode=mode, eps=eb, generator=generator, stages=stages)[:k]
        return out

    def _passes(self, x: Tensor, y: Tensor, *, mode: str, eps: Tensor | None, generator: torch.Generator | None,
                stages: int) -> Tensor:  # fmt: skip
        """The three D-VAE forward passes (two with `stages=1`) on one batch."""
        sample = mode == "sample"
        x = x.contiguous(memory_format=self._format)

        def noise(i: int) -> Tensor | None:
            return None if eps is None else eps[:, i].to(x.device, non_blocking=True)

        p1 = self.stage1(x, y, sample=sample, eps=noise(0), generator=generator, decode_x=False).p_hat
        x1 = torch.round(torch.clamp(x - p1, 0, 1) * 255) / 255  # stage 2 was trained on uint8 stage-1 images
        if stages == 1:
            return x1
        p2 = self.stage2(x1, y, sample=sample, eps=noise(1), generator=generator, decode_x=False).p_hat
        x2 = torch.clamp(x1 - p2, 0, 1)
        return self.stage2(x2, y, sample=sample, eps=noise(2), generator=generator, decode_p=False).x_hat

    def purify(self, images: np.ndarray, labels: np.ndarray, *, mode: str = "sample", seed: int = 0,
               sample_ids: np.ndarray | None = None, batch_size: int = 256, progress: bool = False,
               stages: int = 2, bf16: bool = False) -> np.ndarray:  # fmt: skip
        """Purify uint8 NHWC images with their labels; uint8 NHWC out (rounded).

        In "sample" mode each image's latent noise depends only on (seed, sample_id); sample_ids default to the
        position in `images`, so pass stable ids (e.g. hashes of keys) to make results independent of batching.
        batch_size: images converted and moved per step; on a CPU the model itself always sees `CPU_BLOCK` images.
        bf16: bfloat16 autocast (`purify_torch`); emulated, and slower, on CPUs without native bf16 (it warns).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        warn_if_emulated_bf16(self.device, bf16)
        images, labels = validate_batch(images, labels, num_classes=self.num_classes, image_size=self.image_size)
        if sample_ids is None:
            sample_ids = np.arange(len(images))
        elif len(sample_ids) != len(images):
            raise ValueError(f"sample_ids has {len(sample_ids)} entries for {len(images)} images")
        out = np.empty_like(images)
        shape = self.stage1.latent_shape
        for i in _progress(range(0, len(images), batch_size), enabled=progress, desc="purify", unit="batch"):
            sl = slice(i, i + batch_size)
            x = to_float_nchw(torch.from_numpy(images[sl]).to(self.device))  # uint8 travels, floats are made there
            y = torch.from_numpy(labels[sl]).to(self.device)
            eps = sample_noise(seed, sample_ids[sl], shape, device=self.device) if mode == "sample" else None
            xp = self.purify_torch(x, y, mode=mode, eps=eps, stages=stages, bf16=bf16)
            out[sl] = torch.round(xp * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return out

    def purify_stage1(self, images: np.ndarray, labels: np.ndarray, **kw: Any) -> np.ndarray:
        """Stage-1 output x1 = clamp(x - p1) only (what stage 2 is trained on)."""
        return self.purify(images, labels, stages=1, **kw)

    # ---- persistence ----
    def _tensors(self) -> dict[str, Tensor]:
        t = {f"stage1.{k}": v for k, v in self.stage1.state_dict().items()}
        t.update({f"stage2.{k}": v for k, v in self.stage2.state_dict().items()})
        return t

    def save(self, path: str | os.PathLike, **storage_options: Any) -> str:
        """Write `model.safetensors` + `config.json` under `path` (local or fsspec URL); return the fingerprint."""
        meta = {"config": self.cfg.to_dict(), "class_names": self.class_names, "image_size": self.image_size,
                "num_classes": self.num_classes, "metrics": self.metrics, "data_fingerprint": self.data_fingerprint}  # fmt: skip
        self._fingerprint = save_checkpoint(os.fspath(path), self._tensors(), meta, **storage_options)
        return self._fingerprint

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu", **storage_options: Any) -> "Purifier":
        """Load a checkpoint directory (local or fsspec URL). Never unpickles; verifies the weights' sha256."""
        tensors, meta = load_checkpoint(path, **storage_options)
        try:
            cfg = DVAEConfig.from_dict(meta["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: invalid model config in config.json ({e})") from None
        models = []
        for stage in ("stage1", "stage2"):
            m = DVAE(cfg)
            sd = {k[len(stage) + 1 :]: v for k, v in tensors.items() if k.startswith(stage + ".")}
            try:
                m.load_state_dict(sd, strict=True)
            except RuntimeError as e:
                raise CheckpointError(f"{path}: {stage} weights do not match the config: {e}") from None
            models.append(m)
        return cls(models[0], models[1], class_names=meta.get("class_names"), metrics=meta.get("metrics"),
                   data_fingerprint=meta.get("data_fingerprint"), fingerprint=meta["fingerprint"], device=device)  # fmt: skip


def data_fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of the training images and labels (recorded in checkpoints)."""
    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()
