"""Ops whose gradient is computed in the forward pass and rescaled in place by backward."""

from __future__ import annotations


def saved_tensors(ctx, message: str):
    """``ctx.saved_tensors``, turning autograd's generic version-counter error on a second backward
    through the same graph (the saved gradient was already rescaled in place) into ``message``."""
    try:
        return ctx.saved_tensors
    except RuntimeError as exc:
        if "inplace" not in str(exc):
            raise
        raise RuntimeError(message) from exc
