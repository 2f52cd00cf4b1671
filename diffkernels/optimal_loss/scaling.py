"""Scaling-law fits with and without the optimal loss (docs/METHODS.md section 3).

Three laws of the loss J against training compute F:

- plain: J = beta F^alpha;
- gap:   J - J* = beta F^alpha with the optimal loss J* given (the paper's form);
- free:  J = beta F^alpha + c with the constant c fitted (the usual total-loss law, 0 <= c < min J).

The plain and gap laws are least squares of ln y on ln F (linear). The free law minimises the same
log-space residuals sum (ln J - ln(beta F^alpha + c))^2, by a profile search over c (for each c the
linear fit of ln(J - c)) followed by Gauss-Newton on (ln beta, alpha, c). Every R^2 is
1 - sum(ln J - ln J_fit)^2 / sum(ln J - mean ln J)^2, so the three fits' qualities are comparable.
(For the plain and gap laws that is the regression's own R^2; the gap law's residuals are
in ln(J - J*), the quantity it models.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .conversions import _floats, _real

__all__ = ["PowerLaw", "OffsetPowerLaw", "ScalingFit", "fit_power_law", "fit_offset_power_law", "fit_scaling_law"]


@dataclass
class PowerLaw:
    """y = beta x^alpha with the log-space R^2 of the fit.

    Examples:
        >>> from diffkernels.optimal_loss import fit_power_law
        >>> fit = fit_power_law([1.0, 2.0, 4.0], [2.0, 1.0, 0.5])
        >>> type(fit).__name__, round(fit.alpha, 6)
        ('PowerLaw', -1.0)
    """

    beta: float
    alpha: float
    r2: float

    def __call__(self, x):
        return self.beta * np.asarray(x, dtype=np.float64) ** self.alpha


@dataclass
class OffsetPowerLaw:
    """y = beta x^alpha + c with the log-space R^2 of the fit (residuals ln y - ln(beta x^alpha + c)).

    Examples:
        >>> import numpy as np
        >>> from diffkernels.optimal_loss import fit_offset_power_law
        >>> x = np.array([1.0, 2.0, 4.0, 8.0])
        >>> fit = fit_offset_power_law(x, 1 / x + 0.5)
        >>> type(fit).__name__, round(fit.c, 4)
        ('OffsetPowerLaw', 0.5)
    """

    beta: float
    alpha: float
    c: float
    r2: float

    def __call__(self, x):
        return self.beta * np.asarray(x, dtype=np.float64) ** self.alpha + self.c


@dataclass
class ScalingFit:
    """``plain``: J = beta F^alpha. ``gap``: J - J* = beta F^alpha (None without j_star).
    ``free``: J = beta F^alpha + c with c fitted (None with fewer than 4 points).

    ``beta``, ``alpha``, ``r2`` are the plain fit's; ``beta_gap``, ``alpha_gap``, ``r2_gap`` the gap fit's.

    Examples:
        >>> import numpy as np
        >>> from diffkernels.optimal_loss import fit_scaling_law
        >>> compute = np.array([1e18, 1e19, 1e20])
        >>> fit = fit_scaling_law(compute, 2.0 * compute**-0.05)
        >>> round(fit.plain.alpha, 4), fit.gap is None, fit.free is None  # no j_star; < 4 points
        (-0.05, True, True)
    """

    plain: PowerLaw
    gap: Optional[PowerLaw]
    free: Optional[OffsetPowerLaw] = None

    beta = property(lambda self: self.plain.beta)
    alpha = property(lambda self: self.plain.alpha)
    r2 = property(lambda self: self.plain.r2)
    beta_gap = property(lambda self: None if self.gap is None else self.gap.beta)
    alpha_gap = property(lambda self: None if self.gap is None else self.gap.alpha)
    r2_gap = property(lambda self: None if self.gap is None else self.gap.r2)


def fit_power_law(x, y) -> PowerLaw:
    """Least squares of ln y on ln x; x, y > 0, at least 2 distinct x.

    Examples:
        >>> import numpy as np
        >>> from diffkernels.optimal_loss import fit_power_law
        >>> x = np.array([1.0, 10.0, 100.0])
        >>> fit = fit_power_law(x, 3.0 * x**-0.5)
        >>> round(fit.beta, 6), round(fit.alpha, 6), round(fit.r2, 6)
        (3.0, -0.5, 1.0)
    """
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


def _r2(ly, fitted) -> float:
    ss_tot = float(np.sum((ly - ly.mean()) ** 2))
    return 1.0 - float(np.sum((ly - fitted) ** 2)) / ss_tot if ss_tot > 0 else 1.0


def fit_offset_power_law(x, y, *, iterations: int = 50) -> OffsetPowerLaw:
    """Least squares of ln y against ln(beta x^alpha + c) with 0 <= c < min y; x, y > 0, >= 4 points.

    Examples:
        >>> import numpy as np
        >>> from diffkernels.optimal_loss import fit_offset_power_law
        >>> x = np.array([1e18, 1e19, 1e20, 1e21])
        >>> fit = fit_offset_power_law(x, 3 * x**-0.1 + 0.2)
        >>> round(fit.beta, 4), round(fit.alpha, 4), round(fit.c, 4)
        (3.0, -0.1, 0.2)
    """
    x = _floats(x, "x").reshape(-1)
    y = _floats(y, "y").reshape(-1)
    if x.shape != y.shape or x.size < 4:
        raise ValueError(f"need two 1-D arrays of the same length >= 4 (3 parameters), got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all() and (x > 0).all() and (y > 0).all()):
        raise ValueError("power-law fit needs finite positive values")
    lx, ly = np.log(x), np.log(y)
    if np.ptp(lx) == 0:
        raise ValueError("need at least two distinct x values")
    x0 = float(np.exp(lx.mean()))  # fit in x / x0: keeps ln beta and alpha decorrelated
    u = lx - np.log(x0)
    y_min = float(y.min())

    def linear(c):  # (log beta0, alpha, log-space sse) of the linear fit of ln(y - c) on u
        alpha, lb = np.polyfit(u, np.log(y - c), 1)
        return lb, alpha, float(np.sum((ly - np.log(np.exp(lb + alpha * u) + c)) ** 2))

    # Profile over c: uniform in [0, y_min) and geometrically close to y_min (c -> y_min is where
    # a nearly flat tail puts it), then refine the best by Gauss-Newton on all three parameters.
    cs = np.concatenate([np.linspace(0.0, 0.99, 100), 1.0 - np.geomspace(1e-2, 1e-9, 50)]) * y_min
    c, lb, alpha, sse = min(((float(c),) + linear(c) for c in cs), key=lambda r: r[3])
    lam = 1e-3
    for _ in range(iterations):
        pw = np.exp(lb + alpha * u)
        model = pw + c
        r = ly - np.log(model)
        jac = np.stack([pw / model, pw * u / model, 1.0 / model], axis=1)
        step = np.linalg.solve(jac.T @ jac + lam * np.diag(np.diag(jac.T @ jac)), jac.T @ r)
        nlb, nal, nc = lb + step[0], alpha + step[1], min(max(c + step[2], 0.0), y_min * (1 - 1e-12))
        nsse = float(np.sum((ly - np.log(np.exp(nlb + nal * u) + nc)) ** 2))
        if nsse <= sse:
            converged = sse - nsse <= 1e-15 * max(sse, 1e-300)
            lb, alpha, c, sse, lam = nlb, nal, nc, nsse, lam * 0.3
            if converged:
                break
        else:
            lam *= 10.0
    fitted = np.log(np.exp(lb + alpha * u) + c)
    return OffsetPowerLaw(beta=float(np.exp(lb - alpha * np.log(x0))), alpha=float(alpha), c=float(c),
                          r2=_r2(ly, fitted))


def fit_scaling_law(compute, loss, j_star: Optional[float] = None) -> ScalingFit:
    """Fit J = beta F^alpha, with ``j_star`` also J - J* = beta F^alpha (every J must exceed J*), and
    with at least 4 points J = beta F^alpha + c (:func:`fit_offset_power_law`).

    Examples:
        Losses J = J* + 3 F^-0.1 with J* = 0.2: the gap J - J* is an exact power law.

        >>> import numpy as np
        >>> from diffkernels.optimal_loss import fit_scaling_law
        >>> compute = np.array([1e18, 1e19, 1e20, 1e21])
        >>> fit = fit_scaling_law(compute, 0.2 + 3 * compute**-0.1, j_star=0.2)
        >>> round(fit.alpha_gap, 4), round(fit.beta_gap, 4)
        (-0.1, 3.0)
        >>> round(fit.alpha, 4)  # the plain power law, fitted to J, hides the exponent
        -0.0146
    """
    plain = fit_power_law(compute, loss)
    free = fit_offset_power_law(compute, loss) if np.size(compute) >= 4 else None
    gap = None
    if j_star is not None:
        j_star = _real(j_star, "j_star")
        gap_values = _floats(loss, "loss").reshape(-1) - j_star
        if not (gap_values > 0).all():
            raise ValueError(f"every loss must exceed j_star = {j_star} to fit J - J* (got min {gap_values.min() + j_star})")
        gap = fit_power_law(compute, gap_values)
    return ScalingFit(plain=plain, gap=gap, free=free)
