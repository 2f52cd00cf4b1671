"""Samplers of the masking rate t for masked diffusion LMs (docs/METHODS.md section 2: P-POTS, StraTS).

Every sampler returns ``(t, weight)`` such that, for any integrable f,

    E[ mean_i f(t_i) * weight_i ] = integral_0^1 f(t) dt

(``Clipped`` is the one documented exception). Multiplying each sequence's loss by its weight
therefore keeps the training objective unchanged while the samplers change its variance:

- :class:`Uniform`: t ~ U(0, 1), weight 1 (the baseline).
- :class:`Stratified` (StraTS): k equal strata of [0, 1] over the **global** batch, default
  k = floor(sqrt(G)); removes most of the masking-rate noise (term B of the decomposition).
- :class:`LowDiscrepancy`: ``Stratified`` with k = G, one draw per stratum.
- :class:`Clipped`: t ~ U(t_min, t_max), weight 1. Biased for the integral over [0, 1].
- :class:`PPOTSSampler` (P-POTS): t ~ p(t), weight 1/p(t), with p estimated once before
  training (:func:`estimate_ppots_grid`, then optionally :func:`fit_epr`). With
  ``importance_weights=False`` it returns weight 1 instead (the second documented exception: a
  different, biased objective, see the class).

Reproducibility and data parallelism. Seeds are integers (Python or numpy, taken modulo 2**64); a
sampler derives its stream with :func:`diffkernels.rng.fold_seed` and draws with a CPU
``torch.Generator`` (bit-identical on every machine), then moves the result to ``device``.
``sample(n, seed, rank=, world_size=, micro_batch=, num_micro_batches=)`` always draws the whole global batch
G = n * world_size * num_micro_batches from ``seed`` and returns one slice of it, so every rank
must pass the same seed (e.g. ``fold_seed(base_seed, step)``, *without* the rank): the slices of
all ranks and micro-batches then concatenate, rank-major (slice index
``rank * num_micro_batches + micro_batch``), to :meth:`TimeSampler.sample_global`. Drawing G
numbers on every rank costs microseconds and is what lets the stratification span the global batch.

Returned t lies in [0, 1): values that round up to 1 in the requested dtype are set to the largest
representable number below 1. Weights are computed in float64 from the float64 draw (the value
actually sampled), then cast.
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

__all__ = [
    "TimeSampler",
    "Uniform",
    "Stratified",
    "LowDiscrepancy",
    "Clipped",
    "PPOTSGrid",
    "EPRFit",
    "PPOTSSampler",
    "estimate_ppots_grid",
    "fit_epr",
]

# Stream tags folded into the user's seed, so that these draws never coincide with another use of
# the same seed (masks, noise, ...). Arbitrary constants; changing them changes every draw.
_T_STREAM = 0x7453_414D  # "tSAM": the t draws of every sampler
_GRID_EXAMPLES = 0x7047_5845  # which examples estimate_ppots_grid evaluates
_GRID_MASKS = 0x7047_4D4B  # the mask seeds handed to loss_fn
_FIT_RESTARTS = 0x6570_7266  # fit_epr's random starting points

_F64 = torch.float64


# --- argument checks --------------------------------------------------------------------------


def _check_int(value, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    return float(value)


def _check_unit(value, name: str) -> float:
    value = _check_float(value, name)
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def _check_k(k) -> Optional[int]:
    return None if k is None else _check_int(k, "k", minimum=1)


def _generator(seed: int) -> torch.Generator:
    """A CPU generator for the t stream of ``seed`` (any integer, Python or numpy)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(fold_seed(check_seed(seed), _T_STREAM))
    return gen


def _below_one(dtype: torch.dtype) -> float:
    """The largest number below 1 in a binary floating-point dtype: 1 - eps/2."""
    return 1.0 - torch.finfo(dtype).eps / 2


# --- the common interface ---------------------------------------------------------------------


