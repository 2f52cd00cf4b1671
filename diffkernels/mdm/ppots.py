"""P-POTS: the masking-rate sampler t ~ p(t), weight 1/p(t), with p estimated before training.

:func:`estimate_ppots_grid` measures, on a grid of t, the mean loss and its variance over masks
(:class:`PPOTSGrid`); :func:`fit_epr` optionally fits a smooth parametric density to it
(:class:`EPRFit`); :class:`PPOTSSampler` draws from either. The sampler follows the contract of
:class:`~diffkernels.mdm.samplers.TimeSampler` (seeds, the global batch sliced by rank and
micro-batch, t in [0, 1)); the other samplers are in :mod:`diffkernels.mdm.samplers`.

One module on purpose: the grid estimate, the parametric fit and the sampler are the steps of one
method, each consuming the previous one's result (a third of the lines are docstrings and examples).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from .._validate import check_seed
from ..rng import fold_seed
from .samplers import _F64, TimeSampler, _check_int, _check_k, _check_unit, _stratified_uniforms

__all__ = ["PPOTSGrid", "EPRFit", "PPOTSSampler", "estimate_ppots_grid", "fit_epr"]

# Stream tags folded into the user's seed (arbitrary constants; changing them changes every draw).
_GRID_EXAMPLES = 0x7047_5845  # which examples estimate_ppots_grid evaluates
_GRID_MASKS = 0x7047_4D4B  # the mask seeds handed to loss_fn
_FIT_RESTARTS = 0x6570_7266  # fit_epr's random starting points


# --- P-POTS: estimate the optimal density on a grid ---------------------------------------------


def _as_vector(x, name: str) -> Tensor:
    x = torch.as_tensor(x, dtype=_F64).detach().cpu()
    if x.dim() != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite")
    return x


@dataclass
class PPOTSGrid:
    """P-POTS statistics on the t grid (float64 CPU tensors of equal length).

    ``t``: the grid; ``g``: mean loss at each t; ``v``: mean over examples of the within-example
    variance of the loss over masks; ``w = sqrt(g**2 + v)``: the optimal density, unnormalised.

    Examples:
        >>> from diffkernels.mdm import estimate_ppots_grid
        >>> grid = estimate_ppots_grid(lambda x, t, seed: x / t, [1.0, 2.0], T=5, a=2, c=2, progress=False)
        >>> grid.t.tolist()
        [0.2, 0.4, 0.6, 0.8]
        >>> grid.w.shape, bool((grid.w > 0).all())
        (torch.Size([4]), True)
    """

    t: Tensor
    g: Tensor
    v: Tensor
    w: Tensor

    def __post_init__(self):
        self.t, self.g, self.v, self.w = (_as_vector(getattr(self, f), f"grid.{f}") for f in ("t", "g", "v", "w"))
        if not (self.t.numel() == self.g.numel() == self.v.numel() == self.w.numel()):
            raise ValueError("grid.t, grid.g, grid.v and grid.w must have the same length")
        if self.t.numel() == 0:
            raise ValueError("the grid must have at least one point")
        if not bool(((self.t > 0) & (self.t < 1)).all()) or not bool((self.t[1:] > self.t[:-1]).all()):
            raise ValueError("grid.t must be strictly increasing inside (0, 1)")


def _as_loss(value) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        return float(value.item())
    if isinstance(value, numbers.Real):
        return float(value)
    shape = f" of shape {tuple(value.shape)}" if isinstance(value, Tensor) else ""
    raise TypeError(f"loss_fn must return a float (or a one-element tensor), got {type(value).__name__}{shape}")


def estimate_ppots_grid(loss_fn: Callable[[Any, float, int], Any], examples: Sequence, T: int = 70, a: int = 15,
                        c: int = 15, seed: int = 0, progress: bool = True) -> PPOTSGrid:
    """Estimate g(t), v(t) and the P-POTS weight w(t) = sqrt(g(t)^2 + v(t)) on a grid.

    Run once before training, with the initial model (the paper's default T=70, a=15, c=15).

    - Grid: t_j = linspace(1/T, 1 - 1/T, T - 1), away from 0 and 1 where losses blow up or vanish.
    - ``a`` examples are drawn from ``examples`` (anything with ``len`` and integer indexing, e.g. a
      list, dataset or tensor) without replacement, once, and the *same* examples are used at every
      t_j (as in the reference code): the data noise is then common to all grid points and does
      not distort the shape of w(t), which is all the sampler uses.
    - At each t_j, each example is evaluated ``c`` times, ``loss_fn(example, t_j, mask_seed)``
      -> float: the per-sequence loss at masking rate t_j with the mask drawn from ``mask_seed``
      (fresh for every grid point, example and repetition; derived with ``fold_seed`` from ``seed``).
    - g_j = mean of the a*c losses; v_j = mean over examples of the unbiased variance over the c
      masks (needs c >= 2); w_j = sqrt(g_j^2 + v_j). As in the paper, g_j^2 squares the mean over
      examples, so w leaves out the between-example variance of g(x0, t) that the exact optimum,
      sqrt(E[loss^2 | t]), would also contain.

    ``loss_fn`` runs under ``torch.no_grad()``. The result is a deterministic function of ``seed``
    if ``loss_fn`` is, so every rank can compute it, or one rank can compute and broadcast it.

    Examples:
        A loss that falls as 1/t, evaluated on 4 examples at T - 1 = 9 rates:

        >>> from diffkernels.mdm import PPOTSSampler, estimate_ppots_grid
        >>> def loss_fn(example, t, mask_seed):
        ...     return example / t
        >>> grid = estimate_ppots_grid(loss_fn, [1.0, 2.0, 3.0, 4.0], T=10, a=4, c=2, progress=False)
        >>> grid.t.shape, round(float(grid.g[0]), 4)  # g(0.1) = mean(example) / 0.1
        (torch.Size([9]), 25.0)
        >>> sampler = PPOTSSampler.from_grid(grid, mix=0.1)
        >>> t, w = sampler.sample(8, seed=0)
        >>> t.shape
        torch.Size([8])
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    T = _check_int(T, "T", minimum=2)
    a = _check_int(a, "a", minimum=1)
    c = _check_int(c, "c", minimum=2)
    try:
        num_examples = len(examples)
    except TypeError:
        raise TypeError(f"examples must support len() and integer indexing, got {type(examples).__name__}") from None
    if a > num_examples:
        raise ValueError(f"a must be <= len(examples)={num_examples} (examples are drawn without replacement), got {a}")
    check_seed(seed)

    gen = torch.Generator(device="cpu")
    gen.manual_seed(fold_seed(seed, _GRID_EXAMPLES))
    chosen = torch.randperm(num_examples, generator=gen)[:a].tolist()
    picked = [examples[i] for i in chosen]
    t_grid = torch.linspace(1.0 / T, 1.0 - 1.0 / T, T - 1, dtype=_F64)

    from tqdm.auto import tqdm

    losses = torch.empty(T - 1, a, c, dtype=_F64)
    mask_root = fold_seed(seed, _GRID_MASKS)
    with torch.no_grad(), tqdm(total=(T - 1) * a * c, desc="P-POTS grid", disable=not progress) as bar:
        for j, t in enumerate(t_grid.tolist()):
            seed_j = fold_seed(mask_root, j)
            for i, example in enumerate(picked):
                seed_ji = fold_seed(seed_j, i)
                for m in range(c):
                    value = _as_loss(loss_fn(example, t, fold_seed(seed_ji, m)))
                    if not math.isfinite(value):
                        raise ValueError(f"loss_fn returned {value} at t={t:.6g} for example {chosen[i]}")
                    losses[j, i, m] = value
                bar.update(c)
    g = losses.mean(dim=(1, 2))
    v = losses.var(dim=2, correction=1).mean(dim=1)
    return PPOTSGrid(t=t_grid, g=g, v=v, w=torch.sqrt(g * g + v))


# --- P-POTS: the parametric fit ---------------------------------------------------------------

# Fitted parameters theta = (log a, log b, r, q, log kappa, log(m - 1)), with A fixed to 1 while
# fitting: p is only defined up to scale, and scaling (a, b, A^2) together leaves it unchanged, so
# a free A would be a flat direction. The reported (a, b, A) are rescaled afterwards so that p
# integrates to 1.
_FIT_BOUNDS = [(-40.0, 40.0), (-40.0, 40.0), (0.0, 40.0), (0.0, 40.0), (-12.0, 5.0), (-12.0, 4.0)]
_NORM_POINTS = 4097


def _epr_log_density(theta: Tensor, t: Tensor) -> Tensor:
    """log sqrt(a t^r + b (1-t)^q + exp(2 kappa t^m)) (A = 1), computed in log space."""
    log_a, log_b, r, q, log_kappa, log_m1 = theta.unbind()
    m = 1.0 + torch.exp(log_m1)
    terms = torch.stack([
        log_a + torch.xlogy(r, t),
        log_b + torch.xlogy(q, 1.0 - t),
        2.0 * torch.exp(log_kappa) * torch.pow(t, m),
    ])
    return 0.5 * torch.logsumexp(terms, dim=0)


@dataclass
class EPRFit:
    """p(t) = sqrt(a t^r + b (1-t)^q + A^2 exp(2 kappa t^m)), normalised to integrate to 1 on [0, 1]
    (trapezoid rule on 4097 points).

    ``kl``: KL(w_normalised || p_normalised) over the grid points, the quantity minimised;
    ``r2``: 1 - SS_res/SS_tot of the normalised p against the normalised w on the grid (NaN when w
    is constant there); ``success``: whether the best restart's optimiser reported convergence.

    Examples:
        >>> import torch
        >>> from diffkernels.mdm import PPOTSGrid, fit_epr
        >>> t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
        >>> w = (1 + 4 * t).sqrt()
        >>> fit = fit_epr(PPOTSGrid(t, w, torch.zeros_like(t), w), restarts=2)
        >>> type(fit).__name__, fit.r2 > 0.99
        ('EPRFit', True)
    """

    a: float
    b: float
    A: float
    kappa: float
    r: float
    q: float
    m: float
    kl: float
    r2: float
    success: bool
    restarts: int

    @property
    def params(self) -> dict:
        return {"a": self.a, "b": self.b, "A": self.A, "kappa": self.kappa, "r": self.r, "q": self.q, "m": self.m}

    def pdf(self, t) -> Tensor:
        """The fitted density at t (tensor or float; values outside [0, 1] give 0), float64."""
        t = torch.as_tensor(t, dtype=_F64)
        inside = (t >= 0) & (t <= 1)
        tc = t.clamp(0.0, 1.0)
        terms = torch.stack([
            math.log(self.a) + torch.xlogy(torch.tensor(self.r, dtype=_F64), tc),
            math.log(self.b) + torch.xlogy(torch.tensor(self.q, dtype=_F64), 1.0 - tc),
            2.0 * math.log(self.A) + 2.0 * self.kappa * torch.pow(tc, self.m),
        ])
        p = torch.exp(0.5 * torch.logsumexp(terms, dim=0))
        return torch.where(inside, p, torch.zeros_like(p))


def _import_scipy_optimize():
    try:
        import scipy.optimize
    except ImportError as exc:
        raise ImportError(
            "fit_epr needs scipy, an optional dependency of diffkernels: pip install scipy "
            "(the `examples` extra brings it too). PPOTSSampler.from_grid works without it."
        ) from exc
    return scipy.optimize


def _single_threaded_blas():
    """L-BFGS-B on 6 parameters makes thousands of tiny BLAS calls; a multi-threaded BLAS only adds
    overhead to them (over 10x on a busy machine). threadpoolctl is optional (scikit-learn has it)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def fit_epr(grid: PPOTSGrid, restarts: int = 8, seed: int = 0) -> EPRFit:
    """Fit p(t) proportional to sqrt(a t^r + b (1-t)^q + A^2 exp(2 kappa t^m)) to ``grid.w``.

    Minimises KL(w_hat || p) with both normalised to sum 1 over the grid points, by L-BFGS-B (with
    exact analytic gradients) over log a, log b, r >= 0, q >= 0, log kappa, log(m - 1), from
    ``restarts`` starting points (the first fixed, the others random from ``seed``); the best one
    wins. The smooth parametric form is what the paper samples from: it averages out the grid's
    estimation noise and extrapolates to the ends of [0, 1]. Needs scipy.

    Examples:
        >>> import torch
        >>> from diffkernels.mdm import PPOTSGrid, PPOTSSampler, fit_epr
        >>> t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
        >>> w = (1 + 4 * t).sqrt()  # the shape of a P-POTS weight
        >>> fit = fit_epr(PPOTSGrid(t, w, torch.zeros_like(t), w), restarts=2)
        >>> fit.r2 > 0.99
        True
        >>> t_draw, weight = PPOTSSampler.from_fit(fit, mix=0.05).sample(4, seed=0)
        >>> t_draw.shape
        torch.Size([4])
    """
    if not isinstance(grid, PPOTSGrid):
        raise TypeError(f"grid must be a PPOTSGrid, got {type(grid).__name__}")
    restarts = _check_int(restarts, "restarts", minimum=1)
    check_seed(seed)
    if not bool((grid.w > 0).all()):
        raise ValueError("grid.w must be positive at every grid point to fit a density to it")
    optimize = _import_scipy_optimize()
    import numpy as np

    t = grid.t
    target = grid.w / grid.w.sum()
    target_entropy_term = float((target * torch.log(target)).sum())

    t_np = t.numpy()
    target_np = target.numpy()
    log_t, log_1mt = np.log(t_np), np.log1p(-t_np)

    def objective(x):
        """KL and its exact gradient (numpy: this runs a few thousand times per fit)."""
        log_a, log_b, r, q, log_kappa, log_m1 = x
        m = 1.0 + math.exp(log_m1)
        t_m = np.exp(m * log_t)
        kappa = math.exp(log_kappa)
        terms = np.stack([log_a + r * log_t, log_b + q * log_1mt, 2.0 * kappa * t_m])
        top = terms.max(axis=0)
        e = np.exp(terms - top)
        total = e.sum(axis=0)
        log_p = 0.5 * (top + np.log(total))  # log of the unnormalised density
        shares = e / total  # softmax over the three terms
        lp_max = log_p.max()
        p_norm = np.exp(log_p - lp_max)
        log_norm = lp_max + math.log(p_norm.sum())
        p_norm /= p_norm.sum()
        kl = target_entropy_term - float(target_np @ (log_p - log_norm))
        # d log_p / d theta, one row per parameter
        d = 0.5 * np.stack([shares[0], shares[1], shares[0] * log_t, shares[1] * log_1mt,
                            shares[2] * 2.0 * kappa * t_m, shares[2] * 2.0 * kappa * t_m * log_t * (m - 1.0)])
        return kl, d @ (p_norm - target_np)

    rng = np.random.default_rng(fold_seed(seed, _FIT_RESTARTS))
    starts = [np.array([0.0, 0.0, 1.0, 1.0, 0.0, 0.0])]
    for _ in range(restarts - 1):
        starts.append(np.array([rng.uniform(-3, 3), rng.uniform(-3, 3), rng.uniform(0, 4), rng.uniform(0, 4),
                                rng.uniform(-3, 1.5), rng.uniform(-2, 2)]))
    best = None
    with _single_threaded_blas():
        for x0 in starts:
            res = optimize.minimize(objective, x0, jac=True, method="L-BFGS-B", bounds=_FIT_BOUNDS,
                                    options={"maxiter": 3000, "ftol": 1e-13, "gtol": 1e-10})
            if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
                best = res
    if best is None:
        raise RuntimeError("fit_epr: every restart ended with a non-finite objective")

    theta = torch.tensor(best.x, dtype=_F64)
    fine = torch.linspace(0.0, 1.0, _NORM_POINTS, dtype=_F64)
    z = float(torch.trapezoid(torch.exp(_epr_log_density(theta, fine)), fine))
    log_a, log_b, r, q, log_kappa, log_m1 = best.x.tolist()
    log_p = _epr_log_density(theta, t)
    p = torch.exp(log_p - torch.logsumexp(log_p, dim=0))
    ss_res = float(((target - p) ** 2).sum())
    ss_tot = float(((target - target.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return EPRFit(a=math.exp(log_a) / z**2, b=math.exp(log_b) / z**2, A=1.0 / z, kappa=math.exp(log_kappa),
                  r=r, q=q, m=1.0 + math.exp(log_m1), kl=max(float(best.fun), 0.0), r2=r2,
                  success=bool(best.success), restarts=restarts)


# --- P-POTS: the sampler ----------------------------------------------------------------------


class PPOTSSampler(TimeSampler):
    """t ~ p(t), weight 1/p(t), for a piecewise-linear density p on [0, 1].

    The density is given by knots 0 = x_0 < ... < x_K = 1 and positive values y_i; it is
    normalised exactly (the trapezoid rule is exact for piecewise-linear functions), then mixed
    with the uniform, p <- (1 - mix) p + mix (still piecewise linear; mix > 0 bounds the weights
    by 1/mix). Sampling inverts the CDF exactly: the CDF is quadratic within each bin, and the
    quadratic is solved in closed form. The weight is 1/p(t) for the very p that was sampled,
    so E[f(t) / p(t)] equals the integral of f up to Monte-Carlo error, not up to a discretisation
    error. :meth:`pdf` and :meth:`cdf` expose that p.

    Build it with :meth:`from_fit` (the paper's route) or :meth:`from_grid` (the raw estimates).

    ``importance_weights=False`` returns weight 1 instead of 1/p(t) (times the stratum weight with
    ``stratify``): the objective becomes E_{t~p}[l(t)], which is **biased** for the ELBO (it
    reweights the masking rates by p(t)). This is the recipe of the P-POTS reference code's headline
    runs: per-sample losses at t ~ p(t) without the 1/p(t) weight, each sequence's loss clamped at 10::

        sampler = PPOTSSampler.from_fit(fit, importance_weights=False)
        t, w = sampler(batch_size, seed)                    # w == 1 (no stratification)
        masked = mask_tokens(ids, (1 - 1e-3) * t + 1e-3, seed, mask_id=MASK, eligible=eligible)
        loss = masked_diffusion_loss(masked, ids, logits=model(masked.noisy_ids), row_clamp=10.0)

    Use it to compare with that code; ``importance_weights=True`` (default) is the unbiased P-POTS.

    ``stratify=True`` stratifies the uniforms fed to the inverse CDF over the global batch, as in
    :class:`Stratified` (k strata, default floor(sqrt(G)); the weight is then the stratum weight
    times 1/p(t)): P-POTS and StraTS combined.

    Examples:
        >>> import torch
        >>> from diffkernels.mdm import PPOTSSampler
        >>> sampler = PPOTSSampler([0.0, 0.5, 1.0], [1.0, 3.0, 1.0])  # more draws near t = 0.5
        >>> sampler.pdf(torch.tensor([0.0, 0.5])).tolist()  # normalised: the integral is 1
        [0.5, 1.5]
        >>> t, w = sampler.sample(4, seed=0)
        >>> bool(torch.allclose(w, 1 / sampler.pdf(t.double()).float()))  # importance weights 1/p(t)
        True
    """

    def __init__(self, knots, values, *, mix: float = 0.0, stratify: bool = False, k: Optional[int] = None,
                 importance_weights: bool = True):
        x = _as_vector(knots, "knots")
        y = _as_vector(values, "values")
        if x.numel() != y.numel() or x.numel() < 2:
            raise ValueError(f"knots and values must have the same length >= 2, got {x.numel()} and {y.numel()}")
        if float(x[0]) != 0.0 or float(x[-1]) != 1.0 or not bool((x[1:] > x[:-1]).all()):
            raise ValueError("knots must increase strictly from 0 to 1")
        if not bool((y >= 0).all()):
            raise ValueError("values must be non-negative")
        self.mix = _check_unit(mix, "mix")
        if not isinstance(stratify, bool):
            raise TypeError(f"stratify must be a bool, got {type(stratify).__name__}")
        self.k = _check_k(k)
        if self.k is not None and not stratify:
            raise ValueError("k is the number of strata and needs stratify=True")
        self.stratify = stratify
        if not isinstance(importance_weights, bool):
            raise TypeError(f"importance_weights must be a bool, got {type(importance_weights).__name__}")
        self.importance_weights = importance_weights
        h = x[1:] - x[:-1]
        area = float((h * (y[1:] + y[:-1])).sum() / 2)
        if not area > 0:
            raise ValueError("values must not all be zero")
        y = (1.0 - self.mix) * (y / area) + self.mix
        y = y / float((h * (y[1:] + y[:-1])).sum() / 2)  # 1 up to rounding
        if not bool((y > 0).all()):
            raise ValueError("the density is zero somewhere on [0, 1] (weight 1/p unbounded); use mix > 0")
        cdf = torch.cat([torch.zeros(1, dtype=_F64), torch.cumsum(h * (y[1:] + y[:-1]) / 2, 0)])
        self._x, self._y, self._h, self._cdf = x, y, h, cdf

    @classmethod
    def from_fit(cls, fit: EPRFit, mix: float = 0.0, *, num_knots: int = _NORM_POINTS, stratify: bool = False,
                 k: Optional[int] = None, importance_weights: bool = True) -> "PPOTSSampler":
        """The fitted density, linearly interpolated between ``num_knots`` equispaced points
        (relative error of order 1e-7 for a smooth fit), normalised and mixed."""
        if not isinstance(fit, EPRFit):
            raise TypeError(f"fit must be an EPRFit, got {type(fit).__name__}")
        num_knots = _check_int(num_knots, "num_knots", minimum=2)
        x = torch.linspace(0.0, 1.0, num_knots, dtype=_F64)
        return cls(x, fit.pdf(x), mix=mix, stratify=stratify, k=k, importance_weights=importance_weights)

    @classmethod
    def from_grid(cls, grid: PPOTSGrid, mix: float = 0.0, *, stratify: bool = False,
                  k: Optional[int] = None, importance_weights: bool = True) -> "PPOTSSampler":
        """The raw estimates: piecewise linear through (t_j, w_j), and flat beyond the grid
        (p = w_1 on [0, t_1], p = w_last on [t_last, 1]).

        The flat extension keeps every t in [0, 1] reachable, which unbiasedness needs (a density
        that is zero outside the grid would never sample the ends, yet 1/p would claim to cover
        them), without extrapolating noisy slopes. Every w_j must be positive, or use mix > 0.
        """
        if not isinstance(grid, PPOTSGrid):
            raise TypeError(f"grid must be a PPOTSGrid, got {type(grid).__name__}")
        one = torch.ones(1, dtype=_F64)
        x = torch.cat([0 * one, grid.t, one])
        y = torch.cat([grid.w[:1], grid.w, grid.w[-1:]])
        return cls(x, y, mix=mix, stratify=stratify, k=k, importance_weights=importance_weights)

    def _bin(self, t: Tensor) -> tuple[Tensor, Tensor]:
        i = (torch.searchsorted(self._x, t, right=True) - 1).clamp_(0, self._x.numel() - 2)
        return i, ((t - self._x[i]) / self._h[i]).clamp_(0.0, 1.0)

    def pdf(self, t) -> Tensor:
        """The density actually sampled, at t (values outside [0, 1] give 0), float64."""
        t = torch.as_tensor(t, dtype=_F64)
        i, s = self._bin(t)
        p = self._y[i] + (self._y[i + 1] - self._y[i]) * s
        return torch.where((t >= 0) & (t <= 1), p, torch.zeros_like(p))

    def cdf(self, t) -> Tensor:
        """Its cumulative distribution function at t, float64."""
        t = torch.as_tensor(t, dtype=_F64).clamp(0.0, 1.0)
        i, s = self._bin(t)
        y0, dy, h = self._y[i], self._y[i + 1] - self._y[i], self._h[i]
        return self._cdf[i] + h * s * (y0 + 0.5 * dy * s)

    def icdf(self, u: Tensor) -> Tensor:
        """The exact inverse of :meth:`cdf` on [0, 1), float64."""
        u = torch.as_tensor(u, dtype=_F64)
        i = (torch.searchsorted(self._cdf, u, right=True) - 1).clamp_(0, self._x.numel() - 2)
        y0, dy, h = self._y[i], self._y[i + 1] - self._y[i], self._h[i]
        d = (u - self._cdf[i]).clamp_(min=0.0)
        # h*(y0*s + dy*s^2/2) = d, solved as 2d / (b + sqrt(b^2 + 2 h dy d)) to avoid cancellation
        b = h * y0
        s = 2.0 * d / (b + torch.sqrt((b * b + 2.0 * h * dy * d).clamp_(min=0.0)))
        return self._x[i] + h * s.clamp_(0.0, 1.0)

    def _draw(self, G, gen):
        if self.stratify:
            k = self.k if self.k is not None else max(1, math.isqrt(G))
            u, w = _stratified_uniforms(G, k, gen, reweight=True)
        else:
            u, w = torch.rand(G, generator=gen, dtype=_F64), torch.ones(G, dtype=_F64)
        t = self.icdf(u)
        return t, (w / self.pdf(t) if self.importance_weights else w)

    def __repr__(self) -> str:
        return (f"PPOTSSampler(knots={self._x.numel()}, mix={self.mix}, stratify={self.stratify}"
                + (f", k={self.k}" if self.k is not None else "")
                + ("" if self.importance_weights else ", importance_weights=False") + ")")

