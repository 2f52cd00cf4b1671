#!/usr/bin/env python
"""Benchmark the masked-diffusion LM tools (``diffkernels.mdm``) against what a user writes without them.

    python benchmarks/bench_mdm.py [--quick] [--out benchmarks/results]

Two parts:

* ``mask_tokens`` (standard and mirror modes) at (B, L) = (32, 4096) and (256, 1024), plus one
  large shape where the kernel, not the launch, dominates -- against the eager
  ``u = torch.rand(B, L); m = u < p[:, None]; noisy = torch.where(m, mask_id, ids);
  w = torch.where(m, 1 / p[:, None], 0)`` (``eager_mask`` below; mirror: a second copy masked
  where ``u > 1 - p``). Both the public API (validation and the per-row table included) and the
  backend kernel alone are timed. Bytes moved per token: read the int64 id, write per copy the
  noisy id (8 B), the mask (1 B) and the float32 weight (4 B); ``floor`` = those bytes at the
  measured copy bandwidth, ``% floor`` = floor / time.
* ``masked_diffusion_loss`` forward + backward (w.r.t. the hidden states and the LM-head weight),
  hidden-state form, normaliser "row", per-row masking probabilities with mean p = 0.5, against
  - ``eager_full``: logits of every token (``hidden @ W.T``), ``F.cross_entropy(logits.float(),
    targets, ignore_index=-100, reduction="none")`` on the masked tokens, weighted like our loss;
  - ``eager_gathered``: ``idx = masked.nonzero()``; logits only for those rows, same CE and weights;
  - ``liger``: Liger-Kernel's fused linear cross-entropy, when it installs and runs here, with
    ``reduction="none"`` and the per-token weights applied to its output (the same loss; Liger
    then recomputes the logits in backward), and ``liger_sum``: its fast path
    (``reduction="sum"``, gradients in forward) over the same masked tokens with one uniform
    weight -- a different loss (timing only; checked against our op with that uniform weight).
  On CUDA the target shapes: B*L = 16384, H = 4096, V in {32000, 128256}, bf16 hidden and weight.
  On CPU those are infeasible (hours per step on a few cores): scaled-down shapes, fp32, said so in
  the table. All variants are checked once to give the same loss (relative 1e-4 in fp32) before
  timing, and against the float64 oracle (``diffkernels.reference.masked_ce``) where it fits.

Timing, interleaving, load monitoring, peak-memory measurement, ceilings and the machine
description are the shared ones (``benchmarks/timing.py``, ``memory.py``, ``environment.py``; as in
``bench_sparse_mse.py``): CUDA events on GPU, ``time.perf_counter`` on CPU, median and inter-quartile
range, ratios as the median of per-round ratios. A matmul ceiling (the forward GEMM of the row's own
shapes) gives each loss row a compute floor: 3 GEMMs (logits, grad hidden, grad weight) over the masked
tokens for the fused op.

Targets on a GPU: peak memory <= 25% of eager full logits; time <= 0.7x eager full
logits at mean p = 0.5; mask generation >= 80% of the bandwidth floor. CPU numbers are recorded
for information.

Results: Markdown on stdout, and ``<out>/mdm_<kind>[_quick].{md,json}``.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout: diffkernels, benchmarks
from benchmarks.cli import base_parser, fill_defaults, parse_shapes, result_stem  # noqa: E402
from benchmarks.environment import (  # noqa: E402
    bandwidth_ceilings,
    cache_bytes,
    default_device,
    fused_backend,
    gemm_times,
    input_copies,
    optional_peer,
    start,
)
from benchmarks.memory import MiB, free, peak_extra_mib  # noqa: E402
from benchmarks.reporting import (  # noqa: E402
    err_s,
    fmt_r,
    fmt_t,
    grad_rel_diff,
    header,
    load_cell,
    log,
    md_table,
    log_row,
    log_start,
    rel_diff,
    shape_s,
    write_results,
)
from benchmarks.timing import (  # noqa: E402
    LOAD_LIMIT,
    add_timing_options,
    measure_quietly,
    record,
    sync,
    timing_defaults,
    wait_if_busy,
)

import diffkernels  # noqa: E402
from diffkernels.mdm.loss import masked_cross_entropy, masked_diffusion_loss  # noqa: E402
from diffkernels.mdm.masking import mask_tokens  # noqa: E402
from diffkernels.ops import _kernels  # noqa: E402
from diffkernels.ops.masked_ce import default_chunk_size  # noqa: E402
from diffkernels.ops.mask_tokens import row_table  # noqa: E402
from diffkernels.reference import masked_ce as _ref_ce  # noqa: E402
from diffkernels.rng import seed_to_int64  # noqa: E402

BASE_SEED = 0x5EED_0000_4D44
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MASK_SHAPES = [(32, 4096), (256, 1024)]  # the target shapes
MASK_BANDWIDTH_SHAPE = (1024, 4096)  # 4M tokens: large enough that the kernel, not the launch, dominates
MODES = ("standard", "mirror")
# (B, L, H, V). CUDA: the target shapes (B*L = 16384, H = 4096). CPU: scaled down (B*L = 2048,
# H = 512; 1024 x 256 with --quick), since a 16384 x 4096 x 128256 matmul takes hours on 2 cores.
LOSS_SHAPES = {
    "cuda": [(8, 2048, 4096, 32000), (8, 2048, 4096, 128256)],
    "cpu": [(4, 512, 512, 8192), (4, 512, 512, 32000)],
    "cpu_quick": [(4, 256, 256, 8192)],
}
LOSS_TOL = {"fp32": 1e-4, "bf16": 1e-3}  # relative agreement of the loss values before timing
ORACLE_MAX_LOGITS = 2**27  # float64 oracle only when N x V logits fit in 1 GiB
LOSS_METHODS = ("fused", "eager_full", "eager_gathered", "liger", "liger_sum")
SAME_LOSS = ("fused", "eager_full", "eager_gathered", "liger")  # liger_sum is a different loss


# --- mask generation: ours and the eager baseline ------------------------------------------------


def row_p(B: int, p: str | float, device) -> torch.Tensor:
    """Per-row masking probabilities: "stratified" = the B midpoints (b + 1/2) / B in a fixed
    shuffled order (mean exactly 1/2, as a time sampler gives over a batch), or one float for all."""
    if p == "stratified":
        order = torch.randperm(B, generator=torch.Generator().manual_seed(B))
        vals = (order.to(torch.float32) + 0.5) / B
    else:
        vals = torch.full((B,), float(p), dtype=torch.float32)
    return vals.to(device)


def eager_mask(ids: torch.Tensor, p: torch.Tensor, mask_id: int, mirror: bool = False):
    """What a user writes with torch's RNG: (noisy, masked, weights), shaped (copies*B, L) like ours."""
    B, L = ids.shape
    u = torch.rand(B, L, device=ids.device)
    pc = p[:, None]
    m = u < pc
    if mirror:
        m = torch.cat([m, u > 1 - pc])  # copy 2 of row b is masked where u > 1 - p_b (MIRROR)
        ids, pc = ids.repeat(2, 1), pc.repeat(2, 1)
    noisy = torch.where(m, mask_id, ids)
    w = torch.where(m, 1 / pc, 0.0)
    return noisy, m, w


