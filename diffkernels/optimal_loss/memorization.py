"""The memorisation metric of Gu et al. (2023), docs/METHODS.md section 1, on top of the exact streaming :func:`knn`.

Pixel values on the 0..255 scale; d(a, b) = ||a - b||_2 / sqrt(D). For each generated sample, d1 <= d2
are the distances to its nearest and second-nearest training images; the sample is memorised iff
d1 / d2 < threshold (1/3). A sample equal to a training image that appears twice in the training
set has d1 = d2 = 0; we count it as memorised (ratio 0), as an exact copy should be.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .estimators.data import LocalRows, as_2d
from .posterior import knn

__all__ = ["MemorizationResult", "memorization"]


@dataclass
class MemorizationResult:
    """``fraction`` memorised and ``mean_d1``; per sample (float64 CPU tensors): ``d1``, ``d2``,
    ``ratio`` = d1 / d2, ``memorized`` (bool) and ``nearest`` (index of the nearest training row).

    Examples:
        >>> import torch
        >>> from diffkernels.optimal_loss import memorization
        >>> train = torch.tensor([[0.0, 0.0], [100.0, 100.0], [200.0, 0.0]])
        >>> r = memorization(torch.tensor([[1.0, 1.0], [50.0, 50.0]]), train)
        >>> r.to_dict()
        {'memorized_fraction': 0.5, 'mean_d1': 25.5, 'threshold': 0.3333333333333333, 'num_samples': 2}
    """

    fraction: float
    mean_d1: float
    d1: Tensor
    d2: Tensor
    ratio: Tensor
    memorized: Tensor
    nearest: Tensor
    threshold: float

    def to_dict(self, per_sample: bool = False) -> dict:
        out = {"memorized_fraction": self.fraction, "mean_d1": self.mean_d1, "threshold": self.threshold,
               "num_samples": int(self.d1.numel())}
        if per_sample:
            out.update(d1=self.d1.tolist(), d2=self.d2.tolist(), ratio=self.ratio.tolist(),
                       nearest=self.nearest.tolist())
        return out


@torch.no_grad()
def memorization(samples, train, threshold: float = 1.0 / 3.0, *, device=None) -> MemorizationResult:
    """Fraction of ``samples`` (M, ...) that memorise ``train`` (N, ...), both on the 0..255 scale.

    ``samples``, ``train``: tensors (any device) or numpy arrays; ``train`` may be a memmap larger than
    memory (streamed in host chunks). Exact float64 distances; ``device`` defaults to the samples'.
    A NaN or Inf in either is an error (its distance ratio would be meaningless, not "memorised").

    Examples:
        >>> import torch
        >>> from diffkernels.optimal_loss import memorization
        >>> train = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 100.0, 100.0, 100.0], [200.0, 0.0, 200.0, 0.0]])
        >>> samples = torch.tensor([[1.0, 0.0, 0.0, 1.0],      # next to train[0]: a copy
        ...                         [50.0, 50.0, 50.0, 50.0]])  # halfway between train[0] and train[1]
        >>> r = memorization(samples, train)
        >>> r.fraction, r.memorized, r.nearest
        (0.5, tensor([ True, False]), tensor([0, 0]))
        >>> r.d1, r.ratio  # RMS distance per pixel to the nearest image; d1 / d2
        (tensor([ 0.7071, 50.0000], dtype=torch.float64), tensor([0.0071, 1.0000], dtype=torch.float64))
    """
    if isinstance(threshold, bool) or not (isinstance(threshold, numbers.Real) and 0 < threshold <= 1):
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    samples = as_2d(samples, "samples")
    train = as_2d(train, "train")
    if samples.shape[1] != train.shape[1]:
        raise ValueError(f"samples and train have different sizes per image: {samples.shape[1]} and {train.shape[1]}")
    if train.shape[0] < 2:
        raise ValueError("train needs at least 2 images (nearest and second nearest)")
    if isinstance(samples, np.ndarray):
        samples = torch.from_numpy(np.array(samples, dtype=np.float64))
    if device is None:
        device = samples.device
    x = samples.to(device=device, dtype=torch.float64)
    D = x.shape[1]
    bad = ~torch.isfinite(x).all(dim=1)
    if bool(bad.any()):
        raise ValueError(f"samples row {int(bad.nonzero()[0, 0])} contains NaN or Inf")

    best_d = best_i = None
    rows = LocalRows(train, torch.device(device), name="train")
    rows.scan(checksum=False)  # NaN / Inf rows of train
    for start, chunk in rows.chunks():
        d, i = knn(x, chunk, min(2, chunk.shape[0]))
        i = i + start
        if best_d is None:
            best_d, best_i = d, i
        else:  # keep the two smallest of the running pair and this chunk's
            d, pos = torch.topk(torch.cat([best_d, d], 1), 2, dim=1, largest=False, sorted=True)
            best_d, best_i = d, torch.cat([best_i, i], 1).gather(1, pos)
    dist = (best_d.double().cpu() / D).sqrt()
    d1, d2 = dist[:, 0], dist[:, 1]
    ratio = torch.where(d2 > 0, d1 / d2.clamp_min(1e-300), 0.0)
    memorized = ratio < threshold
    return MemorizationResult(fraction=float(memorized.double().mean()), mean_d1=float(d1.mean()), d1=d1, d2=d2,
                              ratio=ratio, memorized=memorized, nearest=best_i[:, 0].cpu(), threshold=float(threshold))
