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
- :class:`PPOTSSampler` (P-POTS, in :mod:`diffkernels.mdm.ppots`): t ~ p(t), weight 1/p(t), with p
  estimated once before training (:func:`estimate_ppots_grid`, then optionally :func:`fit_epr`). With
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

import math
from typing import Any, Optional

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
]

# Stream tags folded into the user's seed, so that these draws never coincide with another use of
# the same seed (masks, noise, ...). Arbitrary constants; changing them changes every draw.
_T_STREAM = 0x7453_414D  # "tSAM": the t draws of every sampler

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


# P-POTS lives in ppots.py; its names stay importable from here (imported on first use: ppots imports
# this module).
_PPOTS_NAMES = frozenset({"PPOTSGrid", "EPRFit", "PPOTSSampler", "estimate_ppots_grid", "fit_epr"})


def __getattr__(name: str) -> Any:
    if name in _PPOTS_NAMES:
        from . import ppots

        return getattr(ppots, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