def mask_bytes(B: int, L: int, mirror: bool, id_bytes: int = 8) -> int:
    """Bytes a mask generator must move: read the ids; per copy write noisy ids, bool mask, fp32 weights."""
    copies = 2 if mirror else 1
    return B * L * (id_bytes + copies * (id_bytes + 1 + 4))


# --- the loss: ours and the baselines -------------------------------------------------------------


def token_coef(mt) -> torch.Tensor:
    """(R, L) float32: the coefficient of each token's CE in our loss with normalizer="row"
    (weights * row_weight / (eligible_count * B)); 0 where not masked."""
    B = mt.eligible_count.shape[0]
    row = mt.row_weight / (mt.eligible_count.clamp(min=1)[mt.source_row].to(torch.float32) * B)
    return mt.weights * row[:, None]


def fused_loss(mt, targets, hidden, weight):
    return masked_diffusion_loss(mt, targets, hidden=hidden, lm_head_weight=weight)


def eager_full_loss(mt, targets, hidden, weight):
    """Logits of every token, F.cross_entropy with the unmasked tokens ignored, weighted like ours."""
    H = hidden.shape[-1]
    logits = hidden.reshape(-1, H) @ weight.t()
    tgt = torch.where(mt.masked, targets[mt.source_row], -100).reshape(-1)
    ce = F.cross_entropy(logits.float(), tgt, ignore_index=-100, reduction="none")
    return (ce * token_coef(mt).reshape(-1)).sum()


def eager_gathered_loss(mt, targets, hidden, weight):
    """Logits only for the masked rows (idx = masked.nonzero()), then the same CE and weights."""
    H = hidden.shape[-1]
    idx = mt.masked.reshape(-1).nonzero().squeeze(1)
    logits = hidden.reshape(-1, H).index_select(0, idx) @ weight.t()
    tgt = targets[mt.source_row].reshape(-1).index_select(0, idx)
    ce = F.cross_entropy(logits.float(), tgt, reduction="none")
    return (ce * token_coef(mt).reshape(-1).index_select(0, idx)).sum()


def uniform_scale(mt) -> float:
    """liger_sum's one weight for every masked token: 1 / (B * L * mean p) (= ours when p is fixed)."""
    B, L = mt.masked.shape[0], mt.masked.shape[1]
    return 1.0 / (B * L * float(mt.p.mean()))


def liger_fn():
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy


def _liger_accum(dtype):
    return torch.float32 if dtype != torch.float32 else None  # accumulate dW in fp32, as ours does


def liger_loss(mt, targets, hidden, weight):
    """Liger FLCE, reduction="none" (per-token CE, 0 at ignored tokens), weighted like ours."""
    H = hidden.shape[-1]
    tgt = torch.where(mt.masked, targets[mt.source_row], -100).reshape(-1)
    ce = liger_fn()(hidden.reshape(-1, H), weight, tgt, ignore_index=-100, reduction="none",
                    accum_dtype=_liger_accum(hidden.dtype))
    return (ce.float() * token_coef(mt).reshape(-1)).sum()


