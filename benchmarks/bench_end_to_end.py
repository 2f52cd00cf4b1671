#!/usr/bin/env python
"""End-to-end timings: whole training steps of real models with the fused ops against the same steps with eager losses.

    python benchmarks/bench_end_to_end.py [--quick] [--out DIR] [--device cuda|cpu] [--parts image,lm,curve]

Every model is built from a config (nothing is downloaded).

(a) ``image``: one training step -- noising, forward, loss, backward, optimizer step -- of a diffusers
    ``UNet2DModel`` trained as diffusers' ``train_unconditional.py`` trains it (DDPM: random timesteps,
    ``DDPMScheduler.add_noise``, epsilon target, Adam). Loss variants, at mask ratios 0 / 0.9 / 0.98:
    * ``fused``: ``diffkernels.sparse_mse_loss(pred, noise, eta, seed)`` (normalize "expected");
    * ``mse``: ``F.mse_loss(pred, noise)``, the dense loss it replaces;
    * ``eager``: the masked MSE a user writes with ``torch.rand`` (another mask, same law; as
      ``bench_sparse_mse.py``'s baseline).
    Checked before timing, on the same batch, model and seed: the fused loss and every parameter
    gradient against ``diffkernels.reference.sparse_mse_loss`` (float64, the same Philox mask), and at
    eta = 0 (nothing masked) ``mse`` and ``eager`` too. Shapes: 32 x 3 x 32 x 32 with a two-level UNet
    on a CPU; on a GPU a CIFAR-10-sized batch 256 x 3 x 32 x 32 with a three-level UNet (attention at 16 x 16).
(b) ``lm``: one training step of a masked-diffusion LM: a transformers ``LlamaForCausalLM`` made
    bidirectional (``make_bidirectional``), uniform t, standard masks, gradient clipping, AdamW:
    * ``fused``: ``diffkernels.integrations.transformers.masked_diffusion_loss_from_model`` (logits of
      the masked tokens only);
    * ``eager_full``: the same t and mask draws, the model's own full logits, ``F.cross_entropy`` at the
      masked tokens with the same weights (what a user writes).
    Checked before timing on the same masks: loss and parameter gradients of fused against eager_full,
    and both against the float64 oracle (``diffkernels.reference.masked_ce``) where it is small. Shapes:
    B = 8, L = 128, d = 128, 2 layers, V = 8192, fp32 on a CPU; on a GPU B = 8, L = 1024, d = 1024, 4
    layers, V = 32000 under bf16 autocast (fp32 master weights).
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
loading is not part of a step); the masks, timesteps and noising happen inside the step. Peak
memory on a GPU: ``torch.cuda.max_memory_allocated()`` during one step (model, optimizer state and
batches included) and its excess over the allocation before the step.

Results: Markdown on stdout and ``<out>/end_to_end_<device>[_quick].{md,json}``; the exit code is 1
when a correctness check failed or a part raised.
"""

from __future__ import annotations

import math
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout: diffkernels, benchmarks
from benchmarks.bench_sparse_mse import baseline_loss as eager_masked_mse  # noqa: E402
from benchmarks.cli import base_parser, fill_defaults, parse_floats, parse_tolerantly, result_stem  # noqa: E402
from benchmarks.environment import (  # noqa: E402
    copy_gemm_ceilings,
    default_device,
    fused_backend,
    start,
)
from benchmarks.memory import MiB, cuda_peak_bytes, free, peak_extra_bytes  # noqa: E402
from benchmarks.reporting import (  # noqa: E402
    err_s,
    fmt_r,
    fmt_t,
    grad_rel_diff,
    header,
    load_cell,
    log,
    log_row,
    log_start,
    md_table,
    rel_diff,
    write_results,
)
from benchmarks.timing import (  # noqa: E402
    add_timing_options,
    measure_quietly,
    record,
    sync,
    time_once,
    timing_defaults,
)

from diffkernels import fold_seed, mdm, sparse_mse_loss  # noqa: E402
from diffkernels import reference as ref_mse  # noqa: E402
from diffkernels.optimal_loss import estimate_curve  # noqa: E402
from diffkernels.reference import masked_ce as ref_ce  # noqa: E402

