"""Paired statistics for comparing methods over seeds (used by reproduce.py).

Runs of one seed share the initialisation, the data subset or a checkpoint, so methods are compared
on the per-seed differences d_i (signed so that d > 0 is the claimed improvement):

- :func:`paired_test`: one-sided paired t-test of H0: mean d <= 0 against H1: mean d > 0, with
  t = mean(d) / (sd(d) / sqrt(n)), df = n - 1, and the two-sided 95% t-interval of mean d.
- :func:`noninferiority`: one-sided paired t-test of H0: mean d <= -margin ("worse by more than the
  margin") against H1: mean d > -margin; t = (mean(d) + margin) / se. Significant = non-inferior.
- :func:`seeds_needed` / :func:`power`: seeds a one-sided paired t-test needs to detect a
  standardised effect d_z = mean(d) / sd(d) with the given power (noncentral t distribution:
  power = P(T'_{n-1, d_z sqrt(n)} > t_{1-a, n-1})).

Needs scipy (the ``examples`` extra).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as _st

LEVEL = 0.05  # one-sided significance level of every verdict


@dataclass
class PairedResult:
    """A paired one-sided test: ``mean`` and ``se`` of the differences d, ``t``, ``df``, one-sided
    ``p``, the two-sided 95% interval (``ci_low``, ``ci_high``) of mean d, and the ``margin`` tested
    against (0 for superiority)."""

    n: int
    mean: float
    se: float
    t: float
    df: int
    p: float
    ci_low: float
    ci_high: float
    margin: float = 0.0

    @property
    def significant(self) -> bool:
        return self.p < LEVEL

    def describe(self, digits: int = 3) -> str:
        what = "paired difference" if self.margin == 0 else f"paired difference (margin {self.margin:.{digits}g})"
        if self.n < 2:
            return f"{what} {self.mean:.{digits}g}, n = {self.n}: no test with one seed"
        return (f"{what} {self.mean:.{digits}g} ± {self.se:.2g} s.e., 95% CI [{self.ci_low:.{digits}g}, "
                f"{self.ci_high:.{digits}g}], one-sided paired t-test p = {self.p:.2g} (n = {self.n})")


def _differences(treatment, control, higher_is_better: bool) -> np.ndarray:
    a = np.asarray(treatment, dtype=np.float64).reshape(-1)
    b = np.asarray(control, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"treatment and control must be paired (same length), got {a.size} and {b.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("treatment and control must be finite")
    return a - b if higher_is_better else b - a


def _test(d: np.ndarray, margin: float) -> PairedResult:
    n = d.size
    mean = float(d.mean()) if n else float("nan")
    if n < 2:
        return PairedResult(n, mean, float("nan"), float("nan"), max(n - 1, 0), float("nan"), float("nan"),
                            float("nan"), margin)
    se = float(d.std(ddof=1) / math.sqrt(n))
    df = n - 1
    shifted = mean + margin
    if se == 0:  # identical differences: the sign decides (the t statistic is +-inf or undefined)
        t = math.copysign(math.inf, shifted) if shifted != 0 else float("nan")
        p = 0.0 if shifted > 0 else 1.0
        return PairedResult(n, mean, 0.0, t, df, p, mean, mean, margin)
    t = shifted / se
    half = float(_st.t.ppf(0.975, df)) * se
    return PairedResult(n, mean, se, t, df, float(_st.t.sf(t, df)), mean - half, mean + half, margin)


def paired_test(treatment, control, *, higher_is_better: bool = False) -> PairedResult:
    """Is ``treatment`` better than ``control``? Paired by position (seed order); lower is better
    unless ``higher_is_better``. d = control - treatment (or treatment - control)."""
    return _test(_differences(treatment, control, higher_is_better), 0.0)


def noninferiority(treatment, control, margin: float, *, higher_is_better: bool = False) -> PairedResult:
    """Is ``treatment`` not worse than ``control`` by more than ``margin`` (> 0, in the metric's units)?"""
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin > 0):
        raise ValueError(f"margin must be a finite number > 0, got {margin!r}")
    return _test(_differences(treatment, control, higher_is_better), float(margin))


def power(effect_size: float, n: int, *, level: float = LEVEL) -> float:
    """Power of the one-sided paired t-test with n seeds at standardised effect d_z = ``effect_size``."""
    if n < 2:
        return float("nan")
    df = n - 1
    return float(_st.nct.sf(_st.t.ppf(1 - level, df), df, effect_size * math.sqrt(n)))


def seeds_needed(effect_size: float, *, target_power: float = 0.8, level: float = LEVEL,
                 max_seeds: int = 2000) -> float:
    """The fewest seeds (>= 2) for which the one-sided paired t-test detects d_z = ``effect_size``
    with ``target_power``; inf for d_z <= 0 or beyond ``max_seeds``."""
    if not 0 < target_power < 1 or not 0 < level < 1:
        raise ValueError("target_power and level must lie in (0, 1)")
    if not effect_size > 0:
        return math.inf
    for n in range(2, max_seeds + 1):  # power grows with n: the first n that reaches the target
        if power(effect_size, n, level=level) >= target_power:
            return n
    return math.inf


def effect_size(treatment, control, *, higher_is_better: bool = False) -> float:
    """The observed standardised paired effect d_z = mean(d) / sd(d) (nan with < 2 seeds or sd = 0)."""
    d = _differences(treatment, control, higher_is_better)
    if d.size < 2 or d.std(ddof=1) == 0:
        return float("nan")
    return float(d.mean() / d.std(ddof=1))


def detectable_effect(n: int, *, target_power: float = 0.8, level: float = LEVEL) -> float:
    """The smallest d_z that n seeds detect with ``target_power`` (one-sided paired t-test); inf for n < 2."""
    if n < 2:
        return math.inf
    from scipy.optimize import brentq

    return float(brentq(lambda d: power(d, n, level=level) - target_power, 1e-6, 1e3, xtol=1e-10))
