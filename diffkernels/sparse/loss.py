"""The public functions of sparse supervision (docs/METHODS.md section 1): argument checks, then the
op layer (diffkernels/ops/sparse_mse.py)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .._validate import check_choice, check_devices, check_float_tensor, check_mask_ratio, check_seed
from ..ops import sparse_mse as op
from ..ops.sparse_mse import NORMALIZATIONS, REDUCTIONS

GRANULARITIES = ("element", "pixel")
BACKWARD_MODES = ("fused", "recompute")

__all__ = ["SparseMSELoss", "sparse_mask", "sparse_mse_loss"]


def _channels(shape, granularity: str, name: str = "pred") -> int:
    check_choice(granularity, "granularity", GRANULARITIES)
    if granularity == "pixel":
        if len(shape) < 2:
            raise ValueError(
                f"granularity='pixel' shares one draw across dim 1 (channels), but {name} has shape "
                f"{tuple(shape)} with no channel dimension"
            )
        return shape[1]
    return 1


def sparse_mse_loss(
    pred: Tensor,
    target: Tensor,
    mask_ratio: float,
    seed: int,
    *,
    weight: Optional[Tensor] = None,
    granularity: str = "element",
    normalize: str = "expected",
    reduction: str = "mean",
    backward: str = "fused",
) -> Tensor:
    """Masked, weighted MSE of sparse supervision (docs/METHODS.md section 1), fused.

    loss_b = w_b * sum_i keep[b, i] * (pred[b, i] - target[b, i])**2 / Z_b, reduced over b by
    ``reduction`` ("mean", "sum" or "none" for the (B,) vector), with
    ``keep[b, i] = U(seed, index) >= mask_ratio`` from the counter RNG of :mod:`diffkernels.rng`
    (index: the flat element index, or with ``granularity="pixel"`` the flat index with the
    channel dim 1 removed, so all channels of a pixel share one draw).

    ``normalize``: ``"expected"`` (Z_b = n * (1 - mask_ratio), an unbiased estimate of the dense
    MSE), ``"all"`` (Z_b = n) or ``"kept"`` (Z_b = max(1, kept elements of sample b)).

    Accumulates in float32 (float64 for float64 inputs); returns float32 for half, bfloat16 and
    float32 inputs. NaN/Inf in kept elements propagate; in masked-out elements they are ignored.
    An empty batch gives NaN for "mean" (like ``torch.mean`` of nothing), 0 for "sum" and an
    empty vector for "none". Gradients flow to ``pred``, ``target`` and ``weight``.

    ``backward``: ``"fused"`` (default, fastest) computes the gradient in the forward pass and
    rescales it in place in backward (skipped when the upstream gradient is exactly 1), so the
    graph can be differentiated once and gives no second-order gradients (``create_graph=True``
    is an error); for bfloat16 inputs with an upstream gradient other than 1 the gradient is
    rounded twice (at most 1 ulp more). float16 inputs always take the "recompute" path (a float16
    gradient for an upstream gradient of 1 can under- or overflow before it is rescaled, e.g.
    under GradScaler's loss scale). ``"recompute"`` computes only the loss in forward and
    regenerates the mask in backward (one more read of pred and target); its graph can be
    differentiated any number of times (retain_graph, gradcheck, Jacobians), and with
    ``create_graph=True`` its backward is itself differentiable (gradient penalties, gradgradcheck).

    All tensors must be on one device; meta tensors are rejected outside fake-tensor tracing.

    Examples:
        >>> import torch
        >>> from diffkernels import sparse_mask, sparse_mse_loss
        >>> x = torch.tensor([[1., 2., 3., 4.], [4., 3., 2., 1.]])
        >>> sparse_mask(x.shape, 0.5, seed=8)  # the elements this seed keeps
        tensor([[ True,  True,  True,  True],
                [ True,  True, False, False]])
        >>> sparse_mse_loss(x, torch.zeros_like(x), 0.5, seed=8, reduction="none")  # sum kept / (4 * 0.5)
        tensor([15.0000, 12.5000])

        In training: a fresh seed every step, and gradients only where elements are kept.

        >>> pred = torch.randn(2, 3, 4, 4, requires_grad=True)
        >>> target = torch.randn(2, 3, 4, 4)
        >>> loss = sparse_mse_loss(pred, target, mask_ratio=0.75, seed=1234)
        >>> loss.shape, loss.dtype
        (torch.Size([]), torch.float32)
        >>> loss.backward()
        >>> keep = sparse_mask(pred.shape, 0.75, seed=1234)
        >>> bool(((pred.grad != 0) == keep).all())
        True
    """
    check_float_tensor(pred, "pred")
    check_float_tensor(target, "target")
    shape = pred.shape
    if shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.dtype != target.dtype:
        raise TypeError(f"pred and target must have the same dtype, got {pred.dtype} and {target.dtype}")
    if pred.device != target.device:
        raise ValueError(f"pred and target must be on the same device, got {pred.device} and {target.device}")
    if weight is not None:
        check_float_tensor(weight, "weight")
    if weight is not None or pred.is_meta:  # pred and target share a device: nothing else to check
        check_devices({"pred": pred, "target": target, "weight": weight})
    if pred.dim() < 1:
        raise ValueError("pred must have a batch dimension (dim 0), got a 0-d tensor")
    mask_ratio = check_mask_ratio(mask_ratio)
    seed = check_seed(seed)
    check_choice(normalize, "normalize", NORMALIZATIONS)
    check_choice(reduction, "reduction", REDUCTIONS)
    channels = _channels(shape, granularity)
    B = shape[0]
    if B and pred.numel() == 0:
        raise ValueError(f"pred has no elements per sample (shape {tuple(pred.shape)})")
    channels = max(channels, 1)  # B = 0 with no channels: nothing to mask, and the kernels need C >= 1
    if weight is not None:
        if weight.shape != (B,):
            raise ValueError(f"weight must have shape (B,) = ({B},), one weight per sample, got {tuple(weight.shape)}")
        weight = weight.contiguous()
    check_choice(backward, "backward", BACKWARD_MODES)
    # float16 takes the recompute path: its gradient stored for an upstream gradient of 1 can leave
    # float16's range before the rescale (GradScaler's 65536 x tiny gradients would underflow to 0).
    fused_grad = (backward == "fused" and pred.dtype != torch.float16 and torch.is_grad_enabled()
                  and (pred.requires_grad or target.requires_grad))
    return op.sparse_mse(pred.contiguous(), target.contiguous(), weight, mask_ratio, seed, channels, normalize,
                         reduction, fused_grad)


def sparse_mask(shape, mask_ratio: float, seed: int, *, granularity: str = "element", device=None) -> Tensor:
    """The boolean keep-mask that ``sparse_mse_loss`` uses for a tensor of ``shape`` (True = kept).

    Examples:
        >>> from diffkernels import sparse_mask
        >>> keep = sparse_mask((2, 3, 4, 4), 0.75, seed=3)
        >>> keep.shape, keep.dtype
        (torch.Size([2, 3, 4, 4]), torch.bool)
        >>> pixel = sparse_mask((2, 3, 4, 4), 0.75, seed=3, granularity="pixel")
        >>> bool((pixel == pixel[:, :1]).all())  # one draw per pixel, shared by its 3 channels
        True
    """
    shape = torch.Size(shape)
    if len(shape) < 1:
        raise ValueError("shape must have a batch dimension")
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must be non-negative, got {tuple(shape)}")
    mask_ratio = check_mask_ratio(mask_ratio)
    seed = check_seed(seed)
    C = _channels(shape, granularity, "shape")
    B = shape[0]
    n = math.prod(shape[1:])
    R = n // C if C else 0
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "meta":
        raise ValueError("device='meta': meta tensors are not supported (they hold no data)")
    if C == 0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    return op.sparse_mask(seed, B, C, R, mask_ratio, device).reshape(shape)


class SparseMSELoss(torch.nn.Module):
    """Module form of :func:`sparse_mse_loss`; ``forward(pred, target, seed, weight=None)``.

    Derive a fresh seed every step (e.g. ``diffkernels.fold_seed(base_seed, step, rank)``):
    the same seed gives the same mask. The constructor's arguments are those of
    :func:`sparse_mse_loss`.

    Examples:
        >>> import torch
        >>> from diffkernels import SparseMSELoss, fold_seed
        >>> criterion = SparseMSELoss(mask_ratio=0.75)
        >>> criterion
        SparseMSELoss(mask_ratio=0.75, granularity='element', normalize='expected', reduction='mean')
        >>> pred, target = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 3, 4, 4)
        >>> step, rank = 0, 0
        >>> loss = criterion(pred, target, seed=fold_seed(1234, step, rank))
        >>> loss.backward()
        >>> loss.shape, pred.grad.shape
        (torch.Size([]), torch.Size([2, 3, 4, 4]))
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
        """The sparse MSE of ``pred`` against ``target`` with this module's settings.

        Args:
            pred: (B, ...) floating-point prediction; with ``granularity="pixel"``, (B, C, ...).
            target: the regression target, same shape, dtype and device as ``pred``.
            seed: any integer; it fixes the keep-mask (use a new one every step).
            weight: optional (B,) per-sample weights.

        Returns:
            A 0-d tensor for ``reduction="mean"`` or ``"sum"``, the (B,) per-sample losses for
            ``"none"``; float32 for half, bfloat16 and float32 inputs, float64 for float64.
        """
        return sparse_mse_loss(pred, target, self.mask_ratio, seed, weight=weight, granularity=self.granularity,
                               normalize=self.normalize, reduction=self.reduction, backward=self.backward)

    def extra_repr(self) -> str:
        return (f"mask_ratio={self.mask_ratio}, granularity={self.granularity!r}, normalize={self.normalize!r}, "
                f"reduction={self.reduction!r}")
