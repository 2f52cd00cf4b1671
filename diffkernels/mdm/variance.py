"""Decompose the variance of the MDM loss (and of its gradient) into A, B, C (docs/METHODS.md section 2).

The per-sequence loss l of a masked diffusion LM is random in three nested ways: the example x0,
the masking rate t given x0, and the mask given (x0, t). With g(x0, t) = E[l | x0, t] and
v(x0, t) = Var[l | x0, t], the law of total variance gives

    Var l = E[v]              (A: masking-pattern noise; MIRROR, ISAD, SyRM reduce it)
          + E_x0[Var_t g]     (B: masking-rate noise; StraTS, P-POTS reduce it)
          + Var_x0(E_t g)     (C: data noise; an autoregressive model has only this one)

:func:`variance_decomposition` estimates the three terms from a balanced nested sample (n_x
examples, n_t rates per example, n_m masks per rate), for the loss value and, optionally, for the
trace of the gradient covariance (the quantity that sets the noise of SGD). Knowing which term
dominates tells which of the variance-reduction methods can help at all.

The estimator works on any array of nested draws; :func:`nested_variance_components` exposes it
for draws the caller already has.

This is an offline diagnostic: it reads every loss value back to the host (one sync per call of
``loss_fn``), which is fine here and would not be in a training step.

One module on purpose: the result types, the nested estimator and the driver that draws the samples
for it make up one diagnostic (a third of the lines are docstrings and their examples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from .._validate import check_seed
from ..rng import fold_seed
from .samplers import Uniform

__all__ = ["VarianceComponents", "VarianceDecomposition", "variance_decomposition", "nested_variance_components"]

# Stream tags folded into the user's seed so that the draws of the different levels never
# coincide with each other or with another use of the same seed. Changing them changes every draw.
_EXAMPLE_STREAM = 0x5644_5845  # which examples are drawn
_T_STREAM = 0x5644_5452  # the masking rates
_MASK_STREAM = 0x5644_4D4B  # the mask seeds handed to loss_fn
_PROJ_STREAM = 0x5644_504A  # the random projection of the gradients

_F64 = torch.float64


# --- results ----------------------------------------------------------------------------------


@dataclass
class VarianceComponents:
    """Estimates of A, B, C and their sum, with standard errors (all Python floats).

    For the loss value the terms are variances; for a gradient they are traces of covariance
    matrices (sum over coordinates of the per-coordinate terms). ``total = A + B + C`` estimates
    Var l (the variance of one sequence's loss, or the trace of one sequence's gradient covariance):
    a batch mean over G sequences with independent x0, t and masks has 1/G of it.

    Standard errors: delete-one jackknife over the n_x examples (see
    :func:`nested_variance_components`). They cover the sampling noise of the nested sample,
    not that of a random projection (``VarianceDecomposition.projected``).
    Individual estimates can be negative when a term is small compared to its standard error;
    they are left unclipped so that averages over runs stay unbiased.

    Examples:
        >>> import torch
        >>> from diffkernels.mdm import nested_variance_components
        >>> c = nested_variance_components(torch.randn(10, 3, 3))
        >>> type(c).__name__, (c.n_x, c.n_t, c.n_m)
        ('VarianceComponents', (10, 3, 3))
        >>> abs(c.total - (c.A + c.B + c.C)) < 1e-12
        True
        >>> sorted(c.fractions())
        ['A', 'B', 'C']
    """

    A: float
    B: float
    C: float
    total: float
    A_se: float
    B_se: float
    C_se: float
    total_se: float
    n_x: int
    n_t: int
    n_m: int

    def fractions(self) -> dict:
        """A, B and C as fractions of their sum (for reports)."""
        return {k: getattr(self, k) / self.total if self.total else float("nan") for k in "ABC"}

    def __str__(self) -> str:
        rows = [f"{k} = {getattr(self, k):.6g} +- {getattr(self, k + '_se'):.3g}" for k in ("A", "B", "C", "total")]
        return f"{type(self).__name__}(n_x={self.n_x}, n_t={self.n_t}, n_m={self.n_m}): " + ", ".join(rows)


@dataclass
class VarianceDecomposition(VarianceComponents):
    """What :func:`variance_decomposition` returns: the loss-value components (the inherited
    fields), the raw nested sample, and with ``grad=True`` the gradient components.

    values (n_x, n_t, n_m) float64: the loss values l_ijk (times the sampler weight, see
        :func:`variance_decomposition`).
    t, weight (n_x, n_t) float64: the masking rates and sampler weights.
    indices (n_x,) int64: which items of ``data`` were drawn (with replacement).
    grad: the components of the trace of the gradient covariance, or None.
    grad_dim: the length of the gradient vectors used (number of parameters, or
        ``num_projections``). projected: whether they were randomly projected.

    Examples:
        >>> from diffkernels.mdm import variance_decomposition
        >>> r = variance_decomposition(lambda x, t, seed, mask_mode: x + t, [0.0, 1.0, 2.0],
        ...                            n_x=5, n_t=2, n_m=2, progress=False)
        >>> r.values.shape, r.t.shape, r.indices.shape, r.grad is None
        (torch.Size([5, 2, 2]), torch.Size([5, 2]), torch.Size([5]), True)
        >>> r.A  # this loss does not depend on the mask
        0.0
    """

    values: Tensor = field(default=None, repr=False)
    t: Tensor = field(default=None, repr=False)
    weight: Tensor = field(default=None, repr=False)
    indices: Tensor = field(default=None, repr=False)
    grad: Optional[VarianceComponents] = None
    grad_dim: Optional[int] = None
    projected: bool = False

    def __str__(self) -> str:
        text = "loss: " + VarianceComponents.__str__(self)
        if self.grad is not None:
            how = f"projected to {self.grad_dim} dims" if self.projected else f"{self.grad_dim} params"
            text += f"\ngrad ({how}): " + str(self.grad)
        return text


# --- the estimator ----------------------------------------------------------------------------


def _example_stats(y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One example's block of draws y (n_t, n_m, D) -> (a_i, b_i, m_i).

    a_i = mean_j S^2_k(y_ijk), b_i = S^2_j(ybar_ij.), m_i = ybar_i.. (D,), where S^2 of vectors is
    the unbiased sample variance summed over coordinates: sum ||dev||^2 / (n - 1).
    """
    n_t, n_m = y.shape[0], y.shape[1]
    cell = y.mean(dim=1)  # (n_t, D)
    a = ((y - cell[:, None]) ** 2).sum(dim=(1, 2)).mean() / (n_m - 1)
    m = cell.mean(dim=0)
    b = ((cell - m) ** 2).sum() / (n_t - 1)
    return a, b, m


