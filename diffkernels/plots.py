"""Figures of the demo and the examples: matplotlib without a display, and image grids.

Needs matplotlib (``pip install matplotlib``, or ``diffkernels[examples]``).
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import Tensor

__all__ = ["pyplot", "save_image_grid"]


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (figures go to files only)."""
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the figures need matplotlib: pip install matplotlib (or diffkernels[examples])") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_image_grid(images: Tensor, path, title: str, *, cell: float = 0.7) -> None:
    """Save (N, C, H, W) images in [-1, 1] as a square-ish grid to ``path``: grey for C = 1 (dark
    strokes on white, as digits are drawn), RGB from the first three channels otherwise.
    ``cell``: inches per image."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (N, C, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    plt = pyplot()
    n = images.shape[0]
    cols = max(1, int(math.ceil(math.sqrt(n))))
    rows = max(1, int(math.ceil(n / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell, rows * cell + 0.5), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            img = images[k].detach().clamp(-1, 1).float().cpu()
            if img.shape[0] == 1:
                ax.imshow(img[0].numpy(), cmap="gray_r", vmin=-1, vmax=1)
            else:
                ax.imshow(((img[:3].permute(1, 2, 0) + 1) / 2).numpy())
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(path), dpi=100)
    plt.close(fig)
