#!/usr/bin/env python
"""What the bin-wise EMA control variate (``diffkernels.mdm.BinnedEMABaseline``) does to the MDM loss.

The method (docs/METHODS.md section 2, method 4) subtracts c_j b_j, a per-bin EMA baseline of the
loss with a coefficient from EMA statistics, from each sequence's loss. This script measures, on a
tiny masked diffusion model trained on Markov-chain sequences, the variance of the loss value and of
its gradient with and without the adjustment, whether training on the adjusted loss changes the
parameters, and the A/B/C variance decomposition of the same loss. docs/mdm_ema_control_variate.md
records the numbers of the default run and explains them (the gradient is unchanged bit for bit).

    python python_examples/ema_control_variate.py            # the documented run, about 10 s on a CPU
    python python_examples/ema_control_variate.py --quick    # a few draws: checks the wiring
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

# Run from a source checkout without installing: make `import diffkernels` find the package.
_REPO = Path(__file__).resolve().parent.parent
if (_REPO / "diffkernels" / "__init__.py").is_file() and str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from diffkernels import fold_seed  # noqa: E402
from diffkernels.mdm import BinnedEMABaseline, mask_tokens, variance_decomposition  # noqa: E402

QUICK = dict(draws=12, warmup=12, train_steps=10, decompose=False)


class _TinyDenoiser(nn.Module):
    """A small bidirectional denoiser: token + position embeddings, one layer mixing each position
    with its two neighbours and with the sequence mean, a linear read-out."""

    def __init__(self, vocab: int, length: int, dim: int, gen: torch.Generator):
        super().__init__()
        scale = 1.0 / math.sqrt(dim)
        self.emb = nn.Parameter(torch.randn(vocab + 1, dim, generator=gen) * 0.5)  # + the mask token
        self.pos = nn.Parameter(torch.randn(length, dim, generator=gen) * 0.1)
        self.left = nn.Parameter(torch.randn(dim, dim, generator=gen) * scale)
        self.right = nn.Parameter(torch.randn(dim, dim, generator=gen) * scale)
        self.mix = nn.Parameter(torch.randn(dim, dim, generator=gen) * scale)
        self.out = nn.Parameter(torch.randn(dim, vocab, generator=gen) * scale)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb[ids] + self.pos
        z = h + torch.roll(h, 1, dims=1) @ self.left + torch.roll(h, -1, dims=1) @ self.right
        h = torch.tanh(z + h.mean(dim=1, keepdim=True) @ self.mix)
        return h @ self.out + self.bias


def _markov_data(n: int, vocab: int, length: int, stick: float, gen: torch.Generator) -> Tensor:
    """Sequences of a Markov chain: the next token is (previous + 1) mod V with probability
    ``stick``, else uniform. A masked token is easy to predict when a neighbour is visible and
    hard when both are masked, so the loss grows with the masking rate, as in a real MDM."""
    ids = torch.empty(n, length, dtype=torch.int64)
    ids[:, 0] = torch.randint(0, vocab, (n,), generator=gen)
    for i in range(1, length):
        follow = torch.rand(n, generator=gen) < stick
        ids[:, i] = torch.where(follow, (ids[:, i - 1] + 1) % vocab, torch.randint(0, vocab, (n,), generator=gen))
    return ids


def _sequence_losses(model: nn.Module, ids: Tensor, t: Tensor, seed: int, mask_id: int) -> Tensor:
    """The per-sequence MDM loss l_b = sum_i w_i CE_i / P (docs/METHODS.md section 2), every token eligible."""
    p = (1 - 1e-3) * t + 1e-3
    masked = mask_tokens(ids, p, seed, mask_id=mask_id)
    logits = model(masked.noisy_ids)
    ce = nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
    return (masked.weights * ce).sum(dim=1) * masked.row_weight / masked.eligible_count


@dataclass
class EMAEffect:
    """What :func:`measure_ema_effect` measured (at fixed parameters, over ``draws`` batches).

    For the raw loss and for each adjusted variant (``coef`` 1.0, ``"ema"``, ``"pooled"``):
    seq_var: variance of a sequence's loss value; batch_var: variance of the batch-mean loss value;
    grad_trace: trace of the covariance of the batch-mean loss's gradient (over draws);
    max_grad_diff: the largest |grad(adjusted) - grad(raw)| over all draws and coordinates.
    mean_c: the average coefficient c_j used per variant.
    training: the two training runs (raw loss, and loss adjusted with coef="ema"): the largest
        difference of their final parameters (0.0: bit-identical trajectories) and the mean c_j used.
    decomposition: the variance_decomposition of the loss (with grad=True) at the same parameters.
    """

    settings: dict
    seq_var: dict
    batch_var: dict
    grad_trace: dict
    max_grad_diff: dict
    mean_c: dict
    training: dict
    decomposition: object = None

    def report(self) -> str:
        adjusted = [f"adjusted, coef={k}" for k in self.seq_var if k != "raw"]
        lines = ["| quantity | raw loss | " + " | ".join(adjusted) + " |",
                 "|---|---|" + "---|" * (len(self.seq_var) - 1)]
        for label, d in (("variance of a sequence's loss value", self.seq_var),
                         ("variance of the batch-mean loss value", self.batch_var),
                         ("trace of the gradient covariance (batch mean)", self.grad_trace)):
            lines.append(f"| {label} | " + " | ".join(f"{v:.6g}" for v in d.values()) + " |")
        lines.append("| max abs difference of the gradients from raw | 0 | "
                     + " | ".join(f"{v:.3g}" for v in self.max_grad_diff.values()) + " |")
        text = "\n".join(lines) + f"\n\nmean c used (over draws and sequences): " + ", ".join(
            f"{k}: {v:.4g}" for k, v in self.mean_c.items()) + (
            f"\ntraining with coef='ema' vs raw: max |parameter difference| after "
            f"{self.settings['train_steps']} Adam steps = {self.training['max_param_diff']:.3g} "
            f"(mean c_j used while training: {self.training['mean_c_used']:.4g})") + f"\nsettings: {self.settings}"
        if self.decomposition is not None:
            text += "\n\n" + str(self.decomposition)
        return text


def measure_ema_effect(*, num_bins: int = 10, decay: float = 0.01, batch_size: int = 16, draws: int = 300,
                       warmup: int = 300, train_steps: int = 300, decompose: bool = True, seed: int = 0,
                       progress: bool = False) -> EMAEffect:
    """Measure what the EMA control variate does to the variance of the loss value and of the gradient.

    1. A tiny MDM (vocabulary 16, length 32, width 16, 1824 parameters) is trained for
       ``train_steps`` Adam steps on Markov-chain sequences, so that its loss depends on t like a
       real model's. It is trained twice from the same start on the same batches and masks: on the
       raw loss and on the loss adjusted by a ``coef="ema"`` baseline; the largest difference of
       the final parameters is reported (0.0: the trajectories are bit-identical). Then the
       parameters of the first run are frozen.
    2. Three baselines, coef=1.0, "ema" and "pooled" (``num_bins``, ``decay``), are warmed up on
       ``warmup`` batches.
    3. For each of ``draws`` fresh batches (examples, t ~ U(0, 1) and masks all redrawn) it computes
       the per-sequence losses l, the adjusted losses (``forward``: adjust, then update, as in
       training), the batch means and the gradients of the batch means (raw and adjusted) with
       respect to all parameters.
    4. It reports the variances over draws, and the largest gradient difference (0 means
       bit-identical). ``decompose=True`` adds ``variance_decomposition(..., grad=True)`` of the
       same loss (n_x=24, n_t=8, n_m=4), showing how much of the gradient noise is the B term that
       the method targets.

    Deterministic for a given ``seed``; runs in a few seconds on a CPU. It runs with one intra-op
    thread (restored afterwards): the tensors are tiny, and extra threads only add contention.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(num_bins=num_bins, decay=decay, batch_size=batch_size, draws=draws, warmup=warmup,
                        train_steps=train_steps, decompose=decompose, seed=seed, progress=progress)
    finally:
        torch.set_num_threads(threads)


