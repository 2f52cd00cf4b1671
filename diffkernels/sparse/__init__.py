"""Sparse supervision for image/latent diffusion (METHODS.md section 1): the loss and its mask.

The functional forms live with their custom op in diffkernels/ops/sparse_mse.py; this module adds
the ``nn.Module`` form.
"""

from typing import Optional

import torch
from torch import Tensor

from .._validate import check_choice, check_mask_ratio
from ..ops.sparse_mse import BACKWARD_MODES, NORMALIZATIONS, REDUCTIONS, _channels, sparse_mask, sparse_mse_loss

__all__ = ["SparseMSELoss", "sparse_mask", "sparse_mse_loss"]


class SparseMSELoss(torch.nn.Module):
    """Module form of :func:`sparse_mse_loss`; ``forward(pred, target, seed, weight=None)``.

    Derive a fresh seed every step (e.g. ``diffkernels.fold_seed(base_seed, step, rank)``):
    the same seed gives the same mask.
    """

    def __init__(self, mask_ratio: float, *, granularity: str = "element", normalize: str = "expected",
                 reduction: str = "mean", backward: str = "fused"):
        super().__init__()
        self.mask_ratio = check_mask_ratio(mask_ratio)
        _channels((1, 1), granularity)
        check_choice(normalize, "normalize", NORMALIZATIONS)
        check_choice(reduction, "reduction", REDUCTIONS)
        check_choice(backward, "backward", BACKWARD_MODES)
        self.granularity, self.normalize, self.reduction, self.backward = granularity, normalize, reduction, backward

    def forward(self, pred: Tensor, target: Tensor, seed: int, weight: Optional[Tensor] = None) -> Tensor:
        return sparse_mse_loss(pred, target, self.mask_ratio, seed, weight=weight, granularity=self.granularity,
                               normalize=self.normalize, reduction=self.reduction, backward=self.backward)

    def extra_repr(self) -> str:
        return (f"mask_ratio={self.mask_ratio}, granularity={self.granularity!r}, normalize={self.normalize!r}, "
                f"reduction={self.reduction!r}")
