"""From the x0-loss J*(s) to other parameterisations, processes and training schedules (docs/METHODS.md section 3).

Every process x_t = alpha_t x0 + sigma_t eps has the same posterior of x0 as the VE process
x = x0 + s eps with s = sigma_t / alpha_t, so J*(s) of the VE process is the optimal x0-loss of all
of them. The optimal loss of another prediction target is J*(s) times a factor (:func:`loss_factor`):

    x0 (data)                  1
    eps (noise)                1 / s^2
    score (VE, grad log p_s)   1 / s^4
    velocity (flow matching)   (1 + s)^2 / s^2      (v = eps - x0 with x_t = (1 - t) x0 + t eps)
    EDM F (network output)     (s^2 + sd^2) / (s sd)^2 = 1 / c_out(s)^2 = EDM's lambda(s)
    vp_score (VP, grad log p)  (1 + s^2) / s^4      (score = -eps / sigma_t, sigma_t^2 = s^2 / (1 + s^2))
    vp_v (VP v-prediction)     (1 + s^2) / s^2      (v = alpha_t eps - sigma_t x0: its error is the x0 error / sigma_t)

For VP (alpha_t^2 + sigma_t^2 = 1) the eps target is the same as VE's (factor 1 / s^2); its score
is eps's divided by sigma_t, and v's error is -(alpha_t^2 / sigma_t + sigma_t) (x0 error) = -(x0 error) / sigma_t.

The total optimal loss of a training schedule, E_{s ~ p(s)}[weight(s) * J*(s)], comes from
:func:`schedule_loss`. Quadrature: J* is tabulated on a grid of s; between grid points it is interpolated
in u = ln s, geometrically (ln J* linear in u, exact for power laws) where both neighbours are > 0
and linearly otherwise (J* = 0 at tiny s), extended as a constant above the grid (J* saturates at tr Cov) and
as J*(s_min) (s / s_min)^2 below it (the small-s law of a smooth density; for finite data J*
falls faster, so this tail is an upper bound and tiny anyway). The expectation is written as an
integral over u against the schedule's density in u and evaluated with the trapezoid rule on
``num_points`` equally spaced u over a range that leaves out less than ~1e-12 of the probability.
With 64 grid points over six decades the error is ~2e-3 relative, with 2000 points ~1e-6 (tests).
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

import numpy as np

from .. import edm

__all__ = [
    "TARGETS",
    "loss_factor",
    "s_from_ve",
    "s_from_vp",
    "s_from_flow",
    "flow_t_from_s",
    "interpolate_log",
    "schedule_loss",
    "edm_schedule_loss",
    "flow_matching_schedule_loss",
    "EDM_P_MEAN",
    "EDM_P_STD",
    "EDM_SIGMA_DATA",
]

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz

TARGETS = ("x0", "eps", "score", "velocity", "edm", "vp_score", "vp_v")
# EDM's training distribution of log sigma and its data scale, from the one home of the EDM constants.
EDM_P_MEAN, EDM_P_STD, EDM_SIGMA_DATA = edm.P_MEAN, edm.P_STD, edm.SIGMA_DATA


def _floats(x, name: str) -> np.ndarray:
    """``x`` (a number, sequence, numpy array or CPU tensor) as a float64 array; TypeError for anything
    that is not real numbers (strings such as "0.5", booleans, objects) instead of a silent conversion."""
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu()
    a = np.asarray(x)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be real numbers, got {a.dtype} ({type(x).__name__})")
    return a.astype(np.float64)


def _real(value, name: str, positive: bool = False) -> float:
    """A finite Python float from a Python or numpy real scalar (not bool or str); > 0 if ``positive``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and not value > 0):
        raise ValueError(f"{name} must be finite{' and > 0' if positive else ''}, got {value}")
    return value


def _positive(s, name="s") -> np.ndarray:
    s = _floats(s, name)
    if not (np.isfinite(s).all() and (s > 0).all()):
        raise ValueError(f"{name} must be finite and > 0")
    return s


