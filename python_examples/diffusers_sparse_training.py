"""A diffusers training loop with sparse supervision, and its loss against the optimal training loss.

A small ``UNet2DModel`` and a ``DDPMScheduler`` (both built from their configs: nothing is downloaded)
train on scikit-learn's bundled digits, upsampled from 8x8 to 32x32 and scaled to [-1, 1], the way
diffusers' ``train_unconditional.py`` trains: random timesteps, ``noise_scheduler.add_noise``, the target
of ``prediction_type``. The one change is the loss: ``diffkernels.sparse_mse_loss`` with mask ratio
eta (default 0.98; a fresh mask every step from ``diffkernels.fold_seed(seed, step)``) in place of
``F.mse_loss``. With ``normalize="expected"`` it is an unbiased estimate of the dense loss.

Outputs in ``--out`` (default ``out/diffusers_sparse``): ``loss_vs_optimum.png``, the dense training
loss per timestep bucket (over the second half of training, and of the final model on fresh noise)
against the optimal training loss of the training set from
``diffkernels.integrations.diffusers.optimal_training_loss``, and ``summary.json``.

    python python_examples/diffusers_sparse_training.py                  # CPU, a few minutes on 2 cores
    python python_examples/diffusers_sparse_training.py --device cuda --steps 5000 --batch-size 128
    python python_examples/diffusers_sparse_training.py --quick          # a few steps: checks the wiring
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from _common import default_device, load_images, set_threads

import diffkernels
from diffkernels.integrations.diffusers import optimal_training_loss
from diffkernels.plots import pyplot

QUICK = dict(steps=3, batch_size=8, n_train=64, queries=16, buckets=4, per_bucket=2, eval_samples=8, channels=(8, 16))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimisation steps")
    p.add_argument("--batch-size", type=int, default=32, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--mask-ratio", type=float, default=0.98,
                   help="eta, the fraction of loss elements left out each step (0: the dense loss)")
    p.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction", "sample"],
                   help="the scheduler's prediction_type, which sets the training target")
    p.add_argument("--n-train", type=int, default=None, help="train on a random subset of this many digits (default: all 1797)")
    p.add_argument("--channels", type=int, nargs=2, default=(32, 64), metavar=("C1", "C2"),
                   help="the UNet's block_out_channels")
    p.add_argument("--buckets", type=int, default=10, help="equal-width timestep buckets of the plot")
    p.add_argument("--per-bucket", type=int, default=5, help="timesteps per bucket at which the optimum is estimated")
    p.add_argument("--queries", type=int, default=256, help="estimator queries per timestep of the optimum")
    p.add_argument("--eval-samples", type=int, default=128, help="fresh noisy images per bucket to evaluate the final model")
    p.add_argument("--seed", type=int, default=0, help="seed of the data subset, the model, the noise and the masks")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default; 1 is fastest for this tiny model on a shared machine)")
    p.add_argument("--out", default="out/diffusers_sparse", help="output folder")
    p.add_argument("--quick", action="store_true", help=f"a few steps of a tiny model, to check the wiring: {QUICK}")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def load_digits_32(n_train, seed: int) -> torch.Tensor:
    """scikit-learn's digits as (N, 1, 32, 32) in [-1, 1] (bilinear upsampling keeps the range)."""
    x = load_images("digits", n_train=n_train, seed=seed)
    return F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(-1, 1).contiguous()


def make_model(channels):
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=tuple(channels),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)