def liger_sum_loss(mt, targets, hidden, weight):
    """Liger FLCE's fast path (reduction="sum", gradients in forward), one uniform weight."""
    H = hidden.shape[-1]
    tgt = torch.where(mt.masked, targets[mt.source_row], -100).reshape(-1)
    s = liger_fn()(hidden.reshape(-1, H), weight, tgt, ignore_index=-100, reduction="sum",
                   accum_dtype=_liger_accum(hidden.dtype))
    return s * uniform_scale(mt)


def liger_sum_expected(mt, targets, hidden, weight):
    """What liger_sum computes, with our op: the uniform weight on every masked token."""
    coef = mt.masked.to(torch.float32) * uniform_scale(mt)
    return masked_cross_entropy(targets[mt.source_row], coef, hidden=hidden, lm_head_weight=weight)


LOSS_FNS = {"fused": fused_loss, "eager_full": eager_full_loss, "eager_gathered": eager_gathered_loss,
            "liger": liger_loss, "liger_sum": liger_sum_loss}


def liger_status(device) -> tuple[bool, str]:
    """(usable, note): Liger-Kernel installed and able to run forward + backward on this device?"""
    def probe():
        h = torch.randn(8, 16, device=device, requires_grad=True)
        w = torch.randn(32, 16, device=device, requires_grad=True)
        t = torch.randint(0, 32, (8,), device=device)
        liger_fn()(h, w, t, reduction="sum").backward()
        sync(device)

    return optional_peer("liger-kernel", probe, "liger-kernel --no-deps")


def make_loss_inputs(B, L, H, V, dtype, device, *, p="stratified", n_masks=4, seed=0):
    """hidden (B, L, H) and LM head W (V, H), leaves with requires_grad; targets (B, L) in [0, V-1);
    n_masks MaskedTokens (standard mode, mask_id = V - 1) with different seeds, to rotate over."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=gen, device=device, dtype=torch.float32).to(dtype)
    weight = (torch.randn(V, H, generator=gen, device=device, dtype=torch.float32) / math.sqrt(H)).to(dtype)
    targets = torch.randint(0, V - 1, (B, L), generator=gen, device=device)
    pr = row_p(B, p, device)
    masks = [mask_tokens(targets, pr, BASE_SEED + seed * 1000 + j, mask_id=V - 1) for j in range(n_masks)]
    return hidden.requires_grad_(True), weight.requires_grad_(True), targets, masks


# --- one mask row ---------------------------------------------------------------------------------


def bench_mask_row(shape, mode, device, args, ceil, backend, cache: int) -> dict:
    B, L = shape
    mirror = mode == "mirror"
    mask_id = 32000
    n_sets = input_copies(B * L * 8, cache, not args.no_rotate)
    gen = torch.Generator().manual_seed(B * 7919 + L)
    sets = [torch.randint(0, mask_id, (B, L), generator=gen).to(device) for _ in range(n_sets)]
    p = row_p(B, args.p, device)
    with diffkernels.use_backend(backend):
        kernels = _kernels.for_device(device)
    table = row_table(p, 0.0, torch.ones(B, dtype=torch.bool, device=device) if mirror else None, False)

    def api(i):
        with diffkernels.use_backend(backend):
            mask_tokens(sets[i % n_sets], p, BASE_SEED + i, mask_id=mask_id, mode=mode)

    def kernel(i):
        kernels.mask_tokens(sets[i % n_sets], table, seed_to_int64(BASE_SEED + i), mask_id, None, None, mirror)

    def eager(i):
        eager_mask(sets[i % n_sets], p, mask_id, mirror)

    row = {"shape": [B, L], "mode": mode, "tokens": B * L, "input_sets": n_sets, "errors": {}}
    # Sanity, once: the API and the kernel agree; both mask about a fraction mean(p) like eager.
    with diffkernels.use_backend(backend):
        mt = mask_tokens(sets[0], p, BASE_SEED, mask_id=mask_id, mode=mode)
    noisy, masked, w = kernels.mask_tokens(sets[0], table, seed_to_int64(BASE_SEED), mask_id, None, None, mirror)
    row["api_equals_kernel"] = bool(torch.equal(mt.noisy_ids, noisy.view_as(mt.noisy_ids))
                                    and torch.equal(mt.masked, masked.view_as(mt.masked))
                                    and torch.equal(mt.weights, w.view_as(mt.weights)))
    row["masked_fraction"] = {"ours": float(mt.masked.float().mean()),
                              "eager": float(eager_mask(sets[0], p, mask_id, mirror)[1].float().mean()),
                              "mean_p": float(p.mean())}
    if not row["api_equals_kernel"]:
        row["errors"]["check"] = "mask_tokens API and backend kernel disagree"

    row["waited_for_idle_s"] = wait_if_busy(device, args.idle_wait)
    res = measure_quietly({"api": api, "kernel": kernel, "eager": eager}, device, args, args.budget_mask,
                          args.min_reps_mask)
    record(row, res, [("api", "eager"), ("kernel", "eager")], args.keep_samples)
    row["bytes"] = mask_bytes(B, L, mirror)
    row["floor_ms"] = row["bytes"] / (ceil["copy"]["GBps"] * 1e9) * 1e3
    row["frac_of_floor"] = {n: row["floor_ms"] / row["time"][n]["median_ms"] for n in row["time"]}
    row["GBps"] = {n: row["bytes"] / (row["time"][n]["median_ms"] * 1e-3) / 1e9 for n in row["time"]}
    del sets
    free(device)
    return row


# --- one loss row ---------------------------------------------------------------------------------


def matmul_rate(n, H, V, dtype, device, reps) -> dict:
    """FLOP/s of the forward GEMM (n x H) @ (H x V), in the bench dtype: the loss rows' compute ceiling."""
    t = statistics.median(gemm_times(device, n, H, V, dtype, reps, b_transposed=True, seed=1))
    return {"shape": [n, H, V], "median_ms": t * 1e3, "TFLOPs": 2 * n * H * V / t / 1e12,
            "note": f"a @ b.t(), a ({n}, {H}), b ({V}, {H}), {str(dtype).replace('torch.', '')}"}


