"""Plain-PyTorch implementations: the test oracles, benchmark baselines and the ``torch`` backend."""

from .sparse_mse import sparse_mask, sparse_mse_loss

__all__ = ["sparse_mask", "sparse_mse_loss"]
