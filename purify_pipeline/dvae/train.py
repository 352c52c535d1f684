"""`fit_stage`: the single-process training loop of one D-VAE stage (the Ray Train job runs it per worker).

Adam (lr 5e-3, no weight decay), cosine annealing stepped per epoch, drop_last batches, gradient-norm clip,
no augmentation — METHOD.md. Data come either as in-memory uint8 arrays (shuffled per epoch from the seed) or
as a callable `epoch -> iterable of (images, labels)` batches (what a Ray Data shard provides).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from purify_pipeline._progress import progress as _progress
from purify_pipeline.dvae.config import DVAEConfig
from purify_pipeline.dvae.losses import dvae_loss
from purify_pipeline.dvae.model import sample_with_kl_formulas

Batches = Callable[[int], Iterable[tuple[Any, Any]]]
EpochCallback = Callable[[int, dict[str, float]], None]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 / AMX), as oneDNN sees it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def bf16_pays(device: str | torch.device) -> bool:
    """Whether bf16 autocast is a real speed-up on `device`: a CUDA GPU, or a CPU with native bfloat16 (on such a
    CPU the `cpu` fit runs 1.4-1.6x faster than in fp32 at the same accuracy, benchmarks/results/speed/)."""
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def warn_if_emulated_bf16(device: torch.device, bf16: bool) -> None:
    """Warn when bf16 autocast is asked for on a CPU that emulates it: there it is slower, not faster (on a
    2-core AVX2 EPYC, bench_fit.py measured the `cpu` preset training at 7.7 samples/s against 87.9 in fp32)."""
    if bf16 and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("bf16 autocast on a CPU without native bfloat16 (AVX512-BF16 / AMX) is emulated and several "
                      "times slower than fp32 here; leave bf16 off on this machine", RuntimeWarning, stacklevel=3)  # fmt: skip


def to_float_nchw(x: Tensor | np.ndarray) -> Tensor:
    """uint8 NHWC (array or tensor) -> float NCHW in [0, 1]; float NCHW passes through."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if x.dtype == torch.uint8:
        return x.permute(0, 3, 1, 2).float().div_(255.0)
    return x.float()


def use_channels_last(device: str | torch.device, channels_last: bool | None = None) -> bool:
    """Whether to run the D-VAE in channels-last (NHWC) layout: as asked, else on a CPU (measured faster there;
    on a GPU the NCHW layout the throughput figures were measured with stays)."""
    return torch.device(device).type == "cpu" if channels_last is None else bool(channels_last)


