#!/usr/bin/env python
"""End-to-end timings (issue 6, section 3): whole training steps with the fused ops against the same steps with eager losses.

    python benchmarks/bench_end_to_end.py [--quick] [--out DIR] [--device cuda|cpu] [--parts image,lm,curve]

(a) ``image``: one training step -- forward, loss, backward, optimizer step -- of the image-diffusion
    example (python_examples/train_image_diffusion.py, EDM objective): ``EDMPrecond(TinyDenoiser)``
    from ``diffkernels.demo``, widened to C channels as the example does, Adam, per-sample loss with
    ``reduction="none"`` weighted by EDM's lambda(sigma). Loss variants, at mask ratios 0 / 0.9 / 0.98:
    * ``fused``: ``diffkernels.sparse_mse_loss`` (the example's loss);
    * ``reference``: ``diffkernels.reference.sparse_mse_loss``, the plain-PyTorch float64 reference
      with the same Philox mask: the same loss value, which is checked before timing;
    * ``eager``: the masked MSE a user writes with ``torch.rand`` (another mask, same law; as
      ``bench_sparse_mse.py``'s baseline), for scale.
    Shapes: the example's (digits, 128 x 1 x 8 x 8, 32 channels, 2 blocks) and, on a GPU, a
    CIFAR-10-sized batch 256 x 3 x 32 x 32 with the same network.
(b) ``lm``: one training step of the masked-diffusion LM example
    (python_examples/train_masked_diffusion_lm.py: its ``TinyTransformer``, AdamW, uniform t, standard
    masks from ``mask_tokens``, gradient clipping) with the loss from the hidden states:
    * ``fused``: ``diffkernels.mdm.masked_diffusion_loss(hidden=, lm_head_weight=)`` (the example's);
    * ``eager_full``: logits of every token, ``F.cross_entropy`` at the masked tokens with the same
      weights (what a user writes); the same loss value, checked before timing.
    Shapes: the example's (2-digit addition, B = 128, L = 10, d = 64, 2 layers, V = 15, fp32) and, on
    a GPU, B = 8, L = 1024, d = 1024, 4 layers, 16 heads, V = 32000, random tokens, bf16 autocast for
    the transformer and bf16 hidden states / LM head for both losses (fp32 master weights).
(c) ``curve``: the CIFAR-10-sized optimal-loss curve, ``diffkernels.optimal_loss.estimate_curve``
    with the full estimator, N = M = 50000, D = 3072, 64 noise levels log-spaced in [2e-3, 80], on
    random data with a multi-scale cluster structure and a power-law spectrum (``curve_data``;
    RMS 0.5: CIFAR-10 in [-1, 1]). The time per level depends on sigma, so 5 levels spread over the
    range (sigma = 0.002, 0.03, 0.43, 6.4, 80) are measured on the full-size problem and the 64-level
    total is extrapolated (per-level time interpolated linearly in log sigma between them); the
    table says which numbers are measured and which extrapolated. ``--full-curve`` also measures the
    whole curve. On a CPU: N = M = 2048; with --quick a tiny problem whose whole curve is measured too.

Timing: whole steps, CUDA events after warm-up on a GPU (CUDA-synchronised; host overhead that
starves the GPU shows up), ``perf_counter`` on a CPU; the methods interleaved round by round;
medians and inter-quartile ranges; ratios fused/X as the median (quartiles) of per-round ratios,
measured in the same run (< 1: fused faster). The batches are generated before timing (data
loading is not part of a step); the masks and noise levels are drawn inside the step, as in the
examples. Peak memory on a GPU: ``torch.cuda.max_memory_allocated()`` during one step (model,
optimizer state and batches included) and its excess over the allocation before the step.

Results: Markdown on stdout and ``<out>/end_to_end_<device>[_quick].{md,json}``; the exit code is 1
when a correctness check failed or a part raised.
"""

from __future__ import annotations

import importlib
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout: diffkernels, benchmarks._common
from benchmarks._common import (  # noqa: E402
    REPO,
    MiB,
    base_parser,
    copy_times,
    cuda_peak_bytes,
    default_device,
    environment,
    err_s,
    fmt_r,
    fmt_t,
    free,
    fused_backend,
    gemm_ceilings,
    grad_rel_diff,
    md_table,
    measure,
    peak_extra_bytes,
    pin_device,
    ratio_stats,
    rel_diff,
    summarize,
    sync,
    time_once,
    write_results,
)

from diffkernels import fold_seed, sparse_mse_loss  # noqa: E402
from diffkernels import reference as ref_mse  # noqa: E402
from diffkernels.demo import P_MEAN, P_STD, EDMPrecond, TinyDenoiser, edm_loss_weight  # noqa: E402
from diffkernels.mdm import Uniform, mask_tokens, masked_diffusion_loss  # noqa: E402
from diffkernels.optimal_loss import estimate_curve  # noqa: E402
from diffkernels.reference import masked_ce as ref_ce  # noqa: E402

SEED = 0x5EED_0000_E2E0
PARTS = ("image", "lm", "curve")
ETAS = (0.0, 0.9, 0.98)
IMAGE_METHODS = ("fused", "reference", "eager")
LM_METHODS = ("fused", "eager_full")
N_SETS = 4  # batches rotated over
LR_IMAGE = 1e-4  # small: hundreds of timing steps on random data stay finite (a step's cost does not depend on it)
LR_LM = 1e-4
EPS = 1e-3  # p = (1 - eps) t + eps, as the LM example