def _components(a: Tensor, b: Tensor, means: Tensor, n_t: int, n_m: int) -> VarianceComponents:
    """A, B, C and jackknife standard errors from the per-example statistics (float64)."""
    n = a.numel()
    a, b, means = a.to(_F64), b.to(_F64), means.to(_F64)
    centred = means - means.mean(dim=0)
    q = (centred * centred).sum(dim=1)  # ||m_i - mbar||^2, (n,)
    ss = q.sum()

    def estimates(s_a, s_b, s_c):
        A = s_a
        B = s_b - s_a / n_m
        C = s_c - s_b / n_t
        return torch.stack([A, B, C, A + B + C], dim=-1)

    full = estimates(a.mean(), b.mean(), ss / (n - 1))
    # Delete-one values in closed form: removing point i from n points with mean mbar lowers the
    # sum of squared deviations by n/(n-1) ||m_i - mbar||^2.
    loo = estimates((a.sum() - a) / (n - 1), (b.sum() - b) / (n - 1), (ss - q * (n / (n - 1))) / (n - 2))
    se = torch.sqrt((n - 1) / n * ((loo - loo.mean(dim=0)) ** 2).sum(dim=0))
    A, B, C, total = full.cpu().tolist()
    A_se, B_se, C_se, total_se = se.cpu().tolist()
    return VarianceComponents(A=A, B=B, C=C, total=total, A_se=A_se, B_se=B_se, C_se=C_se, total_se=total_se,
                              n_x=n, n_t=n_t, n_m=n_m)


