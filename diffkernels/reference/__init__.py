"""Plain-PyTorch references: the oracles the tests compare every backend with, the benchmarks'
baselines, and the ``torch`` backend (the primitives of diffkernels/ops/_kernels.py).

One module per kernel primitive, named as in every layer (see diffkernels/ops/__init__.py):
``sparse_mse`` (oracles ``sparse_mse_loss``, ``sparse_mask``; primitives ``sparse_mse_fwd``,
``keep_mask``), ``mask_tokens`` (oracle ``mask_tokens``; primitive ``mask_tokens_fwd``),
``masked_ce`` (oracle ``masked_diffusion_loss``; primitive ``masked_ce_rows``) and ``scale_rows``
(primitive ``scale_rows_``); ``posterior`` holds the oracles of the optimal denoiser and of
k-nearest neighbours.
"""

from .sparse_mse import sparse_mask, sparse_mse_loss

__all__ = ["sparse_mask", "sparse_mse_loss"]
