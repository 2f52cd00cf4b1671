"""Masked diffusion language models (docs/METHODS.md section 2): variance-reduced training tools."""

from .ema import BinnedEMABaseline
from .loss import masked_cross_entropy, masked_diffusion_loss
from .masking import MaskedTokens, mask_tokens
from .ppots import EPRFit, PPOTSGrid, PPOTSSampler, estimate_ppots_grid, fit_epr
from .samplers import Clipped, LowDiscrepancy, Stratified, TimeSampler, Uniform
from .syrm import SyRMWeights, syrm_coefficients, syrm_loss, syrm_weights
from .variance import VarianceComponents, VarianceDecomposition, nested_variance_components, variance_decomposition

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
    "BinnedEMABaseline",
    "SyRMWeights",
    "syrm_coefficients",
    "syrm_loss",
    "syrm_weights",
    "VarianceComponents",
    "VarianceDecomposition",
    "nested_variance_components",
    "variance_decomposition",
]
