"""Train an evaluation classifier on (purified) images and report clean test accuracy.

`train_classifier` is the in-memory loop (one process, CPU or GPU), readable top to bottom: seed, build,
then per epoch shuffle -> augment -> SGD step -> schedule, and test accuracy. `train_classifier_ray` runs
the same recipe as a Ray Train `TorchTrainer` job (DDP over workers) fed by a Ray Dataset, e.g. purified
shards read with `ray.data.read_webdataset`.

Determinism: on CPU the same seed, data and thread count give bit-identical results; the Ray job is seeded
but its streaming split is not bit-reproducible.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
import uuid
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from purify_pipeline._progress import progress as _bar
from purify_pipeline.data.augment import random_crop_flip, to_float_nchw, ueraser
from purify_pipeline.dvae.train import warn_if_emulated_bf16
from purify_pipeline.eval.classifiers import (
    ClassifierConfig,
    build_classifier,
    num_parameters,
)


def _check_split(images: np.ndarray, labels: np.ndarray, name: str, num_classes: int) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        got = f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}"
        raise ValueError(f"{name}_images: expected a uint8 numpy array (N, H, W, 3), got {got}")
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise ValueError(f"{name}_labels: expected shape ({len(images)},), got {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{name}_labels: values must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")


def lr_factor(cfg: ClassifierConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of cfg.lr after `step` optimiser steps: linear warmup, then cosine or linear decay to 0."""
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total_steps - warm)
    return 0.5 * (1 + math.cos(math.pi * t)) if cfg.schedule == "cosine" else max(0.0, 1.0 - t)


