"""``diffkernels::scale_rows_``: ``grad[b] *= factor[b]`` in place, rows with factor exactly 1 untouched.

The backward of the ops whose gradient is computed in the forward pass (sparse_mse with
backward="fused", masked_ce_logits / masked_ce_hidden): it rescales the saved gradient by the
upstream gradient, which the usual ``loss.backward()`` passes as exactly 1, so that case costs no
pass over the gradient and no host sync. Such a graph can be differentiated once:
``saved_tensors`` turns the second backward's version-counter error into a clear message.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._validate import check_fake_devices
from . import _kernels


def check_args(grad: Tensor, factor: Tensor) -> None:
    """What the op's kernels assume (checked by the custom op and its fake kernel alike)."""
    torch._check_type(grad.dtype.is_floating_point,
                      lambda: f"scale_rows_: grad must be floating-point, got {grad.dtype}")
    torch._check_type(factor.dtype.is_floating_point,
                      lambda: f"scale_rows_: factor must be floating-point, got {factor.dtype}")
    torch._check_value(grad.dim() >= 1, lambda: "scale_rows_: grad must have a row dimension (dim 0)")
    torch._check_value(factor.dim() == 1 and factor.shape[0] == grad.shape[0],
                       lambda: f"scale_rows_: factor must have shape (rows of grad,) = ({grad.shape[0]},), "
                               f"got {tuple(factor.shape)}")


@torch.library.custom_op("diffkernels::scale_rows_", mutates_args=("grad",))
def scale_rows_op(grad: Tensor, factor: Tensor) -> None:
    """grad[b] *= factor[b] in place; rows with factor exactly 1 are not touched."""
    check_args(grad, factor)
    _kernels.for_device(grad.device).scale_rows_(grad, factor)


@scale_rows_op.register_fake
def _(grad, factor):
    check_fake_devices("diffkernels::scale_rows_", grad, factor)
    check_args(grad, factor)
    return None


def scale_rows_(grad: Tensor, factor: Tensor, kernels: Optional[_kernels.Kernels] = None) -> None:
    """Rescale ``grad`` in place. With ``kernels`` (an eager fast path's backend) the kernel runs
    directly and ``grad``'s version counter is bumped, so that a second backward through the graph
    that saved it is detected; without, the custom op runs (what torch.compile traces)."""
    if kernels is None:
        scale_rows_op(grad, factor)
    else:
        kernels.scale_rows_(grad, factor)
        torch.autograd.graph.increment_version(grad)


def saved_tensors(ctx, message: str):
    """``ctx.saved_tensors``, turning autograd's generic version-counter error on a second backward
    through the same graph (the saved gradient was already rescaled in place) into ``message``."""
    try:
        return ctx.saved_tensors
    except RuntimeError as exc:
        if "inplace" not in str(exc):
            raise
        raise RuntimeError(message) from exc