def _measure(*, num_bins, decay, batch_size, draws, warmup, train_steps, decompose, seed, progress) -> EMAEffect:
    vocab, length, dim = 16, 32, 16
    gen = torch.Generator().manual_seed(fold_seed(seed, 0x454D41))
    data = _markov_data(2048, vocab, length, 0.8, gen)
    model = _TinyDenoiser(vocab, length, dim, gen)
    params = list(model.parameters())

    def batch(step_seed: int):
        g = torch.Generator().manual_seed(step_seed)
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=g)
        t = torch.rand(batch_size, generator=g)
        return data[idx], t

    # Training, twice from the same start on the same batches and masks: on the raw loss, and on
    # the loss adjusted by a per-bin EMA baseline (which, the loss level drifting, sees c_j > 0).
    twin = _TinyDenoiser(vocab, length, dim, torch.Generator())
    twin.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(params, lr=3e-2)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=3e-2)
    train_cv = BinnedEMABaseline(num_bins, decay, coef="ema")
    c_train = 0.0
    for step in range(train_steps):
        ids, t = batch(fold_seed(seed, 1, step))
        loss = _sequence_losses(model, ids, t, fold_seed(seed, 2, step), vocab).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses = _sequence_losses(twin, ids, t, fold_seed(seed, 2, step), vocab)
        c_train += float(train_cv.coefficients()[train_cv.bins(t)].mean()) / max(train_steps, 1)
        twin_opt.zero_grad()
        train_cv(losses, t).mean().backward()
        twin_opt.step()
    for p in params:
        p.grad = None
    max_param_diff = max(float((a - b).detach().abs().max()) for a, b in zip(params, twin.parameters()))

    variants = {name: BinnedEMABaseline(num_bins, decay, coef=c) for name, c in (("1.0", 1.0), ("ema", "ema"),
                                                                                  ("pooled", "pooled"))}
    with torch.no_grad():
        for step in range(warmup):
            ids, t = batch(fold_seed(seed, 3, step))
            losses = _sequence_losses(model, ids, t, fold_seed(seed, 4, step), vocab)
            for cv in variants.values():
                cv.update(losses, t)

    seq = {k: [] for k in ("raw", *variants)}
    means = {k: [] for k in seq}
    grads = {k: [] for k in seq}
    max_diff = {k: 0.0 for k in variants}
    c_used = {k: 0.0 for k in variants}
    for step in range(draws):
        ids, t = batch(fold_seed(seed, 5, step))
        losses = _sequence_losses(model, ids, t, fold_seed(seed, 6, step), vocab)
        values = {"raw": losses}
        for k, cv in variants.items():
            c_used[k] += float(cv.coefficients()[cv.bins(t)].mean()) / draws
            values[k] = cv(losses, t)
        flat = {}
        for k, v in values.items():
            g = torch.autograd.grad(v.mean(), params, retain_graph=True)
            flat[k] = torch.cat([x.reshape(-1) for x in g]).to(torch.float64)
            seq[k].append(v.detach().to(torch.float64))
            means[k].append(v.detach().mean().to(torch.float64))
            grads[k].append(flat[k])
        for k in variants:
            max_diff[k] = max(max_diff[k], float((flat[k] - flat["raw"]).abs().max()))

    def trace_cov(rows):
        x = torch.stack(rows)
        return float(((x - x.mean(0)) ** 2).sum() / (x.shape[0] - 1))

    decomposition = None
    if decompose:
        def loss_fn(x, t, mask_seed):
            return _sequence_losses(model, x[None], torch.tensor([t]), mask_seed, vocab)[0]

        decomposition = variance_decomposition(loss_fn, data, mask_mode=None, n_x=24, n_t=8, n_m=4,
                                               seed=fold_seed(seed, 7), grad=True, params=params, progress=progress)
    return EMAEffect(
        settings=dict(num_bins=num_bins, decay=decay, batch_size=batch_size, draws=draws, warmup=warmup,
                      train_steps=train_steps, seed=seed, parameters=sum(p.numel() for p in params)),
        seq_var={k: float(torch.cat(v).var()) for k, v in seq.items()},
        batch_var={k: float(torch.stack(v).var()) for k, v in means.items()},
        grad_trace={k: trace_cov(v) for k, v in grads.items()},
        max_grad_diff=max_diff,
        mean_c=c_used,
        training=dict(max_param_diff=max_param_diff, mean_c_used=c_train),
        decomposition=decomposition,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-bins", type=int, default=10, help="m, the bins of the masking rate")
    p.add_argument("--decay", type=float, default=0.01, help="eta, the baseline's EMA rate")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per batch")
    p.add_argument("--draws", type=int, default=300, help="fresh batches at the frozen parameters")
    p.add_argument("--warmup", type=int, default=300, help="batches that warm up the baselines first")
    p.add_argument("--train-steps", type=int, default=300, help="Adam steps of each of the two training runs")
    p.add_argument("--no-decompose", action="store_true", help="skip the A/B/C variance decomposition")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help=f"a few draws and steps, to check the wiring: {QUICK}")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> EMAEffect:
    args = build_parser().parse_args(argv)
    settings = dict(num_bins=args.num_bins, decay=args.decay, batch_size=args.batch_size, draws=args.draws,
                    warmup=args.warmup, train_steps=args.train_steps, decompose=not args.no_decompose,
                    seed=args.seed, progress=not args.no_progress)
    if args.quick:
        settings.update(QUICK)
    start = time.perf_counter()
    effect = measure_ema_effect(**settings)
    print(effect.report())
    print(f"\n({time.perf_counter() - start:.1f} s)")
    return effect


if __name__ == "__main__":
    main()
