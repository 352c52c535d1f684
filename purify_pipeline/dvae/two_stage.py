"""One D-VAE stage's loop under any executor, and the in-process two-stage fit.

`fit_one_stage` is the loop every fit runs: the Ray Train job (`stages.fit.fit_purifier`, through a
`_RaySession`) and `fit_two_stage` here (through a `_LocalSession`) differ only in the session that gives rank,
world, device, checkpoints and reporting, so the same config and seed give the same bytes on both paths.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from purify_pipeline.dvae.config import DVAEConfig
from purify_pipeline.dvae.model import DVAE
from purify_pipeline.dvae.noise import sample_ids_for_keys
from purify_pipeline.dvae.purifier import Purifier, data_fingerprint, validate_batch
from purify_pipeline.dvae.train import (
    array_batches,
    fit_stage,
    make_optimizer,
    recover_train_state,
    resident,
    replace_dir,
    resume_stage,
    save_train_state,
    use_channels_last,
)

__all__ = ["STAGE1_BATCH", "fit_one_stage", "fit_two_stage", "rank_batches"]


def rank_batches(images: np.ndarray, labels: np.ndarray, global_batch: int, *, seed: int, epoch: int, rank: int = 0,
                 world: int = 1) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """This rank's rows (r, r + world, ...) of each global batch of the epoch's seeded permutation of all samples
    (`train.array_batches`): the ranks together see every global batch once, and one rank sees all of it."""
    for xb, yb in array_batches(images, labels, global_batch, seed=seed, epoch=epoch):
        yield xb[rank::world], yb[rank::world]



class _LocalSession:
    """The in-process executor (`fit_two_stage`, `fit_purifier(num_workers=0)`): rank 0 of 1, epoch checkpoints
    swapped into `ckpt` (none when None); `dataset` is the Ray dataset `fit_purifier` hands it, if any."""

    rank, world = 0, 1

    def __init__(self, ckpt: str | os.PathLike | None, device: str | torch.device = "cpu", dataset: Any = None) -> None:
        self.ckpt = None if ckpt is None else Path(ckpt)
        self.device, self.ds = torch.device(device), dataset

    def restore_dir(self) -> str | None:
        d = None if self.ckpt is None else recover_train_state(self.ckpt)
        return None if d is None else str(d)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def iterator(self) -> Any:
        return self.ds.iterator()

    def report(self, metrics: dict, ckpt_dir: str | None) -> None:
        if ckpt_dir and self.ckpt is not None:

            def move_in(t: Path) -> None:
                for f in sorted(os.listdir(ckpt_dir), key=lambda f: f == "state.json"):  # state.json, the mark, last
                    os.replace(os.path.join(ckpt_dir, f), t / f)

            replace_dir(self.ckpt, move_in)


def fit_one_stage(images: np.ndarray, labels: np.ndarray, cfg: DVAEConfig, stage: int, sess: Any, *,
                  progress: bool = True, bf16: bool = False, compile: bool | str = False, channels_last: bool | None = None,
                  metrics_path: str | None = None, crash_after_epoch: int | None = None) -> tuple[DVAE, list[dict]]:  # fmt: skip
    """The one stage loop of every fit, whatever runs it: seeded initial weights (the same on every rank), resume
    from the session's last checkpoint, one seeded permutation of all samples per epoch (rank r trains on rows
    r, r + world, ... of each global batch, so one worker sees exactly the in-process batches), `fit_stage`, a
    checkpoint every epoch. On an accelerator the images are copied to it once and Adam is fused (`fit_stage`).
    Returns the (unwrapped) model and its epoch history."""
    epochs, tau = cfg.epochs_for(stage), cfg.tau(stage)
    torch.manual_seed(cfg.seed + 1000 * stage)
    model = DVAE(cfg).to(sess.device)  # before the optimizer, so restored Adam moments land on the model's device
    if use_channels_last(sess.device, channels_last):
        model.to(memory_format=torch.channels_last)  # before DDP wraps it (fit_stage leaves a wrapped model as it is)
    opt, sched = make_optimizer(model, cfg, epochs, fused=sess.device.type == "cuda")
    restore = sess.restore_dir()
    start, history, tau = resume_stage(restore, model, opt, sched, tau)
    model = sess.prepare(model)
    per_worker = max(1, cfg.batch_size_for(stage) // sess.world)  # the global batch stays the stage's batch size
    shuffle_seed = cfg.seed * 1009 + 17 * stage
    if sess.device.type != "cpu":
        images, labels = resident(images, labels, sess.device)

    def batches(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        return rank_batches(images, labels, per_worker * sess.world, seed=shuffle_seed, epoch=epoch,
                            rank=sess.rank, world=sess.world)  # fmt: skip

    def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
        metrics = {**metrics, "stage": stage, "world_size": sess.world, "resumed_from": start,
                   "samples_per_s": metrics["samples_per_s"] * sess.world, "torch_threads": torch.get_num_threads()}  # fmt: skip
        history.append(metrics)
        with tempfile.TemporaryDirectory() as d:
            if sess.rank == 0:
                if sess.ckpt:
                    save_train_state(d, getattr(model, "module", model), opt, epoch, history)
                if metrics_path:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(metrics) + "\n")
            sess.report(metrics, d if sess.rank == 0 and sess.ckpt else None)
        if crash_after_epoch == epoch and not restore:
            raise RuntimeError(f"injected failure after epoch {epoch} (test hook)")

    fit_stage(model, batches, tau=tau, epochs=epochs, cfg=cfg, device=sess.device, seed=shuffle_seed + sess.rank,
              start_epoch=start, optimizer=opt, scheduler=sched, on_epoch_end=on_epoch_end,
              progress=progress and sess.rank == 0, desc=f"stage {stage}",
              autocast_dtype=torch.bfloat16 if bf16 else None, steps=len(images) // (per_worker * sess.world),
              compile=compile, channels_last=use_channels_last(sess.device, channels_last))  # fmt: skip
    return getattr(model, "module", model), history


def fit_two_stage(images: np.ndarray, labels: np.ndarray, preset: str | DVAEConfig, *, keys: Sequence[str] | None = None,
                  class_names: Sequence[str] | None = None, device: str | torch.device = "cpu", progress: bool = True,
                  bf16: bool = False, compile: bool | str = False, channels_last: bool | None = None,
                  checkpoint_dir: str | os.PathLike | None = None) -> Purifier:  # fmt: skip
    """Fit both stages on in-memory data, in this process: `fit_purifier`'s loop (`fit_one_stage`) and seeding,
    with stage 2 trained on the stage-1 purification of the images (noise seeded by each sample's key, as
    `purify_shards` does). Given the key-sorted arrays of a set of shards and their keys, the result has the
    bytes of `fit_purifier(shards, num_workers=0)` with the same config.

    preset: a preset name (its classes: `class_names`, else the largest label + 1) or a DVAEConfig, as for
    `fit_purifier`. keys: one per image (default: the zero-padded index). bf16: bfloat16 autocast (a GPU, or a CPU with AMX /
    AVX512-BF16). compile: `torch.compile` the model while training (`fit_stage`; a string is the mode).
    channels_last: NHWC layout (None: on a CPU only, `train.use_channels_last`). checkpoint_dir:
    save each stage's state there after every epoch and, when called again with the same config and data, resume
    from the last saved epoch; the result has the bytes of an uninterrupted fit."""
    if isinstance(preset, DVAEConfig):
        cfg = preset
    else:
        k = len(class_names) if class_names is not None else int(np.max(labels)) + 1 if len(labels) else 1
        cfg = DVAEConfig.preset(preset, num_classes=k)
    images, labels = validate_batch(images, labels, num_classes=cfg.num_classes, image_size=cfg.image_size)
    if len(images) < max(cfg.batch_size_for(1), cfg.batch_size_for(2)):
        raise ValueError(f"{len(images)} images is fewer than one batch ({cfg.batch_size_for(1)} / "
                         f"{cfg.batch_size_for(2)}); lower batch_size")  # fmt: skip
    if keys is not None and len(keys) != len(images):
        raise ValueError(f"{len(keys)} keys for {len(images)} images")
    fp = data_fingerprint(images, labels)
    ckpt = None if checkpoint_dir is None else _fit_checkpoint_dir(Path(checkpoint_dir), cfg, fp)
    kw = dict(progress=progress, bf16=bf16, compile=compile, channels_last=channels_last)
    stage1, h1 = fit_one_stage(images, labels, cfg, 1, _LocalSession(ckpt and ckpt / "stage1", device), **kw)
    half = Purifier(stage1, _placeholder(cfg), device=device)
    ids = sample_ids_for_keys(keys if keys is not None else [f"{i:08d}" for i in range(len(images))])
    x1 = half.purify(images, labels, mode=cfg.stage1_mode, seed=cfg.seed, sample_ids=ids, stages=1,
                     batch_size=STAGE1_BATCH, progress=progress)  # fmt: skip
    stage2, h2 = fit_one_stage(x1, labels, cfg, 2, _LocalSession(ckpt and ckpt / "stage2", device), **kw)
    return Purifier(stage1, stage2, class_names=class_names, metrics={"stage1": h1, "stage2": h2},
                    data_fingerprint=fp, device=device)  # fmt: skip


STAGE1_BATCH = 256  # images per forward pass of the stage-1 purification, as PurifyConfig.model_batch_size


def _placeholder(cfg: DVAEConfig) -> DVAE:
    """A deterministic stand-in stage 2 for the stage-1-only checkpoint (keeps its fingerprint stable)."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return DVAE(cfg)


def _fit_checkpoint_dir(d: Path, cfg: DVAEConfig, fingerprint: str) -> Path:
    """`d`, created with a fit.json naming the config and data; an existing one must name the same."""
    want = {"config": cfg.to_dict(), "data_fingerprint": fingerprint}
    f = d / "fit.json"
    if f.exists():
        have = json.loads(f.read_text())
        if have != want:
            what = "data" if have.get("config") == want["config"] else "config"
            raise ValueError(f"checkpoint_dir {d} holds a fit with another {what}; pass a new directory to start over")
    else:
        d.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(want, indent=1))
    return d


