"""diffkernels: fused kernels for training and diagnosing diffusion models.

Public API only; see README.md for an overview.
"""

from . import mdm, optimal_loss
from ._backend import backends, use_backend
from .sparse import SparseMSELoss, sparse_mask, sparse_mse_loss
from .optimal_loss import knn, posterior_mean
from .rng import fold_seed

__version__ = "0.1.0"

__all__ = [
    "mdm",
    "optimal_loss",
    "knn",
    "posterior_mean",
    "SparseMSELoss",
    "backends",
    "fold_seed",
    "sparse_mask",
    "sparse_mse_loss",
    "use_backend",
]