IMAGE_CONFIGS = {
    "example": dict(B=128, C=1, H=8, channels=32, blocks=2,
                    note="train_image_diffusion.py's defaults (digits 1×8×8, batch 128, 32 channels, 2 blocks)"),
    "gpu": dict(B=256, C=3, H=32, channels=32, blocks=2,
                note="CIFAR-10-sized batch 256×3×32×32, the example's network widened to 3 channels"),
    "quick": dict(B=8, C=1, H=8, channels=16, blocks=1, note="tiny (--quick)"),
}
LM_CONFIGS = {
    "example": dict(B=128, digits=2, dim=64, layers=2, heads=4, precision="fp32",
                    note="train_masked_diffusion_lm.py's defaults (2-digit addition, B 128, d 64, 2 layers, V 15)"),
    "gpu": dict(B=8, L=1024, dim=1024, layers=4, heads=16, V=32000, precision="bf16",
                note="GPU scale: random tokens, all eligible, bf16 autocast"),
    "quick": dict(B=16, digits=2, dim=32, layers=1, heads=2, precision="fp32", note="tiny (--quick)"),
}
CURVE_CONFIGS = {  # N = M; levels log-spaced in [sigma_min, sigma_max]; the measured level indices
    "gpu": dict(N=50000, D=3072, levels=64, measure=(0, 16, 32, 48, 63), full_curve=False),
    "cpu": dict(N=2048, D=3072, levels=64, measure=(0, 16, 32, 48, 63), full_curve=False),
    "quick": dict(N=256, D=64, levels=8, measure=(0, 4, 7), full_curve=True),
}
SIGMA_RANGE = (2e-3, 80.0)
DATA_RMS = 0.5  # CIFAR-10 scaled to [-1, 1]
CURVE_TREE = ((10, 1.0), (10, 0.6), (10, 0.36))  # (branching, scale) per level of the cluster tree
CURVE_LEAF_SCALE = 0.216
# Relative tolerances of the loss on the same inputs. Image (fp32 vs the float64 reference, same mask):
# float32 rounding of per-row sums. LM (fused vs full logits): summation order in fp32; in bf16 the
# logits GEMMs of the masked rows vs all rows may round a few logits differently.
IMAGE_LOSS_TOL = 1e-5
LM_LOSS_TOL = {"fp32": 1e-4, "bf16": 1e-3}
GRAD_TOL = {"fp32": 1e-3, "bf16": 5e-2}  # max |g - g_ref| / max |g_ref| over the model's parameters


# --- the examples ----------------------------------------------------------------------------------


def import_example(name: str):
    """Import python_examples/<name>.py. It imports its own top-level ``_common``
    (python_examples/_common.py), which must win over any other module of that name."""
    if name in sys.modules:
        return sys.modules[name]
    ex_dir = REPO / "python_examples"
    other = sys.modules.get("_common")
    if other is not None and Path(getattr(other, "__file__", "") or ".").resolve().parent == ex_dir:
        other = None
    if other is not None:
        del sys.modules["_common"]
    sys.path.insert(0, str(ex_dir))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ex_dir))
        if other is not None:
            sys.modules["_common"] = other


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def param_grads(model: nn.Module) -> list:
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def max_grad_rel(grads, ref) -> float:
    return max(grad_rel_diff(g, r) for g, r in zip(grads, ref))


# --- (a) image diffusion ------------------------------------------------------------------------------


def build_image_model(cfg: dict, device) -> nn.Module:
    """The example's network: EDMPrecond(TinyDenoiser), stem and head widened to C channels as
    train_image_diffusion.py does. The example zero-initialises its head and each block's last
    layers (so every block starts as the identity); here they get small random weights instead, so
    that every parameter's gradient is non-trivial from the first step (same cost)."""
    torch.manual_seed(SEED)
    ch, C = cfg["channels"], cfg["C"]
    net = TinyDenoiser(channels=ch, blocks=cfg["blocks"], size=cfg["H"])
    if C != 1:
        net.inp = nn.Conv2d(C, ch, 3, padding=1)
        net.out = nn.Conv2d(ch, C, 3, padding=1)
    for layer in [net.out] + [m for blk in net.blocks for m in (blk.conv2, blk.mix2)]:
        nn.init.normal_(layer.weight, std=1e-2)
        nn.init.zeros_(layer.bias)
    return EDMPrecond(net).to(device)


def image_batches(cfg: dict, device) -> list:
    """N_SETS (clean images in [-1, 1], noise, sigma ~ EDM's log-normal) on the device."""
    gen = torch.Generator().manual_seed(SEED + 1)
    B, C, H = cfg["B"], cfg["C"], cfg["H"]
    out = []
    for _ in range(N_SETS):
        y = torch.rand(B, C, H, H, generator=gen) * 2 - 1
        noise = torch.randn(B, C, H, H, generator=gen)
        sigma = (torch.randn(B, generator=gen) * P_STD + P_MEAN).exp()
        out.append((y.to(device), noise.to(device), sigma.to(device)))
    return out


def eager_masked_mse(pred, target, eta: float):
    """Per-sample masked MSE with torch's RNG and the "expected" normalisation (bench_sparse_mse's baseline)."""
    keep = torch.rand(pred.shape, device=pred.device) >= eta
    d = pred.float() - target.float()
    return torch.where(keep, d * d, 0).flatten(1).sum(1) / (pred[0].numel() * (1 - eta))


def image_loss(method: str, pred, target, eta: float, seed: int):
    if method == "fused":
        return sparse_mse_loss(pred, target, eta, seed, reduction="none")
    if method == "reference":
        return ref_mse.sparse_mse_loss(pred, target, eta, seed, reduction="none")
    return eager_masked_mse(pred, target, eta)


def image_forward_loss(model, batch, method, eta, seed):
    y, noise, sigma = batch
    x = y + sigma.view(-1, 1, 1, 1) * noise
    pred = model(x, sigma)
    per_sample = image_loss(method, pred, y, eta, seed)
    return (edm_loss_weight(sigma) * per_sample).mean()


