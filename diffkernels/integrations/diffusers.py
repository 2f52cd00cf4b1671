"""The optimal value of the loss that diffusers' training scripts log, per training timestep.

diffusers' training scripts (``train_text_to_image.py``, ``train_unconditional.py``, the DreamBooth and
SD3/Flux scripts) compute ``F.mse_loss(model_pred.float(), target.float(), reduction="mean")``: the mean
over all elements of the squared error of the prediction target that the noise scheduler implies. No
network can go below the loss of the training set's optimal denoiser, the posterior mean
E[target | x_t] under the empirical data distribution. :func:`optimal_training_loss` estimates that
floor per timestep, in exactly those units, so a logged loss can be compared with it directly.

Every process x_t = alpha x0 + sigma eps has the same posterior of x0 as the VE process
x = x0 + s eps with s = sigma / alpha, so one curve J*(s) = E||x0 - E[x0 | x_t]||^2 (from
:func:`diffkernels.optimal_loss.estimate_curve`) gives every target. A target a*eps + b*x0 has the error
(b - a alpha/sigma) (x0 - E[x0 | x_t]), because eps = (x_t - alpha x0) / sigma, so its optimal loss is
J*(s) times ``factor = (b - a alpha/sigma)^2``:

    prediction_type    target                   (a, b)            factor
    sample             x0                       (0, 1)            1
    epsilon            eps (the noise)          (1, 0)            1/s^2 = SNR
    v_prediction       alpha eps - sigma x0     (alpha, -sigma)   ((alpha^2 + sigma^2)/sigma)^2 = 1 + SNR (VP)
    flow_prediction    eps - x0 (flow matching) (1, -1)           1/sigma^2 = (1 + s)^2/s^2

(SNR = alpha^2/sigma^2 = 1/s^2.) Divided by D, the number of elements of a sample, these are the
per-element losses that ``reduction="mean"`` reports.

Schedulers:

- Schedulers with ``alphas_cumprod`` (DDPMScheduler, DDIMScheduler, PNDMScheduler, ...), indexed by
  integer timesteps 0 <= t < len(alphas_cumprod) as their ``add_noise`` and ``get_velocity`` do:
  alpha = sqrt(alphas_cumprod[t]), sigma = sqrt(1 - alphas_cumprod[t]). Targets ``epsilon``,
  ``v_prediction`` and ``sample``; the default is ``noise_scheduler.config.prediction_type``.
- FlowMatchEulerDiscreteScheduler: x_t = (1 - sigma) x0 + sigma eps as its ``scale_noise`` computes,
  with sigma = ``noise_scheduler.sigmas[k]`` for the timestep ``noise_scheduler.timesteps[k]``. The
  accepted timesteps are the values of ``noise_scheduler.timesteps`` (matched to float32 rounding),
  which is how the SD3/Flux scripts sample them: ``noise_scheduler.timesteps[indices]``. A scheduler
  fresh from its config has ``timesteps = num_train_timesteps * sigmas`` with the ``shift`` already
  applied (sigmas = shift u / (1 + (shift - 1) u), u = k / num_train_timesteps), so with shift = 1 they
  are 1, ..., num_train_timesteps, and with another shift they are not integers; after
  ``set_timesteps`` the scheduler's current timesteps and sigmas are used. Targets ``flow_prediction``
  (the velocity eps - x0, the default), ``epsilon`` and ``sample``.

At sigma/alpha = infinity (alphas_cumprod = 0 with zero terminal SNR, or flow-matching sigma = 1) the
posterior is the uniform distribution over the data and J* is the data's total variance, computed
exactly (standard error 0).

Min-SNR weighting (``snr_gamma``) reproduces ``train_text_to_image.py``: ``snr = compute_snr(scheduler,
timesteps)``, weight = min(snr, gamma), divided by snr for ``epsilon`` and by snr + 1 for
``v_prediction`` (unchanged for ``sample``), computed with the same float32 torch operations. The
weighted optimal loss is weight times the optimal loss: min(snr, gamma) J* / D for every target.
Like the script's, the ``epsilon`` weight is NaN (0/0) at a timestep with zero SNR.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..optimal_loss.estimators import ESTIMATORS, estimate_curve
from ..optimal_loss.estimators.data import as_2d

__all__ = ["OptimalTrainingLoss", "optimal_training_loss", "PREDICTION_TYPES"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")
_VP_TYPES = ("epsilon", "v_prediction", "sample")
_FLOW_TYPES = ("flow_prediction", "epsilon", "sample")
_CHUNK_ELEMENTS = 1 << 24  # rows per chunk of the exact total variance: at most this many elements


def _require_diffusers():
    try:
        import diffusers
    except ImportError as exc:  # pragma: no cover - diffusers is installed in the test environment
        raise ImportError("diffkernels.integrations.diffusers needs the diffusers library: "
                          "pip install diffkernels[diffusers]") from exc
    return diffusers


@dataclass(frozen=True, eq=False)
class OptimalTrainingLoss:
    """The optimal training loss per requested timestep (all arrays have one entry per timestep, in
    the order given, and are read-only).

    Attributes:
        timesteps: the requested timesteps (int64 for ``alphas_cumprod`` schedulers, float64 for flow matching).
        s: the VE noise level sigma/alpha (``inf`` where alpha = 0).
        alpha, sigma: the process coefficients, x_t = alpha x0 + sigma eps.
        prediction_type: the target: ``"epsilon"``, ``"v_prediction"``, ``"sample"`` or ``"flow_prediction"``.
        loss: the optimal per-element loss of the target, the floor of
            ``F.mse_loss(model_pred, target, reduction="mean")`` at that timestep.
        stderr: its standard error (from the estimator; 0 where s = inf).
        factor: ``loss / x0_loss`` (module docstring).
        x0_loss, x0_stderr: the optimal per-element x0-loss J*(s)/D and its standard error.
        snr_gamma: the min-SNR gamma, or None.
        weights: the min-SNR loss weights of ``train_text_to_image.py`` (None without ``snr_gamma``).
        weighted_loss, weighted_stderr: ``weights * loss`` and ``|weights| * stderr``, the floor of the
            min-SNR-weighted loss (None without ``snr_gamma``).
        dim: D, the elements per sample. num_data: N.
        num_queries, estimator, seed: the estimator's settings.
    """

    timesteps: np.ndarray
    s: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    prediction_type: str
    loss: np.ndarray
    stderr: np.ndarray
    factor: np.ndarray
    x0_loss: np.ndarray
    x0_stderr: np.ndarray
    snr_gamma: Optional[float]
    weights: Optional[np.ndarray]
    weighted_loss: Optional[np.ndarray]
    weighted_stderr: Optional[np.ndarray]
    dim: int
    num_data: int
    num_queries: int
    estimator: str
    seed: int

    def expected_loss(self, weighted: Optional[bool] = None) -> tuple[float, float]:
        """The mean optimal loss over the requested timesteps and its standard error.

        With ``timesteps=range(num_train_timesteps)`` this is the floor of the loss a training script
        logs on average (it draws timesteps uniformly). ``weighted``: use the min-SNR-weighted loss
        (default: when ``snr_gamma`` was given). Repeated timesteps share one estimate, so their
        errors are added before squaring; different noise levels are independent.
        """
        if weighted is None:
            weighted = self.weights is not None
        if weighted and self.weights is None:
            raise ValueError("weighted=True needs a result computed with snr_gamma")
        value, se = (self.weighted_loss, self.weighted_stderr) if weighted else (self.loss, self.stderr)
        _, group = np.unique(self.s, return_inverse=True)
        se_groups = np.bincount(group.reshape(-1), weights=se)
        n = len(value)
        return float(value.mean()), float(math.sqrt(float(np.sum(se_groups**2)))) / n


# --- input checks ------------------------------------------------------------------------------


def _as_timesteps(timesteps) -> np.ndarray:
    if isinstance(timesteps, Tensor):
        if timesteps.dtype.is_complex or timesteps.dtype == torch.bool:
            raise TypeError(f"timesteps must be real numbers, got dtype {timesteps.dtype}")
        t = timesteps.detach().cpu().to(torch.float64).numpy().reshape(-1)
    else:
        if isinstance(timesteps, bool):
            raise TypeError("timesteps must be numbers, got bool")
        try:
            t = np.asarray(timesteps, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"timesteps must be a number, a sequence of numbers, a numpy array or a tensor, "
                            f"got {type(timesteps).__name__}") from exc
    if t.size == 0:
        raise ValueError("timesteps is empty")
    if not np.isfinite(t).all():
        raise ValueError("timesteps must be finite")
    return t


def _vp_coefficients(noise_scheduler, t: np.ndarray):
    """(timesteps as int64, alpha, sigma) for a scheduler with alphas_cumprod."""
    ac = noise_scheduler.alphas_cumprod.detach().cpu().to(torch.float64).numpy()
    T = ac.size
    if not (t == np.round(t)).all():
        raise ValueError(f"timesteps must be integers for {type(noise_scheduler).__name__}, got {t[t != np.round(t)][:5].tolist()}")
    bad = (t < 0) | (t >= T)
    if bad.any():
        raise ValueError(f"timesteps must lie in [0, {T - 1}] for {type(noise_scheduler).__name__} "
                         f"(len(alphas_cumprod) = {T}), got {t[bad][:5].tolist()}")
    idx = t.astype(np.int64)
    abar = ac[idx]
    if not ((abar >= 0) & (abar < 1)).all():
        raise ValueError(f"alphas_cumprod must lie in [0, 1) at the requested timesteps, got {abar[(abar < 0) | (abar >= 1)][:5].tolist()}")
    return idx, np.sqrt(abar), np.sqrt(1.0 - abar)


def _flow_coefficients(noise_scheduler, t: np.ndarray):
    """(timesteps, alpha, sigma) for FlowMatchEulerDiscreteScheduler: the sigma of the matching schedule entry."""
    sched_t = noise_scheduler.timesteps.detach().cpu().to(torch.float64).numpy().reshape(-1)
    sched_sigma = noise_scheduler.sigmas.detach().cpu().to(torch.float64).numpy().reshape(-1)
    # Match to float32 rounding: the schedule is stored in float32, the caller may pass float64 values.
    tol = 1e-5 * max(1.0, float(np.abs(sched_t).max()))
    order = np.argsort(sched_t)
    sorted_t = sched_t[order]
    pos = np.searchsorted(sorted_t, t)
    left, right = np.clip(pos - 1, 0, len(sorted_t) - 1), np.clip(pos, 0, len(sorted_t) - 1)
    nearest = np.where(np.abs(sorted_t[left] - t) <= np.abs(sorted_t[right] - t), left, right)
    k = order[nearest]
    bad = np.abs(sched_t[k] - t) > tol
    if bad.any():
        raise ValueError(f"timesteps must be values of noise_scheduler.timesteps ({len(sched_t)} values from "
                         f"{sched_t.min():.6g} to {sched_t.max():.6g}; sample them as noise_scheduler.timesteps[indices]), "
                         f"got {t[bad][:5].tolist()}")
    sigma = sched_sigma[k]
    if not ((sigma > 0) & (sigma <= 1)).all():
        raise ValueError(f"flow-matching sigma must lie in (0, 1] at the requested timesteps (sigma = 0 has no noise), "
                         f"got {sigma[(sigma <= 0) | (sigma > 1)][:5].tolist()}")
    return t, 1.0 - sigma, sigma


def _target_coefficients(prediction_type: str, alpha: np.ndarray, sigma: np.ndarray):
    """(a, b) with target = a * eps + b * x0."""
    one, zero = np.ones_like(alpha), np.zeros_like(alpha)
    return {
        "epsilon": (one, zero),
        "sample": (zero, one),
        "v_prediction": (alpha, -sigma),  # diffusers' get_velocity
        "flow_prediction": (one, -one),  # noise - x0
    }[prediction_type]


def _total_variance(flat) -> float:
    """E||x0 - mean||^2 over the rows of (N, D) data (the optimal x0-loss at s = inf), in float64, in row chunks."""
    N, D = flat.shape
    step = max(1, _CHUNK_ELEMENTS // D)

    def chunks():
        for start in range(0, N, step):
            block = flat[start:start + step]
            block = block.detach().cpu() if isinstance(block, Tensor) else torch.from_numpy(np.asarray(block))
            yield block.to(torch.float64)

    mean = sum(c.sum(dim=0) for c in chunks()) / N
    return float(sum((c - mean).square().sum() for c in chunks())) / N


def _snr_weights(noise_scheduler, idx: np.ndarray, prediction_type: str, snr_gamma: float) -> np.ndarray:
    """The min-SNR weights as train_text_to_image.py computes them (float32, diffusers' compute_snr)."""
    _require_diffusers()
    from diffusers.training_utils import compute_snr

    timesteps = torch.as_tensor(idx, dtype=torch.long)
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        weights = weights / snr
    elif prediction_type == "v_prediction":
        weights = weights / (snr + 1)
    return weights.to(torch.float64).numpy()


def _read_only(*arrays):
    for a in arrays:
        if a is not None:
            a.setflags(write=False)


# --- the public function -----------------------------------------------------------------------


def optimal_training_loss(
    data,
    noise_scheduler,
    timesteps,
    *,
    prediction_type: Optional[str] = None,
    num_queries: int,
    estimator: str = "full",
    seed: int = 0,
    snr_gamma: Optional[float] = None,
    **estimate_kwargs,
) -> OptimalTrainingLoss:
    """The optimal value of diffusers' training loss for ``data`` at each of ``timesteps``.

    The loss is ``F.mse_loss(model_pred.float(), target.float(), reduction="mean")`` with the target
    of ``prediction_type`` (module docstring: formulas, schedulers and accepted timesteps). The
    optimum is that of the training set itself (the posterior mean under the empirical
    distribution of ``data``, which memorises it), the floor of the training loss.

    Args:
        data: the training data as diffusers feeds it to the model (images scaled to [-1, 1], or
            latents already multiplied by the VAE's scaling factor): an (N, ...) tensor or numpy
            array, e.g. (N, C, H, W), flattened to (N, D).
        noise_scheduler: a scheduler with ``alphas_cumprod`` (DDPMScheduler, DDIMScheduler, ...) or a
            FlowMatchEulerDiscreteScheduler, e.g. built from its config: ``DDPMScheduler(**config)``.
        timesteps: one timestep or a sequence / array / tensor of them (repeats allowed).
        prediction_type: ``"epsilon"``, ``"v_prediction"``, ``"sample"`` or ``"flow_prediction"``
            (the velocity noise - x0 of flow matching). None: ``noise_scheduler.config.prediction_type``,
            or ``"flow_prediction"`` for the flow-matching scheduler.
        num_queries: queries per noise level of the estimator (the standard error falls as 1/sqrt).
        estimator: ``"full"`` (default), ``"snis"``, ``"dol"`` or ``"cdol"``, see
            :func:`diffkernels.optimal_loss.estimate_curve`.
        seed: the estimator's seed.
        snr_gamma: min-SNR gamma (> 0) as in diffusers' ``train_text_to_image.py --snr_gamma``; needs
            a scheduler with ``alphas_cumprod``.
        **estimate_kwargs: passed to :func:`diffkernels.optimal_loss.estimate_curve` (``subset_size``,
            ``C``, ``batch_size``, ``progress``, ``device``, ``precision``, ``checkpoint``, ...).

    Returns:
        An :class:`OptimalTrainingLoss`. Each distinct noise level is estimated once.

    Examples:
        >>> import torch
        >>> from diffusers import DDPMScheduler
        >>> from diffkernels.integrations.diffusers import optimal_training_loss
        >>> data = torch.rand(40, 1, 4, 4) * 2 - 1  # 40 tiny images in [-1, 1]
        >>> scheduler = DDPMScheduler(num_train_timesteps=1000)  # from its config, nothing downloaded
        >>> opt = optimal_training_loss(data, scheduler, [10, 500, 999], num_queries=128, progress=False)
        >>> opt.prediction_type, opt.loss.shape
        ('epsilon', (3,))
        >>> bool(opt.x0_loss[0] < opt.x0_loss[1] < opt.x0_loss[2])  # the x0-loss grows with the noise
        True
        >>> [round(float(v), 2) for v in opt.s]  # sigma/alpha: the VE noise level of each timestep
        [0.05, 3.44, 157.41]
    """
    diffusers = _require_diffusers()
    flat = as_2d(data)  # the estimator checks data the same way; checked here before any other argument
    N, D = flat.shape
    if isinstance(num_queries, bool) or not isinstance(num_queries, numbers.Integral):
        raise TypeError(f"num_queries must be an int, got {type(num_queries).__name__}")
    if num_queries < 1:
        raise ValueError(f"num_queries must be >= 1, got {num_queries}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise TypeError(f"seed must be an int >= 0, got {seed!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    t = _as_timesteps(timesteps)

    if isinstance(noise_scheduler, diffusers.FlowMatchEulerDiscreteScheduler):
        family, allowed = "flow", _FLOW_TYPES
    elif isinstance(getattr(noise_scheduler, "alphas_cumprod", None), Tensor):
        family, allowed = "vp", _VP_TYPES
        if getattr(noise_scheduler.config, "use_flow_sigmas", False):
            raise ValueError(f"{type(noise_scheduler).__name__} with use_flow_sigmas=True is not supported; "
                             "use FlowMatchEulerDiscreteScheduler for flow matching")
    else:
        raise TypeError(f"noise_scheduler must be a diffusers scheduler with alphas_cumprod (DDPMScheduler, "
                        f"DDIMScheduler, ...) or a FlowMatchEulerDiscreteScheduler, got {type(noise_scheduler).__name__}")
    if prediction_type is None:
        prediction_type = "flow_prediction" if family == "flow" else noise_scheduler.config.prediction_type
    if prediction_type not in allowed:
        raise ValueError(f"prediction_type must be one of {allowed} for {type(noise_scheduler).__name__}, "
                         f"got {prediction_type!r}")
    if snr_gamma is not None:
        if family != "vp":
            raise ValueError("snr_gamma (min-SNR weighting with diffusers' compute_snr) needs a scheduler with "
                             f"alphas_cumprod, not {type(noise_scheduler).__name__}")
        if isinstance(snr_gamma, bool) or not isinstance(snr_gamma, numbers.Real):
            raise TypeError(f"snr_gamma must be a number, got {type(snr_gamma).__name__}")
        snr_gamma = float(snr_gamma)
        if not (math.isfinite(snr_gamma) and snr_gamma > 0):
            raise ValueError(f"snr_gamma must be finite and > 0, got {snr_gamma}")

    steps, alpha, sigma = (_vp_coefficients if family == "vp" else _flow_coefficients)(noise_scheduler, t)
    with np.errstate(divide="ignore"):
        s = sigma / alpha  # inf where alpha = 0

    # J*(s) per distinct finite level from the estimator; at s = inf the data's total variance, exactly.
    x0_total = np.empty(t.size)
    x0_se = np.zeros(t.size)
    finite = np.isfinite(s)
    if finite.any():
        levels, which = np.unique(s[finite], return_inverse=True)
        curve = estimate_curve(data, levels, estimator=estimator, num_queries=num_queries, seed=seed,
                               **estimate_kwargs)
        x0_total[finite] = curve.j_star[which.reshape(-1)]
        x0_se[finite] = curve.stderr[which.reshape(-1)]
    if not finite.all():
        x0_total[~finite] = _total_variance(flat)

    a, b = _target_coefficients(prediction_type, alpha, sigma)
    factor = (b - a * alpha / sigma) ** 2
    x0_loss, x0_stderr = x0_total / D, x0_se / D
    loss, stderr = factor * x0_loss, factor * x0_stderr
    weights = weighted_loss = weighted_stderr = None
    if snr_gamma is not None:
        weights = _snr_weights(noise_scheduler, steps, prediction_type, snr_gamma)
        weighted_loss, weighted_stderr = weights * loss, np.abs(weights) * stderr
    steps = np.asarray(steps, dtype=np.int64 if family == "vp" else np.float64).copy()
    _read_only(steps, s, alpha, sigma, loss, stderr, factor, x0_loss, x0_stderr, weights, weighted_loss,
               weighted_stderr)
    return OptimalTrainingLoss(
        timesteps=steps, s=s, alpha=alpha, sigma=sigma, prediction_type=prediction_type, loss=loss, stderr=stderr,
        factor=factor, x0_loss=x0_loss, x0_stderr=x0_stderr, snr_gamma=snr_gamma, weights=weights,
        weighted_loss=weighted_loss, weighted_stderr=weighted_stderr, dim=D, num_data=N, num_queries=int(num_queries),
        estimator=estimator, seed=int(seed),
    )
