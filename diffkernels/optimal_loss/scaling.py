"""Scaling-law fits with and without the optimal loss (METHODS.md section 3).

J(F) = beta F^alpha, and the paper's J(F) - J* = beta F^alpha (F: training compute), each fitted by
least squares on (ln F, ln y): ln y = ln beta + alpha ln F. R^2 is that regression's, in log space,
so the two fits' qualities are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .conversions import _floats, _real

__all__ = ["PowerLaw", "ScalingFit", "fit_power_law", "fit_scaling_law"]


@dataclass
class PowerLaw:
    """y = beta x^alpha with the log-space R^2 of the fit."""

    beta: float
    alpha: float
    r2: float

    def __call__(self, x):
        return self.beta * np.asarray(x, dtype=np.float64) ** self.alpha


@dataclass
class ScalingFit:
    """``plain``: J = beta F^alpha. ``gap``: J - J* = beta F^alpha (None without j_star).

    ``beta``, ``alpha``, ``r2`` are the plain fit's; ``beta_gap``, ``alpha_gap``, ``r2_gap`` the gap fit's.
    """

    plain: PowerLaw
    gap: Optional[PowerLaw]

    beta = property(lambda self: self.plain.beta)
    alpha = property(lambda self: self.plain.alpha)
    r2 = property(lambda self: self.plain.r2)
    beta_gap = property(lambda self: None if self.gap is None else self.gap.beta)
    alpha_gap = property(lambda self: None if self.gap is None else self.gap.alpha)
    r2_gap = property(lambda self: None if self.gap is None else self.gap.r2)


def fit_power_law(x, y) -> PowerLaw:
    """Least squares of ln y on ln x; x, y > 0, at least 2 distinct x."""
    x = _floats(x, "x").reshape(-1)
    y = _floats(y, "y").reshape(-1)
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"need two 1-D arrays of the same length >= 2, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all() and (x > 0).all() and (y > 0).all()):
        raise ValueError("power-law fit needs finite positive values")
    lx, ly = np.log(x), np.log(y)
    if np.ptp(lx) == 0:
        raise ValueError("need at least two distinct x values")
    alpha, log_beta = np.polyfit(lx, ly, 1)
    resid = ly - (log_beta + alpha * lx)
    ss_tot = float(np.sum((ly - ly.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else 1.0
    return PowerLaw(beta=float(np.exp(log_beta)), alpha=float(alpha), r2=r2)


def fit_scaling_law(compute, loss, j_star: Optional[float] = None) -> ScalingFit:
    """Fit J = beta F^alpha, and with ``j_star`` also J - J* = beta F^alpha (every J must exceed J*)."""
    plain = fit_power_law(compute, loss)
    gap = None
    if j_star is not None:
        j_star = _real(j_star, "j_star")
        gap_values = _floats(loss, "loss").reshape(-1) - j_star
        if not (gap_values > 0).all():
            raise ValueError(f"every loss must exceed j_star = {j_star} to fit J - J* (got min {gap_values.min() + j_star})")
        gap = fit_power_law(compute, gap_values)
    return ScalingFit(plain=plain, gap=gap)