class TimeSampler:
    """Base class: subclasses implement ``_draw(G, gen) -> (t, weight)``, float64 on CPU, for the
    whole global batch; this class adds seeding, slicing by rank and micro-batch, casting and
    argument checks, so that every sampler behaves the same under data parallelism.

    Examples:
        Every sampler: ``sample(n, seed)`` gives this rank's (t, weight); seed once per step.

        >>> import torch
        >>> from diffkernels.mdm import Stratified
        >>> t, w = Stratified(k=4).sample(8, seed=0)
        >>> t.shape, w.dtype
        (torch.Size([8]), torch.float32)
        >>> t0, _ = Stratified(k=4).sample(4, seed=0, rank=0, world_size=2)  # rank 0's half of the global batch
        >>> t1, _ = Stratified(k=4).sample(4, seed=0, rank=1, world_size=2)
        >>> bool((torch.cat([t0, t1]) == t).all())
        True
    """

    def _draw(self, G: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def sample_global(self, batch_size: int, seed: int, *, device=None,
                      dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """The whole global batch of ``batch_size`` draws for ``seed``: ``(t, weight)``, each (G,)."""
        G = _check_int(batch_size, "batch_size", minimum=1)
        _check_dtype(dtype)
        t, w = self._draw(G, _generator(seed))
        return _finish(t, w, device, dtype)

    def sample(self, n: int, seed: int, *, rank: int = 0, world_size: int = 1, micro_batch: int = 0,
               num_micro_batches: int = 1, device=None,
               dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """This rank's micro-batch of ``n`` draws: ``(t, weight)``, each of shape (n,).

        ``seed`` must be the same on every rank (fold the step into it, not the rank): the global
        batch G = n * world_size * num_micro_batches is drawn from it and this call returns slice
        ``rank * num_micro_batches + micro_batch`` of it.
        """
        n = _check_int(n, "n", minimum=1)
        world_size = _check_int(world_size, "world_size", minimum=1)
        num_micro_batches = _check_int(num_micro_batches, "num_micro_batches", minimum=1)
        rank = _check_int(rank, "rank", minimum=0)
        micro_batch = _check_int(micro_batch, "micro_batch", minimum=0)
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size={world_size}, got {rank}")
        if micro_batch >= num_micro_batches:
            raise ValueError(f"micro_batch must be < num_micro_batches={num_micro_batches}, got {micro_batch}")
        _check_dtype(dtype)
        G = n * world_size * num_micro_batches
        t, w = self._draw(G, _generator(seed))
        start = (rank * num_micro_batches + micro_batch) * n
        return _finish(t[start:start + n], w[start:start + n], device, dtype)

    __call__ = sample


def _check_dtype(dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")


def _finish(t: Tensor, w: Tensor, device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    t = t.to(dtype).clamp_(max=_below_one(dtype))
    w = w.to(dtype)
    if device is not None:
        t, w = t.to(device), w.to(device)
    return t, w


def _stratified_uniforms(G: int, k: int, gen: torch.Generator, reweight: bool) -> tuple[Tensor, Tensor]:
    """G stratified uniforms over k equal strata, shuffled, and their weights (float64).

    Every stratum gets base = G // k draws; the remaining G % k go to distinct strata chosen at
    random. With ``reweight`` a draw in a stratum holding c of the G draws weighs
    (1/k) / (c/G): the weighted mean is then exactly the stratified estimator
    sum_s (1/k) * mean_{i in s} f(t_i), unbiased whatever strata got the extra draws.
    """
    if k > G:
        raise ValueError(f"k must be <= the global batch size G={G} (each stratum needs a draw), got k={k}")
    base, extra = divmod(G, k)
    stratum = torch.arange(k).repeat(base)
    if extra:
        stratum = torch.cat([stratum, torch.randperm(k, generator=gen)[:extra]])
    counts = torch.bincount(stratum, minlength=k)
    u = (stratum.to(_F64) + torch.rand(G, generator=gen, dtype=_F64)) / k
    u.clamp_(max=_below_one(_F64))  # (k - 1 + u) / k can round up to 1
    if reweight and extra:
        w = (G / (k * counts.to(_F64)))[stratum]
    else:
        w = torch.ones(G, dtype=_F64)
    order = torch.randperm(G, generator=gen)
    return u[order], w[order]


# --- simple samplers --------------------------------------------------------------------------


class Uniform(TimeSampler):
    """t ~ U(0, 1) i.i.d., weight 1: the standard MDM objective.

    Examples:
        >>> from diffkernels.mdm import Uniform
        >>> t, w = Uniform().sample(4, seed=0)
        >>> bool(((t >= 0) & (t <= 1)).all()), w
        (True, tensor([1., 1., 1., 1.]))
    """

    def _draw(self, G, gen):
        return torch.rand(G, generator=gen, dtype=_F64), torch.ones(G, dtype=_F64)

    def __repr__(self) -> str:
        return "Uniform()"


class Stratified(TimeSampler):
    """StraTS: t stratified over the global batch G into k equal strata of [0, 1], then shuffled.

    ``k=None`` uses floor(sqrt(G)) (the paper finds the optimal k grows like sqrt(G)); k must not
    exceed G. Each stratum gets G // k draws, uniform within the stratum; the G % k remaining
    draws go to distinct strata chosen at random.

    Weights. When k divides G all weights are 1. Otherwise some strata hold one draw more than
    others, and the sampler returns weight = (1/k) / (count_in_stratum / G) (``reweight=True``,
    the default): the weighted batch mean equals the stratified estimator exactly, unbiased
    for every allocation of the remainder, and the weights of the global batch sum to G. With
    ``reweight=False`` all weights are 1; that is still unbiased on average over the random
    allocation (each stratum's expected count is G / k) but adds the allocation's noise.

    Examples:
        >>> from diffkernels.mdm import Stratified
        >>> t, w = Stratified(k=4).sample(8, seed=0)
        >>> (t * 4).floor().sort().values  # two draws in each quarter of [0, 1]
        tensor([0., 0., 1., 1., 2., 2., 3., 3.])
        >>> w  # k divides G: all weights 1
        tensor([1., 1., 1., 1., 1., 1., 1., 1.])
    """

    def __init__(self, k: Optional[int] = None, *, reweight: bool = True):
        self.k = _check_k(k)
        if not isinstance(reweight, bool):
            raise TypeError(f"reweight must be a bool, got {type(reweight).__name__}")
        self.reweight = reweight

    def num_strata(self, G: int) -> int:
        """The number of strata used for a global batch of G draws."""
        return self.k if self.k is not None else max(1, math.isqrt(G))

    def _draw(self, G, gen):
        return _stratified_uniforms(G, self.num_strata(G), gen, self.reweight)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(k={self.k}, reweight={self.reweight})"


class LowDiscrepancy(Stratified):
    """Stratified with k = G: exactly one draw in each of G equal strata, shuffled; weight 1.

    MDLM's low-discrepancy sampler uses one shared offset, t_i = (u + i/G) mod 1; this draws
    each stratum independently instead (same marginals, same one-per-stratum coverage).

    Examples:
        >>> from diffkernels.mdm import LowDiscrepancy
        >>> t, w = LowDiscrepancy().sample(4, seed=0)
        >>> (t * 4).floor().sort().values  # one draw in each of the 4 strata
        tensor([0., 1., 2., 3.])
    """

    def __init__(self):
        super().__init__(None, reweight=True)

    def num_strata(self, G: int) -> int:
        return G

    def __repr__(self) -> str:
        return "LowDiscrepancy()"


class Clipped(TimeSampler):
    """t ~ U(t_min, t_max), weight 1, for 0 <= t_min < t_max <= 1.

    Not an unbiased estimator of the [0, 1] objective, by design: it optimises the loss averaged
    over [t_min, t_max] only, i.e. E[f(t)] = (1 / (t_max - t_min)) * integral_{t_min}^{t_max} f,
    dropping the rates outside the window (typically the very low masking rates whose 1/t-weighted
    loss is the noisiest). Use it as a deliberate change of objective, not as variance reduction.

    Examples:
        >>> from diffkernels.mdm import Clipped
        >>> t, w = Clipped(0.1, 0.9).sample(6, seed=0)
        >>> bool(((t >= 0.1) & (t <= 0.9)).all())
        True
    """

    def __init__(self, t_min: float, t_max: float):
        self.t_min = _check_unit(t_min, "t_min")
        self.t_max = _check_unit(t_max, "t_max")
        if not self.t_min < self.t_max:
            raise ValueError(f"t_min must be < t_max, got t_min={self.t_min}, t_max={self.t_max}")

    def _draw(self, G, gen):
        u = torch.rand(G, generator=gen, dtype=_F64)
        return self.t_min + (self.t_max - self.t_min) * u, torch.ones(G, dtype=_F64)

    def __repr__(self) -> str:
        return f"Clipped(t_min={self.t_min}, t_max={self.t_max})"


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

