"""Bin-wise EMA control variate for the MDM loss (docs/METHODS.md section 2, method 4).

The method: split the masking rate into m bins, j = round(t (m - 1)); keep an exponential moving
average b_j of the loss in each bin; train on l_adj = l - c_j b_j, with c_j estimated from EMA
covariance statistics. The aim is to remove the masking-rate part of the loss noise (term B).

What it can and cannot do. b_j and c_j are statistics of *past* losses: they carry no gradient,
so d l_adj / d theta = d l / d theta exactly. The adjustment shifts the loss *value* by a constant
and leaves the gradient, hence the SGD noise and the training trajectory, bit-for-bit unchanged
(with a plain optimiser: only code that reads the loss value, such as logging, loss-based
clipping or spike detection, sees a difference). docs/mdm_ema_control_variate.md measures both
effects on a small MDM (``python python_examples/ema_control_variate.py``).
"""

from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor, nn

from .._validate import check_on_device

__all__ = ["BinnedEMABaseline"]


def _check_rate(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float in (0, 1], got {type(value).__name__}")
    value = float(value)
    if not (0.0 < value <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must lie in (0, 1], got {value}")
    return value


class BinnedEMABaseline(nn.Module):
    """Per-bin EMA baseline b_j and coefficient c_j; ``forward(loss, t)`` returns l - c_j b_j.

    ``num_bins`` m >= 1: bin j = round(t (m - 1)) (round half to even), t in [0, 1].
    ``decay`` eta in (0, 1]: the weight of the *new* observation, b_j <- (1 - eta) b_j + eta l
    (the paper's baseline learning rate, e.g. 0.01; not the "0.99" convention of parameter EMAs).
    ``coef``: how c_j is chosen:

    - ``"ema"`` (default, docs/METHODS.md as specified): per bin, c_j = clip(Cov_j / (Var_j + eps), 0, 1)
      from exponentially weighted statistics of that bin (below);
    - ``"pooled"``: one coefficient for all bins, the same statistics pooled over all sequences
      whatever their bin (the regression of l on b_{j(t)} across rates);
    - a fixed float, e.g. 1.0 for the plain baseline subtraction l - b_j.

    ``stats_decay`` rho: the EMA rate of the statistics (default: ``decay``). ``eps``: added to the
    variance in the ratio, so that c -> 0 where the baseline hardly varies.

    State (buffers, so ``state_dict``, ``.to(device)`` and checkpoints work; float32 values):

    - baseline b_j, updated once per step from the mean of that bin's losses in the batch,
      b_j <- (1 - eta) b_j + eta * mean_{r in bin j} l_r (bins absent from the batch are left
      alone), with ``steps_j`` counting the updates. The value used is bias-corrected like Adam's
      moments, b_j / (1 - (1 - eta)^steps_j), so the first update already gives the bin's mean
      instead of a value pulled towards the initial 0; a bin never seen has baseline 0.
    - statistics of the pairs (l_r, B_r), B_r = the bias-corrected baseline of r's bin *in use
      before this step's update*, over the sequences whose bin had been seen before: an
      exponentially weighted mean mu_L, mu_B, covariance Cov(l, B) and variance Var(B), per bin and
      pooled. Each step mixes the old moments (weight 1 - rho) with the batch's moments (weight
      rho), exactly as the moments of a mixture, in centred form (no E[xy] - E[x]E[y] cancellation):

          mu  <- (1 - rho) mu + rho xbar
          Cov <- (1 - rho) Cov + rho Cov_batch + rho (1 - rho) (mu_L - Lbar)(mu_B - Bbar)

      (the first update of a group sets mu = xbar, Cov = Cov_batch). Within one bin B_r is the
      same for every r, so the per-bin Cov_batch is 0 and the recursion is the classic EW
      covariance of (Lbar_j, B_j). c = clip(Cov / (Var + eps), 0, 1), and 0 until the group has
      two statistics updates: the regression coefficient minimising Var(l - c B) under the EMA
      weighting (as in the reference code), clipped because a negative or larger-than-one
      coefficient would amplify noise.

    What the per-bin coefficient measures: within one bin b_j changes only through drift. At
    fixed parameters a new loss is independent of a baseline built from older losses, so
    Cov_j -> 0 and c_j is noise around 0; c_j is large only while the loss level drifts
    (training). The pooled coefficient sees the differences between bins (the t-dependence of the
    loss, term B) and tends to about 1 when the baselines are accurate.

    :meth:`adjust` uses the state as it is (past steps only: b_j never contains the loss it is
    subtracted from), :meth:`update` then folds the batch in; ``forward`` does both, in that
    order. Everything is vectorised with scatter operations, with no host synchronisation (the
    range check on t runs on CPU tensors only). Under data parallelism each rank keeps its own
    state; pass the all-gathered (loss, t) of the global batch to keep the ranks identical.

    Examples:
        >>> import torch
        >>> from diffkernels.mdm import BinnedEMABaseline
        >>> baseline = BinnedEMABaseline(num_bins=5, decay=0.1, coef=1.0)  # plain l - b_j
        >>> t = torch.tensor([0.2, 0.9])  # bins round(4 t) = 1 and 4
        >>> baseline(torch.tensor([2.0, 1.0]), t)  # no baseline yet
        tensor([2., 1.])
        >>> [round(b, 4) for b in baseline.current_baseline().tolist()]  # bias-corrected: the bin's mean
        [0.0, 2.0, 0.0, 0.0, 1.0]
        >>> baseline(torch.tensor([2.5, 1.5]), t)
        tensor([0.5000, 0.5000])

        In training the adjusted loss has the gradient of the plain loss:

        >>> loss_per_seq = torch.tensor([2.0, 1.0], requires_grad=True)
        >>> baseline(loss_per_seq, t).mean().backward()
        >>> loss_per_seq.grad
        tensor([0.5000, 0.5000])
    """

    _STATS = ("mu_l", "mu_b", "cov_lb", "var_b", "stat_steps")

    def __init__(self, num_bins: int = 10, decay: float = 0.01, *, coef: Union[str, float] = "ema",
                 stats_decay: Union[float, None] = None, eps: float = 1e-8, device=None):
        super().__init__()
        if isinstance(num_bins, bool) or not isinstance(num_bins, int):
            raise TypeError(f"num_bins must be a Python int, got {type(num_bins).__name__}")
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        self.num_bins = num_bins
        self.decay = _check_rate(decay, "decay")
        self.stats_decay = self.decay if stats_decay is None else _check_rate(stats_decay, "stats_decay")
        if isinstance(coef, str):
            if coef not in ("ema", "pooled"):
                raise ValueError(f"coef must be 'ema', 'pooled' or a float, got {coef!r}")
        elif isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef):
            raise TypeError(f"coef must be 'ema', 'pooled' or a finite Python float, got {coef!r}")
        else:
            coef = float(coef)
        self.coef = coef
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps >= 0):
            raise ValueError(f"eps must be a float >= 0, got {eps!r}")
        self.eps = float(eps)
        self.register_buffer("baseline", torch.zeros(num_bins, dtype=torch.float32, device=device))
        self.register_buffer("steps", torch.zeros(num_bins, dtype=torch.int64, device=device))
        for prefix, size in (("bin_", num_bins), ("pooled_", 1)):
            for name in self._STATS:
                dtype = torch.int64 if name == "stat_steps" else torch.float32
                self.register_buffer(prefix + name, torch.zeros(size, dtype=dtype, device=device))

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}, decay={self.decay}, coef={self.coef!r}, stats_decay={self.stats_decay}"

    # --- helpers ------------------------------------------------------------------------------

    def bins(self, t: Tensor) -> Tensor:
        """Bin index round(t (m - 1)) of each rate, int64, clamped to [0, m - 1]."""
        return torch.round(t.to(torch.float32) * (self.num_bins - 1)).clamp_(0, self.num_bins - 1).to(torch.int64)

    def current_baseline(self) -> Tensor:
        """The bias-corrected baseline of every bin (0 for bins never seen), shape (m,)."""
        seen = self.steps > 0
        norm = 1.0 - torch.pow(1.0 - self.decay, self.steps.to(torch.float32))
        return torch.where(seen, self.baseline / torch.where(seen, norm, 1.0), 0.0)

    def _ratio(self, prefix: str) -> Tensor:
        cov, var = getattr(self, prefix + "cov_lb"), getattr(self, prefix + "var_b")
        if self.eps > 0:
            c = cov / (var + self.eps)
        else:
            c = torch.where(var > 0, cov / torch.where(var > 0, var, 1.0), 0.0)
        return torch.where(getattr(self, prefix + "stat_steps") >= 2, c.clamp(0.0, 1.0), 0.0)

    def coefficients(self) -> Tensor:
        """c_j of every bin, shape (m,): the fixed ``coef``, or the clipped regression coefficient
        of the per-bin (``"ema"``) or pooled (``"pooled"``) statistics."""
        if self.coef == "ema":
            return self._ratio("bin_")
        if self.coef == "pooled":
            return self._ratio("pooled_").expand(self.num_bins).clone()
        return torch.full_like(self.baseline, self.coef)

    def _check(self, loss: Tensor, t: Tensor) -> None:
        if not isinstance(loss, Tensor) or not loss.dtype.is_floating_point:
            raise TypeError("loss_per_seq must be a floating-point tensor of per-sequence losses")
        if loss.dim() != 1:
            raise ValueError(f"loss_per_seq must have shape (B,), got {tuple(loss.shape)}")
        if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
            raise TypeError("t must be a floating-point tensor of masking rates")
        if t.shape != loss.shape or t.device != loss.device:
            raise ValueError(f"t must have loss_per_seq's shape {tuple(loss.shape)} and device {loss.device}, "
                             f"got {tuple(t.shape)} on {t.device}")
        if t.device != self.baseline.device:
            raise ValueError(f"t is on {t.device} but the baseline state is on {self.baseline.device}; "
                             "move the module with .to()")
        check_on_device(((t >= 0) & (t <= 1)).all(), "t must lie in [0, 1]", "diffkernels.mdm.BinnedEMABaseline")

    def _update_stats(self, prefix: str, group: Tensor, weight: Tensor, loss: Tensor, base: Tensor) -> None:
        """Mix the batch's weighted moments of (loss, base), per group, into the EW moments."""
        size = getattr(self, prefix + "mu_l").numel()
        zeros = torch.zeros(size, dtype=torch.float32, device=loss.device)
        n = zeros.index_add(0, group, weight)
        present = n > 0
        n_safe = n.clamp(min=1.0)
        l_bar = zeros.index_add(0, group, weight * loss) / n_safe
        b_bar = zeros.index_add(0, group, weight * base) / n_safe
        dl, db = loss - l_bar[group], base - b_bar[group]
        cov_batch = zeros.index_add(0, group, weight * dl * db) / n_safe
        var_batch = zeros.index_add(0, group, weight * db * db) / n_safe

        rho = self.stats_decay
        steps = getattr(self, prefix + "stat_steps")
        first = steps == 0
        mu_l, mu_b = getattr(self, prefix + "mu_l"), getattr(self, prefix + "mu_b")
        cov, var = getattr(self, prefix + "cov_lb"), getattr(self, prefix + "var_b")
        mix_cov = (1 - rho) * cov + rho * cov_batch + rho * (1 - rho) * (mu_l - l_bar) * (mu_b - b_bar)
        mix_var = (1 - rho) * var + rho * var_batch + rho * (1 - rho) * (mu_b - b_bar) ** 2
        new = {
            "cov_lb": torch.where(first, cov_batch, mix_cov),
            "var_b": torch.where(first, var_batch, mix_var),
            "mu_l": torch.where(first, l_bar, (1 - rho) * mu_l + rho * l_bar),
            "mu_b": torch.where(first, b_bar, (1 - rho) * mu_b + rho * b_bar),
        }
        for name, value in new.items():
            buf = getattr(self, prefix + name)
            buf.copy_(torch.where(present, value, buf))
        steps.add_(present.to(torch.int64))

    # --- the method ---------------------------------------------------------------------------

    def adjust(self, loss_per_seq: Tensor, t: Tensor) -> Tensor:
        """l - c_j b_j for each sequence (same shape and dtype as ``loss_per_seq``; the subtracted
        term is a constant, so the gradient is that of ``loss_per_seq``). Does not change the state."""
        self._check(loss_per_seq, t)
        j = self.bins(t)
        shift = (self.coefficients() * self.current_baseline())[j]
        return loss_per_seq - shift.to(loss_per_seq.dtype)

    @torch.no_grad()
    def update(self, loss_per_seq: Tensor, t: Tensor) -> None:
        """Fold one batch into the statistics and the baselines (see the class docstring)."""
        self._check(loss_per_seq, t)
        j = self.bins(t)
        loss = loss_per_seq.detach().to(torch.float32)
        # statistics first: against the baseline in use before this update, for sequences whose
        # bin had a baseline
        base = self.current_baseline()[j]
        valid = (self.steps > 0)[j].to(torch.float32)
        self._update_stats("bin_", j, valid, loss, base)
        self._update_stats("pooled_", torch.zeros_like(j), valid, loss, base)

        count = torch.zeros_like(self.baseline).index_add_(0, j, torch.ones_like(loss))
        total = torch.zeros_like(self.baseline).index_add_(0, j, loss)
        present = count > 0
        mean = total / count.clamp(min=1.0)
        eta = self.decay
        self.baseline.copy_(torch.where(present, (1.0 - eta) * self.baseline + eta * mean, self.baseline))
        self.steps.add_(present.to(torch.int64))

    def forward(self, loss_per_seq: Tensor, t: Tensor) -> Tensor:
        """``adjust`` with the current state, then ``update`` with this batch; returns the adjusted losses.

        Args:
            loss_per_seq: (B,) floating-point per-sequence losses (may require grad).
            t: (B,) masking rates in [0, 1] of those sequences, on the module's device.

        Returns:
            l - c_j b_j, shape and dtype of ``loss_per_seq``, with its gradient.
        """
        adjusted = self.adjust(loss_per_seq, t)
        self.update(loss_per_seq, t)
        return adjusted
