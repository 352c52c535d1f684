"""Shared fixtures: CIFAR-10 shard location, one embedded Ray per test session, small seeded data."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_memory_usage_threshold", "0.98")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("PURIFY_PIPELINE_NO_PROGRESS", "1")

REPO = Path(__file__).resolve().parents[1]


REFERENCE_LAYOUT = ("the reference CIFAR-10 shards: manifest.json, train-000000..000049.tar and test-000000..000009.tar "
                    "of 1,000 samples each, keys numbered in stored order (train_00000.jpg first)")


def _is_reference_layout(d: Path) -> bool:
    """Tests pin shard counts and keys of the reference set; another CIFAR-10 copy (e.g. `convert`'s) differs."""
    import json
    import tarfile

    try:
        splits = json.loads((d / "manifest.json").read_text())["splits"]
        sizes = {k: [s["samples"] for s in splits[k]["shards"]] for k in ("train", "test")}
        with tarfile.open(d / "train-000000.tar") as tf:
            first = tf.next()
    except (OSError, KeyError, TypeError, ValueError, tarfile.TarError):
        return False
    return sizes == {"train": [1000] * 50, "test": [1000] * 10} and first is not None and first.name == "train_00000.jpg"


def cifar_dir() -> Path:
    """CIFAR-10 WebDataset shards: $PURIFY_PIPELINE_DATA, else ../shared/data/cifar10 beside the repo."""
    env = os.environ.get("PURIFY_PIPELINE_DATA")
    cands = [Path(env)] if env else []
    cands += [REPO.parent / "shared" / "data" / "cifar10", REPO / "shared" / "data" / "cifar10"]
    for c in cands:
        if (c / "train-000000.tar").exists():
            if not _is_reference_layout(c):
                pytest.skip(f"{c} is not {REFERENCE_LAYOUT}")
            return c
    pytest.skip(f"CIFAR-10 shards not found: set PURIFY_PIPELINE_DATA to {REFERENCE_LAYOUT}")


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    return cifar_dir()


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for the whole test session (ray.init costs seconds; 4 logical CPUs on 2 cores)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            object_store_memory=512 * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=False,
            ignore_reinit_error=True,
        )
    yield ray


@pytest.fixture()
def ray_data_context(ray_session):
    """Restore Ray Data's global DataContext after a test that changes it."""
    import copy

    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = copy.copy(ctx)
    yield ctx
    ray.data.DataContext._set_current(saved)


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A real (untrained, seeded) tiny two-stage checkpoint on disk: weights are irrelevant to the plumbing."""
    import torch

    from purify_pipeline import DVAE, DVAEConfig, Purifier

    torch.manual_seed(0)
    cfg = DVAEConfig.preset("tiny")
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    Purifier(DVAE(cfg), DVAE(cfg)).save(path)
    return str(path)