def loss_factor(s, target: str, *, sigma_data: float = EDM_SIGMA_DATA) -> np.ndarray:
    """Multiply the x0-loss at VE noise level ``s`` by this to get the loss of ``target`` (table above).

    Examples:
        >>> from diffkernels.optimal_loss import loss_factor
        >>> loss_factor([0.5, 1.0], "eps")  # eps-loss = J*(s) / s^2
        array([4., 1.])
        >>> float(loss_factor(2.0, "velocity"))  # (1 + s)^2 / s^2
        2.25
    """
    s = _positive(s)
    if target == "x0":
        return np.ones_like(s)
    if target == "eps":
        return 1.0 / s**2
    if target == "score":
        return 1.0 / s**4
    if target == "velocity":
        return (1.0 + s) ** 2 / s**2
    if target == "edm":
        sigma_data = _real(sigma_data, "sigma_data", positive=True)
        return (s**2 + sigma_data**2) / (s * sigma_data) ** 2
    if target == "vp_score":
        return (1.0 + s**2) / s**4
    if target == "vp_v":
        return (1.0 + s**2) / s**2
    raise ValueError(f"target must be one of {TARGETS}, got {target!r}")


def s_from_ve(sigma) -> np.ndarray:
    """VE: x = x0 + sigma eps, so s = sigma.

    Examples:
        >>> from diffkernels.optimal_loss import s_from_ve
        >>> s_from_ve([0.1, 1.0])
        array([0.1, 1. ])
    """
    return _positive(sigma, "sigma")


def s_from_vp(*, sigma=None, alpha=None) -> np.ndarray:
    """VP (alpha^2 + sigma^2 = 1): s = sigma / alpha, from either sigma or alpha in (0, 1).

    Examples:
        >>> from diffkernels.optimal_loss import s_from_vp
        >>> round(float(s_from_vp(sigma=0.6)), 6), round(float(s_from_vp(alpha=0.8)), 6)  # alpha = 0.8: s = 0.6 / 0.8
        (0.75, 0.75)
    """
    if (sigma is None) == (alpha is None):
        raise ValueError("give exactly one of sigma and alpha")
    v = _floats(sigma, "sigma") if sigma is not None else _floats(alpha, "alpha")
    if not ((v > 0).all() and (v < 1).all()):
        raise ValueError("VP sigma / alpha must lie in (0, 1)")
    other = np.sqrt(1.0 - v**2)
    return v / other if sigma is not None else other / v


def s_from_flow(t) -> np.ndarray:
    """Flow matching x_t = (1 - t) x0 + t eps, t in (0, 1): s = t / (1 - t).

    Examples:
        >>> from diffkernels.optimal_loss import s_from_flow
        >>> s_from_flow([0.5, 0.75])  # t / (1 - t)
        array([1., 3.])
    """
    t = _floats(t, "t")
    if not ((t > 0).all() and (t < 1).all()):
        raise ValueError("flow-matching t must lie in (0, 1)")
    return t / (1.0 - t)


def flow_t_from_s(s) -> np.ndarray:
    """The inverse of :func:`s_from_flow`: t = s / (1 + s), for s > 0.

    Examples:
        >>> from diffkernels.optimal_loss import flow_t_from_s
        >>> flow_t_from_s([1.0, 3.0])  # s / (1 + s), the inverse of s_from_flow
        array([0.5 , 0.75])
    """
    s = _positive(s)
    return s / (1.0 + s)


def _check_table(sigmas, j_star) -> tuple[np.ndarray, np.ndarray]:
    s = _positive(sigmas, "sigmas").reshape(-1)
    j = _floats(j_star, "j_star").reshape(-1)
    if s.shape != j.shape or s.size < 2:
        raise ValueError(f"sigmas and j_star must be 1-D of the same length >= 2, got {s.shape} and {j.shape}")
    if not np.isfinite(j).all():
        raise ValueError("j_star must be finite")
    order = np.argsort(s)
    s, j = s[order], j[order]
    if np.any(np.diff(s) == 0):
        raise ValueError("sigmas must be distinct")
    return s, j


def interpolate_log(s, sigmas, j_star) -> np.ndarray:
    """J*(s) from a table: inside the grid, ln J* linear in ln s where both neighbours are > 0 (else J*
    linear in ln s); constant above the grid, ~s^2 below it (module docstring).

    Examples:
        >>> import numpy as np
        >>> from diffkernels.optimal_loss import interpolate_log
        >>> sigmas, j_star = np.array([0.1, 1.0, 10.0]), np.array([0.01, 0.5, 1.0])
        >>> interpolate_log([1.0, 100.0, 0.01], sigmas, j_star).round(6).tolist()  # on the grid, above it, below (~s^2)
        [0.5, 1.0, 0.0001]
    """
    grid, j = _check_table(sigmas, j_star)
    s = _positive(s)
    u, ug = np.log(s), np.log(grid)
    linear = np.interp(u, ug, j)
    # Where both neighbours are > 0, interpolate ln J* instead: exact for power laws (J* ~ s^2 at
    # small s, constant at large s), a 64-level grid then gives ~2e-3 instead of ~1e-2 error in a schedule total.
    positive = j > 0
    k = np.clip(np.searchsorted(ug, u) - 1, 0, len(ug) - 2)
    both = positive[k] & positive[k + 1]
    with np.errstate(divide="ignore"):
        geometric = np.exp(np.interp(u, ug, np.log(np.where(positive, j, 1.0))))
    out = np.where(both, geometric, linear)
    below = s < grid[0]
    return np.where(below, j[0] * (s / grid[0]) ** 2, out)