def bench_loss_row(shape, dtype_name, device, args, backend, liger_ok) -> dict:
    B, L, H, V = shape
    dtype = DTYPES[dtype_name]
    hidden, weight, targets, masks = make_loss_inputs(B, L, H, V, dtype, device, p=args.p, n_masks=args.n_masks,
                                                      seed=B * L + H + V)
    n_masks = len(masks)
    N = B * L
    n_masked = [int(m.masked.sum()) for m in masks]
    methods = [m for m in LOSS_METHODS if liger_ok or not m.startswith("liger")]
    methods = [m for m in methods if m not in args.skip_methods]
    row = {"shape": {"B": B, "L": L, "H": H, "V": V}, "tokens": N, "dtype": dtype_name, "p": str(args.p),
           "mean_p": float(masks[0].p.mean()), "masked_fraction": sum(n_masked) / (n_masks * N),
           "mask_sets": n_masks, "methods": methods, "errors": {},
           "fused_chunk_tokens": default_chunk_size(V),
           "fused_chunks": math.ceil(sum(n_masked) / n_masks / default_chunk_size(V))}

    def step_fn(name):
        loss_fn = LOSS_FNS[name]

        def step(i):
            hidden.grad = None
            weight.grad = None
            loss_fn(masks[i % n_masks], targets, hidden, weight).backward()
        return step

    fns = {m: step_fn(m) for m in methods}

    # Check once, before timing: every variant gives the same loss (and gradients) as ours.
    tol = LOSS_TOL[dtype_name]
    check = {}
    mt = masks[0]
    hidden.grad = weight.grad = None
    ref_loss = fused_loss(mt, targets, hidden, weight)
    ref_loss.backward()
    ref = (float(ref_loss.detach()), hidden.grad, weight.grad)
    check["fused"] = {"loss": ref[0]}
    for name in methods:
        if name == "fused":
            continue
        hidden.grad = weight.grad = None
        try:
            loss = LOSS_FNS[name](mt, targets, hidden, weight)
            loss.backward()
            if name == "liger_sum":
                with torch.no_grad():
                    expected = float(liger_sum_expected(mt, targets, hidden, weight))
            else:
                expected = ref[0]
            c = {"loss": float(loss.detach()), "rel_diff": rel_diff(float(loss.detach()), expected), "compared_to":
                 "fused, uniform weight" if name == "liger_sum" else "fused"}
            if name != "liger_sum":
                c["grad_hidden_rel"] = grad_rel_diff(hidden.grad, ref[1])
                c["grad_weight_rel"] = grad_rel_diff(weight.grad, ref[2])
            c["ok"] = c["rel_diff"] <= tol
        except Exception as exc:  # noqa: BLE001 -- report, do not abort the run
            row["errors"][name] = err_s(exc, 500)
            fns.pop(name, None)
            continue
        check[name] = c
        if not c["ok"]:
            row["errors"][f"check:{name}"] = f"loss {c['loss']:.8g} vs {expected:.8g} (rel {c['rel_diff']:.2e} > {tol})"
            log(f"  WARNING: {name} loss disagrees: {row['errors'][f'check:{name}']}")
    del ref
    hidden.grad = weight.grad = None
    if N * V <= ORACLE_MAX_LOGITS and not args.no_reference:
        with torch.no_grad():
            oracle = float(_ref_ce.masked_diffusion_loss(mt, targets, hidden=hidden.detach(),
                                                         lm_head_weight=weight.detach()))
        check["oracle_float64"] = {"loss": oracle, "fused_rel_diff": rel_diff(check["fused"]["loss"], oracle)}
    row["check"] = check
    row["check_tolerance"] = tol
    free(device)

    # Compute ceiling: the forward GEMM at this row's shapes (masked tokens only).
    n_mean = max(1, round(sum(n_masked) / n_masks))
    mm = matmul_rate(n_mean, H, V, dtype, device, 3 if args.quick else 5)
    row["matmul"] = mm
    flops_fused = 3 * 2 * n_mean * H * V  # logits, grad hidden, grad weight over the masked tokens
    row["matmul_floor_ms"] = {"fused": flops_fused / (mm["TFLOPs"] * 1e12) * 1e3,
                              "eager_full": 3 * 2 * N * H * V / (mm["TFLOPs"] * 1e12) * 1e3}

    row["waited_for_idle_s"] = wait_if_busy(device, args.idle_wait)
    res = measure_quietly(fns, device, args, args.budget_loss, args.min_reps_loss)
    record(row, res, [("fused", n) for n in fns if n != "fused"], args.keep_samples)
    row["fused_frac_of_matmul_floor"] = row["matmul_floor_ms"]["fused"] / row["time"]["fused"]["median_ms"]

    # Peak extra memory of one step (inputs and masks allocated, grads cleared).
    item = torch.empty((), dtype=dtype).element_size()
    row["grads_MiB"] = (N * H + V * H) * item / MiB  # hidden.grad + weight.grad, which every method leaves
    row["logits_MiB"] = N * V * item / MiB  # the full logits in the input dtype, for scale
    def drop_grads():
        hidden.grad = weight.grad = None

    pm = row["peak_extra_MiB"] = peak_extra_mib(fns, device, drop_grads)
    if "eager_full" in pm:
        row["memory_ratio"] = {f"fused/{n}": pm["fused"] / pm[n] for n in pm if n != "fused"}
        trans = {n: pm[n] - row["grads_MiB"] for n in pm}
        row["transient_ratio_fused/eager_full"] = (trans["fused"] / trans["eager_full"] if trans["eager_full"] > 0
                                                   else None)

    del hidden, weight, targets, masks, fns
    free(device)
    return row


