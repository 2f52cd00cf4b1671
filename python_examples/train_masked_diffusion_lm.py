#!/usr/bin/env python
"""Train a tiny masked diffusion LM (MDM) on multi-digit addition, with the variance-reduction methods.

Task (generated in code): ``123+045=168|..`` -- a prompt ``a+b=`` (n-digit zero-padded operands)
and an answer: the sum's digits, a delimiter ``|``, then padding to a fixed length. Only answer
tokens (digits, delimiter, padding, as in LLaDA) are eligible for masking; the prompt never is.

Training follows docs/METHODS.md section 2 with :mod:`diffkernels.mdm`: per sequence a masking rate t
from ``--t-sampler`` (uniform, stratified over the batch (StraTS), or P-POTS with weight 1/p(t)),
p = (1 - 1e-3) t + 1e-3, masks from :func:`mask_tokens` (``--mirror``: two antithetic copies that
share one uniform per token; ``--isad``: the delimiter is masked with q = min(1, p + 0.2) and
weighted 1/q), and :func:`masked_diffusion_loss` from the transformer's hidden states and LM head
(the fused masked cross-entropy: logits only at masked tokens).

Like the paper (which fine-tunes a pretrained LLaDA), training has two phases: ``--pretrain-steps``
of standard training (uniform t, standard masks) shared by every method -- identical for a given
seed -- and then ``--steps`` with the chosen method. P-POTS estimates its density once, with the
model at the end of the first phase: g(t), v(t) on a grid (batched here: one forward pass per grid
point), w = sqrt(g^2 + v), the paper's parametric fit (``fit_epr``), mixed with ``--ppots-mix`` of
the uniform (our default 0.1 bounds the weights 1/p by 10). The grid uses the method's own masks
(with ``--mirror`` the mirrored loss), so p is optimal for the estimator that is actually trained.

Reports (``--out``/summary.json, printed): exact-match accuracy on 1000 held-out problems
(greedy decoding that unmasks the most confident answer token at each step), and the variance
decomposition (``variance_decomposition``: A = mask noise, B = rate noise, C = data noise) of the
trained loss estimator and of its gradient (trace of the covariance), at the shared checkpoint
(same model for every method: a clean comparison of the estimators) and at the end of training.
Note: MIRROR runs two copies of each sequence, i.e. twice the forward/backward work per step.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _common import default_device, set_threads
from diffkernels import fold_seed
from diffkernels.mdm import (PPOTSGrid, PPOTSSampler, Stratified, Uniform, fit_epr, mask_tokens,
                             masked_diffusion_loss, variance_decomposition)
from diffkernels.plots import pyplot

EPS = 1e-3  # p = (1 - eps) t + eps (LLaDA / SMDM)
PLUS, EQUALS, DELIM, PAD, MASK = 10, 11, 12, 13, 14
VOCAB = 15
TEST_SEED = 12345  # the held-out problems are the same for every run


# --- the task ---------------------------------------------------------------------------------


class AdditionTask:
    """n-digit addition as fixed-length token sequences: prompt ``a+b=``, answer ``sum|`` + padding."""

    def __init__(self, digits: int = 3):
        self.n = digits
        self.prompt_len = 2 * digits + 2
        self.answer_len = digits + 2  # up to n + 1 sum digits and the delimiter
        self.length = self.prompt_len + self.answer_len
        self.eligible = torch.zeros(self.length, dtype=torch.bool)
        self.eligible[self.prompt_len:] = True

    def encode(self, a: Tensor, b: Tensor) -> Tensor:
        n = self.n
        rows = []
        for x, y in zip(a.tolist(), b.tolist()):
            ans = [int(c) for c in str(x + y)] + [DELIM]
            ans += [PAD] * (self.answer_len - len(ans))
            rows.append([int(c) for c in f"{x:0{n}d}"] + [PLUS] + [int(c) for c in f"{y:0{n}d}"] + [EQUALS] + ans)
        return torch.tensor(rows, dtype=torch.int64)

    def sample(self, count: int, gen: torch.Generator) -> Tensor:
        hi = 10**self.n
        return self.encode(torch.randint(0, hi, (count,), generator=gen), torch.randint(0, hi, (count,), generator=gen))

    def decode(self, row: Tensor) -> str:
        return "".join("0123456789+=|._"[i] for i in row.tolist())


# --- the model --------------------------------------------------------------------------------


class TinyTransformer(nn.Module):
    """A bidirectional pre-norm transformer encoder with learned positions (no time input, as LLaDA)."""

    def __init__(self, length: int, dim: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(torch.randn(length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)

    def hidden(self, ids: Tensor) -> Tensor:
        return self.norm(self.enc(self.tok(ids) + self.pos))

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.hidden(ids))


# --- losses -----------------------------------------------------------------------------------


class Method:
    """Which sampler and masks a run trains with."""

    def __init__(self, t_sampler: str, mirror: bool, isad: bool, isad_delta: float = 0.2):
        self.t_sampler, self.mirror, self.isad, self.isad_delta = t_sampler, mirror, isad, isad_delta
        self.mode = "mirror" if mirror else "standard"

    def mask(self, ids: Tensor, p, seed: int, eligible: Tensor):
        extra = dict(rare=[DELIM], rare_delta=self.isad_delta) if self.isad else {}
        return mask_tokens(ids, p, seed, mask_id=MASK, eligible=eligible, mode=self.mode, **extra)

    def name(self) -> str:
        parts = [self.t_sampler] + (["mirror"] if self.mirror else []) + (["isad"] if self.isad else [])
        return "+".join(parts)


def training_loss(model: TinyTransformer, masked, ids: Tensor, importance: Optional[Tensor] = None,
                  row_clamp: Optional[float] = None) -> Tensor:
    """The MDM loss through the fused masked cross-entropy from hidden states and the LM head."""
    return masked_diffusion_loss(masked, ids, hidden=model.hidden(masked.noisy_ids), lm_head_weight=model.head.weight,
                                 importance=importance, row_clamp=row_clamp)


@torch.no_grad()
def per_sequence_loss(model: TinyTransformer, masked, ids: Tensor) -> Tensor:
    """l_b for every input row (plain PyTorch; for diagnostics, where we need each row's value)."""
    ce = F.cross_entropy(model(masked.noisy_ids).transpose(1, 2), ids[masked.source_row], reduction="none")
    per_row = (masked.weights * ce).sum(1) * masked.row_weight / masked.eligible_count[masked.source_row]
    return torch.zeros(ids.shape[0], dtype=per_row.dtype, device=ids.device).index_add_(0, masked.source_row, per_row)


def ppots_grid(model, pool: Tensor, eligible: Tensor, method: Method, *, T: int, a: int, c: int, seed: int) -> PPOTSGrid:
    """``estimate_ppots_grid``'s statistics, batched: at each t_j, a examples x c masks in one pass.

    g_j = mean loss, v_j = mean over examples of the variance over masks, w_j = sqrt(g_j^2 + v_j).
    """
    gen = torch.Generator().manual_seed(fold_seed(seed, 7))
    ids = pool[torch.randperm(len(pool), generator=gen)[:a]].repeat_interleave(c, 0)
    elig = eligible.expand_as(ids)
    t_grid = torch.linspace(1.0 / T, 1.0 - 1.0 / T, T - 1, dtype=torch.float64)
    g, v = [], []
    for j, t in enumerate(t_grid.tolist()):
        masked = method.mask(ids, (1 - EPS) * t + EPS, fold_seed(seed, 8, j), elig)
        l = per_sequence_loss(model, masked, ids).double().view(a, c)
        g.append(float(l.mean()))
        v.append(float(l.var(1).mean()))
    g, v = torch.tensor(g, dtype=torch.float64), torch.tensor(v, dtype=torch.float64)
    return PPOTSGrid(t=t_grid, g=g, v=v, w=torch.sqrt(g * g + v))


@torch.no_grad()
def exact_match(model: TinyTransformer, task: AdditionTask, ids: Tensor, batch: int = 500) -> float:
    """Greedy decoding: start with the whole answer masked, unmask the most confident token per step."""
    correct = 0
    a0 = task.prompt_len
    for chunk in ids.split(batch):
        x = chunk.clone()
        x[:, a0:] = MASK
        for _ in range(task.answer_len):
            logits = model(x)[:, a0:].float()
            logits[..., MASK] = -math.inf
            conf, pred = logits.softmax(-1).max(-1)
            conf[x[:, a0:] != MASK] = -1.0
            j = conf.argmax(1)
            rows = torch.arange(len(x), device=x.device)
            x[rows, a0 + j] = pred[rows, j]
        correct += int((x[:, a0:] == chunk[:, a0:]).all(1).sum())
    return correct / len(ids)


def decompose(model, pool, eligible, method: Method, sampler, *, n_x, n_t, n_m, seed, progress) -> dict:
    """A, B, C of the method's weighted loss estimator and of its gradient (exact per-sample gradients)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_fn(x, t, mask_seed, mask_mode):
        ids = x[None]
        masked = method.mask(ids, (1 - EPS) * t + EPS, mask_seed, eligible[None])
        return training_loss(model, masked, ids)

    dec = variance_decomposition(loss_fn, pool, t_sampler=sampler, mask_mode=method.mode, n_x=n_x, n_t=n_t, n_m=n_m,
                                 seed=seed, grad=True, params=params, progress=progress)
    comp = lambda c: {k: getattr(c, k) for k in ("A", "B", "C", "total", "A_se", "B_se", "C_se", "total_se")}
    return {"loss": comp(dec), "grad": comp(dec.grad), "n_x": n_x, "n_t": n_t, "n_m": n_m}


# --- training ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--t-sampler", choices=("uniform", "stratified", "ppots"), default="uniform")
    p.add_argument("--mirror", action="store_true", help="MIRROR: two antithetic mask copies per sequence")
    p.add_argument("--isad", action="store_true", help="ISAD: mask the answer delimiter with q = p + 0.2, weight 1/q")
    p.add_argument("--digits", type=int, default=2, help="operand digits of the addition task")
    p.add_argument("--pretrain-steps", type=int, default=1500, help="shared standard-training phase")
    p.add_argument("--steps", type=int, default=1500, help="steps with the chosen method after the shared phase")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ppots-grid", type=int, default=20, help="T: grid t_j = linspace(1/T, 1 - 1/T, T - 1)")
    p.add_argument("--ppots-examples", type=int, default=16, help="examples per grid point (paper: 15)")
    p.add_argument("--ppots-masks", type=int, default=16, help="masks per example and grid point (paper: 15)")
    p.add_argument("--ppots-mix", type=float, default=0.1, help="mix the P-POTS density with this much uniform")
    p.add_argument("--ppots-reference", action="store_true",
                   help="the P-POTS reference code's recipe: t ~ p(t) without the 1/p(t) weight, each sequence's loss "
                        "clamped at 10 (a biased objective; for comparison with that code)")
    p.add_argument("--var-nx", type=int, default=24, help="variance decomposition: examples")
    p.add_argument("--var-nt", type=int, default=6, help="variance decomposition: rates per example")
    p.add_argument("--var-nm", type=int, default=4, help="variance decomposition: masks per rate")
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--out", default="out/masked_diffusion_lm", help="output directory")
    p.add_argument("--no-progress", action="store_true")
    return p


def _adam(model, lr):
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))


def pretrain(args, task: AdditionTask, device) -> dict:
    """The shared first phase: standard MDM training; returns model and optimizer state."""
    torch.manual_seed(args.seed)
    model = TinyTransformer(task.length, args.dim, args.layers, args.heads).to(device)
    opt = _adam(model, args.lr)
    _run_steps(model, opt, task, Method("uniform", False, False), Uniform(), args, device, 0, args.pretrain_steps,
               "shared phase")
    return {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict())}


def _run_steps(model, opt, task, method, sampler, args, device, first, count, desc) -> list:
    from tqdm.auto import tqdm

    total = args.pretrain_steps + args.steps
    warmup = max(1, min(100, total // 10))
    eligible = task.eligible.to(device).expand(args.batch_size, -1)
    losses = []
    for step in tqdm(range(first, first + count), desc=desc, disable=args.no_progress, leave=False, dynamic_ncols=True):
        gen = torch.Generator().manual_seed(fold_seed(args.seed, 1, step))
        ids = task.sample(args.batch_size, gen).to(device)
        t, w = sampler.sample(args.batch_size, fold_seed(args.seed, 2, step), device=device)
        masked = method.mask(ids, (1 - EPS) * t + EPS, fold_seed(args.seed, 3, step), eligible)
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))
        for group in opt.param_groups:
            group["lr"] = lr
        # the reference recipe (a P-POTS sampler without 1/p weights) clamps each sequence's loss at 10
        clamp = 10.0 if isinstance(sampler, PPOTSSampler) and not sampler.importance_weights else None
        loss = training_loss(model, masked, ids, importance=w, row_clamp=clamp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses).cpu().tolist() if losses else []


def train(args: argparse.Namespace, *, shared: Optional[dict] = None, verbose: bool = True) -> dict:
    """Run both phases, evaluate, write summary.json and loss.png; ``shared``: a ``pretrain`` result to reuse."""
    t_start = time.perf_counter()
    set_threads(args.threads)
    device = default_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = AdditionTask(args.digits)
    method = Method(args.t_sampler, args.mirror, args.isad)
    if shared is None:
        shared = pretrain(args, task, device)
    model = TinyTransformer(task.length, args.dim, args.layers, args.heads).to(device)
    model.load_state_dict(shared["model"])
    opt = _adam(model, args.lr)
    opt.load_state_dict(shared["opt"])

    test = task.sample(args.test_size, torch.Generator().manual_seed(TEST_SEED)).to(device)
    pool = task.sample(512, torch.Generator().manual_seed(fold_seed(args.seed, 4))).to(device)
    eligible = task.eligible.to(device)
    acc_shared = exact_match(model, task, test)

    ppots = None
    if args.t_sampler == "uniform":
        sampler = Uniform()
    elif args.t_sampler == "stratified":
        sampler = Stratified()
    else:
        grid = ppots_grid(model, pool, eligible, method, T=args.ppots_grid, a=args.ppots_examples,
                          c=args.ppots_masks, seed=args.seed)
        fit = fit_epr(grid, restarts=4, seed=args.seed)
        sampler = PPOTSSampler.from_fit(fit, mix=args.ppots_mix, importance_weights=not args.ppots_reference)
        ppots = {"t": grid.t.tolist(), "g": grid.g.tolist(), "v": grid.v.tolist(), "w": grid.w.tolist(),
                 "fit": fit.params, "fit_kl": fit.kl, "fit_r2": fit.r2, "mix": args.ppots_mix,
                 "reference_recipe": args.ppots_reference}

    t_var = time.perf_counter()
    var_kw = dict(n_x=args.var_nx, n_t=args.var_nt, n_m=args.var_nm, seed=fold_seed(args.seed, 5),
                  progress=not args.no_progress)
    var_shared = decompose(model, pool, eligible, method, sampler, **var_kw)
    var_seconds = time.perf_counter() - t_var

    t_train = time.perf_counter()
    losses = _run_steps(model, opt, task, method, sampler, args, device, args.pretrain_steps, args.steps,
                        method.name())
    train_seconds = time.perf_counter() - t_train

    t_var = time.perf_counter()
    var_final = decompose(model, pool, eligible, method, sampler, **var_kw)
    var_seconds += time.perf_counter() - t_var
    acc = exact_match(model, task, test)

    example = test[:4].clone()
    summary = {
        "config": vars(args),
        "method": method.name(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "accuracy_shared_checkpoint": acc_shared,
        "accuracy": acc,
        "variance_shared_checkpoint": var_shared,
        "variance_final": var_final,
        "ppots": ppots,
        "losses": losses,
        "final_loss": float(np.mean(losses[-max(1, len(losses) // 10):])) if losses else float("nan"),
        "examples": [task.decode(r) for r in example.cpu()],
        "device": str(device),
        "seconds": {"train": train_seconds, "variance": var_seconds, "total": time.perf_counter() - t_start},
    }
    summary["config"] = {**vars(args), "out": str(out)}
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    plot_run(summary, out / "loss.png")
    if verbose:
        vl, vg = var_final["loss"], var_final["grad"]
        print(f"{method.name()} seed {args.seed}: exact match {acc:.3f} (shared checkpoint {acc_shared:.3f}); "
              f"final loss variance A={vl['A']:.3g} B={vl['B']:.3g} C={vl['C']:.3g}, gradient variance "
              f"{vg['total']:.3g}; {summary['seconds']['total']:.0f} s -> {out}")
    return summary


def plot_run(summary: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2 if summary["ppots"] else 1, figsize=(10 if summary["ppots"] else 5.5, 3.3),
                             squeeze=False)
    v = np.array(summary["losses"])
    ax = axes[0, 0]
    if len(v):
        k = max(1, len(v) // 40)
        ax.plot(v, color="0.75", lw=0.6)
        ax.plot(np.arange(k - 1, len(v)), np.convolve(v, np.ones(k) / k, mode="valid"), lw=1.4)
    ax.set(xlabel="step (after the shared phase)", ylabel="weighted MDM loss", yscale="log",
           title=f"{summary['method']}: exact match {summary['accuracy']:.3f}")
    if summary["ppots"]:
        pp = summary["ppots"]
        ax = axes[0, 1]
        t = np.array(pp["t"])
        w = np.array(pp["w"])
        ax.plot(t, w / np.trapezoid(w, t), "o", ms=3, label="grid w = sqrt(g^2 + v), normalised")
        fit = pp["fit"]
        tt = np.linspace(0.001, 0.999, 200)
        dens = np.sqrt(fit["a"] * tt ** fit["r"] + fit["b"] * (1 - tt) ** fit["q"]
                       + fit["A"] ** 2 * np.exp(2 * fit["kappa"] * tt ** fit["m"]))
        ax.plot(tt, dens, label="fit p(t)")
        ax.plot(tt, (1 - pp["mix"]) * dens + pp["mix"], "--", label=f"sampled ({pp['mix']} uniform)")
        ax.set(xlabel="t", ylabel="density", title="P-POTS density")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    return train(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
