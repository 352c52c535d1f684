"""purify_pipeline: remove unlearnable-example poisons from image datasets with D-VAE (Yu et al., ICML 2024).

The layout follows the data, one package per step:
    data/      WebDataset shards (read, write, manifests), converters, streaming loader, augmentation
    poisons/   unlearnable-example generators and the Ray Data poison job   poisons.generate("lsp", ...)
    dvae/      config, model, loss, one stage's loop, two-stage fit, Purifier, checkpoints, noise
    stages/    the Ray jobs: fit_purifier (Ray Train), PurifyStage (Ray Data), purify_shards
    eval/      defenses, classifiers and their trainers, metrics, the learnability audit
    cli / demo the command line and the one-command demo on top
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names are imported on first use (PEP 562), so `import purify_pipeline` and `purify-pipeline --help`
# don't pay for torch and Ray; `from purify_pipeline import PurifyStage` works as usual.
_EXPORTS = {
    "DVAEConfig": "dvae.config", "DVAE": "dvae.model", "fit_stage": "dvae.train", "fit_two_stage": "dvae.two_stage",
    "Purifier": "dvae.purifier", "CheckpointError": "dvae.checkpoint",
    "fit_purifier": "stages.fit", "PurifyBatch": "stages.purify_stage", "PurifyConfig": "stages.purify_stage",
    "PurifyStage": "stages.purify_stage", "PurifySummary": "stages.purify_shards", "purify_shards": "stages.purify_shards",
    "ShardError": "data.shards", "ClassifierConfig": "eval.classifiers", "train_classifier": "eval.train_classifier",
    "train_classifier_ray": "eval.train_classifier", "psnr": "eval.metrics", "retention": "eval.metrics",
}  # fmt: skip
_SUBMODULES = {"shards": "data.shards", "poisons": "poisons", "audit": "eval.audit", "defenses": "eval.defenses"}

if TYPE_CHECKING:
    from purify_pipeline import poisons
    from purify_pipeline.data import shards
    from purify_pipeline.data.shards import ShardError
    from purify_pipeline.dvae.checkpoint import CheckpointError
    from purify_pipeline.dvae.config import DVAEConfig
    from purify_pipeline.dvae.model import DVAE
    from purify_pipeline.dvae.purifier import Purifier
    from purify_pipeline.dvae.train import fit_stage
    from purify_pipeline.dvae.two_stage import fit_two_stage
    from purify_pipeline.eval import audit, defenses
    from purify_pipeline.eval.classifiers import ClassifierConfig
    from purify_pipeline.eval.metrics import psnr, retention
    from purify_pipeline.eval.train_classifier import (
        train_classifier,
        train_classifier_ray,
    )
    from purify_pipeline.stages.fit import fit_purifier
    from purify_pipeline.stages.purify_shards import PurifySummary, purify_shards
    from purify_pipeline.stages.purify_stage import (
        PurifyBatch,
        PurifyConfig,
        PurifyStage,
    )


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{_SUBMODULES[name]}", __name__)
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"

__all__ = sorted([*_EXPORTS, *_SUBMODULES])
