"""purify_pipeline: remove unlearnable-example poisons from image datasets with D-VAE (Yu et al., ICML 2024).

The data flow, one module each:
    shards      WebDataset I/O (local or fsspec URLs)         shards.expand / iter_samples / load_arrays
    poisons     unlearnable-example generators                poisons.generate("lsp", images, labels, ...)
    models      the D-VAE network                             DVAE, DVAEConfig.preset("paper" | "cpu")
    train       one stage's training loop                     fit_stage
    purifier    two fitted stages, checkpoints                Purifier.load(path).purify(images, labels)
    fit         Ray Train job fitting both stages             fit_purifier(shards, output=...)
    stage       Ray Data map stage                            ds = PurifyStage(ckpt)(ds)
    purify      shards in -> purified shards out (Ray Data)   purify_shards(inputs, output, ckpt)
    defenses / classifiers / train_classifier / audit         baselines and the evaluation side
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names are imported on first use (PEP 562), so `import purify_pipeline` and `purify-pipeline --help`
# don't pay for torch and Ray; `from purify_pipeline import PurifyStage` works as usual.
_EXPORTS = {
    "CheckpointError": "checkpoint", "DVAEConfig": "config", "fit_purifier": "fit", "psnr": "metrics",
    "retention": "metrics", "DVAE": "models", "Purifier": "purifier", "fit_two_stage": "fit",
    "PurifySummary": "purify", "purify_shards": "purify", "ShardError": "shards", "PurifyBatch": "stage",
    "PurifyConfig": "stage", "PurifyStage": "stage", "fit_stage": "train", "ClassifierConfig": "classifiers",
    "train_classifier": "train_classifier", "train_classifier_ray": "train_classifier",
}  # fmt: skip
_SUBMODULES = ("audit", "defenses", "poisons", "shards")

if TYPE_CHECKING:
    from . import audit, defenses, poisons, shards
    from .checkpoint import CheckpointError
    from .classifiers import ClassifierConfig
    from .config import DVAEConfig
    from .fit import fit_purifier, fit_two_stage
    from .metrics import psnr, retention
    from .models import DVAE
    from .purifier import Purifier
    from .purify import PurifySummary, purify_shards
    from .shards import ShardError
    from .stage import PurifyBatch, PurifyConfig, PurifyStage
    from .train import fit_stage
    from .train_classifier import train_classifier, train_classifier_ray


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ClassifierConfig", "DVAE", "DVAEConfig", "Purifier", "PurifyBatch", "PurifyConfig",
    "PurifyStage", "PurifySummary", "ShardError", "audit", "defenses", "fit_purifier", "fit_stage", "fit_two_stage",
    "poisons", "psnr", "purify_shards", "retention", "shards", "train_classifier", "train_classifier_ray",
]  # fmt: skip
