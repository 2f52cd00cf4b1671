"""Masked diffusion language models (METHODS.md section 2): variance-reduced training tools."""

from .loss import masked_cross_entropy, masked_diffusion_loss
from .masking import MaskedTokens, mask_tokens
from .samplers import (
    Clipped,
    EPRFit,
    LowDiscrepancy,
    PPOTSGrid,
    PPOTSSampler,
    Stratified,
    TimeSampler,
    Uniform,
    estimate_ppots_grid,
    fit_epr,
)

__all__ = [
    "MaskedTokens",
    "mask_tokens",
    "masked_cross_entropy",
    "masked_diffusion_loss",
    "Clipped",
    "EPRFit",
    "LowDiscrepancy",
    "PPOTSGrid",
    "PPOTSSampler",
    "Stratified",
    "TimeSampler",
    "Uniform",
    "estimate_ppots_grid",
    "fit_epr",
]