def nested_variance_components(samples: Tensor) -> VarianceComponents:
    """A, B, C from a balanced nested sample: (n_x, n_t, n_m) scalars or (n_x, n_t, n_m, D) vectors.

    ``samples[i, j, k]`` is the k-th draw (mask) at the j-th rate of the i-th example; rates must
    be i.i.d. given the example, and masks i.i.d. given (example, rate). With S^2 the unbiased
    sample variance (for vectors: the sum over coordinates, i.e. sum ||deviation||^2 / (n - 1)):

        s_A = mean_ij S^2_k(l_ijk),  s_B = mean_i S^2_j(lbar_ij.),  s_C = S^2_i(lbar_i..)
        A = s_A,  B = s_B - s_A / n_m,  C = s_C - s_B / n_t

    Each is unbiased: E[s_B] = B + A/n_m and E[s_C] = C + (B + A/n_m)/n_t, by the same law of
    total variance applied to the cell and example means.

    Standard errors: the examples are the independent units (everything drawn for one example is
    independent of the other examples), so the delete-one jackknife over examples is used. For A
    and B, which are means of per-example quantities, it equals the usual sd/sqrt(n_x) exactly;
    for C (a variance over examples) it is the standard, slightly conservative, jackknife of a
    U-statistic. It is computed in closed form (no resampling, deterministic). With few examples
    the standard error of C is itself noisy and correlated with the estimate (a C that came out
    small also gets a small standard error), so read z-scores of C only with n_x of about 30 or
    more. Needs n_x >= 3, n_t >= 2, n_m >= 2.

    Examples:
        Draws with C = 4 (example), B = 1 (rate) and A = 0.25 (mask):

        >>> import torch
        >>> from diffkernels.mdm import nested_variance_components
        >>> g = torch.Generator().manual_seed(0)
        >>> n_x, n_t, n_m = 50, 4, 4
        >>> samples = (2 * torch.randn(n_x, 1, 1, generator=g) + torch.randn(n_x, n_t, 1, generator=g)
        ...            + 0.5 * torch.randn(n_x, n_t, n_m, generator=g))
        >>> c = nested_variance_components(samples)
        >>> round(c.A, 2), round(c.B, 1), round(c.C, 1)
        (0.25, 0.8, 4.7)
        >>> round(c.C_se, 1)  # C is estimated from 50 examples only
        1.0
    """
    if not isinstance(samples, Tensor) or not (samples.dtype.is_floating_point):
        raise TypeError("samples must be a floating-point tensor of nested draws")
    if samples.dim() not in (3, 4):
        raise ValueError(f"samples must have shape (n_x, n_t, n_m) or (n_x, n_t, n_m, D), got {tuple(samples.shape)}")
    n_x, n_t, n_m = samples.shape[:3]
    _check_sizes(n_x, n_t, n_m)
    y = samples.to(_F64)
    if y.dim() == 3:
        y = y.unsqueeze(-1)
    if not bool(torch.isfinite(y).all()):
        raise ValueError("samples must be finite")
    stats = [_example_stats(y[i]) for i in range(n_x)]
    a = torch.stack([s[0] for s in stats])
    b = torch.stack([s[1] for s in stats])
    means = torch.stack([s[2] for s in stats])
    return _components(a, b, means, n_t, n_m)


# --- argument checks --------------------------------------------------------------------------