def schedule_loss(sigmas, j_star, log_density: Callable[[np.ndarray], np.ndarray],
                  weight: Callable[[np.ndarray], np.ndarray], u_range: tuple[float, float],
                  num_points: int = 200_001) -> float:
    """E_s[weight(s) J*(s)] = integral over u = ln s of density(u) weight(e^u) J*(e^u) du (trapezoid).

    ``log_density(u)``: the log of the schedule's density of u = ln s (it must integrate to 1);
    ``u_range``: where to integrate (outside it the density must be negligible).

    Examples:
        J*(s) = 1, weight 1, ln s ~ N(0, 1), integrated over ln s in [-1, 1] only: P(|ln s| < 1).

        >>> import numpy as np
        >>> from diffkernels.optimal_loss import schedule_loss
        >>> sigmas, j_star = np.array([0.1, 1.0, 10.0]), np.ones(3)
        >>> log_density = lambda u: -0.5 * np.log(2 * np.pi) - u**2 / 2
        >>> round(schedule_loss(sigmas, j_star, log_density, np.ones_like, (-1.0, 1.0)), 4)
        0.6827
    """
    u = np.linspace(u_range[0], u_range[1], num_points)
    s = np.exp(u)
    f = np.exp(log_density(u)) * weight(s) * interpolate_log(s, sigmas, j_star)
    return float(_trapezoid(f, u))


def edm_schedule_loss(sigmas, j_star, *, p_mean: float = EDM_P_MEAN, p_std: float = EDM_P_STD,
                      sigma_data: float = EDM_SIGMA_DATA) -> float:
    """EDM's optimal training loss: ln s ~ N(p_mean, p_std^2), weight lambda(s) = (s^2 + sd^2)/(s sd)^2.

    Equal to EDM's loss E[lambda ||D - x0||^2] (= E||F - F_target||^2) at the optimum. Use J* per
    element for EDM's per-element mean loss.

    Examples:
        >>> import numpy as np
        >>> from diffkernels.optimal_loss import edm_schedule_loss
        >>> sigmas = np.array([0.01, 0.1, 1.0, 10.0])
        >>> j_star = np.array([1e-4, 0.01, 0.5, 1.0])  # J* per element
        >>> round(edm_schedule_loss(sigmas, j_star), 3)  # the lowest loss EDM training can log
        1.393
    """
    p_mean = _real(p_mean, "p_mean")
    p_std = _real(p_std, "p_std", positive=True)

    def log_density(u):
        return -0.5 * ((u - p_mean) / p_std) ** 2 - math.log(p_std * math.sqrt(2.0 * math.pi))

    return schedule_loss(sigmas, j_star, log_density, lambda s: loss_factor(s, "edm", sigma_data=sigma_data),
                         (p_mean - 8.0 * p_std, p_mean + 8.0 * p_std))


def flow_matching_schedule_loss(sigmas, j_star) -> float:
    """Flow matching's optimal velocity loss with t ~ U(0, 1): E_t[(1 + s)^2 / s^2 J*(s)], s = t / (1 - t).

    In u = ln s = logit(t), uniform t has the logistic density t (1 - t).

    Examples:
        >>> import numpy as np
        >>> from diffkernels.optimal_loss import flow_matching_schedule_loss
        >>> sigmas = np.array([0.01, 0.1, 1.0, 10.0])
        >>> round(flow_matching_schedule_loss(sigmas, np.array([1e-4, 0.01, 0.5, 1.0])), 3)
        1.345
    """

    def log_density(u):
        return -np.logaddexp(0.0, u) - np.logaddexp(0.0, -u)

    return schedule_loss(sigmas, j_star, log_density, lambda s: loss_factor(s, "velocity"), (-40.0, 40.0))