SEED = 0x5EED_0000_E2E0
PARTS = ("image", "lm", "curve")
ETAS = (0.0, 0.9, 0.98)
IMAGE_METHODS = ("fused", "mse", "eager")
LM_METHODS = ("fused", "eager_full")
N_SETS = 4  # batches rotated over
LR_IMAGE = 1e-4  # small: hundreds of timing steps on random data stay finite (a step's cost does not depend on it)
LR_LM = 1e-4
EPS = 1e-3  # p = (1 - eps) t + eps, as masked_diffusion_loss_from_model

# UNet2DModel configs: batch, image size, channels, block widths, layers per block, attention levels.
IMAGE_CONFIGS = {
    "small": dict(B=32, C=3, H=32, widths=(32, 64), layers=1, attention=(), groups=8,
                  note="32×3×32×32, a two-level UNet2DModel (widths 32, 64, one layer per block)"),
    "gpu": dict(B=256, C=3, H=32, widths=(64, 128, 256), layers=2, attention=(1,), groups=32,
                note="CIFAR-10-sized batch 256×3×32×32, a three-level UNet2DModel (widths 64, 128, 256, two "
                     "layers per block, attention at 16×16)"),
    "quick": dict(B=8, C=1, H=8, widths=(16, 32), layers=1, attention=(), groups=8, note="tiny (--quick)"),
}
# LlamaForCausalLM configs: batch, length, hidden size, layers, heads, vocabulary, precision.
LM_CONFIGS = {
    "small": dict(B=8, L=128, dim=128, layers=2, heads=4, V=8192, precision="fp32",
                  note="Llama, d 128, 2 layers, V 8192, random tokens"),
    "gpu": dict(B=8, L=1024, dim=1024, layers=4, heads=16, V=32000, precision="bf16",
                note="Llama, d 1024, 4 layers, V 32000, random tokens, bf16 autocast"),
    "quick": dict(B=4, L=32, dim=32, layers=2, heads=4, V=256, precision="fp32", note="tiny (--quick)"),
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
ORACLE_MAX_LOGITS = 2**22  # float64 oracle only where the masked rows' logits are small


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def param_grads(model: nn.Module) -> list:
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def loss_and_grads(model: nn.Module, loss_fn) -> tuple[float, list]:
    """loss_fn()'s value and the parameter gradients of its backward (no optimizer step)."""
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    out = float(loss.detach()), param_grads(model)
    model.zero_grad(set_to_none=True)
    return out


def compare(got: tuple[float, list], ref: tuple[float, list], loss_tol: float, grad_tol: float) -> dict:
    """Relative loss difference, and max |Δg| / max |g| over all parameters together, against ``ref``.
    (Per parameter would divide by gradients that are zero up to rounding, e.g. attention key biases.)"""
    (loss, grads), (ref_loss, ref_grads) = got, ref
    flat = lambda gs: torch.cat([g.float().reshape(-1) for g in gs])  # noqa: E731
    c = {"loss": loss, "loss_rel": rel_diff(loss, ref_loss), "loss_tol": loss_tol, "grad_tol": grad_tol,
         "grad_rel": grad_rel_diff(flat(grads), flat(ref_grads))}
    c["ok"] = math.isfinite(loss) and c["loss_rel"] <= loss_tol and c["grad_rel"] <= grad_tol
    return c


# --- (a) image diffusion: diffusers UNet2DModel, DDPM ---------------------------------------------------


def build_unet(cfg: dict, device) -> nn.Module:
    from diffusers import UNet2DModel

    levels = len(cfg["widths"])
    down = tuple("AttnDownBlock2D" if k in cfg["attention"] else "DownBlock2D" for k in range(levels))
    up = tuple("AttnUpBlock2D" if levels - 1 - k in cfg["attention"] else "UpBlock2D" for k in range(levels))
    torch.manual_seed(SEED)
    return UNet2DModel(sample_size=cfg["H"], in_channels=cfg["C"], out_channels=cfg["C"],
                       block_out_channels=cfg["widths"], layers_per_block=cfg["layers"], down_block_types=down,
                       up_block_types=up, norm_num_groups=cfg["groups"]).to(device)


def image_batches(cfg: dict, scheduler, device) -> list:
    """N_SETS (clean images in [-1, 1], noise, timesteps) on the device."""
    gen = torch.Generator().manual_seed(SEED + 1)
    B, C, H = cfg["B"], cfg["C"], cfg["H"]
    T = scheduler.config.num_train_timesteps
    return [tuple(x.to(device) for x in (torch.rand(B, C, H, H, generator=gen) * 2 - 1,
                                         torch.randn(B, C, H, H, generator=gen),
                                         torch.randint(0, T, (B,), generator=gen)))
            for _ in range(N_SETS)]


def image_loss(method: str, pred, target, eta: float, seed: int):
    if method == "fused":
        return sparse_mse_loss(pred, target, eta, seed)
    if method == "reference":
        return ref_mse.sparse_mse_loss(pred, target, eta, seed)
    if method == "mse":
        return F.mse_loss(pred, target)
    return eager_masked_mse(pred, target, eta)


def image_forward_loss(model, scheduler, batch, method, eta, seed):
    x0, noise, timesteps = batch
    noisy = scheduler.add_noise(x0, noise, timesteps)
    pred = model(noisy, timesteps).sample
    return image_loss(method, pred, noise, eta, seed)


def image_step_fn(model, scheduler, opt, batches, method, eta):
    def step(i):
        loss = image_forward_loss(model, scheduler, batches[i % len(batches)], method, eta, fold_seed(SEED, i))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def image_check(model, scheduler, batch, eta) -> dict:
    """Loss and parameter gradients on the same batch, model and seed (no optimizer step): fused (and
    mse and eager at eta = 0, where no element is masked) against the float64 reference."""
    seed = fold_seed(SEED, 10**9)
    res = {m: loss_and_grads(model, lambda m=m: image_forward_loss(model, scheduler, batch, m, eta, seed))
           for m in ("reference",) + IMAGE_METHODS}
    out = {"reference": {"loss": res["reference"][0]}}
    for m in IMAGE_METHODS:
        if m == "fused" or eta == 0.0:
            out[m] = compare(res[m], res["reference"], IMAGE_LOSS_TOL, GRAD_TOL["fp32"])
        else:
            out[m] = {"loss": res[m][0], "note": "another loss (dense, or another mask): not comparable"}
    return out


def bench_image(cfg_name: str, eta: float, device, args) -> dict:
    from diffusers import DDPMScheduler

    cfg = dict(IMAGE_CONFIGS[cfg_name])
    if args.image_batch:
        cfg["B"] = args.image_batch
    row = {"part": "image", "config": cfg_name, "note": cfg["note"], "eta": eta,
           "shape": [cfg["B"], cfg["C"], cfg["H"], cfg["H"]], "widths": list(cfg["widths"]), "dtype": "fp32",
           "errors": {}}
    model = build_unet(cfg, device)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    row["params"] = n_params(model)
    batches = image_batches(cfg, scheduler, device)
    row["check"] = image_check(model, scheduler, batches[0], eta)
    opt = torch.optim.Adam(model.parameters(), lr=LR_IMAGE)
    fns = {m: image_step_fn(model, scheduler, opt, batches, m, eta) for m in IMAGE_METHODS}
    time_methods(row, fns, device, args)
    row["final_loss"] = float(fns["fused"](0).detach())
    memory_methods(row, fns, device, args, lambda: opt.zero_grad(set_to_none=True))
    return row


# --- (b) masked-diffusion LM: transformers LlamaForCausalLM ------------------------------------------------


def build_llama(cfg: dict, device) -> nn.Module:
    import transformers

    from diffkernels.integrations.transformers import make_bidirectional

    conf = transformers.LlamaConfig(vocab_size=cfg["V"], hidden_size=cfg["dim"], intermediate_size=cfg["dim"] * 11 // 4,
                                    num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                                    num_key_value_heads=cfg["heads"], max_position_embeddings=cfg["L"])
    torch.manual_seed(SEED)
    return make_bidirectional(transformers.LlamaForCausalLM(conf).to(device))


def lm_mask(ids, i: int, mask_id: int):
    """The masks a user draws for step i: t ~ U(0, 1) (weight 1), p = (1 - eps) t + eps, standard masks."""
    t, w = mdm.Uniform().sample(ids.shape[0], fold_seed(SEED, 2, i), device=ids.device)
    m = mdm.mask_tokens(ids, (1 - EPS) * t + EPS, fold_seed(SEED, 3, i), mask_id=mask_id)
    return m, w


def eager_masked_ce(logits, ids, m, importance):
    """F.cross_entropy at the masked tokens, weighted like the MDM loss (normalizer "row":
    weights * row_weight * importance / (eligible count * B))."""
    B = m.eligible_count.shape[0]
    tgt = torch.where(m.masked, ids[m.source_row], -100).reshape(-1)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt, ignore_index=-100, reduction="none")
    row = m.row_weight * importance.to(torch.float32)[m.source_row]
    row = row / (m.eligible_count.clamp(min=1)[m.source_row].to(torch.float32) * B)
    return (ce * (m.weights * row[:, None]).reshape(-1)).sum()


