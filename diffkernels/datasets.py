"""Small bundled datasets for the demo, the examples and tests (nothing is downloaded).

:func:`load_digits`: scikit-learn's 1797 8x8 handwritten digits (values 0..16), as images in [-1, 1]
(the diffusion models' scale) or on the 0..255 pixel scale of the memorisation metric
(:func:`diffkernels.optimal_loss.memorization`); :func:`to_pixels` maps [-1, 1] images to that scale.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["load_digits", "to_pixels", "DIGITS_MAX"]

DIGITS_MAX = 16.0  # the digits' values are integers 0..16


def load_digits(*, pixels: bool = False, return_labels: bool = False):
    """scikit-learn's digits as a float32 tensor of shape (1797, 1, 8, 8).

    ``pixels=False``: scaled linearly from 0..16 to [-1, 1]; ``pixels=True``: to the 0..255 pixel
    scale (value * 255 / 16), equal to ``to_pixels`` of the [-1, 1] images up to float32 rounding.
    ``return_labels``: also return the digit of each image (int64, shape (1797,)).
    Needs scikit-learn (``pip install scikit-learn``, or ``diffkernels[examples]``).

    Examples:
        >>> from diffkernels.datasets import load_digits
        >>> images, labels = load_digits(return_labels=True)
        >>> images.shape, images.dtype, float(images.min()), float(images.max())
        (torch.Size([1797, 1, 8, 8]), torch.float32, -1.0, 1.0)
        >>> labels[:5]
        tensor([0, 1, 2, 3, 4])
        >>> float(load_digits(pixels=True).max())  # the 0..255 scale of the memorisation metric
        255.0
    """
    if not isinstance(pixels, bool):
        raise TypeError(f"pixels must be a bool, got {type(pixels).__name__}")
    if not isinstance(return_labels, bool):
        raise TypeError(f"return_labels must be a bool, got {type(return_labels).__name__}")
    try:
        from sklearn import datasets
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the digits need scikit-learn: pip install scikit-learn (or diffkernels[examples])") from exc
    bunch = datasets.load_digits()
    raw = torch.tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8)
    images = raw * (255.0 / DIGITS_MAX) if pixels else raw / (DIGITS_MAX / 2) - 1.0
    if return_labels:
        return images, torch.tensor(bunch.target, dtype=torch.int64)
    return images


def to_pixels(x: Tensor) -> Tensor:
    """Images in [-1, 1] (clamped to it first) -> the 0..255 pixel scale, (x + 1) * 127.5.

    Examples:
        >>> import torch
        >>> from diffkernels.datasets import to_pixels
        >>> to_pixels(torch.tensor([-1.0, 0.0, 1.0, 2.0]))
        tensor([  0.0000, 127.5000, 255.0000, 255.0000])
    """
    return (x.clamp(-1, 1) + 1.0) * 127.5
