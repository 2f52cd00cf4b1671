"""Optimal loss value of diffusion models (METHODS.md section 3): the dataset's optimal denoiser,
estimators of the optimal loss J*(s), conversions, schedules and scaling-law fits."""

from .posterior import (
    PosteriorPartial,
    PosteriorStats,
    empty_partial,
    knn,
    merge_partials,
    posterior_mean,
    posterior_partial,
)

__all__ = [
    "PosteriorPartial",
    "PosteriorStats",
    "empty_partial",
    "knn",
    "merge_partials",
    "posterior_mean",
    "posterior_partial",
]
