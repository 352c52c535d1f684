"""Models: the D-VAE purifier network."""
from .dvae import DVAE, DVAEOutput, count_parameters

__all__ = ["DVAE", "DVAEOutput", "count_parameters"]
