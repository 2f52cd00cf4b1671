"""Training schedules derived from the optimal loss (docs/METHODS.md section 3, the paper's form).

- Loss weight: w(s) = a * min(1 / J*(s), w_max) + f(s) * 1[s < s*], with f a Gaussian bump in ln s,
  f(s) = h exp(-(ln s - ln c)^2 / (2 width^2)), and s* the noise level where J* leaves ~0
  (:func:`find_s_star`). 1/J* equalises the optimal loss across levels; the cap w_max keeps the
  weight finite where J* -> 0, and the bump adds weight back at the small levels the cap flattens.
- Adaptive noise sampling: p(s) proportional to w(s) (J_theta(s) - J*(s)), from the current per-level
  training loss J_theta on the same grid: levels with the largest weighted *reducible* loss are
  sampled most. :func:`sample_sigmas` draws s from such a tabulated density.

Our defaults where the paper leaves numbers open: s* is the smallest grid level with
J*(s) >= 1e-3 max J*; w_max = 1 / J*(s*); no bump (h = 0) unless asked; bump centre s*, width 0.5
in ln s. All J* values are interpolated from the table as in :mod:`.conversions`.
"""

from __future__ import annotations

import numbers
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .conversions import _check_table, _floats, _positive, _real, interpolate_log

__all__ = ["find_s_star", "loss_weight", "adaptive_density", "sample_sigmas"]


def find_s_star(sigmas, j_star, *, rel: float = 1e-3) -> float:
    """The smallest tabulated s with J*(s) >= rel * max J*: where J* leaves ~0.

    Examples:
        >>> import numpy as np
        >>> from diffkernels.optimal_loss import find_s_star
        >>> sigmas, j_star = np.array([0.01, 0.1, 1.0, 10.0]), np.array([1e-4, 0.01, 0.5, 1.0])
        >>> find_s_star(sigmas, j_star), find_s_star(sigmas, j_star, rel=0.1)
        (0.1, 1.0)
    """
    s, j = _check_table(sigmas, j_star)
    rel = _real(rel, "rel")
    if not 0 < rel < 1:
        raise ValueError(f"rel must be in (0, 1), got {rel}")
    above = np.flatnonzero(j >= rel * j.max())
    return float(s[above[0]])


def loss_weight(s, sigmas, j_star, *, a: float = 1.0, w_max: Optional[float] = None, bump_height: float = 0.0,
                bump_center: Optional[float] = None, bump_width: float = 0.5,
                s_star: Optional[float] = None) -> np.ndarray:
    """The paper's loss weight w(s) at the noise levels ``s`` (module docstring), from a J* table.

    Examples:
        >>> import numpy as np
        >>> from diffkernels.optimal_loss import loss_weight
        >>> sigmas, j_star = np.array([0.01, 0.1, 1.0, 10.0]), np.array([1e-4, 0.01, 0.5, 1.0])
        >>> loss_weight(sigmas, sigmas, j_star)  # 1 / J*, capped at 1 / J*(s*) = 100
        array([100., 100.,   2.,   1.])
    """
    s = _positive(s)
    s_star = find_s_star(sigmas, j_star) if s_star is None else _real(s_star, "s_star", positive=True)
    if w_max is None:
        w_max = 1.0 / float(interpolate_log(s_star, sigmas, j_star))
    a, w_max, bump_height, bump_width = (_real(v, name) for v, name in (
        (a, "a"), (w_max, "w_max"), (bump_height, "bump_height"), (bump_width, "bump_width")))
    if not (a > 0 and w_max > 0 and bump_width > 0 and bump_height >= 0):
        raise ValueError("need a > 0, w_max > 0, bump_width > 0 and bump_height >= 0")
    j = interpolate_log(s, sigmas, j_star)
    with np.errstate(divide="ignore"):
        inv = np.where(j > 0, 1.0 / np.maximum(j, 1e-300), np.inf)
    w = a * np.minimum(inv, w_max)
    if bump_height > 0:
        center = s_star if bump_center is None else _real(bump_center, "bump_center", positive=True)
        bump = bump_height * np.exp(-((np.log(s) - np.log(center)) ** 2) / (2.0 * bump_width**2))
        w = w + np.where(s < s_star, bump, 0.0)
    return w


