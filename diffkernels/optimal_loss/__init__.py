"""Optimal loss value of diffusion models (docs/METHODS.md section 3): the dataset's optimal denoiser,
estimators of the optimal loss J*(s), conversions, schedules and scaling-law fits."""

from .conversions import (
    edm_schedule_loss,
    flow_matching_schedule_loss,
    flow_t_from_s,
    interpolate_log,
    loss_factor,
    s_from_flow,
    s_from_ve,
    s_from_vp,
    schedule_loss,
)
from .distributed import shard_bounds
from .estimators import CurveResult, estimate_curve
from .memorization import MemorizationResult, memorization
from .posterior import (
    PosteriorPartial,
    PosteriorStats,
    empty_partial,
    knn,
    merge_partials,
    posterior_mean,
    posterior_partial,
)
from .scaling import OffsetPowerLaw, PowerLaw, ScalingFit, fit_offset_power_law, fit_power_law, fit_scaling_law
from .schedules import adaptive_density, find_s_star, loss_weight, sample_sigmas

__all__ = [
    "PosteriorPartial",
    "PosteriorStats",
    "empty_partial",
    "knn",
    "merge_partials",
    "posterior_mean",
    "posterior_partial",
    # estimators
    "CurveResult",
    "estimate_curve",
    "shard_bounds",
    # conversions and schedules
    "loss_factor",
    "s_from_ve",
    "s_from_vp",
    "s_from_flow",
    "flow_t_from_s",
    "interpolate_log",
    "schedule_loss",
    "edm_schedule_loss",
    "flow_matching_schedule_loss",
    "find_s_star",
    "loss_weight",
    "adaptive_density",
    "sample_sigmas",
    # scaling laws
    "PowerLaw",
    "OffsetPowerLaw",
    "ScalingFit",
    "fit_power_law",
    "fit_offset_power_law",
    "fit_scaling_law",
    # memorisation
    "MemorizationResult",
    "memorization",
]