def _check_count(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_sizes(n_x, n_t, n_m) -> None:
    _check_count(n_x, "n_x", 3)  # the jackknife of C divides by n_x - 2
    _check_count(n_t, "n_t", 2)
    _check_count(n_m, "n_m", 2)


def _check_params(params) -> list:
    if params is None:
        raise ValueError("params is required with grad=True: the tensors to differentiate the loss with respect to")
    if isinstance(params, Tensor):
        params = [params]
    try:
        params = list(params)
    except TypeError:
        raise TypeError(f"params must be a sequence of tensors, got {type(params).__name__}") from None
    if not params:
        raise ValueError("params must contain at least one tensor")
    for n, p in enumerate(params):
        if not isinstance(p, Tensor) or not p.dtype.is_floating_point or not p.requires_grad:
            raise TypeError(f"params[{n}] must be a floating-point tensor with requires_grad=True")
    return params


def _draw_rate(t_sampler, seed: int) -> tuple[float, float]:
    out = t_sampler.sample(1, seed)
    try:
        t, w = out
        t = torch.as_tensor(t, dtype=_F64).reshape(-1)
        w = torch.as_tensor(w, dtype=_F64).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError("t_sampler.sample(n, seed) must return a pair (t, weight) of length-n tensors") from None
    if t.numel() != 1 or w.numel() != 1:
        raise ValueError(f"t_sampler.sample(1, seed) returned {t.numel()} rates and {w.numel()} weights, expected 1")
    t, w = float(t[0]), float(w[0])
    if not (0.0 <= t <= 1.0):
        raise ValueError(f"t_sampler returned t={t}, outside [0, 1]")
    if not (math.isfinite(w) and w >= 0.0):
        raise ValueError(f"t_sampler returned weight={w}; weights must be finite and >= 0")
    return t, w


class _Projection:
    """A fixed random sketch S (k x P), entries +-1/sqrt(k) i.i.d. (Rademacher), one block per
    parameter, generated on the CPU from the seed (bit-identical everywhere) and kept on the
    parameter's device. E[S^T S] = I, so E||S v||^2 = ||v||^2 for every v: every quantity of the
    estimator is a sum of squared norms of linear combinations of gradients, hence the projected
    estimate is unbiased over S. Rademacher entries give the smallest variance among i.i.d.
    sketches with that property (Var||Sv||^2 = (2/k)(||v||^4 - sum v_i^4)). Memory: k x P values."""

    def __init__(self, params: list, k: int, seed: int):
        self.blocks = []
        for n, p in enumerate(params):
            gen = torch.Generator(device="cpu")
            gen.manual_seed(fold_seed(seed, n))
            signs = torch.randint(0, 2, (k, p.numel()), generator=gen, dtype=torch.int8)
            dtype = torch.promote_types(p.dtype, torch.float32)
            self.blocks.append(((signs.to(dtype) * 2 - 1) / math.sqrt(k)).to(p.device))

    def __call__(self, grads: list) -> Tensor:
        out = None
        for s, g in zip(self.blocks, grads):
            term = (s @ g.reshape(-1).to(s.dtype)).to(_F64)
            out = term if out is None else out + term.to(out.device)
        return out


# --- the driver -------------------------------------------------------------------------------


def variance_decomposition(
    loss_fn: Callable[..., Any],
    data: Sequence,
    *,
    t_sampler=None,
    mask_mode: Optional[str] = "standard",
    n_x: int,
    n_t: int,
    n_m: int,
    seed: int = 0,
    grad: bool = False,
    params=None,
    num_projections: Optional[int] = None,
    projection_seed: Optional[int] = None,
    progress: bool = True,
) -> VarianceDecomposition:
    """Estimate A (mask), B (rate) and C (data) of the loss variance with standard errors.

    The loss_fn contract. ``loss_fn(x, t, seed, mask_mode=mask_mode)`` returns the per-sequence
    loss l of example ``x`` (an item of ``data``) at masking rate ``t`` (a Python float in [0, 1];
    the caller maps it to p = (1 - eps) t + eps if it follows LLaDA) with the mask drawn from
    ``seed`` (a Python int: pass it to :func:`diffkernels.mdm.mask_tokens` or any seeded mask
    generator; the same seed must give the same mask). ``mask_mode`` is not interpreted here,
    only passed through: e.g. ``"standard"`` or ``"mirror"`` (then l is 1/2 (l1 + l2) of the two
    MIRROR copies, and A measures MIRROR's mask noise). With ``mask_mode=None`` it is not passed
    at all: ``loss_fn(x, t, seed)``, the contract of :func:`estimate_ppots_grid`, so the same
    function serves both. The value is a float or a one-element tensor; with ``grad=True`` a
    scalar tensor differentiable with respect to ``params``.

    The nested sample (all seeded from ``seed``, so the result is a deterministic function of it
    if ``loss_fn`` is):

    - n_x examples ``data[i]``, drawn uniformly *with* replacement (``data``: anything with
      ``len()`` and integer indexing), so the examples are i.i.d. from the empirical distribution
      and C is the variance over ``data`` with the 1/N normalisation.
    - for each example, n_t rates: ``(t, w) = t_sampler.sample(1, s)`` with one seed s per draw
      (any object with ``sample(n, seed) -> (t, weight)``, e.g. the samplers of
      :mod:`diffkernels.mdm.samplers`; default :class:`Uniform`, t ~ U(0, 1), weight 1). One draw
      per call makes the rates i.i.d. from the sampler's marginal, which the estimator requires:
      a stratified sampler's within-batch correlation is a property of the batch, not of a
      sequence, and is not what B measures.
    - for each rate, n_m masks: ``seed = fold_seed(fold_seed(seed, tag), i, j, k)``.

    The decomposed quantity is ``l * w``, the weighted loss that training actually averages
    (with an importance sampler such as P-POTS the weight 1/p(t) is part of the estimator whose
    variance matters). For the unweighted loss pass a sampler whose weights are 1.

    ``grad=True`` also decomposes the trace of the gradient covariance: for every draw the
    gradient of ``l * w`` with respect to ``params`` (a list of tensors) is flattened, and the
    same estimator is applied to vectors, with ||.||^2 of deviations in place of squared
    deviations (docs/METHODS.md section 2.2). By default the exact per-sample gradients are used (streamed: memory
    n_x + n_t * n_m gradient vectors, fine for small models). ``num_projections=k`` instead
    projects each gradient with a fixed k x P Rademacher sketch S (entries +-1/sqrt(k),
    ``projection_seed`` defaults to one derived from ``seed``); every term is unbiased over S,
    with extra relative noise of order sqrt(2/k) that the standard errors do not include.

    Standard errors: delete-one jackknife over the examples (:func:`nested_variance_components`).
    ``loss_fn`` runs under ``torch.no_grad()`` unless ``grad=True``.

    Examples:
        A toy loss l = x + 2 t + u, with u uniform given by the mask seed: C = Var(x) = 2/3 over
        the data, B = 4 Var(t) = 1/3 for t ~ U(0, 1), A = Var(u) = 1/12.

        >>> import torch
        >>> from diffkernels.mdm import variance_decomposition
        >>> from diffkernels.rng import uniform
        >>> def loss_fn(x, t, seed, mask_mode="standard"):
        ...     return x + 2 * t + uniform(seed, torch.arange(1)).item()
        >>> r = variance_decomposition(loss_fn, [0.0, 1.0, 2.0], n_x=20, n_t=3, n_m=3, seed=0, progress=False)
        >>> round(r.A, 2), round(r.B, 2), round(r.C, 2)
        (0.08, 0.45, 0.67)
        >>> print(r)  # doctest: +ELLIPSIS
        loss: VarianceDecomposition(n_x=20, n_t=3, n_m=3): A = 0.0810724 +- 0.00895, B = 0.451074 +- ...
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    _check_sizes(n_x, n_t, n_m)
    try:
        num_examples = len(data)
    except TypeError:
        raise TypeError(f"data must support len() and integer indexing, got {type(data).__name__}") from None
    if num_examples < 1:
        raise ValueError("data must not be empty")
    if t_sampler is None:
        t_sampler = Uniform()
    elif not callable(getattr(t_sampler, "sample", None)):
        raise TypeError(f"t_sampler must have a method sample(n, seed) -> (t, weight), got {type(t_sampler).__name__}")
    if mask_mode is not None and not isinstance(mask_mode, str):
        raise TypeError(f"mask_mode must be a str or None, got {type(mask_mode).__name__}")
    check_seed(seed)
    if not isinstance(grad, bool):
        raise TypeError(f"grad must be a bool, got {type(grad).__name__}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
    if grad:
        params = _check_params(params)
    elif params is not None or num_projections is not None or projection_seed is not None:
        raise ValueError("params, num_projections and projection_seed apply to grad=True only")
    projection = None
    if num_projections is not None:
        k = _check_count(num_projections, "num_projections", 1)
        if projection_seed is None:
            projection_seed = fold_seed(seed, _PROJ_STREAM)
        check_seed(projection_seed)
        projection = _Projection(params, k, projection_seed)
    elif projection_seed is not None:
        raise ValueError("projection_seed needs num_projections")

    gen = torch.Generator(device="cpu")
    gen.manual_seed(fold_seed(seed, _EXAMPLE_STREAM))
    indices = torch.randint(0, num_examples, (n_x,), generator=gen, dtype=torch.int64)
    t_root = fold_seed(seed, _T_STREAM)
    mask_root = fold_seed(seed, _MASK_STREAM)
    extra = {} if mask_mode is None else {"mask_mode": mask_mode}

    values = torch.empty(n_x, n_t, n_m, dtype=_F64)
    rates = torch.empty(n_x, n_t, dtype=_F64)
    weights = torch.empty(n_x, n_t, dtype=_F64)
    g_stats = []  # per example (a_i, b_i, m_i) of the gradient vectors

    from tqdm.auto import tqdm

    with torch.set_grad_enabled(grad), tqdm(total=n_x * n_t * n_m, desc="variance decomposition",
                                            disable=not progress) as bar:
        for i in range(n_x):
            index = int(indices[i])
            x = data[index]
            block = None
            for j in range(n_t):
                t, w = _draw_rate(t_sampler, fold_seed(t_root, i, j))
                rates[i, j], weights[i, j] = t, w
                seed_ij = fold_seed(mask_root, i, j)
                for k in range(n_m):
                    out = loss_fn(x, t, fold_seed(seed_ij, k), **extra)
                    value = _as_scalar(out, grad)
                    weighted = value * w
                    v = float(weighted.detach()) if isinstance(weighted, Tensor) else float(weighted)
                    if not math.isfinite(v):
                        raise ValueError(f"loss_fn returned a non-finite loss {v} for data[{index}] at t={t:.6g}")
                    values[i, j, k] = v
                    if grad:
                        vec = _gradient(weighted, params, projection)
                        if block is None:
                            block = torch.empty(n_t, n_m, vec.numel(), dtype=_F64, device=vec.device)
                        block[j, k] = vec
                bar.update(n_m)
            if grad:
                if not bool(torch.isfinite(block).all()):
                    raise ValueError(f"the gradient of loss_fn is not finite for data[{index}]")
                g_stats.append(_example_stats(block))

    loss = nested_variance_components(values)
    result = VarianceDecomposition(**vars(loss), values=values, t=rates, weight=weights, indices=indices)
    if grad:
        a = torch.stack([s[0] for s in g_stats])
        b = torch.stack([s[1] for s in g_stats])
        means = torch.stack([s[2] for s in g_stats])
        result.grad = _components(a, b, means, n_t, n_m)
        result.grad_dim = int(means.shape[1])
        result.projected = projection is not None
    return result


def _as_scalar(out, grad: bool):
    if isinstance(out, Tensor):
        if out.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar (one-element) loss, got shape {tuple(out.shape)}")
        if grad and not out.requires_grad:
            raise ValueError("with grad=True, loss_fn must return a tensor that depends on params (requires_grad)")
        return out.reshape(())
    if grad:
        raise TypeError(f"with grad=True, loss_fn must return a scalar tensor, got {type(out).__name__}")
    try:
        return float(out)
    except (TypeError, ValueError):
        raise TypeError(f"loss_fn must return a float or a one-element tensor, got {type(out).__name__}") from None


def _gradient(value: Tensor, params: list, projection: Optional[_Projection]) -> Tensor:
    grads = torch.autograd.grad(value, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    if projection is not None:
        return projection(grads)
    device = params[0].device
    return torch.cat([g.reshape(-1).to(device=device, dtype=_F64) for g in grads])