# --- output ---------------------------------------------------------------------------------------

MEMORY_METHOD = {
    "cpu": ("CPU peak extra memory: torch.profiler(profile_memory=True) records every allocation and free "
            "made through PyTorch's CPU allocator during one step (forward + backward); the peak of their "
            "running sum, relative to the start of the step, is reported. Inputs (hidden, W, masks) are "
            "allocated before; hidden.grad and W.grad are None before the step, so the peak includes the "
            "gradients the step leaves (`grads`)."),
    "cuda": ("CUDA peak extra memory: torch.cuda.max_memory_allocated() during one step (forward + backward) "
             "minus torch.cuda.memory_allocated() before it (inputs allocated, hidden.grad = W.grad = None); "
             "it includes the gradients the step leaves (`grads`)."),
}


def _ok(flag) -> str:
    return "✓" if flag else "✗"


def _target(value, limit, le=True, judge=True) -> str:
    if value is None:
        return "n/a"
    if not judge:  # CPU: the targets are for a GPU
        return f"{value:.2f}"
    good = value <= limit if le else value >= limit
    return f"{value:.2f} ({'PASS' if good else 'FAIL'})"


def to_markdown(meta, ceil, mask_rows, loss_rows) -> str:
    cuda = meta.get("cuda") is not None
    p_text = ("the B stratified midpoints (mean 0.5)" if meta["settings"]["p"] == "stratified"
              else str(meta["settings"]["p"]))
    L = header(meta, "masked diffusion LM (diffkernels.mdm) benchmark",
               f"mask kernel backend: `{meta['fused_backend']}`; Liger: {meta['liger']}")
    L.append("- timing: "
             + ("CUDA events after warm-up" if cuda else "time.perf_counter after warm-up, default torch threads")
             + "; methods interleaved round by round; times are median ± IQR/2; ratios are the median "
             "(quartiles) of per-round ratios. `load` = CPU cores used by other processes / stolen by the "
             f"hypervisor during the timing; † marks rows above {LOAD_LIMIT} cores even after retries.")
    L.append("")
    L.append("## Ceilings measured first")
    L.append("")
    c = ceil["copy"]
    L.append(f"- copy bandwidth: **{c['GBps']:.1f} GB/s** ({c['note']}, {c['bytes'] // MiB} MiB buffers)")
    r = ceil["torch_rand"]
    L.append(f"- torch.rand: **{r['ns_per_element']:.3f} ns/element** ({r['note']})")
    m = ceil["philox_mask"]
    L.append(f"- diffkernels.sparse_mask (our Philox stream, 1 B/element): **{m['ns_per_element']:.3f} "
             "ns/element**")
    for row in loss_rows:
        mm = row["matmul"]
        L.append(f"- GEMM for V={row['shape']['V']}: **{mm['TFLOPs']:.3f} TFLOP/s** ({mm['note']}, "
                 f"{mm['median_ms']:.2f} ms)")
    L.append("")

    if mask_rows:
        L.append("## mask_tokens, ms (median ± IQR/2)")
        L.append("")
        L.append("`api` = `diffkernels.mdm.mask_tokens(ids, p, seed, mask_id=..., mode=...)` (validation, row "
                 "table, " + ("" if cuda else "the CPU-only mask_id collision check, ") + "kernel); `kernel` = the "
                 "backend primitive alone with a precomputed row table; `eager` = `torch.rand` + compare + "
                 f"`torch.where` (mirror: both copies, concatenated). int64 ids; per-row p = {p_text}. "
                 "`bytes` = 8 B read + per copy 8 + 1 + 4 B written per token; `floor` = bytes at the copy "
                 "bandwidth; `% floor` = floor / time. The last shape is larger than the targets: it shows the "
                 "kernel-bound regime. Ratios are ours/eager (< 1: ours faster).")
        L.append("")
        head = ["B×L", "mode", "api", "kernel", "eager", "api/eager", "kernel/eager", "MB", "floor ms", "api % floor",
                "kernel % floor", "eager % floor", "check", "load"]
        body = []
        for row in mask_rows:
            t, f, rt = row["time"], row["frac_of_floor"], row["ratio"]
            body.append([shape_s(row["shape"]), row["mode"], f"**{fmt_t(t['api'])}**", fmt_t(t["kernel"]),
                         fmt_t(t["eager"]), fmt_r(rt["api/eager"]), fmt_r(rt["kernel/eager"]),
                         f"{row['bytes'] / 1e6:.1f}", f"{row['floor_ms']:.4f}", f"{100 * f['api']:.0f}%",
                         f"{100 * f['kernel']:.0f}%", f"{100 * f['eager']:.0f}%", _ok(row["api_equals_kernel"]),
                         load_cell(row, LOAD_LIMIT)])
        L += md_table(head, body)
        L.append("")
        fractions = (f"{shape_s(r['shape'])} {r['mode']}: {r['masked_fraction']['ours']:.3f} / "
                     f"{r['masked_fraction']['eager']:.3f} / {r['masked_fraction']['mean_p']:.3f}" for r in mask_rows)
        L.append("`check`: the API's output equals the kernel's for the same seed; masked fractions (ours / eager / "
                 "mean p): " + "; ".join(fractions))
        L.append("")

    if loss_rows:
        dt = loss_rows[0]["dtype"]
        if cuda:
            scale = f"the target shapes, {dt} hidden states and LM head"
        else:
            scale = (f"**CPU: scaled-down shapes** (the target B·L = 16384, H = 4096, V ∈ {{32000, 128256}} would "
                     f"take hours per step on this CPU), {dt}")
        L.append(f"## masked_diffusion_loss, forward + backward, ms (median ± IQR/2) — {scale}")
        L.append("")
        L.append("One step = `loss = f(hidden, W, masked, targets); loss.backward()` with `hidden.grad = W.grad = "
                 "None` before it; gradients w.r.t. hidden (B, L, H) and the LM head W (V, H); normalizer \"row\"; "
                 f"per-row p = {p_text}; "
                 "the masks rotate over a few seeds. `fused` = `diffkernels.mdm.masked_diffusion_loss(hidden=, "
                 "lm_head_weight=)`; `eager_full` = logits of all tokens + masked, weighted `F.cross_entropy`; "
                 "`eager_gathered` = logits only at `masked.nonzero()`; `liger` = Liger FLCE with reduction=\"none\" "
                 "and our per-token weights (same loss; it recomputes logits in backward); `liger_sum` = Liger's "
                 "fast path, reduction=\"sum\" with one uniform weight (a different loss: timing only). Ratios "
                 "fused/X (< 1: ours faster). `chunks` = chunks of masked tokens the fused op processes (its default "
                 "chunk: 256 MiB of float32 logits); with one chunk it holds the logits of every masked token at "
                 "once, so its peak memory is about half of eager_full's rather than the small fraction chunking "
                 "gives at the GPU shapes. `GEMM floor` = 3 GEMMs over the masked tokens at the measured GEMM rate.")
        L.append("")
        has_liger = any("liger" in r["time"] for r in loss_rows)
        has_lsum = any("liger_sum" in r["time"] for r in loss_rows)
        head = "| B×L | H | V | masked | chunks | fused | eager_full | eager_gathered |"
        sep = "|---|---|---|---|---|---|---|---|"
        if has_liger:
            head += " liger |"
            sep += "---|"
        if has_lsum:
            head += " liger_sum |"
            sep += "---|"
        head += " fused/eager_full | fused/eager_gathered |" + (" fused/liger |" if has_liger else "") + \
            " GEMM floor ms | fused % floor | load |"
        sep += "---|---|" + ("---|" if has_liger else "") + "---|---|---|"
        L.append(head)
        L.append(sep)
        for row in loss_rows:
            s, t, rt = row["shape"], row["time"], row["ratio"]
            line = (f"| {s['B']}×{s['L']} | {s['H']} | {s['V']} | {row['masked_fraction']:.3f} | "
                    f"{row['fused_chunks']} | **{fmt_t(t.get('fused'))}** | "
                    f"{fmt_t(t.get('eager_full'))} | {fmt_t(t.get('eager_gathered'))} |")
            if has_liger:
                line += f" {fmt_t(t.get('liger'))} |"
            if has_lsum:
                line += f" {fmt_t(t.get('liger_sum'))} |"
            line += (f" {fmt_r(rt.get('fused/eager_full'))} | {fmt_r(rt.get('fused/eager_gathered'))} |"
                     + (f" {fmt_r(rt.get('fused/liger'))} |" if has_liger else "")
                     + f" {row['matmul_floor_ms']['fused']:.2f} | {100 * row['fused_frac_of_matmul_floor']:.0f}% | "
                     f"{load_cell(row, LOAD_LIMIT)} |")
            L.append(line)
        if not has_liger:
            L.append("")
            L.append(f"Liger-Kernel baseline: {meta['liger']}.")
        L.append("")
        L.append("### Peak extra memory of one step, MiB")
        L.append("")
        L.append(MEMORY_METHOD["cuda" if cuda else "cpu"] + " `logits` = B·L·V in the input dtype, for scale. "
                 "`fused/eager_full (transient)` excludes the gradients from both.")
        L.append("")
        names = [n for n in LOSS_METHODS if any(n in r["peak_extra_MiB"] for r in loss_rows)]
        L.append("| B×L | H | V | grads | logits | " + " | ".join(names)
                 + " | fused/eager_full | fused/eager_full (transient) |")
        L.append("|---|---|---|---|---|" + "---|" * len(names) + "---|---|")
        for row in loss_rows:
            s, pm = row["shape"], row["peak_extra_MiB"]
            mr = row.get("memory_ratio", {}).get("fused/eager_full")
            tr = row.get("transient_ratio_fused/eager_full")
            L.append(f"| {s['B']}×{s['L']} | {s['H']} | {s['V']} | {row['grads_MiB']:.1f} | {row['logits_MiB']:.1f} | "
                     + " | ".join("n/a" if n not in pm else f"{pm[n]:.1f}" for n in names)
                     + f" | {'n/a' if mr is None else f'{mr:.2f}'} | {'n/a' if tr is None else f'{tr:.2f}'} |")
        L.append("")
        L.append(f"### Loss check before timing (relative tolerance {loss_rows[0]['check_tolerance']:g})")
        L.append("")
        L.append("| B×L | H | V | fused loss | " + " | ".join(f"{n} rel diff" for n in names if n != "fused")
                 + " | oracle (float64) rel diff | max grad rel diff (hidden / W) |")
        L.append("|---|---|---|---|" + "---|" * (len(names) - 1) + "---|---|")
        for row in loss_rows:
            s, ck = row["shape"], row["check"]
            cells = []
            for n in names:
                if n == "fused":
                    continue
                cells.append("n/a" if n not in ck else f"{ck[n]['rel_diff']:.1e} {_ok(ck[n]['ok'])}")
            orc = ck.get("oracle_float64")
            grads = [f"{n}: {ck[n]['grad_hidden_rel']:.1e} / {ck[n]['grad_weight_rel']:.1e}" for n in names
                     if n in ck and "grad_hidden_rel" in ck[n]]
            L.append(f"| {s['B']}×{s['L']} | {s['H']} | {s['V']} | {ck['fused']['loss']:.6f} | " + " | ".join(cells)
                     + " | " + ("skipped (too large)" if orc is None else f"{orc['fused_rel_diff']:.1e}")
                     + " | " + "; ".join(grads) + " |")
    errs = [(r, k, v) for r in mask_rows + loss_rows for k, v in r["errors"].items()]
    if errs:
        L.append("")
        for r, k, v in errs:
            where = shape_s(r["shape"] if isinstance(r["shape"], list) else r["shape"].values())
            L.append(f"- error in {k} at {where}: `{v}`")
    L.append("")
    L.append("## Targets (for a GPU)")
    L.append("")
    if not cuda:
        L.append("This run is on a CPU, so the targets do not apply (no PASS/FAIL); the same ratios are shown for "
                 "information.")
        L.append("")
    L.append("| target | row | value |")
    L.append("|---|---|---|")
    for row in loss_rows:
        s = row["shape"]
        tag = f"B·L={s['B'] * s['L']}, H={s['H']}, V={s['V']}"
        mem = row.get("memory_ratio", {}).get("fused/eager_full")
        L.append(f"| peak memory fused/eager_full ≤ 0.25 | {tag} | {_target(mem, 0.25, judge=cuda)} |")
        r = row["ratio"].get("fused/eager_full")
        L.append(f"| time fused/eager_full ≤ 0.7 at mean p = 0.5 | {tag} | "
                 f"{_target(None if r is None else r['median'], 0.7, judge=cuda)} |")
    for row in mask_rows:
        L.append(f"| mask generation ≥ 80% of the bandwidth floor (kernel / api) | {shape_s(row['shape'])} "
                 f"{row['mode']} | {_target(row['frac_of_floor']['kernel'], 0.8, le=False, judge=cuda)} / "
                 f"{_target(row['frac_of_floor']['api'], 0.8, le=False, judge=cuda)} |")
    L.append("")
    return "\n".join(L)


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = base_parser(__doc__, quick_help="short timing budgets; on CPU one small loss shape")
    ap.add_argument("--dtype", default=None, help="fp32 or bf16 for hidden and W (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--loss-shapes", default=None, help="e.g. '8x2048x4096x32000' (B x L x H x V, comma-separated)")
    ap.add_argument("--mask-shapes", default=None, help="e.g. '32x4096,256x1024' (B x L; default adds 1024x4096)")
    ap.add_argument("--p", default="stratified", help="per-row masking probability: 'stratified' (mean 0.5) or a float")
    ap.add_argument("--n-masks", type=int, default=4, help="masks (seeds) the loss steps rotate over")
    ap.add_argument("--skip-mask", action="store_true")
    ap.add_argument("--skip-loss", action="store_true")
    ap.add_argument("--skip-methods", default="", help="comma-separated loss methods not to run, e.g. 'liger_sum'")
    ap.add_argument("--budget-mask", type=float, default=None, help="seconds of timing per mask row")
    ap.add_argument("--budget-loss", type=float, default=None, help="seconds of timing per loss row")
    ap.add_argument("--min-reps-mask", type=int, default=None)
    ap.add_argument("--min-reps-loss", type=int, default=None)
    add_timing_options(ap)
    ap.add_argument("--no-rotate", action="store_true", help="mask rows: do not rotate input copies to defeat caches")
    ap.add_argument("--no-reference", action="store_true", help="skip the float64 oracle check")
    args = ap.parse_args(argv)

    args.device = default_device(args.device)
    cpu = args.device.type == "cpu"
    args.dtype = args.dtype or ("fp32" if cpu else "bf16")
    if args.dtype not in DTYPES:
        ap.error(f"--dtype must be one of {list(DTYPES)}")
    if args.p != "stratified":
        args.p = float(args.p)
        if not 0 < args.p <= 1:
            ap.error("--p must lie in (0, 1]")
    args.loss_shapes = parse_shapes(args.loss_shapes,
                                    LOSS_SHAPES["cuda" if not cpu else ("cpu_quick" if args.quick else "cpu")])
    args.mask_shapes = parse_shapes(args.mask_shapes, MASK_SHAPES + [MASK_BANDWIDTH_SHAPE])
    args.skip_methods = [m for m in args.skip_methods.split(",") if m]
    fill_defaults(args, **timing_defaults(args.quick, cpu),
                  budget_mask=(0.8 if args.quick else 3.0) * (1 if cpu else 0.5),
                  budget_loss=(2.0 if args.quick else 20.0) * (1 if cpu else 0.25),
                  min_reps_mask=5 if args.quick else 15,
                  min_reps_loss=3 if args.quick else (7 if cpu else 15))
    return args