def make_optimizer(model: nn.Module, cfg: ClassifierConfig, total_steps: int, steps_per_epoch: int):
    """SGD (momentum, optional Nesterov, weight decay on every parameter) + a per-step LambdaLR."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s, total_steps, steps_per_epoch))
    return opt, sched


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, step_size: float | None,
             gen: torch.Generator, bf16: bool = False) -> torch.Tensor:  # fmt: skip
    """Adversarial examples for adversarial training (Madry et al.): PGD on the cross-entropy in the L-inf ball
    of radius eps around x (images in [0, 1]), from a uniform random start; the model is put in eval mode
    while attacking (BatchNorm statistics come from clean-mode batches only) and restored after."""
    alpha = step_size if step_size is not None else 2.5 * eps / steps
    was_training = model.training
    model.eval()
    delta = ((torch.rand(x.shape, generator=gen) * 2 - 1) * eps).to(x.device, memory_format=torch.preserve_format)
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x + delta).float(), y)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = (delta + alpha * grad.sign()).clamp(-eps, eps)
            delta = (x + delta).clamp(0, 1) - x
    model.train(was_training)
    return (x + delta).detach()


def _memory_format(cfg: ClassifierConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


@torch.no_grad()
def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, cfg: ClassifierConfig,
             device: torch.device | str = "cpu", bf16: bool = False) -> dict[str, float]:
    """Accuracy and mean cross-entropy of `model` (eval mode) on uint8 NHWC images, optional flip TTA."""
    correct, loss_sum = 0, 0.0
    device = torch.device(device)
    was_training = model.training
    model.eval()
    for i in range(0, len(images), cfg.eval_batch_size):
        x = to_float_nchw(images[i : i + cfg.eval_batch_size]).to(device, memory_format=_memory_format(cfg))
        y = torch.as_tensor(labels[i : i + cfg.eval_batch_size], dtype=torch.long, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
            if cfg.tta_flip:
                logits = 0.5 * (logits + model(x.flip(3)))
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    model.train(was_training)
    n = max(1, len(images))
    return {"acc": correct / n, "loss": loss_sum / n}


def train_classifier(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    cfg: ClassifierConfig | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    on_epoch_end: Callable[[int, dict[str, Any], nn.Module], None] | None = None,
    bf16: bool = False,
) -> dict[str, Any]:
    """Train a fresh classifier on uint8 NHWC images and test it; returns metrics and the model.

    bf16: bfloat16 autocast for the forward passes (a GPU, or a CPU with AMX); weights and SGD stay fp32.
    cfg.adv_eps > 0 trains adversarially (PGD-AT, `pgd_linf`), the classic training-time defense; it costs
    about adv_steps + 1 forward/backward passes per step. cfg.ueraser = 1 / K trains through UEraser-Lite / -Max
    (Max: the mean over images of the highest loss among K augmented views, backpropagated, as the reference code).

    Returns {"test_acc", "test_loss", "history": [per-epoch dicts], "train_seconds", "num_parameters",
    "config", "seed", "device", "model"} where test_acc is the final epoch's clean test accuracy.
    """
    cfg = cfg or ClassifierConfig.preset("paper")
    _check_split(train_images, train_labels, "train", cfg.num_classes)
    _check_split(test_images, test_labels, "test", cfg.num_classes)
    device = torch.device(device)
    warn_if_emulated_bf16(device, bf16)
    mf = _memory_format(cfg)

    # Seeded model init without disturbing the caller's global RNG; a separate generator for data order + crops.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_classifier(cfg)
    model = model.to(device, memory_format=mf)
    gen = torch.Generator().manual_seed(seed)

    x_all = torch.from_numpy(np.ascontiguousarray(train_images))
    y_all = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    n = len(x_all)
    bs = min(cfg.batch_size, n)
    # Batches per epoch; a trailing batch of one image is dropped (BatchNorm cannot train on it).
    steps_per_epoch = n // bs if cfg.drop_last or n % bs == 1 else math.ceil(n / bs)
    if steps_per_epoch < 1:
        raise ValueError(f"need at least 2 training images, got {n}")
    opt, sched = make_optimizer(model, cfg, cfg.epochs * steps_per_epoch, steps_per_epoch)

    history: list[dict[str, Any]] = []
    max_epochs = round(cfg.ueraser_max_fraction * cfg.epochs) if cfg.ueraser > 1 else 0  # UEraser-Max's K-view epochs
    t_start = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        # running sums stay on the device: no host sync per step, so a GPU never waits for Python
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        for step in _bar(range(steps_per_epoch), enabled=progress, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                             leave=False):
            idx = perm[step * bs : (step + 1) * bs]
            x = random_crop_flip(to_float_nchw(x_all[idx]), cfg.crop_padding, cfg.flip, gen)
            x = x.to(device, memory_format=mf)
            y = y_all[idx].to(device)
            if cfg.ueraser:  # UEraser: strong augmentations; Max: K views, each image's highest loss (early epochs)
                xs = [ueraser(x, gen) for _ in range(cfg.ueraser if epoch < max_epochs else 1)]
            else:
                xs = [x]
            if cfg.adv_eps > 0:  # adversarial training: the step is taken on the PGD examples
                xs = [pgd_linf(model, v, y, cfg.adv_eps, cfg.adv_steps, cfg.adv_step_size, gen, bf16) for v in xs]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits_k = [model(v) for v in xs]
            logits = logits_k[-1]
            if len(xs) == 1:
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            else:
                losses = [F.cross_entropy(lg.float(), y, reduction="none", label_smoothing=cfg.label_smoothing)
                          for lg in logits_k]  # fmt: skip
                loss = torch.stack(losses).amax(0).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(idx)
            correct += (logits.argmax(1) == y).sum()
            seen += len(idx)
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": loss_sum.item() / seen,
            "train_acc": correct.item() / seen,
            "lr": opt.param_groups[0]["lr"],
            "epoch_seconds": time.perf_counter() - t0,
        }
        last = epoch == cfg.epochs - 1
        if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            ev = evaluate(model, test_images, test_labels, cfg, device, bf16=bf16)
            metrics.update(test_acc=ev["acc"], test_loss=ev["loss"])
        history.append(metrics)
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics, model)

    return {
        "test_acc": history[-1]["test_acc"],
        "test_loss": history[-1]["test_loss"],
        "history": history,
        "train_seconds": time.perf_counter() - t_start,
        "num_parameters": num_parameters(model),
        "config": cfg.to_dict(),
        "seed": seed,
        "device": str(device),
        "bf16": bf16,
        "model": model,
    }


# ---------------------------------------------------------------- Ray Train
def _ray_train_loop(config: dict[str, Any]) -> None:
    """Per-worker loop of `train_classifier_ray`: DDP model, batches from this worker's dataset shard."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    cfg = ClassifierConfig.from_dict(config["cfg"])
    seed, img_col, lab_col = config["seed"], config["image_column"], config["label_column"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    mf = _memory_format(cfg)
    bf16 = bool(config.get("bf16", False))

    torch.manual_seed(seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    model = build_classifier(cfg)
    model = ray.train.torch.prepare_model(model.to(memory_format=mf))
    gen = torch.Generator().manual_seed(seed * 7919 + rank)  # this rank's crops
    local_bs = max(2, cfg.batch_size // world)  # cfg.batch_size is the global batch
    steps_per_epoch = max(1, math.ceil(config["num_train"] / (local_bs * world)))
    opt, sched = make_optimizer(model, cfg, cfg.epochs * steps_per_epoch, steps_per_epoch)

    def all_sum(*vals: float) -> list[float]:
        t = torch.tensor(vals, dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t)
        return t.tolist()

    def batches(name: str, bs: int, shuffle_seed: int | None):
        it = ray.train.get_dataset_shard(name)
        kw = {} if shuffle_seed is None else {"local_shuffle_buffer_size": 4 * bs, "local_shuffle_seed": shuffle_seed}
        for b in it.iter_torch_batches(batch_size=bs, **kw):
            yield to_float_nchw(b[img_col].to(torch.uint8)), b[lab_col].long()

    history: list[dict[str, Any]] = []
    for epoch in range(cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        loss_sum = correct = seen = 0.0
        for x, y in batches("train", local_bs, shuffle_seed=seed * 1000 + epoch * 10 + rank):
            if len(y) < 2:
                continue  # BatchNorm cannot train on a single image
            x = random_crop_flip(x, cfg.crop_padding, cfg.flip, gen).to(device, memory_format=mf)
            y = y.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        loss_sum, correct, seen = all_sum(loss_sum, correct, seen)
        metrics = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
                   "train_samples": int(seen), "lr": opt.param_groups[0]["lr"],
                   "epoch_seconds": time.perf_counter() - t0}
        last = epoch == cfg.epochs - 1
        if config["has_test"] and rank == 0 and (last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
            # The test set is not split: rank 0 scores all of it with the unwrapped model (no DDP collectives).
            net = getattr(model, "module", model).eval()
            t_correct = t_loss = t_seen = 0.0
            with torch.no_grad():
                for x, y in batches("test", cfg.eval_batch_size, shuffle_seed=None):
                    x, y = x.to(device, memory_format=mf), y.to(device)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        logits = net(x)
                        if cfg.tta_flip:
                            logits = 0.5 * (logits + net(x.flip(3)))
                    logits = logits.float()
                    t_loss += F.cross_entropy(logits, y, reduction="sum").item()
                    t_correct += (logits.argmax(1) == y).sum().item()
                    t_seen += len(y)
            metrics.update(test_acc=t_correct / max(t_seen, 1), test_loss=t_loss / max(t_seen, 1),
                           test_samples=int(t_seen))
        history.append(metrics)
        if not last:
            ray.train.report(metrics)  # a barrier on every worker; V2 keeps metrics only with a checkpoint
            continue
        # Last epoch: rank 0 writes model.safetensors + metrics.json as the run's checkpoint.
        final = {**metrics, "history": history, "world_size": world}
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                state = {k: v.detach().cpu().contiguous() for k, v in
                         getattr(model, "module", model).state_dict().items()}
                save_file(state, os.path.join(d, "model.safetensors"))
                with open(os.path.join(d, "metrics.json"), "w") as f:
                    json.dump({"config": cfg.to_dict(), "seed": seed, **final}, f, indent=1)
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(final, checkpoint=ckpt)


def train_classifier_ray(
    train_ds: "ray.data.Dataset",  # noqa: F821
    test_ds: "ray.data.Dataset | None" = None,  # noqa: F821
    cfg: ClassifierConfig | None = None,
    seed: int = 0,
    *,
    num_workers: int = 2,
    resources_per_worker: dict[str, float] | None = None,
    use_gpu: bool = False,
    image_column: str = "image",
    label_column: str = "label",
    storage_path: str | None = None,
    run_name: str | None = None,
    bf16: bool = False,
) -> dict[str, Any]:
    """Train a classifier with Ray Train (TorchTrainer, DDP) on a Ray Dataset of uint8 HWC images + int labels.

    `cfg.batch_size` is the global batch (split evenly over workers). On a small CPU machine give each
    worker a fraction of a CPU (default {"CPU": 0.5}) so Ray Data's read tasks still get scheduled
    (RAY-NOTES: 2 workers x 1 CPU + datasets hangs on 2 cores). The training set is split over workers
    (equal split: up to num_workers-1 rows may be left out per epoch); rank 0 scores the whole test set.
    With `read_webdataset` shards pass image_column="jpg" (or "png") and label_column="cls".
    bf16: bfloat16 autocast for the forward passes (weights and SGD stay fp32).
    Returns {"test_acc", "history", "checkpoint_path", ...} read from the final checkpoint
    (model.safetensors + metrics.json) under `storage_path`/`run_name`.
    """
    from ray.train import CheckpointConfig, DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = cfg or ClassifierConfig.preset("paper")
    if cfg.adv_eps > 0 or cfg.ueraser:  # the DDP loop has plain steps only: refuse rather than train without them
        raise ValueError(f"train_classifier_ray trains without training-time defenses; got adv_eps={cfg.adv_eps}, "
                         f"ueraser={cfg.ueraser} (use train_classifier for PGD-AT and UEraser)")
    missing = {image_column, label_column} - set(train_ds.schema().names)
    if missing:
        raise ValueError(f"train_ds lacks column(s) {sorted(missing)}; it has {train_ds.schema().names} "
                         "(pass image_column=/label_column=, e.g. 'jpg'/'cls' for read_webdataset)")
    cols = [image_column, label_column]  # drop __key__/__url__ etc.: string columns do not become tensors
    datasets = {"train": train_ds.select_columns(cols)}
    if test_ds is not None:
        datasets["test"] = test_ds.select_columns(cols)
    loop_cfg = {"cfg": cfg.to_dict(), "seed": seed, "image_column": image_column, "label_column": label_column,
                "num_train": train_ds.count(), "has_test": test_ds is not None,
                "bf16": bf16}
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources_per_worker or {"CPU": 0.5}),
        run_config=RunConfig(name=run_name or f"classifier-{uuid.uuid4().hex[:12]}", storage_path=storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run finished without a checkpoint (error: {result.error})")
    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, "metrics.json")) as f:
            out = json.load(f)
    out.update(checkpoint_path=result.checkpoint.path, train_seconds=time.perf_counter() - t0)
    return out