def image_step_fn(model, opt, batches, method, eta):
    def step(i):
        loss = image_forward_loss(model, batches[i % len(batches)], method, eta, fold_seed(SEED, i))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def image_check(model, batch, eta) -> dict:
    """Each method's loss and parameter gradients on the same batch, model and seed (no optimizer
    step); fused (and eager at eta = 0, where no element is masked) against the reference."""
    seed = fold_seed(SEED, 10**9)
    res = {}
    for m in IMAGE_METHODS:
        model.zero_grad(set_to_none=True)
        loss = image_forward_loss(model, batch, m, eta, seed)
        loss.backward()
        res[m] = (float(loss.detach()), param_grads(model))
    model.zero_grad(set_to_none=True)
    ref_loss, ref_grads = res["reference"]
    out = {"reference": {"loss": ref_loss}}
    for m in IMAGE_METHODS:
        if m == "reference":
            continue
        loss, grads = res[m]
        c = {"loss": loss}
        if m == "fused" or eta == 0.0:
            c.update(loss_rel=rel_diff(loss, ref_loss), grad_rel=max_grad_rel(grads, ref_grads),
                     loss_tol=IMAGE_LOSS_TOL, grad_tol=GRAD_TOL["fp32"])
            c["ok"] = math.isfinite(loss) and c["loss_rel"] <= c["loss_tol"] and c["grad_rel"] <= c["grad_tol"]
        else:
            c["note"] = "another mask (torch.rand): not comparable"
        out[m] = c
    return out


def bench_image(cfg_name: str, eta: float, device, args) -> dict:
    cfg = dict(IMAGE_CONFIGS[cfg_name])
    if args.image_batch:
        cfg["B"] = args.image_batch
    row = {"part": "image", "config": cfg_name, "note": cfg["note"], "eta": eta,
           "shape": [cfg["B"], cfg["C"], cfg["H"], cfg["H"]], "channels": cfg["channels"], "blocks": cfg["blocks"],
           "dtype": "fp32", "errors": {}}
    model = build_image_model(cfg, device)
    row["params"] = n_params(model)
    batches = image_batches(cfg, device)
    row["check"] = image_check(model, batches[0], eta)
    opt = torch.optim.Adam(model.parameters(), lr=LR_IMAGE)
    fns = {m: image_step_fn(model, opt, batches, m, eta) for m in IMAGE_METHODS}
    time_methods(row, fns, device, args)
    row["final_loss"] = float(fns["fused"](0).detach())
    memory_methods(row, fns, device, args, lambda: opt.zero_grad(set_to_none=True))
    return row


# --- (b) masked-diffusion LM --------------------------------------------------------------------------


def lm_setup(cfg: dict, device):
    """(model, ids batches, eligible mask or None, mask id, L, V) for one LM configuration."""
    ex = import_example("train_masked_diffusion_lm")
    gen = torch.Generator().manual_seed(SEED + 2)
    B = cfg["B"]
    if "digits" in cfg:
        task = ex.AdditionTask(cfg["digits"])
        L, V, mask_id = task.length, ex.VOCAB, ex.MASK
        batches = [task.sample(B, gen).to(device) for _ in range(N_SETS)]
        eligible = task.eligible.to(device).expand(B, -1)
    else:
        L, V = cfg["L"], cfg["V"]
        mask_id = V - 1
        batches = [torch.randint(0, V - 1, (B, L), generator=gen).to(device) for _ in range(N_SETS)]
        eligible = None
    torch.manual_seed(SEED)
    model = ex.TinyTransformer(L, cfg["dim"], cfg["layers"], cfg["heads"])
    if V != ex.VOCAB:  # the example's model with a real vocabulary
        model.tok = nn.Embedding(V, cfg["dim"])
        model.head = nn.Linear(cfg["dim"], V, bias=False)
    model = model.to(device)
    opt = ex._adam(model, LR_LM)
    return model, opt, batches, eligible, mask_id, L, V


def lm_mask(ids, i: int, eligible, mask_id: int):
    """The example's per-step draw: t ~ U(0, 1) (weight 1), p = (1 - eps) t + eps, standard masks."""
    t, w = Uniform().sample(ids.shape[0], fold_seed(SEED, 2, i), device=ids.device)
    m = mask_tokens(ids, (1 - EPS) * t + EPS, fold_seed(SEED, 3, i), mask_id=mask_id, eligible=eligible)
    return m, w


