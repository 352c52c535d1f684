"""`fit_purifier`: fit the two-stage D-VAE on a dataset's WebDataset shards with Ray Train.

    ckpt = fit_purifier("data/train-{000000..000049}.tar", preset="cpu", output="ckpt/", num_workers=2)

Pipeline (each step skipped when a previous run with the same run name already finished it):
1. stage 1: a `TorchTrainer` (DDP; gloo on CPU, nccl on GPU). Each worker decodes the whole training set once
   from `get_dataset_shard("train")` (unsplit) and runs `fit_stage` over one seeded permutation of all samples
   per epoch, taking every world-th row of each global batch: one worker sees exactly the batches of the
   in-process `fit_stage(images, labels)`. A checkpoint (safetensors + JSON) every epoch.
2. stage-1 purification of the training shards with `purify_shards(..., stages=1)` — the PurifyStage path.
3. stage 2: the same trainer on those stage-1 shards.
4. one combined checkpoint at `output`, loadable by `Purifier.load` and `PurifyStage`.
Re-running with the same `run_name` resumes the current stage from its last completed epoch; worker failures
are retried by Ray Train (`max_failures`). `num_workers=0` runs the same loop in this process (debugging).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file

from purify_pipeline._progress import progress_enabled
from purify_pipeline.data import shards
from purify_pipeline.dvae.config import DVAEConfig
from purify_pipeline.dvae.model import DVAE
from purify_pipeline.dvae.purifier import Purifier
from purify_pipeline.dvae.train import replace_dir, use_channels_last
from purify_pipeline.dvae.two_stage import _LocalSession, _placeholder, fit_one_stage
from purify_pipeline.stages.shard_io import training_dataset  # torch-free: its read tasks skip importing torch

__all__ = ["fit_purifier", "load_training_arrays", "training_dataset"]


# ----------------------------------------------------------------------------------------------- data
def load_training_arrays(it: Any) -> tuple[np.ndarray, np.ndarray]:
    """Decode a worker's training dataset once into memory (uint8 NHWC + int64), sorted by sample key so the
    order, and with it every seeded shuffle, does not depend on how Ray scheduled the read tasks."""
    xs, ys, ks = [], [], []
    for b in it.iter_batches(batch_size=4096, batch_format="numpy"):
        xs.append(b["image"])
        ys.append(b["label"])
        ks.append(np.asarray(b["key"], dtype=object))
    if not xs:
        raise ValueError("the training dataset is empty")
    keys = np.concatenate(ks)
    order = np.argsort(keys.astype(str), kind="stable")
    return np.concatenate(xs)[order], np.concatenate(ys)[order].astype(np.int64)


class _RaySession:
    """The Ray Train executor: rank and world from the train context, checkpoints through `ray.train.report`."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.local_world = ctx.get_local_world_size()
        self.device = ray.train.torch.get_device()
        self._ckpt = ray.train.get_checkpoint()
        self._restore: Any = None
        self.ckpt = True  # every epoch is reported with its checkpoint

    def restore_dir(self) -> str | None:
        if self._ckpt is None:
            return None
        self._restore = self._ckpt.as_directory()
        return self._restore.__enter__()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def iterator(self) -> Any:
        import ray.train

        return ray.train.get_dataset_shard("train")

    def report(self, metrics: dict, ckpt_dir: str | None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)


