"""Sparse supervision for image/latent diffusion (docs/METHODS.md section 1): the loss, its
``nn.Module`` form and its mask."""

from .loss import SparseMSELoss, sparse_mask, sparse_mse_loss

__all__ = ["SparseMSELoss", "sparse_mask", "sparse_mse_loss"]
