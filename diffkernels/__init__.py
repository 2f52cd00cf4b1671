"""diffkernels: fused kernels for training and diagnosing diffusion models.

Public API only; see README.md for an overview.
"""

from . import mdm
from ._backend import backends, use_backend
from .sparse import SparseMSELoss, sparse_mask, sparse_mse_loss
from .rng import fold_seed

__version__ = "0.1.0"

__all__ = [
    "mdm",
    "SparseMSELoss",
    "backends",
    "fold_seed",
    "sparse_mask",
    "sparse_mse_loss",
    "use_backend",
]
