"""purify_pipeline: remove unlearnable-example poisons from image datasets with D-VAE (Yu et al., ICML 2024).

shards -> poisons -> model -> fit (Ray Train) -> PurifyStage (Ray Data) -> train classifiers.
"""
from .checkpoint import CheckpointError
from .config import DVAEConfig
from .metrics import psnr, retention
from .models import DVAE
from .purifier import Purifier, fit_two_stage
from .train import fit_stage

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "DVAE",
    "DVAEConfig",
    "Purifier",
    "fit_stage",
    "fit_two_stage",
    "psnr",
    "retention",
]