def eager_full_loss(model, ids, m, w, bf16: bool):
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=m.noisy_ids, use_cache=False).logits
    return eager_masked_ce(logits, ids, m, w)


def fused_loss(model, ids, i: int, mask_id: int, bf16: bool, return_outputs: bool = False):
    from diffkernels.integrations.transformers import masked_diffusion_loss_from_model

    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        return masked_diffusion_loss_from_model(model, ids, mask_id=mask_id, seed=fold_seed(SEED, i),
                                                sampler=mdm.Uniform(), eps=EPS, return_outputs=return_outputs)


def lm_step_fn(model, opt, batches, mask_id, method, bf16):
    def step(i):
        ids = batches[i % len(batches)]
        if method == "fused":
            loss = fused_loss(model, ids, i, mask_id, bf16)
        else:
            m, w = lm_mask(ids, i, mask_id)
            loss = eager_full_loss(model, ids, m, w, bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss
    return step


def lm_check(model, ids, mask_id, bf16, precision) -> dict:
    """fused against eager_full on the masks fused drew; both against the float64 oracle when small."""
    from diffkernels.integrations.transformers import find_backbone

    holder = {}

    def fused():
        loss, holder["out"] = fused_loss(model, ids, 10**9, mask_id, bf16, return_outputs=True)
        return loss

    got = loss_and_grads(model, fused)
    m, w = holder["out"].masked, holder["out"].weight
    ref = loss_and_grads(model, lambda: eager_full_loss(model, ids, m, w, bf16))
    out = {"masked_fraction": float(m.masked.float().mean()), "eager_full": {"loss": ref[0]},
           "fused": compare(got, ref, LM_LOSS_TOL[precision], GRAD_TOL[precision])}
    head = model.get_output_embeddings().weight
    if int(m.masked.sum()) * head.shape[0] <= ORACLE_MAX_LOGITS:
        with torch.no_grad():
            hidden = find_backbone(model)(input_ids=m.noisy_ids, use_cache=False).last_hidden_state
            oracle = float(ref_ce.masked_diffusion_loss(m, ids, hidden=hidden.double(), lm_head_weight=head.double(),
                                                        importance=w))
        out["oracle_float64"] = {"loss": oracle, "fused_rel": rel_diff(got[0], oracle),
                                 "eager_full_rel": rel_diff(ref[0], oracle)}
    return out


def bench_lm(cfg_name: str, device, args) -> dict:
    cfg = dict(LM_CONFIGS[cfg_name])
    if args.lm_shape:
        cfg.update(zip(("B", "L", "dim", "layers", "heads", "V"), args.lm_shape))
    precision = args.lm_precision or (cfg["precision"] if device.type == "cuda" else "fp32")
    bf16 = precision == "bf16"
    B, L, V = cfg["B"], cfg["L"], cfg["V"]
    mask_id = V - 1
    gen = torch.Generator().manual_seed(SEED + 2)
    batches = [torch.randint(0, mask_id, (B, L), generator=gen).to(device) for _ in range(N_SETS)]
    model = build_llama(cfg, device)
    row = {"part": "lm", "config": cfg_name, "note": cfg["note"], "B": B, "L": L, "dim": cfg["dim"],
           "layers": cfg["layers"], "heads": cfg["heads"], "V": V, "precision": precision, "params": n_params(model),
           "errors": {}}
    row["check"] = lm_check(model, batches[0], mask_id, bf16, precision)
    # The masked fraction varies from step to step (one t per sequence): its mean over 32 steps' masks.
    row["masked_fraction"] = float(np.mean([float(lm_mask(batches[i % N_SETS], i, mask_id)[0].masked.float().mean())
                                            for i in range(32)]))
    opt = torch.optim.AdamW(model.parameters(), lr=LR_LM)
    fns = {meth: lm_step_fn(model, opt, batches, mask_id, meth, bf16) for meth in LM_METHODS}
    time_methods(row, fns, device, args)
    row["final_loss"] = float(fns["fused"](0).detach())
    memory_methods(row, fns, device, args, lambda: opt.zero_grad(set_to_none=True))
    row["logits_MiB"] = B * L * V * (2 if bf16 else 4) / MiB  # the eager step's full logits, for scale
    return row


# --- shared: timing and memory of a row's methods ------------------------------------------------------


def time_methods(row: dict, fns: dict, device, args) -> None:
    res = measure_quietly(fns, device, args, args.budget, args.min_reps)
    record(row, res, [("fused", n) for n in fns if n != "fused"], args.keep_samples)


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


def timed_curve(data, sigmas, device, precision=None):
    """(seconds, CurveResult) of one estimate_curve call over all of data (``precision`` None: its default)."""
    holder = {}
    t = time_once(lambda: holder.update(res=estimate_curve(data, sigmas, num_queries=data.shape[0], seed=SEED % 2**31,
                                                           progress=False, precision=precision)), device)
    return t, holder["res"]


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
        t, res = timed_curve(data, [s], device, precision="float64")
        # The screen-and-refine engine on the same draws: its time, and its J* (equal to float64 rounding).
        t_auto, res_auto = timed_curve(data, [s], device, precision="auto")
        measured.append({"level": int(k), "sigma": s, "seconds": t, "status": "measured",
                         "TFLOPs": out["flops_per_level"] / t / 1e12,
                         "j_star_per_element": float(res.j_star_per_element[0]),
                         "stderr_per_element": float(res.stderr_per_element[0]),
                         "seconds_auto": t_auto, "j_star_per_element_auto": float(res_auto.j_star_per_element[0])})
        log(f"curve level {k} sigma={s:.3g}: float64 {t:.3f} s, auto {t_auto:.3f} s")
    if "fp64_TFLOPs" in ceil:
        for r in measured:
            r["frac_of_fp64_ceiling"] = r["TFLOPs"] / ceil["fp64_TFLOPs"]
    if device.type == "cuda":
        out["peak_MiB"] = torch.cuda.max_memory_allocated(device) / MiB
    out["measured"] = measured
    # Extrapolation: per-level time linear in log sigma between the measured levels, constant beyond.
    ls = np.log(sigmas)
    log_measured = [math.log(r["sigma"]) for r in measured]
    est = np.interp(ls, log_measured, [r["seconds"] for r in measured])
    for r in measured:
        est[r["level"]] = r["seconds"]
    out["per_level_seconds"] = [float(v) for v in est]
    out["per_level_status"] = ["measured" if k in cfg["measure"] else "extrapolated" for k in range(n_levels)]
    out["measured_seconds"] = float(sum(r["seconds"] for r in measured))
    out["total_seconds_extrapolated"] = float(est.sum())
    est_auto = np.interp(ls, log_measured, [r["seconds_auto"] for r in measured])
    out["total_seconds_extrapolated_auto"] = float(est_auto.sum())
    if cfg["full_curve"] or args.full_curve:
        t, res = timed_curve(data, sigmas, device)
        out["full_curve_seconds_measured"] = t
        out["full_curve_j_star_per_element"] = [float(v) for v in res.j_star_per_element]
        out["full_curve_stderr_per_element"] = [float(v) for v in res.stderr_per_element]
    return out


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
            auto, j = r.get("j_star_per_element_auto"), r["j_star_per_element"]
            if auto is not None and not abs(auto - j) <= 1e-9 * abs(j) + 1e-15:
                bad.append(("curve", f"J* at sigma {r['sigma']:.3g}: precision='auto' gives {auto!r}, "
                                     f"float64 {r['j_star_per_element']!r} (must agree to rounding)"))
    return bad


def _mem(row, names, key="peak_MiB") -> str:
    pm = row.get(key) or {}
    return " / ".join(f"{pm[n]:.0f}" if n in pm else "n/a" for n in names) if pm else "n/a"


def _check_cell(c: dict) -> str:
    return f"{c['loss_rel']:.1e}, {c['grad_rel']:.1e} {'✓' if c['ok'] else '✗'}" if "ok" in c else "n/a"


def to_markdown(meta, ceil, image_rows, lm_rows, curve, part_errors) -> str:
    cuda = meta.get("cuda") is not None
    L = header(meta, "End-to-end training steps: fused ops vs eager losses",
               f"fused backend: `{meta['fused_backend']}`")
    L.append("- timing: " + ("CUDA events around whole steps after warm-up (CUDA-synchronised)" if cuda else
                             "time.perf_counter around whole steps after warm-up")
             + "; methods interleaved round by round; ms = median ± IQR/2; ratios fused/X = median (quartiles) of "
             "the per-round ratios, measured in the same run (< 1: the fused step is faster). `load` = CPU cores used "
             "by other processes / stolen by the hypervisor while timing.")
    L.append("")
    L.append("## Ceilings measured first")
    L.append("")
    gem = ", ".join(f"{k.split('_')[0]} **{v:.1f}**" for k, v in ceil.items() if k.endswith("_TFLOPs"))
    L.append(f"- copy bandwidth: **{ceil['copy_GBps']:.1f} GB/s** (bytes read + written, "
             f"{ceil['copy_bytes'] // MiB} MiB)")
    L.append(f"- GEMM {ceil['gemm_size']}³, TFLOP/s: {gem}")
    L.append("")
    peak = "peak MiB" if cuda else "peak extra MiB"
    if image_rows:
        L.append("## (a) Image diffusion: one training step of a diffusers UNet2DModel (DDPM)")
        L.append("")
        L.append("Step = t ~ U{0, …, 999}, `DDPMScheduler.add_noise`, `UNet2DModel` forward, loss against the noise "
                 "(epsilon prediction), `zero_grad`, backward, Adam step. `fused` = `diffkernels.sparse_mse_loss` "
                 "(a fresh Philox mask every step, `normalize=\"expected\"`); `mse` = `F.mse_loss` (dense: the loss "
                 "it replaces); `eager` = masked MSE with a `torch.rand` mask (another mask, same law). fp32; Adam at "
                 "lr 1e-4 (the cost of a step does not depend on it). `check`: loss and parameter gradients of fused "
                 "vs `diffkernels.reference.sparse_mse_loss` (float64, the same mask) on the same batch, model and "
                 "seed (relative loss difference; max |Δg| / max |g| over all parameters).")
        L.append("")
        head = ["config", "batch", "params", "η", "fused ms", "mse ms", "eager ms", "fused/mse", "fused/eager",
                f"{peak} fused / mse / eager", "check: loss rel, grad rel", "load"]
        body = []
        for r in image_rows:
            t, rt = r.get("time", {}), r.get("ratio", {})
            body.append([r["config"], "×".join(map(str, r["shape"])), f"{r['params'] / 1e3:.0f}k", r["eta"],
                         f"**{fmt_t(t.get('fused'))}**", fmt_t(t.get("mse")), fmt_t(t.get("eager")),
                         fmt_r(rt.get("fused/mse")), fmt_r(rt.get("fused/eager")),
                         _mem(r, IMAGE_METHODS, "peak_MiB" if cuda else "peak_extra_MiB"),
                         _check_cell(r.get("check", {}).get("fused", {})), load_cell(r)])
        L += md_table(head, body)
        L.append("")
        for name, note in dict((r["config"], r["note"]) for r in image_rows).items():
            L.append(f"- `{name}`: {note}")
        L.append("")
    if lm_rows:
        L.append("## (b) Masked-diffusion LM: one training step of a transformers LlamaForCausalLM")
        L.append("")
        L.append("Step = t ~ U(0, 1) and standard masks drawn in the step, the bidirectional Llama's forward, the MDM "
                 "loss (normalizer \"row\"), `zero_grad`, backward, gradient clipping at 1, AdamW step. `fused` = "
                 "`diffkernels.integrations.transformers.masked_diffusion_loss_from_model` (logits of masked tokens "
                 "only); `eager_full` = the model's full logits + `F.cross_entropy` at the masked tokens, same "
                 "weights. "
                 "bf16 rows: the whole step under bf16 autocast (fp32 master weights). `check`: fused vs eager_full "
                 "on the same masks and model; `oracle` = the float64 reference (`diffkernels.reference.masked_ce`) "
                 "where the logits are small.")
        L.append("")
        head = ["config", "B×L", "d × layers", "V", "precision", "params", "masked (mean)", "fused ms",
                "eager_full ms", "fused/eager_full", f"{peak} fused / eager", "peak fused/eager",
                "check: loss rel, grad rel", "oracle rel (fused)", "load"]
        body = []
        for r in lm_rows:
            t, rt, ck = r.get("time", {}), r.get("ratio", {}), r.get("check", {})
            key = "peak_MiB" if cuda else "peak_extra_MiB"
            pm = r.get(key) or {}
            mr = f"{pm['fused'] / pm['eager_full']:.2f}" if pm.get("fused") and pm.get("eager_full") else "n/a"
            orc = ck.get("oracle_float64")
            body.append([r["config"], f"{r['B']}×{r['L']}", f"{r['dim']}×{r['layers']}", r["V"], r["precision"],
                         f"{r['params'] / 1e6:.2f}M", f"{r.get('masked_fraction', float('nan')):.2f}",
                         f"**{fmt_t(t.get('fused'))}**", fmt_t(t.get("eager_full")), fmt_r(rt.get("fused/eager_full")),
                         _mem(r, LM_METHODS, key), mr, _check_cell(ck.get("fused", {})),
                         "n/a (too large)" if orc is None else f"{orc['fused_rel']:.1e}", load_cell(r)])
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
        has_frac = "frac_of_fp64_ceiling" in c["measured"][0]
        head = (["level", "σ", "status", "seconds (float64 engine)", "TFLOP/s"]
                + (["% fp64 GEMM ceiling"] if has_frac else []) + ["seconds (auto engine)", "J*/D (± s.e.)"])
        body = []
        for r in c["measured"]:
            line = [r["level"], f"{r['sigma']:.3g}", "measured", f"{r['seconds']:.3f}", f"{r['TFLOPs']:.2f}"]
            if has_frac:
                line.append(f"{100 * r['frac_of_fp64_ceiling']:.0f}%")
            line += [f"{r['seconds_auto']:.3f}", f"{r['j_star_per_element']:.4g} ± {r['stderr_per_element']:.1g}"]
            body.append(line)
        L += md_table(head, body)
        L.append("")
        n_meas = len(c["measured"])
        L.append(f"- **{c['levels']} levels: {c['total_seconds_extrapolated']:.1f} s = "
                 f"{c['total_seconds_extrapolated'] / 60:.2f} min (extrapolated**: {n_meas} levels measured, "
                 f"{c['measured_seconds']:.1f} s; {c['levels'] - n_meas} extrapolated); with `precision=\"auto\"` "
                 f"{c['total_seconds_extrapolated_auto']:.1f} s (extrapolated the same way)")
        if "full_curve_seconds_measured" in c:
            full = c["full_curve_seconds_measured"]
            L.append(f"- whole curve measured too: **{full:.1f} s** (measured; "
                     f"extrapolation / measured = {c['total_seconds_extrapolated'] / full:.2f})")
        if "peak_MiB" in c:
            L.append(f"- peak GPU memory while measuring: {c['peak_MiB']:.0f} MiB")
        L.append("")
    bad = _checks(image_rows + lm_rows, curve) + list(part_errors.items())
    L.append("## Checks")
    L.append("")
    if bad:
        L += [f"- **FAILED** {w}: {m}" for w, m in bad]
    else:
        L.append("All correctness checks passed (fused loss = reference/eager loss on the same inputs, gradients "
                 "agree, losses finite after timing).")
    L.append("")
    return "\n".join(L)


# --- main -------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = base_parser(__doc__, quick_help="tiny shapes and short budgets (a CPU smoke test)")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of image,lm,curve")
    ap.add_argument("--image-configs", default=None, help="e.g. 'small,gpu' (default: gpu on a GPU, small on "
                    "a CPU, quick with --quick)")
    ap.add_argument("--lm-configs", default=None, help="e.g. 'small,gpu' (same defaults)")
    ap.add_argument("--image-batch", type=int, default=None, help="override the image batch size")
    ap.add_argument("--lm-shape", default=None, help="override the LM config's B,L,d,layers,heads,V")
    ap.add_argument("--lm-precision", default=None, choices=("fp32", "bf16"),
                    help="LM precision (default: the config's on a GPU, fp32 on a CPU)")
    ap.add_argument("--etas", default=None, help="mask ratios of the image step, e.g. '0,0.9,0.98'")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timing per row (all methods)")
    ap.add_argument("--min-reps", type=int, default=None)
    add_timing_options(ap, max_reps=200)
    ap.add_argument("--full-curve", action="store_true", help="also measure the whole curve (GPU: about a minute)")
    ap.add_argument("--curve-size", default=None, help="N,D of the curve (N = M), e.g. '50000,3072'")
    ap.add_argument("--curve-levels", type=int, default=None, help="number of noise levels of the curve")
    args = parse_tolerantly(ap, argv, "bench_end_to_end")
    args.device = default_device(args.device)
    cuda = args.device.type == "cuda"
    args.parts = [p for p in args.parts.split(",") if p]
    for p in args.parts:
        if p not in PARTS:
            ap.error(f"unknown part {p!r} (choose from {PARTS})")
    default_cfg = "quick" if args.quick else ("gpu" if cuda else "small")
    args.image_configs = args.image_configs.split(",") if args.image_configs else [default_cfg]
    args.lm_configs = args.lm_configs.split(",") if args.lm_configs else [default_cfg]
    for name in args.image_configs + args.lm_configs:
        if name not in IMAGE_CONFIGS:
            ap.error(f"unknown config {name!r} (choose from {list(IMAGE_CONFIGS)})")
    args.etas = parse_floats(args.etas, ETAS)
    args.lm_shape = tuple(int(x) for x in args.lm_shape.split(",")) if args.lm_shape else None
    args.curve_size = tuple(int(x) for x in args.curve_size.split(",")) if args.curve_size else None
    # Whole steps are long: no waiting for an idle CPU, no retries (unless asked).
    fill_defaults(args, **{**timing_defaults(args.quick, not cuda), "warmup": 0.05 if args.quick else 0.3,
                           "idle_wait": 0.0, "retries": 0, "max_total_wait": 0.0},
                  budget=(0.3 if args.quick else (2.0 if cuda else 4.0)),
                  min_reps=(3 if args.quick else (15 if cuda else 7)))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device, meta = start(args)
    meta["fused_backend"] = fused_backend(device)
    meta["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    log_start(meta, f"fused backend {meta['fused_backend']}; parts {args.parts}")
    t_start = time.perf_counter()
    ceil = copy_gemm_ceilings(device, args.quick)
    log(f"ceilings {ceil}")

    image_rows, lm_rows, curve, part_errors = [], [], None, {}

    def run_part(label, bench, rows=None):
        """Run one row (appended to ``rows``) or the curve; an error is recorded under ``label``, the rest go on."""
        t0 = time.perf_counter()
        try:
            result = bench()
        except Exception as exc:  # noqa: BLE001 -- record, go on with the other rows
            traceback.print_exc()
            part_errors[label] = err_s(exc)
            return None
        finally:
            free(device)
        if rows is not None:
            rows.append(result)
            log_row(label, result, t0, f"check {result['check']['fused'].get('ok')}")
        return result

    if "image" in args.parts:
        for cfg in args.image_configs:
            for eta in args.etas:
                run_part(f"image {cfg} η={eta}", lambda: bench_image(cfg, eta, device, args), image_rows)
    if "lm" in args.parts:
        for cfg in args.lm_configs:
            run_part(f"lm {cfg}", lambda: bench_lm(cfg, device, args), lm_rows)
    if "curve" in args.parts:
        curve = run_part("curve", lambda: bench_curve(device, args, ceil))
        if curve:
            log(f"curve: {curve['levels']} levels ≈ {curve['total_seconds_extrapolated']:.1f} s (extrapolated)")
    meta["total_s"] = time.perf_counter() - t_start

    md = to_markdown(meta, ceil, image_rows, lm_rows, curve, part_errors)
    print(md)
    failed = _checks(image_rows + lm_rows, curve) + list(part_errors.items())
    payload = {"meta": meta, "ceilings": ceil, "image_rows": image_rows, "lm_rows": lm_rows, "curve": curve,
               "part_errors": part_errors, "failed_checks": [f"{w}: {m}" for w, m in failed]}
    write_results(args.out, result_stem("end_to_end", meta["device_kind"], args), md, payload,
                  note=f" in {meta['total_s']:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