def adaptive_density(sigmas, weight, j_theta, j_star, *, floor: float = 0.0) -> np.ndarray:
    """p(s) ~ w(s) max(J_theta(s) - J*(s), 0) + floor on the grid, normalised so that its integral
    over ln s (trapezoid) is 1; returned in the order of ``sigmas``. ``floor`` > 0 keeps every level reachable.

    Examples:
        >>> import numpy as np
        >>> from diffkernels.optimal_loss import adaptive_density
        >>> sigmas, j_star = np.array([0.01, 0.1, 1.0, 10.0]), np.array([1e-4, 0.01, 0.5, 1.0])
        >>> j_theta = j_star + np.array([0.0, 0.0, 0.5, 0.1])  # the model's current loss per level
        >>> density = adaptive_density(sigmas, np.ones(4), j_theta, j_star)
        >>> int(density.argmax())  # most draws where the reducible loss is largest
        2
    """
    s, j = _check_table(sigmas, j_star)
    order = np.argsort(_floats(sigmas, "sigmas").reshape(-1))
    w = _floats(weight, "weight").reshape(-1)
    jt = _floats(j_theta, "j_theta").reshape(-1)
    floor = _real(floor, "floor")
    if w.shape != s.shape or jt.shape != s.shape:
        raise ValueError("weight, j_theta and j_star must match sigmas in length")
    if not (np.isfinite(w).all() and np.isfinite(jt).all()):
        raise ValueError("weight and j_theta must be finite")
    w, jt = w[order], jt[order]
    if floor < 0 or (w < 0).any():
        raise ValueError("weights and floor must be >= 0")
    p = w * np.maximum(jt - j, 0.0) + floor
    area = float(np.sum(0.5 * (p[1:] + p[:-1]) * np.diff(np.log(s))))
    if not area > 0:
        raise ValueError("the density is zero everywhere: J_theta <= J* on the whole grid (use floor > 0)")
    out = np.empty_like(p)
    out[order] = p / area  # back in the caller's order of sigmas
    return out


def sample_sigmas(n: int, sigmas, density, *, generator: Optional[torch.Generator] = None,
                  device=None) -> Tensor:
    """Draw n noise levels from a density tabulated on ``sigmas``, piecewise linear in ln s (exact inverse CDF).

    Returns float32 s on ``device``. Pick an interval by its trapezoid mass, then invert the linear
    density on it: with end values a, b and uniform r, x = r (a + b) / (a + sqrt(a^2 + r (b^2 - a^2))).
    ``n`` = 0 gives an empty tensor.

    Examples:
        >>> import numpy as np
        >>> import torch
        >>> from diffkernels.optimal_loss import sample_sigmas
        >>> s = sample_sigmas(1000, [0.01, 1.0, 100.0], np.ones(3), generator=torch.Generator().manual_seed(0))
        >>> s.shape, s.dtype, bool(((s >= 0.01) & (s <= 100.0)).all())
        (torch.Size([1000]), torch.float32, True)
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    n = int(n)
    s, p = _check_table(sigmas, density)
    if (p < 0).any():
        raise ValueError("density must be >= 0")
    u = np.log(s)
    mass = 0.5 * (p[1:] + p[:-1]) * np.diff(u)
    if not mass.sum() > 0:
        raise ValueError("density has no mass")
    if n == 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    probs = torch.as_tensor(mass / mass.sum(), dtype=torch.float64)
    k = torch.multinomial(probs, n, replacement=True, generator=generator)
    r = torch.rand(n, generator=generator, dtype=torch.float64)
    a = torch.as_tensor(p[:-1], dtype=torch.float64)[k]
    b = torch.as_tensor(p[1:], dtype=torch.float64)[k]
    den = a + torch.sqrt(a * a + r * (b * b - a * a))
    x = torch.where(den > 0, r * (a + b) / den.clamp_min(1e-300), 0.0)  # den = 0 only for a = 0, r = 0
    lo = torch.as_tensor(u[:-1], dtype=torch.float64)[k]
    width = torch.as_tensor(np.diff(u), dtype=torch.float64)[k]
    return torch.exp(lo + x * width).to(device=device, dtype=torch.float32)