def array_batches(
    images: np.ndarray | Tensor, labels: np.ndarray | Tensor, batch_size: int, *, seed: int, epoch: int,
    drop_last: bool = True,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Seeded per-epoch shuffle of in-memory arrays into (uint8 NHWC, int64) batches.

    Tensors (`resident`: the data already on the training device) are indexed where they are, with the same
    permutation: the same batches, with no per-step host work or host-to-device copy."""
    n = len(images)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    if isinstance(images, Tensor):
        order_t = torch.from_numpy(order).to(images.device)  # one copy per epoch
        for i in range(0, stop, batch_size):
            idx = order_t[i : i + batch_size].sort().values
            yield images.index_select(0, idx), labels.index_select(0, idx)
        return
    for i in range(0, stop, batch_size):
        idx = np.sort(order[i : i + batch_size])
        yield torch.from_numpy(images[idx]), torch.from_numpy(labels[idx].astype(np.int64))


def resident(images: np.ndarray, labels: np.ndarray, device: str | torch.device) -> tuple[Tensor, Tensor]:
    """uint8 images and int64 labels as tensors on `device` (for `array_batches`): on an accelerator the whole
    training set is copied once (50,000 CIFAR images are 150 MB) instead of one batch per step."""
    return (torch.from_numpy(np.ascontiguousarray(images)).to(device),
            torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device))  # fmt: skip


def _mean_over_ranks(value: float, device: torch.device) -> float:
    """`value` averaged over the DDP ranks (itself outside DDP), so every rank picks the same automatic tau."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return float(t.item()) / torch.distributed.get_world_size()
    return float(value)


def make_optimizer(model: nn.Module, cfg: DVAEConfig, epochs: int, *, fused: bool = False) -> tuple[torch.optim.Optimizer, Any]:
    """Adam + per-epoch cosine annealing over the stage's epochs, as the authors train. fused: one kernel per
    step for all parameters (CUDA parameters only; the same update up to float rounding)."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=fused or None)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    return opt, sched


def save_train_state(d: str, model: nn.Module, opt: torch.optim.Optimizer, epoch: int, history: list[dict]) -> None:
    """Epoch checkpoint in directory `d`: weights + Adam moments as safetensors, the rest as JSON (nothing
    pickled). state.json is written last, so its presence marks a complete checkpoint."""
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, os.path.join(d, "model.safetensors"))
    st = opt.state_dict()["state"]
    save_file({f"{i}.{n}": t.detach().cpu().contiguous().reshape(t.shape) for i, s in st.items() for n, t in s.items()},
              os.path.join(d, "optimizer.safetensors"))  # fmt: skip
    part = Path(d, "state.json.part")  # renamed, so a kill mid-write never leaves a truncated state.json
    part.write_text(json.dumps({"epoch": epoch, "history": history}))
    os.replace(part, Path(d, "state.json"))


def load_train_state(d: str, model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> tuple[int, list[dict]]:
    """Restore an epoch checkpoint written by `save_train_state`; return (next epoch, history so far)."""
    model.load_state_dict(load_file(os.path.join(d, "model.safetensors")))
    flat = load_file(os.path.join(d, "optimizer.safetensors"))
    state: dict[int, dict[str, Tensor]] = {}
    for k, t in flat.items():
        i, n = k.split(".", 1)
        state.setdefault(int(i), {})[n] = t
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    meta = json.loads(Path(d, "state.json").read_text())
    with warnings.catch_warnings():  # stepping before any optimizer step is the point here, not a mistake
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        for _ in range(meta["epoch"] + 1):
            sched.step()  # the cosine schedule at the resumed epoch, exactly as an uninterrupted run has it
    return meta["epoch"] + 1, meta["history"]


def resume_stage(d: str | Path | None, model: nn.Module, opt: torch.optim.Optimizer, sched: Any,
                 tau: float) -> tuple[int, list[dict], float]:
    """(start epoch, history, tau) to continue a stage from checkpoint `d`, or to start it when `d` is None.

    tau is the last epoch's `tau_next`: with automatic tau the target chosen before the interruption, not the
    preset's."""
    if d is None:
        return 0, [], tau
    start, history = load_train_state(str(d), model, opt, sched)
    return start, history, history[-1].get("tau_next", tau) if history else tau


def replace_dir(d: Path, fill: Callable[[Path], None]) -> None:
    """Replace directory `d` by one that `fill` writes into d.tmp, which is then swapped in.

    With `fill` writing state.json last (its mark of completeness, as `save_train_state` does) and
    `recover_train_state(d)` run before the first save, a kill at any point leaves a complete `d` or a complete,
    newer d.tmp, and no save ever deletes the only complete copy."""
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a half-written copy, or one recover_train_state found older than d
    tmp.mkdir(parents=True)
    fill(tmp)
    shutil.rmtree(d, ignore_errors=True)
    os.replace(tmp, d)


def recover_train_state(d: Path) -> Path | None:
    """The newest complete checkpoint written through `replace_dir(d, ...)`, moved to `d`; None if there is none.

    d.tmp is the newer one when a kill came between finishing it and renaming it (possibly with `d` half
    deleted); it is renamed into place first, so the next save cannot delete the only good copy."""
    tmp = d.with_name(d.name + ".tmp")
    epochs = {p: json.loads((p / "state.json").read_text())["epoch"] for p in (d, tmp) if (p / "state.json").exists()}
    if not epochs:
        return None
    if max(epochs, key=epochs.__getitem__) == tmp:  # max keeps the first of equals: d wins a tie
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
    return d


def fit_stage(
    model: nn.Module,
    data: np.ndarray | Batches,
    labels: np.ndarray | None = None,
    *,
    tau: float,
    epochs: int,
    cfg: DVAEConfig | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    start_epoch: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    on_epoch_end: EpochCallback | None = None,
    progress: bool = True,
    desc: str = "D-VAE",
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool | None = None,
    batch_size: int | None = None,
    steps: int | None = None,
    compile: bool | str = False,
) -> list[dict[str, float]]:
    """Train `model` (a DVAE, possibly DDP-wrapped) for epochs [start_epoch, epochs); return per-epoch metrics.

    Resuming: pass the restored optimizer/scheduler and `start_epoch`; shuffling and latent noise are seeded per
    (seed, epoch), so a resumed run sees the same batches and noise as an uninterrupted one. With automatic tau
    (cfg.tau_auto_ratio > 0) pass the last epoch's `tau_next` as `tau` when resuming after the warm-up.
    channels_last: NHWC activations and weights (None = on a CPU, where oneDNN's convolutions run 1.1-1.2x
    faster so, benchmarks/results/fit/; a DDP-wrapped model must be converted before wrapping, `to_channels_last`).
    compile: the encoder, both decoders and the latent op run through `torch.compile` during this call (`compiled`;
    a string is its mode, e.g. "reduce-overhead" for CUDA graphs): the same loss curve up to float rounding. On a
    CPU it needs a C++ compiler; with bf16 on a 2-core AMX Xeon it made the fit 1.12x / 1.06x faster (stage 1 /
    stage 2; benchmarks/results/speed/), in fp32 1.05x / 0.98x.
    On an accelerator, in-memory arrays are copied to it once (`resident`) and Adam is fused.
    """
    cfg = cfg or getattr(model, "module", model).cfg
    device = torch.device(device)
    if labels is not None:
        images, labels_arr = np.asarray(data), np.asarray(labels)
        if device.type != "cpu":
            images, labels_arr = resident(images, labels_arr, device)
        bs = batch_size or cfg.batch_size
        batches: Batches = lambda e: array_batches(images, labels_arr, bs, seed=seed, epoch=e)
        steps = max(1, len(images) // bs)
    elif callable(data):
        batches = data  # `steps`: its batches per epoch, for the progress bar (None: unknown until one epoch ran)
    else:
        raise TypeError("fit_stage needs (images, labels) arrays or a callable epoch -> iterable of batches")
    if optimizer is None:
        optimizer, scheduler = make_optimizer(model, cfg, epochs, fused=device.type == "cuda")
        for _ in range(start_epoch):
            scheduler.step()
    warn_if_emulated_bf16(device, autocast_dtype == torch.bfloat16)
    model.to(device)
    fmt = torch.channels_last if use_channels_last(device, channels_last) else torch.contiguous_format
    if not hasattr(model, "module"):  # DDP: the caller converted it before wrapping
        model.to(memory_format=fmt)
    with compiled(getattr(model, "module", model), compile):
        history: list[dict[str, float]] = []
        for epoch in range(start_epoch, epochs):
            model.train()
            gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)
            lr = optimizer.param_groups[0]["lr"]
            sums: dict[str, Tensor] = {}
            n_seen, step, hinge_steps, t0 = 0, 0, 0, time.perf_counter()
            bar = _progress(batches(epoch), enabled=progress, total=steps, desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False)
            for xb, yb in bar:
                if compile:
                    torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA graphs ("reduce-overhead")
                x = to_float_nchw(xb).to(device, non_blocking=True).contiguous(memory_format=fmt)
                y = torch.as_tensor(yb).to(device, non_blocking=True).long()
                with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                    out = model(x, y, sample=True, generator=gen)
                loss, terms = dvae_loss(
                    out._replace(x_hat=out.x_hat.float(), p_hat=out.p_hat.float()), x, tau=tau, epoch=epoch, kl_weight=cfg.kl_weight,
                    energy_start_epoch=cfg.energy_start_epoch, energy_floor=cfg.energy_floor,
                    y=y, p_class_weight=cfg.p_class_weight,
                )  # fmt: skip
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v * len(x)
                hinge_steps = hinge_steps + (terms["kl"] > tau)  # the rate hinge's gradient is on in this step (no sync)
                n_seen, step = n_seen + len(x), step + 1
                if progress and step % 10 == 1:  # .item() waits for the device: only for a visible bar
                    bar.set_postfix(loss=f"{terms['loss'].item():.4f}", kl=f"{terms['kl'].item():.2f}")
            bar.close()
            steps = steps or step  # streamed batches (drop_last): every epoch has the first one's count of steps
            if scheduler is not None:
                scheduler.step()
            seconds = time.perf_counter() - t0
            metrics = {k: float(v) / max(n_seen, 1) for k, v in sums.items()}
            metrics.update(epoch=epoch, tau=tau, lr=lr, samples=n_seen, seconds=seconds,
                           samples_per_s=n_seen / seconds if seconds > 0 else 0.0,
                           kl_above_tau=metrics.get("kl", 0.0) > tau, hinge_active=float(hinge_steps) / max(step, 1))  # fmt: skip
            if cfg.tau_auto_ratio > 0 and epoch == cfg.tau_auto_warmup - 1:
                tau = cfg.tau_auto_ratio * _mean_over_ranks(metrics.get("kl", 0.0), device)
            metrics["tau_next"] = tau  # the tau of the next epoch (a resumed run starts from it)
            history.append(metrics)
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics)
    return history


COMPILED_PARTS = ("encoder", "decoder", "perturbation_decoder")  # the convolution stacks; and the latent op


@contextlib.contextmanager
def compiled(model: nn.Module, enabled: bool | str = True) -> Iterator[None]:
    """Within the block, `model`'s encoder and decoders run through `torch.compile` with static shapes (a fit's
    batches all have one size; a string `enabled` is the compile mode), and so does its latent sampling with the KL
    (`sample_with_kl_formulas`: Inductor fuses the element-wise work on the 256-channel latent, forward and
    backward). Afterwards all are eager again: purification and checkpoints never see compiled code, and the state
    dict's keys do not change."""
    parts = [getattr(model, n) for n in COMPILED_PARTS] if enabled else []
    mode = enabled if isinstance(enabled, str) else None
    for m in parts:
        m.compile(dynamic=False, mode=mode)
    if enabled:
        model.latent_op = torch.compile(sample_with_kl_formulas, dynamic=False, mode=mode)
    try:
        yield
    finally:
        for m in parts:
            m._compiled_call_impl = None  # what nn.Module.compile set: back to the module's own __call__
        if enabled:
            model.latent_op = None
