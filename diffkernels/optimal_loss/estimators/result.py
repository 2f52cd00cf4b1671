"""The result of :func:`~.curve.estimate_curve`: :class:`CurveResult`, with JSON-ready dicts and CSV."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = ["CurveResult"]


@dataclass
class CurveResult:
    """J*(s) on a grid of noise levels. Totals are sums over the D elements of a sample.

    ``j_star`` / ``stderr``: the recommended estimate (``"full"``: the posterior-variance form;
    subset estimators: the A - B form). ``j_star_ab`` / ``stderr_ab``: the A - B form (all
    estimators). ``j_star_var`` / ``stderr_var``: the posterior-variance form (``"full"`` only, else
    None). ``*_per_element`` properties divide by ``dim``. ``common_random_numbers``: every level used
    the same draws (see :func:`~diffkernels.optimal_loss.estimate_curve`).

    Examples:
        >>> import torch
        >>> from diffkernels.optimal_loss import CurveResult, estimate_curve
        >>> data = torch.randn(64, 2)
        >>> curve = estimate_curve(data, [0.1, 1.0, 10.0], num_queries=256, progress=False)
        >>> curve.estimator, curve.dim, curve.j_star.shape, curve.j_star_per_element.shape
        ('full', 2, (3,), (3,))
        >>> saved = curve.to_dict()  # JSON-ready; curve.to_csv(path) writes one row per level
        >>> bool((CurveResult.from_dict(saved).j_star == curve.j_star).all())
        True
    """

    sigmas: np.ndarray
    j_star: np.ndarray
    stderr: np.ndarray
    j_star_ab: np.ndarray
    stderr_ab: np.ndarray
    j_star_var: Optional[np.ndarray]
    stderr_var: Optional[np.ndarray]
    estimator: str
    dim: int
    num_data: int
    num_queries: int
    subset_size: Optional[int] = None
    C: Optional[float] = None
    seed: int = 0
    extra: dict = field(default_factory=dict)
    common_random_numbers: bool = False

    @property
    def j_star_per_element(self) -> np.ndarray:
        return self.j_star / self.dim

    @property
    def stderr_per_element(self) -> np.ndarray:
        return self.stderr / self.dim

    def to_dict(self) -> dict:
        def arr(a):
            return None if a is None else [float(v) for v in a]

        return {
            "estimator": self.estimator, "dim": self.dim, "num_data": self.num_data,
            "num_queries": self.num_queries, "subset_size": self.subset_size, "C": self.C, "seed": self.seed,
            "sigmas": arr(self.sigmas), "j_star": arr(self.j_star), "stderr": arr(self.stderr),
            "j_star_per_element": arr(self.j_star_per_element), "stderr_per_element": arr(self.stderr_per_element),
            "j_star_ab": arr(self.j_star_ab), "stderr_ab": arr(self.stderr_ab),
            "j_star_var": arr(self.j_star_var), "stderr_var": arr(self.stderr_var),
            **({"common_random_numbers": True} if self.common_random_numbers else {}),
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "CurveResult":
        def arr(key):
            return None if d.get(key) is None else np.asarray(d[key], dtype=np.float64)

        return cls(sigmas=arr("sigmas"), j_star=arr("j_star"), stderr=arr("stderr"), j_star_ab=arr("j_star_ab"),
                   stderr_ab=arr("stderr_ab"), j_star_var=arr("j_star_var"), stderr_var=arr("stderr_var"),
                   estimator=d["estimator"], dim=int(d["dim"]), num_data=int(d["num_data"]),
                   num_queries=int(d["num_queries"]), subset_size=d.get("subset_size"), C=d.get("C"),
                   seed=int(d.get("seed", 0)), extra=d.get("extra", {}),
                   common_random_numbers=bool(d.get("common_random_numbers", False)))

    def to_csv(self, path) -> None:
        """One row per noise level: sigma, J* total and per element with standard errors, both forms."""
        cols = ["sigma", "j_star", "stderr", "j_star_per_element", "stderr_per_element", "j_star_ab", "stderr_ab"]
        values = [self.sigmas, self.j_star, self.stderr, self.j_star_per_element, self.stderr_per_element,
                  self.j_star_ab, self.stderr_ab]
        if self.j_star_var is not None:
            cols += ["j_star_var", "stderr_var"]
            values += [self.j_star_var, self.stderr_var]
        lines = [",".join(cols)]
        for row in zip(*values):
            lines.append(",".join(repr(float(v)) for v in row))
        Path(path).write_text("\n".join(lines) + "\n")