def _train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker (or the in-process executor) of one `fit_purifier` stage."""
    local = config.get("local")
    sess = _LocalSession(Path(config["stage_dir"], "local-checkpoint"), "cuda" if config["use_gpu"] else "cpu",
                         config["dataset"]) if local else _RaySession()  # fmt: skip
    if sess.device.type == "cpu" and not local:
        # Ray sets OMP_NUM_THREADS=1 for a worker holding <= 1 logical CPU (fractional on purpose, see RAY-NOTES),
        # which leaves the other cores idle: split the node's cores among the workers on it instead.
        torch.set_num_threads(config.get("threads") or max(1, (os.cpu_count() or 1) // sess.local_world))
    images, labels = load_training_arrays(sess.iterator())  # every worker holds the whole set, decoded once
    fit_one_stage(images, labels, DVAEConfig.from_dict(config["cfg"]), config["stage"], sess,
                  progress=config["progress"], bf16=config["bf16"], compile=config.get("compile", False),
                  metrics_path=config["metrics_path"],
                  crash_after_epoch=config.get("_crash_after_epoch"))  # fmt: skip


# ---------------------------------------------------------------------------------------- the job
def _run_stage(stage: int, ds: Any, cfg: DVAEConfig, run_dir: Path, run_name: str, *, num_workers: int,
               use_gpu: bool, cpus_per_worker: float | None, max_failures: int, bf16: bool, progress: bool,
               extra: dict[str, Any]) -> tuple[DVAE, list[dict]]:  # fmt: skip
    """Train one stage (or load it if a previous run finished it); return the model and its epoch history."""
    stage_dir = run_dir / f"stage{stage}"
    final = stage_dir / "final"
    if not (final / "state.json").exists():
        stage_dir.mkdir(parents=True, exist_ok=True)
        config = {"cfg": cfg.to_dict(), "stage": stage, "progress": progress, "bf16": bf16, "use_gpu": use_gpu,
                  "metrics_path": str(run_dir / "metrics.jsonl"), "stage_dir": str(stage_dir), **extra}  # fmt: skip
        if num_workers == 0:
            _train_loop({**config, "local": True, "dataset": ds})
            src = stage_dir / "local-checkpoint"
        else:
            src = _ray_train(config, ds, run_dir, f"{run_name}-stage{stage}", num_workers=num_workers,
                             use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, max_failures=max_failures)  # fmt: skip

        def copy_in(t: Path) -> None:
            for f in ("model.safetensors", "state.json"):  # weights, then history (the mark, last); no optimizer
                (t / f).write_bytes(Path(src, f).read_bytes())

        replace_dir(final, copy_in)
    model = DVAE(cfg)
    model.load_state_dict(load_file(str(final / "model.safetensors")))
    return model, json.loads((final / "state.json").read_text())["history"]


def _ray_train(config: dict, ds: Any, run_dir: Path, name: str, *, num_workers: int, use_gpu: bool,
               cpus_per_worker: float | None, max_failures: int) -> str:  # fmt: skip
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cpus_per_worker if cpus_per_worker is not None else (1.0 if use_gpu else 0.5)}
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=str(run_dir / "ray"),
                             failure_config=FailureConfig(max_failures=max_failures)),  # fmt: skip
        datasets={"train": ds},
        dataset_config=DataConfig(datasets_to_split=[]),  # every worker loads all of it (see _train_loop)
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name} finished without a checkpoint (error: {result.error})")
    local = tempfile.mkdtemp(prefix="purify-fit-")
    return result.checkpoint.to_directory(local)


def _resolve(preset: str | DVAEConfig, urls: list[str], num_classes: int | None, class_names: Sequence[str] | None,
             storage_options: Mapping[str, Any]) -> tuple[DVAEConfig, list[str] | None]:  # fmt: skip
    """Config + class names. The class count comes from: num_classes / class_names, a DVAEConfig, the shards'
    manifest.json "classes", else the largest label in the data + 1."""
    cfg = preset if isinstance(preset, DVAEConfig) else DVAEConfig.preset(preset)
    names = list(class_names) if class_names is not None else None
    if names is None:
        man = shards.read_manifest(urls[0].rsplit("/", 1)[0], storage_options=storage_options) or {}
        if isinstance(man.get("classes"), list):
            names = [str(c) for c in man["classes"]]
    k = num_classes or (len(names) if names else None)
    if k is None and not isinstance(preset, DVAEConfig):
        k = 1 + max(shards.parse_label(s.get("cls"), shard=u, key=s["__key__"])
                    for u in urls for s in shards.iter_samples(u, storage_options=storage_options))  # fmt: skip
    if k is not None and k != cfg.num_classes:
        cfg = DVAEConfig(**{**cfg.to_dict(), "num_classes": k})
    if names is not None and len(names) != cfg.num_classes:
        raise ValueError(f"{len(names)} class names for {cfg.num_classes} classes")
    return cfg, names


def fit_purifier(
    train_shards: str | Sequence[str],
    *,
    preset: str | DVAEConfig = "cpu",
    output: str,
    num_workers: int = 1,
    use_gpu: bool = False,
    storage_path: str | None = None,
    run_name: str | None = None,
    resume: bool = True,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    cpus_per_worker: float | None = None,
    threads_per_worker: int | None = None,
    max_failures: int = 1,
    bf16: bool = False,
    compile: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    _crash_after_epoch: int | None = None,
) -> str:
    """Fit a two-stage D-VAE on `train_shards` and write a combined checkpoint to `output`; return its path.

    preset: "cpu" | "paper" | "small" | "tiny" | a DVAEConfig. storage_path: where run state lives (default
    `<output>.runs/`). run_name: default derived from the inputs and config, so re-running the same fit resumes;
    resume=False starts a fresh run. cpus_per_worker: fractional CPUs leave room for Ray Data's read tasks
    (0.5 by default on CPU; see RAY-NOTES). threads_per_worker: torch threads of a CPU worker (default: the
    node's cores split among its workers). bf16: bfloat16 autocast, on a GPU or a CPU with native bf16 (AMX /
    AVX512-BF16: 1.3x faster for `cpu`, 1.9x for `paper` here); part of the run's identity, so it never resumes an fp32 run.
    compile: `torch.compile` the D-VAE (convolution stacks and latent op) in each worker (`fit_stage`); also part of the identity.
    """
    import ray

    so = dict(storage_options or {})
    urls = shards.expand(train_shards, storage_options=so)
    cfg, names = _resolve(preset, urls, num_classes, class_names, so)
    how = (["bf16"] if bf16 else []) + (["channels_last"] if use_channels_last("cuda" if use_gpu else "cpu") else [])
    how += ["compile"] if compile else []
    ident = hashlib.sha256(json.dumps([urls, cfg.to_dict()] + how, sort_keys=True).encode()).hexdigest()[:10]
    run_name = run_name or f"fit-{ident}"
    if not resume:
        run_name = f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"
    # absolute: Ray Train reads a relative storage path as a URI without a scheme and its controller dies
    run_dir = Path(storage_path or f"{str(output).rstrip('/')}.runs").resolve() / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        ray.init()
    show = progress_enabled(progress)
    common = dict(num_workers=num_workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker,
                  max_failures=max_failures, bf16=bf16, progress=show, extra={"_crash_after_epoch": _crash_after_epoch,
                                                                          "threads": threads_per_worker, "compile": compile})  # fmt: skip
    t0 = time.perf_counter()
    ds1 = training_dataset(urls, num_classes=cfg.num_classes, image_size=cfg.image_size, storage_options=so)
    stage1, h1 = _run_stage(1, ds1, cfg, run_dir, run_name, **common)

    # stage-1 purification of the training set through the PurifyStage path (resumable, shard by shard)
    from purify_pipeline.stages.purify_shards import purify_shards

    s1_ckpt = str(run_dir / "stage1-checkpoint")
    Purifier(stage1, _placeholder(cfg), class_names=names).save(s1_ckpt)
    s1_out = str(run_dir / "stage1-shards")
    purify_shards(urls, s1_out, s1_ckpt, prefix="stage1", stages=1, mode=cfg.stage1_mode, seed=cfg.seed,
                  storage_options=so, progress=show)  # fmt: skip
    s1_urls = shards.expand(f"{s1_out}/stage1-*.tar")
    ds2 = training_dataset(s1_urls, num_classes=cfg.num_classes, image_size=cfg.image_size)
    stage2, h2 = _run_stage(2, ds2, cfg, run_dir, run_name, **common)

    digest = hashlib.sha256()
    for u in urls:
        digest.update(shards.sha256_file(u, storage_options=so).encode())
    purifier = Purifier(stage1, stage2, class_names=names, metrics={"stage1": h1, "stage2": h2},
                        data_fingerprint=digest.hexdigest())  # fmt: skip
    purifier.save(str(output), **so)
    summary = {"output": str(output), "run_dir": str(run_dir), "inputs": urls, "stage2_inputs": s1_urls,
               "config": cfg.to_dict(), "num_workers": num_workers, "seconds": time.perf_counter() - t0,
               "fingerprint": purifier.fingerprint,
               "final": {"stage1": h1[-1] if h1 else None, "stage2": h2[-1] if h2 else None}}  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if show:
        for s, h in (("stage 1", h1), ("stage 2", h2)):
            if h:
                m = h[-1]
                print(f"{s}: {len(h)} epochs, loss {m['loss']:.4f} rec {m['rec']:.4f} rec_p {m['rec_p']:.4f} "
                      f"KL {m['kl']:.2f} (tau {m['tau']}) energy {m['energy']:.4f}")  # fmt: skip
        print(f"checkpoint {output} ({purifier.fingerprint[:12]}) in {summary['seconds']:.0f} s; run {run_dir}")
    return str(output)
