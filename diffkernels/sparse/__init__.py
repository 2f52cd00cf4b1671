"""Sparse supervision for image/latent diffusion (docs/METHODS.md section 1): the loss, its
``nn.Module`` form and its mask.

Examples:
    A training step that supervises a random quarter of the elements, with a new mask every step:

    >>> import torch
    >>> from diffkernels import SparseMSELoss, fold_seed
    >>> model = torch.nn.Conv2d(3, 3, 3, padding=1)
    >>> criterion = SparseMSELoss(mask_ratio=0.75)
    >>> x, target = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    >>> for step in range(2):
    ...     loss = criterion(model(x), target, seed=fold_seed(1234, step))
    ...     loss.backward()
    >>> model.weight.grad.shape
    torch.Size([3, 3, 3, 3])
"""

from .loss import SparseMSELoss, sparse_mask, sparse_mse_loss

__all__ = ["SparseMSELoss", "sparse_mask", "sparse_mse_loss"]
