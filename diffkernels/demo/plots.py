"""The demo's figures: the loss curve and the loss gap to J* per noise level (sample grids come from
:func:`diffkernels.plots.save_image_grid`)."""

from __future__ import annotations

from pathlib import Path

from ..edm import SIGMA_MAX, SIGMA_MIN
from ..plots import pyplot


def save_loss_curve(losses: list, smoothed: list, path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, color="0.75", lw=0.8, label="loss per step")
    ax.plot(smoothed, color="C0", lw=1.5, label="EMA")
    ax.set_xlabel("step")
    ax.set_ylabel("sparse EDM loss")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_gap_plot(optimal: dict, bin_sigma: list, bin_mse: list, path: Path, title: str) -> None:
    """J*(sigma)/D (``optimal["sigmas"]``, ``optimal["j_star_per_element"]``) against the model's x0 error."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(optimal["sigmas"], optimal["j_star_per_element"], "k-", lw=1.5, label="optimal J*(σ)/D (the data's floor)")
    ax.plot(bin_sigma, bin_mse, "o-", color="C1", ms=4, label="model: x0 error per element (2nd half of training)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    # Below the data's nearest-neighbour spacing J* falls off like exp(-d^2 / 8 sigma^2): clip the axis there.
    ax.set_xlim(SIGMA_MIN, SIGMA_MAX)
    if bin_mse:
        shown = [j for sig, j in zip(optimal["sigmas"], optimal["j_star_per_element"]) if sig <= SIGMA_MAX]
        ax.set_ylim(min(bin_mse) / 100, 3 * max(bin_mse + shown))
    ax.set_xlabel("noise level σ")
    ax.set_ylabel("per-element x0 loss")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