def main(argv=None):
    args = parse_args(argv)
    device, meta = start(args)
    meta["fused_backend"] = backend = fused_backend(device)
    liger_ok, meta["liger"] = liger_status(device)
    meta["memory_method"] = MEMORY_METHOD["cuda" if device.type == "cuda" else "cpu"]
    meta["cpu_shapes_scaled_down"] = device.type == "cpu" and not any(s[2] == 4096 for s in args.loss_shapes)
    log_start(meta, f"mask backend {backend}; {meta['liger']}")

    ceil = bandwidth_ceilings(device, args.quick)
    cache = cache_bytes(meta, device)
    log(f"copy {ceil['copy']['GBps']:.1f} GB/s; torch.rand {ceil['torch_rand']['ns_per_element']:.3f} ns/el")

    t_start = time.perf_counter()
    mask_rows, loss_rows = [], []
    if not args.skip_mask:
        for shape in args.mask_shapes:
            for mode in MODES:
                t0 = time.perf_counter()
                row = bench_mask_row(shape, mode, device, args, ceil, backend, cache)
                mask_rows.append(row)
                log_row(f"mask {shape_s(shape)} {mode}", row, t0,
                        f"kernel {100 * row['frac_of_floor']['kernel']:.0f}% of floor")
    if not args.skip_loss:
        for shape in args.loss_shapes:
            t0 = time.perf_counter()
            row = bench_loss_row(shape, args.dtype, device, args, backend, liger_ok)
            loss_rows.append(row)
            log_row(f"loss {shape_s(shape)} {args.dtype}", row, t0,
                    " ".join(f"{k}={v:.0f}MiB" for k, v in row["peak_extra_MiB"].items()))
    meta["total_s"] = time.perf_counter() - t_start
    meta["waited_for_idle_total_s"] = sum(r.get("waited_for_idle_s", 0) for r in mask_rows + loss_rows)

    md = to_markdown(meta, ceil, mask_rows, loss_rows)
    print(md)
    write_results(args.out, result_stem("mdm", meta["device_kind"], args), md,
                  {"meta": meta, "ceilings": ceil, "mask_rows": mask_rows, "loss_rows": loss_rows},
                  note=f" in {meta['total_s']:.0f} s")


if __name__ == "__main__":
    main()