def target_of(scheduler, x0, noise, timesteps):
    """The training target of the scheduler's prediction_type, as diffusers' training scripts form it."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    return x0


def as_json(values) -> list:
    """Floats for JSON, with None for the NaN of an empty bucket (JSON has no NaN)."""
    return [None if not np.isfinite(v) else float(v) for v in values]


def bucket_means(timesteps: np.ndarray, losses: np.ndarray, edges: np.ndarray) -> np.ndarray:
    which = np.clip(np.searchsorted(edges, timesteps, side="right") - 1, 0, len(edges) - 2)
    out = np.full(len(edges) - 1, np.nan)
    for b in range(len(edges) - 1):
        if (which == b).any():
            out[b] = losses[which == b].mean()
    return out


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if not 0.0 <= args.mask_ratio < 1.0:
        raise SystemExit(f"--mask-ratio must lie in [0, 1), got {args.mask_ratio}")
    device = default_device(args.device)
    if device.type == "cpu":
        set_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    torch.manual_seed(args.seed)
    data = load_digits_32(args.n_train, args.seed).to(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=args.prediction_type)
    T = scheduler.config.num_train_timesteps
    model = make_model(args.channels).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    # --- training: train_unconditional.py's step with sparse_mse_loss in place of F.mse_loss ---
    log_t, log_dense, log_sparse = [], [], []
    start = time.perf_counter()
    for step in tqdm(range(args.steps), desc="training", disable=args.no_progress):
        x0 = data[torch.randint(len(data), (args.batch_size,), generator=gen, device=device)]
        noise = torch.randn(x0.shape, generator=gen, device=device)
        timesteps = torch.randint(0, T, (args.batch_size,), generator=gen, device=device)
        noisy = scheduler.add_noise(x0, noise, timesteps)
        target = target_of(scheduler, x0, noise, timesteps)
        pred = model(noisy, timesteps).sample
        loss = diffkernels.sparse_mse_loss(pred.float(), target.float(), args.mask_ratio,
                                           diffkernels.fold_seed(args.seed, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # the dense per-image loss, only for the plot
            log_dense.append(F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)).cpu())
        log_t.append(timesteps.cpu())
        log_sparse.append(loss.item())
    train_seconds = time.perf_counter() - start

    # --- the final model's dense loss per bucket, on fresh noise ---
    edges = np.linspace(0, T, args.buckets + 1)
    model.eval()
    eval_t, eval_loss = [], []
    with torch.no_grad():
        for b in range(args.buckets):
            lo, hi = int(edges[b]), int(edges[b + 1])
            x0 = data[torch.randint(len(data), (args.eval_samples,), generator=gen, device=device)]
            noise = torch.randn(x0.shape, generator=gen, device=device)
            timesteps = torch.randint(lo, hi, (args.eval_samples,), generator=gen, device=device)
            pred = model(scheduler.add_noise(x0, noise, timesteps), timesteps).sample
            eval_loss.append(F.mse_loss(pred, target_of(scheduler, x0, noise, timesteps), reduction="none")
                             .mean(dim=(1, 2, 3)).cpu())
            eval_t.append(timesteps.cpu())
    eval_means = bucket_means(torch.cat(eval_t).numpy(), torch.cat(eval_loss).numpy(), edges)

    # --- the optimum: the same loss of the training set's optimal denoiser ---
    half = len(log_t) // 2
    train_means = bucket_means(torch.cat(log_t[half:]).numpy(), torch.cat(log_dense[half:]).numpy(), edges)
    opt_steps = np.concatenate([np.linspace(edges[b], edges[b + 1] - 1, args.per_bucket).round().astype(int)
                                for b in range(args.buckets)])
    optimum = optimal_training_loss(data, scheduler, opt_steps, num_queries=args.queries, seed=args.seed,
                                    progress=not args.no_progress)
    opt_means = optimum.loss.reshape(args.buckets, args.per_bucket).mean(axis=1)
    opt_se = np.sqrt((optimum.stderr.reshape(args.buckets, args.per_bucket) ** 2).sum(axis=1)) / args.per_bucket

    # --- the plot ---
    plt = pyplot()
    centres = 0.5 * (edges[:-1] + edges[1:])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(centres, train_means, "o-", label="training loss (dense MSE, second half of training)")
    ax.plot(centres, eval_means, "s-", label="final model, fresh noise")
    # Error bars clipped above zero for the log axis; the optimum of a memorising denoiser falls to ~0
    # at small timesteps, so the axis stops three decades below the model's loss.
    low = np.minimum(2 * opt_se, 0.9 * opt_means)
    ax.errorbar(centres, opt_means, yerr=[low, 2 * opt_se], fmt="k^--", capsize=3,
                label="optimal training loss (±2 s.e.)")
    ax.set_yscale("log")
    model_min = np.nanmin(np.concatenate([train_means, eval_means]))
    if np.isfinite(model_min) and model_min > 0:
        ax.set_ylim(bottom=max(model_min / 1e3, np.nanmin(opt_means[opt_means > 0], initial=model_min) / 2))
    ax.set_xlabel("timestep bucket")
    ax.set_ylabel(f"MSE of the {args.prediction_type} target (mean over elements)")
    ax.set_title(f"UNet2DModel + DDPMScheduler, sparse_mse_loss eta={args.mask_ratio}, {args.steps} steps",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    plot_path = out / "loss_vs_optimum.png"
    fig.savefig(plot_path, dpi=120)
    plt.close(fig)

    tail = max(1, len(log_sparse) // 4)
    summary = {
        "steps": args.steps, "batch_size": args.batch_size, "mask_ratio": args.mask_ratio,
        "prediction_type": args.prediction_type, "n_train": len(data), "device": str(device),
        "train_seconds": train_seconds, "train_loss": float(np.mean(log_sparse[-tail:])),
        "bucket_edges": edges.tolist(), "train_loss_per_bucket": as_json(train_means),
        "final_model_loss_per_bucket": as_json(eval_means), "optimal_loss": as_json(opt_means),
        "optimal_loss_stderr": as_json(opt_se), "expected_optimal_loss": optimum.expected_loss()[0],
        "files": {"plot": str(plot_path), "json": str(out / "summary.json")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"trained {args.steps} steps in {train_seconds:.1f} s; last-quarter sparse loss {summary['train_loss']:.4f}, "
          f"optimum (uniform timesteps) {summary['expected_optimal_loss']:.4f}")
    print(f"wrote {plot_path} and {out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