def lm_hidden(model, m, bf16: bool):
    """Hidden states and LM head weight as the loss sees them (bf16 under autocast on a GPU)."""
    with torch.autocast(m.noisy_ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = model.hidden(m.noisy_ids)
    weight = model.head.weight
    if bf16:
        hidden, weight = hidden.to(torch.bfloat16), weight.to(torch.bfloat16)
    return hidden, weight


def eager_full_lm_loss(m, ids, hidden, weight, importance):
    """Logits of every token, F.cross_entropy at the masked tokens, weighted like the MDM loss
    (normalizer "row": weights * row_weight * importance / (eligible count * B))."""
    H = hidden.shape[-1]
    B = m.eligible_count.shape[0]
    logits = hidden.reshape(-1, H) @ weight.t()
    tgt = torch.where(m.masked, ids[m.source_row], -100).reshape(-1)
    ce = F.cross_entropy(logits.float(), tgt, ignore_index=-100, reduction="none")
    row = m.row_weight / (m.eligible_count.clamp(min=1)[m.source_row].to(torch.float32) * B)
    if importance is not None:
        row = row * importance.to(torch.float32)[m.source_row]
    return (ce * (m.weights * row[:, None]).reshape(-1)).sum()


def lm_loss(method, model, m, ids, w, bf16):
    hidden, weight = lm_hidden(model, m, bf16)
    if method == "fused":
        return masked_diffusion_loss(m, ids, hidden=hidden, lm_head_weight=weight, importance=w)
    return eager_full_lm_loss(m, ids, hidden, weight, w)


def lm_step_fn(model, opt, batches, eligible, mask_id, method, bf16):
    def step(i):
        ids = batches[i % len(batches)]
        m, w = lm_mask(ids, i, eligible, mask_id)
        loss = lm_loss(method, model, m, ids, w, bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss
    return step


def lm_check(model, ids, eligible, mask_id, bf16, precision) -> dict:
    m, w = lm_mask(ids, 10**9, eligible, mask_id)
    res = {}
    for meth in LM_METHODS:
        model.zero_grad(set_to_none=True)
        loss = lm_loss(meth, model, m, ids, w, bf16)
        loss.backward()
        res[meth] = (float(loss.detach()), param_grads(model))
    model.zero_grad(set_to_none=True)
    out = {"masked_fraction": float(m.masked.float().mean()), "eager_full": {"loss": res["eager_full"][0]}}
    loss, grads = res["fused"]
    c = {"loss": loss, "loss_rel": rel_diff(loss, res["eager_full"][0]),
         "grad_rel": max_grad_rel(grads, res["eager_full"][1]),
         "loss_tol": LM_LOSS_TOL[precision], "grad_tol": GRAD_TOL[precision]}
    c["ok"] = math.isfinite(loss) and c["loss_rel"] <= c["loss_tol"] and c["grad_rel"] <= c["grad_tol"]
    out["fused"] = c
    V = model.head.weight.shape[0]
    if m.masked.numel() * V <= 2**22:  # the float64 oracle (diffkernels.reference) where it is small
        with torch.no_grad():
            hidden, weight = lm_hidden(model, m, bf16)
            oracle = float(ref_ce.masked_diffusion_loss(m, ids, hidden=hidden.double(), lm_head_weight=weight.double(),
                                                        importance=w))
        out["oracle_float64"] = {"loss": oracle, "fused_rel": rel_diff(loss, oracle),
                                 "eager_full_rel": rel_diff(res["eager_full"][0], oracle)}
    return out


def bench_lm(cfg_name: str, device, args) -> dict:
    cfg = dict(LM_CONFIGS[cfg_name])
    if args.lm_shape:
        if "digits" in cfg:
            raise ValueError(f"--lm-shape applies to the 'gpu' LM config (random tokens), not {cfg_name!r}")
        cfg.update(zip(("B", "L", "dim", "layers", "heads", "V"), args.lm_shape))
    precision = args.lm_precision or (cfg["precision"] if device.type == "cuda" else "fp32")
    bf16 = precision == "bf16"
    model, opt, batches, eligible, mask_id, L, V = lm_setup(cfg, device)
    row = {"part": "lm", "config": cfg_name, "note": cfg["note"], "B": cfg["B"], "L": L, "dim": cfg["dim"],
           "layers": cfg["layers"], "heads": cfg["heads"], "V": V, "precision": precision, "params": n_params(model),
           "errors": {}}
    row["check"] = lm_check(model, batches[0], eligible, mask_id, bf16, precision)
    # The masked fraction varies from step to step (one t per sequence): its mean over 32 steps' masks.
    row["masked_fraction"] = float(np.mean([float(lm_mask(batches[i % N_SETS], i, eligible, mask_id)[0].masked.float().mean())
                                            for i in range(32)]))
    fns = {meth: lm_step_fn(model, opt, batches, eligible, mask_id, meth, bf16) for meth in LM_METHODS}
    time_methods(row, fns, device, args)
    row["final_loss"] = float(fns["fused"](0).detach())
    memory_methods(row, fns, device, args, lambda: opt.zero_grad(set_to_none=True))
    item = 2 if bf16 else 4
    row["logits_MiB"] = cfg["B"] * L * V * item / MiB  # the eager step's full logits, for scale
    return row


# --- shared: timing and memory of a row's methods ------------------------------------------------------


def time_methods(row: dict, fns: dict, device, args) -> None:
    res = measure(fns, device, budget_s=args.budget, min_reps=args.min_reps, max_reps=args.max_reps,
                  min_sample_s=args.min_sample, warmup_s=args.warmup)
    row["time"] = {n: summarize(s) for n, s in res["samples"].items()}
    row["ratio"] = {f"fused/{n}": ratio_stats(res["samples"]["fused"], res["samples"][n])
                    for n in res["samples"] if n != "fused"}
    row.update(rounds=res["rounds"], calls_per_sample=res["calls_per_sample"],
               foreign_cores=res["foreign_cores"], steal_cores=res["steal_cores"])


def memory_methods(row: dict, fns: dict, device, args, reset) -> None:
    """GPU: absolute peak of one step and its excess over the allocation before it. CPU (not with
    --quick): the profiler's peak extra memory of one step."""
    row["peak_MiB"], row["peak_extra_MiB"] = {}, {}
    if device.type != "cuda" and args.quick:
        return
    for name, fn in fns.items():
        try:
            reset()
            free(device)
            if device.type == "cuda":
                before, peak = cuda_peak_bytes(fn, 1, device)
                row["peak_MiB"][name] = peak / MiB
                row["peak_extra_MiB"][name] = (peak - before) / MiB
            else:
                row["peak_extra_MiB"][name] = peak_extra_bytes(fn, 1, device) / MiB
        except Exception as exc:  # noqa: BLE001 -- record, go on
            row["errors"][f"memory:{name}"] = err_s(exc)


# --- (c) the optimal-loss curve -----------------------------------------------------------------------


def curve_data(N: int, D: int, device) -> torch.Tensor:
    """(N, D) float32 random data with a multi-scale neighbour structure, RMS DATA_RMS.

    A tree of clusters: 10 top-level centres, 10 children each, 10 grandchildren each (1000 groups),
    then a leaf offset per row; the scales fall by 0.6 per level, so pairwise distances spread over
    four scales (nearest neighbours ~10x closer than typical pairs) and the posterior widens
    gradually with sigma, as for natural images -- unlike i.i.d. Gaussian rows, which are all nearly
    equidistant in high dimension. Every vector has a power-law spectrum (variance of coordinate
    k ~ 1/k). Row n descends from group n mod 10^l at level l."""
    gen = torch.Generator(device=device).manual_seed(SEED + 3)
    spec = torch.arange(1, D + 1, device=device, dtype=torch.float32).rsqrt()
    spec /= spec.square().mean().sqrt()
    x = torch.randn(N, D, generator=gen, device=device).mul_(spec * CURVE_LEAF_SCALE)
    idx = torch.arange(N, device=device)
    groups = 1
    for branching, scale in CURVE_TREE:
        groups *= branching
        centres = torch.randn(groups, D, generator=gen, device=device).mul_(spec * scale)
        x.add_(centres[idx % groups])
    return x.mul_(DATA_RMS / x.square().mean().sqrt())


def bench_curve(device, args, ceil) -> dict:
    key = "quick" if args.quick else ("gpu" if device.type == "cuda" else "cpu")
    cfg = dict(CURVE_CONFIGS[key])
    if args.curve_size:
        cfg["N"], cfg["D"] = args.curve_size
    if args.curve_levels:
        cfg["levels"] = args.curve_levels
        cfg["measure"] = tuple(sorted({0, (args.curve_levels - 1) // 3, 2 * (args.curve_levels - 1) // 3,
                                       args.curve_levels - 1}))
    N, D, n_levels = cfg["N"], cfg["D"], cfg["levels"]
    M = N
    sigmas = np.geomspace(*SIGMA_RANGE, n_levels)
    out = {"part": "curve", "config": key, "N": N, "M": M, "D": D, "levels": n_levels, "estimator": "full",
           "sigma_range": list(SIGMA_RANGE),
           "data": (f"a tree of clusters (branching {'/'.join(str(b) for b, _ in CURVE_TREE)}, scales "
                    f"{', '.join(f'{sc:g}' for _, sc in CURVE_TREE)}, leaf {CURVE_LEAF_SCALE:g}), power-law spectrum "
                    f"(variance of coordinate k ~ 1/k), RMS {DATA_RMS}"),
           "flops_per_level": 4.0 * M * N * D, "errors": {}}
    data = curve_data(N, D, device)
    out["data_variance_per_element"] = float((data - data.mean(0)).square().mean())  # J*/D as sigma -> inf
    # Warm-up (cuBLAS handles, kernels) on a small slice.
    estimate_curve(data[: min(N, 1024)], [1.0], num_queries=64, seed=1, progress=False)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    measured = []
    for k in cfg["measure"]:
        s = float(sigmas[k])
        holder = {}
        t = time_once(lambda: holder.update(res=estimate_curve(data, [s], num_queries=M, seed=SEED % 2**31,
                                                               progress=False, precision="float64")), device)
        res = holder["res"]
        # The screen-and-refine engine on the same draws: its time, and its J* (equal to float64 rounding).
        t_auto = time_once(lambda: holder.update(res=estimate_curve(data, [s], num_queries=M, seed=SEED % 2**31,
                                                                    progress=False, precision="auto")), device)
        j_auto = float(holder["res"].j_star_per_element[0])
        measured.append({"level": int(k), "sigma": s, "seconds": t, "status": "measured",
                         "TFLOPs": out["flops_per_level"] / t / 1e12,
                         "j_star_per_element": float(res.j_star_per_element[0]),
                         "stderr_per_element": float(res.stderr_per_element[0]),
                         "seconds_auto": t_auto, "j_star_per_element_auto": j_auto})
        print(f"[bench] curve level {k} sigma={s:.3g}: float64 {t:.3f} s, auto {t_auto:.3f} s", file=sys.stderr)
    if "fp64_TFLOPs" in ceil:
        for r in measured:
            r["frac_of_fp64_ceiling"] = r["TFLOPs"] / ceil["fp64_TFLOPs"]
    if device.type == "cuda":
        out["peak_MiB"] = torch.cuda.max_memory_allocated(device) / MiB
    out["measured"] = measured
    # Extrapolation: per-level time linear in log sigma between the measured levels, constant beyond.
    ls = np.log(sigmas)
    est = np.interp(ls, [math.log(r["sigma"]) for r in measured], [r["seconds"] for r in measured])
    for r in measured:
        est[r["level"]] = r["seconds"]
    out["per_level_seconds"] = [float(v) for v in est]
    out["per_level_status"] = ["measured" if k in cfg["measure"] else "extrapolated" for k in range(n_levels)]
    out["measured_seconds"] = float(sum(r["seconds"] for r in measured))
    out["total_seconds_extrapolated"] = float(est.sum())
    est_auto = np.interp(ls, [math.log(r["sigma"]) for r in measured], [r["seconds_auto"] for r in measured])
    out["total_seconds_extrapolated_auto"] = float(est_auto.sum())
    if cfg["full_curve"] or args.full_curve:
        holder = {}
        t = time_once(lambda: holder.update(res=estimate_curve(data, sigmas, num_queries=M, seed=SEED % 2**31,
                                                               progress=False)), device)
        out["full_curve_seconds_measured"] = t
        out["full_curve_j_star_per_element"] = [float(v) for v in holder["res"].j_star_per_element]
        out["full_curve_stderr_per_element"] = [float(v) for v in holder["res"].stderr_per_element]
    return out


# --- ceilings --------------------------------------------------------------------------------------------


def ceilings(device, quick: bool) -> dict:
    """Copy bandwidth (GB/s, bytes read + written, median) and GEMM rates (TFLOP/s, median)."""
    cuda = device.type == "cuda"
    nbytes = (2**30 if cuda else 2**26) if not quick else (2**28 if cuda else 2**24)
    t = statistics.median(copy_times(device, nbytes, 10 if cuda else 3, warmup=2))
    res = {"copy_GBps": 2 * nbytes / t / 1e9, "copy_bytes": nbytes}
    size = (8192 if cuda else 1024) if not quick else (4096 if cuda else 256)
    res.update(gemm_ceilings(device, size, 5 if cuda else 3))
    res["gemm_size"] = size
    free(device)
    return res


# --- report ---------------------------------------------------------------------------------------------


def _checks(rows, curve) -> list:
    """(where, message) of every failed check."""
    bad = []
    for r in rows:
        for name, c in r.get("check", {}).items():
            if isinstance(c, dict) and c.get("ok") is False:
                bad.append((f"{r['part']} {r['config']}" + (f" η={r['eta']}" if "eta" in r else ""),
                            f"{name}: loss rel diff {c['loss_rel']:.2e} (tol {c['loss_tol']:g}), grad rel diff "
                            f"{c['grad_rel']:.2e} (tol {c['grad_tol']:g})"))
        for k, v in r.get("errors", {}).items():
            bad.append((f"{r['part']} {r['config']}", f"error in {k}: {v}"))
        if r.get("final_loss") is not None and not math.isfinite(r["final_loss"]):
            bad.append((f"{r['part']} {r['config']}", f"loss not finite after timing ({r['final_loss']})"))
    if curve:
        for k, v in curve.get("errors", {}).items():
            bad.append(("curve", f"error in {k}: {v}"))
        for r in curve.get("measured", []):
            if not (math.isfinite(r["j_star_per_element"]) and r["j_star_per_element"] >= 0):
                bad.append(("curve", f"J* at sigma {r['sigma']:.3g} is {r['j_star_per_element']}"))
            auto = r.get("j_star_per_element_auto")
            if auto is not None and not abs(auto - r["j_star_per_element"]) <= 1e-9 * abs(r["j_star_per_element"]) + 1e-15:
                bad.append(("curve", f"J* at sigma {r['sigma']:.3g}: precision='auto' gives {auto!r}, "
                                     f"float64 {r['j_star_per_element']!r} (must agree to rounding)"))
    return bad


def _mem(row, names, key="peak_MiB") -> str:
    pm = row.get(key) or {}
    return " / ".join(f"{pm[n]:.0f}" if n in pm else "n/a" for n in names) if pm else "n/a"


def _load(row) -> str:
    ld, st = row.get("foreign_cores"), row.get("steal_cores")
    return "" if ld is None else f"{ld:.2f} / {st:.2f}"


def to_markdown(meta, ceil, image_rows, lm_rows, curve, part_errors) -> str:
    cuda = meta.get("cuda") is not None
    L = [f"# End-to-end training steps: fused ops vs eager losses — {meta['device']}", ""]
    L.append(f"- date: {meta['date']}; commit `{meta['git_commit']}`" + (" (+ uncommitted changes)" if meta["git_dirty"] else ""))
    L.append(f"- command: `{meta['command']}`")
    L.append(f"- python {meta['python']}, torch {meta['torch']}, triton {meta['triton']}, diffkernels {meta['diffkernels']}; "
             f"fused backend: `{meta['fused_backend']}`; torch threads {meta['torch_num_threads']}")
    if cuda:
        L.append(f"- GPU: {meta['device']}, CUDA {meta['cuda']}, {meta['gpu_sm_count']} SMs, "
                 f"{(meta.get('gpu_memory_bytes') or 0) / 2**30:.0f} GiB")
    L.append("- timing: " + ("CUDA events around whole steps after warm-up (CUDA-synchronised)" if cuda else
                             "time.perf_counter around whole steps after warm-up")
             + "; methods interleaved round by round; ms = median ± IQR/2; ratios fused/X = median (quartiles) of "
             "the per-round ratios, measured in the same run (< 1: the fused step is faster). `load` = CPU cores used "
             "by other processes / stolen by the hypervisor while timing.")
    L.append("")
    L.append("## Ceilings measured first")
    L.append("")
    gem = ", ".join(f"{k.split('_')[0]} **{v:.1f}**" for k, v in ceil.items() if k.endswith("_TFLOPs"))
    L.append(f"- copy bandwidth: **{ceil['copy_GBps']:.1f} GB/s** (bytes read + written, {ceil['copy_bytes'] // MiB} MiB)")
    L.append(f"- GEMM {ceil['gemm_size']}³, TFLOP/s: {gem}")
    L.append("")
    if image_rows:
        L.append("## (a) Image diffusion: one training step (python_examples/train_image_diffusion.py, EDM)")
        L.append("")
        L.append("Step = EDMPrecond(TinyDenoiser) forward on x = y + σ·n, per-sample masked MSE (`reduction=\"none\"`, "
                 "`normalize=\"expected\"`) weighted by λ(σ), `zero_grad`, backward, Adam step (the example's EMA update "
                 "is not included). `fused` = `diffkernels.sparse_mse_loss`; `reference` = "
                 "`diffkernels.reference.sparse_mse_loss` (plain PyTorch, float64, the same Philox mask: same loss); "
                 "`eager` = masked MSE with a `torch.rand` mask (another mask, same law). fp32; Adam at lr 1e-4 (the cost "
                 "of a step does not depend on it). "
                 "`check`: loss and parameter gradients of fused vs reference on the same batch, model and seed "
                 "(relative loss difference; max |Δg| / max |g| over parameters).")
        L.append("")
        head = ["config", "batch", "params", "η", "fused ms", "reference ms", "eager ms", "fused/reference",
                "fused/eager", "peak MiB fused / ref / eager" if cuda else "peak extra MiB fused / ref / eager",
                "check: loss rel, grad rel", "load"]
        body = []
        for r in image_rows:
            t, rt, c = r.get("time", {}), r.get("ratio", {}), r.get("check", {}).get("fused", {})
            chk = (f"{c['loss_rel']:.1e}, {c['grad_rel']:.1e} {'✓' if c['ok'] else '✗'}" if "ok" in c else "n/a")
            body.append([r["config"], "×".join(map(str, r["shape"])), f"{r['params'] / 1e3:.0f}k", r["eta"],
                         f"**{fmt_t(t.get('fused'))}**", fmt_t(t.get("reference")), fmt_t(t.get("eager")),
                         fmt_r(rt.get("fused/reference")), fmt_r(rt.get("fused/eager")),
                         _mem(r, IMAGE_METHODS, "peak_MiB" if cuda else "peak_extra_MiB"), chk, _load(r)])
        L += md_table(head, body)
        L.append("")
        for name, note in dict((r["config"], r["note"]) for r in image_rows).items():
            L.append(f"- `{name}`: {note}")
        L.append("")
    if lm_rows:
        L.append("## (b) Masked-diffusion LM: one training step (python_examples/train_masked_diffusion_lm.py)")
        L.append("")
        L.append("Step = t ~ U(0, 1) and standard masks (`mask_tokens`) drawn in the step, TinyTransformer hidden states, "
                 "MDM loss (normalizer \"row\"), `zero_grad`, backward, gradient clipping at 1, AdamW step. `fused` = "
                 "`masked_diffusion_loss(hidden=, lm_head_weight=)` (logits of masked tokens only); `eager_full` = logits "
                 "of every token + `F.cross_entropy` at the masked tokens, same weights. bf16 rows: transformer under "
                 "bf16 autocast, hidden states and LM head cast to bf16 for both losses (fp32 master weights). "
                 "`check`: fused vs eager_full on the same mask and model; `oracle` = the float64 reference "
                 "(`diffkernels.reference.masked_ce`) where the logits are small.")
        L.append("")
        head = ["config", "B×L", "d × layers", "V", "precision", "params", "masked (mean)", "fused ms", "eager_full ms",
                "fused/eager_full", ("peak MiB fused / eager" if cuda else "peak extra MiB fused / eager"),
                "peak fused/eager", "check: loss rel, grad rel", "oracle rel (fused)", "load"]
        body = []
        for r in lm_rows:
            t, rt, ck = r.get("time", {}), r.get("ratio", {}), r.get("check", {})
            c = ck.get("fused", {})
            key = "peak_MiB" if cuda else "peak_extra_MiB"
            pm = r.get(key) or {}
            mr = f"{pm['fused'] / pm['eager_full']:.2f}" if pm.get("fused") and pm.get("eager_full") else "n/a"
            orc = ck.get("oracle_float64")
            body.append([r["config"], f"{r['B']}×{r['L']}", f"{r['dim']}×{r['layers']}", r["V"], r["precision"],
                         f"{r['params'] / 1e6:.2f}M", f"{r.get('masked_fraction', float('nan')):.2f}",
                         f"**{fmt_t(t.get('fused'))}**", fmt_t(t.get("eager_full")), fmt_r(rt.get("fused/eager_full")),
                         _mem(r, LM_METHODS, key), mr,
                         f"{c['loss_rel']:.1e}, {c['grad_rel']:.1e} {'✓' if c['ok'] else '✗'}" if "ok" in c else "n/a",
                         "n/a (too large)" if orc is None else f"{orc['fused_rel']:.1e}", _load(r)])
        L += md_table(head, body)
        L.append("")
        for r in lm_rows:
            L.append(f"- `{r['config']}`: {r['note']}; the eager step's full logits: {r['logits_MiB']:.0f} MiB")
        L.append("")
    if curve and "measured" in curve:
        c = curve
        L.append(f"## (c) Optimal-loss curve: `estimate_curve`, full estimator, N = M = {c['N']}, D = {c['D']}, "
                 f"{c['levels']} levels σ ∈ [{c['sigma_range'][0]:g}, {c['sigma_range'][1]:g}] (log-spaced)")
        L.append("")
        L.append(f"Data: random, {c['data']}. One level = `estimate_curve(data, [σ], num_queries=M)` "
                 f"({c['flops_per_level'] / 1e12:.2f} TFLOP counting 4·M·N·D for the two GEMMs), timed alone"
                 + (" with CUDA events" if cuda else "") + ". **Measured** rows ran on the full-size problem; the "
                 f"total for {c['levels']} levels is **extrapolated** from them (per-level time interpolated linearly "
                 "in log σ between the measured levels, constant beyond).")
        L.append("")
        head = ["level", "σ", "status", "seconds (float64 engine)", "TFLOP/s"] + (["% fp64 GEMM ceiling"] if "frac_of_fp64_ceiling" in
                                                               c["measured"][0] else []) + ["seconds (auto engine)", "J*/D (± s.e.)"]
        body = []
        for r in c["measured"]:
            line = [r["level"], f"{r['sigma']:.3g}", "measured", f"{r['seconds']:.3f}", f"{r['TFLOPs']:.2f}"]
            if "frac_of_fp64_ceiling" in r:
                line.append(f"{100 * r['frac_of_fp64_ceiling']:.0f}%")
            line.append(f"{r['seconds_auto']:.3f}")
            line.append(f"{r['j_star_per_element']:.4g} ± {r['stderr_per_element']:.1g}")
            body.append(line)
        L += md_table(head, body)
        L.append("")
        n_meas = len(c["measured"])
        L.append(f"- **{c['levels']} levels: {c['total_seconds_extrapolated']:.1f} s = "
                 f"{c['total_seconds_extrapolated'] / 60:.2f} min (extrapolated**: {n_meas} levels measured, "
                 f"{c['measured_seconds']:.1f} s; {c['levels'] - n_meas} extrapolated); with `precision=\"auto\"` "
                 f"{c['total_seconds_extrapolated_auto']:.1f} s (extrapolated the same way)")
        if "full_curve_seconds_measured" in c:
            L.append(f"- whole curve measured too: **{c['full_curve_seconds_measured']:.1f} s** (measured; "
                     f"extrapolation / measured = {c['total_seconds_extrapolated'] / c['full_curve_seconds_measured']:.2f})")
        if "peak_MiB" in c:
            L.append(f"- peak GPU memory while measuring: {c['peak_MiB']:.0f} MiB")
        L.append("")
    bad = _checks(image_rows + lm_rows, curve) + [(p, e) for p, e in part_errors.items()]
    L.append("## Checks")
    L.append("")
    if bad:
        L += [f"- **FAILED** {w}: {m}" for w, m in bad]
    else:
        L.append("All correctness checks passed (fused loss = eager/reference loss on the same inputs, gradients "
                 "agree, losses finite after timing).")
    L.append("")
    return "\n".join(L)


# --- main -------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = base_parser(__doc__, quick_help="tiny shapes and short budgets (a CPU smoke test)")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of image,lm,curve")
    ap.add_argument("--image-configs", default=None, help="e.g. 'example,gpu' (default: both on a GPU, example on "
                    "a CPU, quick with --quick)")
    ap.add_argument("--lm-configs", default=None, help="e.g. 'example,gpu' (same defaults)")
    ap.add_argument("--image-batch", type=int, default=None, help="override the image batch size")
    ap.add_argument("--lm-shape", default=None, help="override the 'gpu' LM config: B,L,d,layers,heads,V")
    ap.add_argument("--lm-precision", default=None, choices=("fp32", "bf16"),
                    help="LM precision (default: the config's on a GPU, fp32 on a CPU)")
    ap.add_argument("--etas", default=None, help="mask ratios of the image step, e.g. '0,0.9,0.98'")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timing per row (all methods)")
    ap.add_argument("--min-reps", type=int, default=None)
    ap.add_argument("--max-reps", type=int, default=200)
    ap.add_argument("--min-sample", type=float, default=None, help="seconds per timed sample (steps are batched)")
    ap.add_argument("--warmup", type=float, default=None, help="seconds of warm-up per method")
    ap.add_argument("--full-curve", action="store_true", help="also measure the whole curve (GPU: about a minute)")
    ap.add_argument("--curve-size", default=None, help="N,D of the curve (N = M), e.g. '50000,3072'")
    ap.add_argument("--curve-levels", type=int, default=None, help="number of noise levels of the curve")
    ap.add_argument("--suffix", default="", help="appended to the output file names")
    args, unknown = ap.parse_known_args(argv)
    if unknown:  # e.g. GPU_PASS_BENCH_ARGS meant for the other benchmarks
        print(f"bench_end_to_end: ignoring arguments {unknown}", file=sys.stderr)
    args.device = default_device(args.device)
    cuda = args.device.type == "cuda"
    args.parts = [p for p in args.parts.split(",") if p]
    for p in args.parts:
        if p not in PARTS:
            ap.error(f"unknown part {p!r} (choose from {PARTS})")
    default_cfgs = ["quick"] if args.quick else (["example", "gpu"] if cuda else ["example"])
    args.image_configs = args.image_configs.split(",") if args.image_configs else list(default_cfgs)
    args.lm_configs = args.lm_configs.split(",") if args.lm_configs else list(default_cfgs)
    for name in args.image_configs + args.lm_configs:
        if name not in IMAGE_CONFIGS:
            ap.error(f"unknown config {name!r} (choose from {list(IMAGE_CONFIGS)})")
    args.etas = [float(x) for x in args.etas.split(",")] if args.etas else list(ETAS)
    args.lm_shape = tuple(int(x) for x in args.lm_shape.split(",")) if args.lm_shape else None
    args.curve_size = tuple(int(x) for x in args.curve_size.split(",")) if args.curve_size else None
    defaults = dict(
        budget=(0.3 if args.quick else (2.0 if cuda else 4.0)),
        min_reps=(3 if args.quick else (15 if cuda else 7)),
        min_sample=(1e-3 if cuda else 2e-3),
        warmup=(0.05 if args.quick else 0.3),
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pin_device(args.device)
    meta = environment(device)
    meta["fused_backend"] = fused_backend(device)
    meta["settings"] = {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()}
    meta["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    print(f"[bench] {meta['device']}; torch {meta['torch']}; fused backend {meta['fused_backend']}; "
          f"commit {meta['git_commit']}; parts {args.parts}", file=sys.stderr)
    t_start = time.perf_counter()
    ceil = ceilings(device, args.quick)
    print(f"[bench] ceilings {ceil}", file=sys.stderr)

    image_rows, lm_rows, curve, part_errors = [], [], None, {}
    def run_row(label, bench, rows):
        """One timed row: appended to ``rows``, or its error recorded under ``label``; the others go on."""
        t0 = time.perf_counter()
        try:
            row = bench()
        except Exception as exc:  # noqa: BLE001 -- record, go on with the other rows
            traceback.print_exc()
            part_errors[label] = err_s(exc)
            return
        finally:
            free(device)
        rows.append(row)
        msg = " ".join(f"{k}={v['median_ms']:.3f}ms" for k, v in row["time"].items())
        rr = " ".join(f"{k}={v['median']:.3f}" for k, v in row["ratio"].items())
        print(f"[bench] {label}: {msg} | {rr} | check {row['check']['fused'].get('ok')} | "
              f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)

    if "image" in args.parts:
        for cfg in args.image_configs:
            for eta in args.etas:
                run_row(f"image {cfg} η={eta}", lambda: bench_image(cfg, eta, device, args), image_rows)
    if "lm" in args.parts:
        for cfg in args.lm_configs:
            run_row(f"lm {cfg}", lambda: bench_lm(cfg, device, args), lm_rows)
    if "curve" in args.parts:
        t0 = time.perf_counter()
        try:
            curve = bench_curve(device, args, ceil)
            print(f"[bench] curve: {curve['levels']} levels ≈ {curve['total_seconds_extrapolated']:.1f} s "
                  f"(extrapolated) | {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            part_errors["curve"] = err_s(exc)
        finally:
            free(device)
    meta["total_s"] = time.perf_counter() - t_start

    md = to_markdown(meta, ceil, image_rows, lm_rows, curve, part_errors)
    print(md)
    failed = _checks(image_rows + lm_rows, curve) + list(part_errors.items())
    payload = {"meta": meta, "ceilings": ceil, "image_rows": image_rows, "lm_rows": lm_rows, "curve": curve,
               "part_errors": part_errors, "failed_checks": [f"{w}: {m}" for w, m in failed]}
    stem = f"end_to_end_{meta['device_kind']}" + ("_quick" if args.quick else "") + args.suffix
    write_results(args.out, stem, md, payload, suffix_msg=f" in {meta['total_s']:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
