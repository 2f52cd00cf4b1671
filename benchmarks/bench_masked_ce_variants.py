#!/usr/bin/env python
"""Masked cross-entropy from hidden states: the previous implementation against the new one.

    python benchmarks/bench_masked_ce_variants.py [--device cuda|cpu] [--quick] [--out DIR]

Forward + backward (gradients w.r.t. the hidden states and the LM head) of
``sum_i coef_i * CE(h_i W^T, target_i)`` at B*L = 16384 tokens, H = 4096, V in {32000, 128256},
bf16, per-row masking probabilities with mean 1/2 (the B stratified midpoints) and the "row"
normaliser's coefficients -- the shapes of the masked-diffusion issue. Variants:

* ``head``: ``diffkernels::masked_ce_hidden`` as it was at commit HEAD_COMMIT (its source is
  embedded below verbatim and imported as is, its ops renamed to ``diffkernels_head::``): chunks
  of 256 MiB of float32 logits, float32 elementwise passes, grad W accumulated per chunk as a bf16
  (V, H) product added into a float32 (V, H) buffer;
* ``new``: ``diffkernels.mdm.masked_cross_entropy`` now (fused Triton row kernel on CUDA, logits
  kept in bf16, balanced 2 GiB chunks: one chunk at these shapes, grad W written by its GEMM);
* ``new_2chunks`` / ``new_4chunks``: the same, forced into 2 / 4 chunks, to price the grad-W
  accumulation across chunks (float32 accumulation inside the GEMM where torch has
  ``addmm(..., out_dtype=float32)``, else a per-chunk product added in float32; the mode used is
  recorded);
* ``eager_full``: logits of every token, ``F.cross_entropy(logits.float(), ignore_index)`` with
  the same coefficients (what a user writes); ``eager_gathered``: logits of the masked rows only.

Before timing, each variant's loss and gradients are compared with ``eager_full`` (loss relative
1e-4; gradients max|diff| / max|ref| <= 1e-2 in bf16, 1e-4 in fp32). Timing: CUDA events (CPU:
perf_counter), warm-up, then rounds that run every variant once in rotating order; median and IQR
of >= 10 samples. Peak memory: torch.cuda.max_memory_allocated() during one step minus the
allocation before it (hidden.grad = W.grad = None before the step). GEMM floor: 3 GEMMs of
2*T*H*V flops (T = masked tokens) at the rate of a measured bf16 ``(T, H) @ (H, V)``; the three
GEMMs the new op runs are also timed alone ("GEMM part"). Diagnostics: the Triton row kernel alone
(and a block/warps sweep), and the previous implementation's per-step float32 elementwise passes
and grad-W accumulation, timed alone. Every section records its error in the table instead of
aborting the run.

Output: Markdown on stdout, and ``<out>/masked_ce_variants_<device>[_quick].{md,json}``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import platform
import subprocess
import sys
import traceback
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout: diffkernels, benchmarks._common
from benchmarks._common import (  # noqa: E402  -- shared machine / timing / memory / output helpers
    REPO,
    MiB,
    base_parser,
    command_line,
    err_s,
    free,
    git_commit,
    gpu_info,
    now_iso,
    peak_extra_mib,
    stats,
    sync,
    time_fn,
    time_once,
    triton_version,
    write_json,
)
from benchmarks._common import grad_rel_diff as grad_rel  # noqa: E402
from benchmarks._common import rel_diff as rel  # noqa: E402

import diffkernels  # noqa: E402
from diffkernels.mdm.loss import masked_cross_entropy  # noqa: E402
from diffkernels.mdm.masking import mask_tokens  # noqa: E402
from diffkernels.ops import masked_ce as new_ops  # noqa: E402

SHAPES = {  # (B, L, H, V)
    "cuda": [(8, 2048, 4096, 32000), (8, 2048, 4096, 128256)],
    "cpu": [(4, 256, 256, 8192), (4, 256, 256, 32000)],
    "cpu_quick": [(2, 64, 32, 101), (2, 64, 32, 1001)],
}
VARIANTS = ("head", "new", "new_2chunks", "new_4chunks", "eager_full", "eager_gathered")
SEED = 0x5EED_CE

# --- the previous implementation, verbatim --------------------------------------------------------

HEAD_COMMIT = "160a8ed535f0c0d879fefe047626e02a9ef31257"  # last commit of diffkernels/ops/masked_ce.py before the fused kernel
HEAD_SOURCE = r'''"""``diffkernels::masked_ce_logits`` / ``masked_ce_hidden``: cross-entropy only where it is needed.

Both compute ``loss = sum_i coef_i * CE(logits_i, target_i)`` over the tokens with ``coef_i != 0``
(the masked tokens of a masked diffusion LM, already weighted and normalised by the caller).
Tokens are compacted first (one host sync to size the chunk loop, documented), then processed
in chunks: logits for a chunk of masked tokens only (from hidden states and the LM head, or
gathered from given logits), a row-wise log-sum-exp in float32, and the gradient of that chunk
written during the forward pass. The (tokens x vocabulary) logits are never materialised; peak
extra memory is one chunk of logits plus the gradients themselves. Backward rescales the saved
gradients in place by the upstream gradient (skipped when it is exactly 1), so such a graph can
be differentiated once.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._inplace import saved_tensors

CHUNK_BYTES = 1 << 28  # float32 logits per chunk: 256 MiB


def default_chunk_size(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * max(1, vocab)))


def _chunk_ce_(logits: Tensor, targets: Tensor, coef: Tensor) -> Tensor:
    """CE of each row of float32 ``logits``, which is overwritten with coef * (softmax - onehot)."""
    lse = torch.logsumexp(logits, dim=1)
    ce = lse - logits.gather(1, targets[:, None]).squeeze(1)
    logits.sub_(lse[:, None]).exp_().mul_(coef[:, None])
    logits.scatter_add_(1, targets[:, None], -coef[:, None])
    return ce


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _active(coef: Tensor) -> Tensor:
    # The one host sync: the number of tokens that carry a loss sizes the chunk loop.
    return torch.nonzero(coef != 0).squeeze(1)


@torch.library.custom_op("diffkernels::masked_ce_logits", mutates_args=())
def _masked_ce_logits(logits: Tensor, targets: Tensor, coef: Tensor, chunk_size: int,
                      need_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, per-token CE (N,) float32 with 0 where coef == 0, gradient w.r.t. logits or empty)."""
    N, V = logits.shape
    acc = _acc(logits.dtype)
    ce_all = torch.zeros(N, dtype=acc, device=logits.device)
    grad = torch.zeros_like(logits) if need_grad else logits.new_empty(0)
    loss = torch.zeros((), dtype=torch.float64, device=logits.device)
    active = _active(coef)
    for start in range(0, active.numel(), chunk_size):
        rows = active[start:start + chunk_size]
        block = logits.index_select(0, rows).to(acc)
        c = coef.index_select(0, rows).to(acc)
        ce = _chunk_ce_(block, targets.index_select(0, rows), c)
        ce_all.index_copy_(0, rows, ce)
        loss += (c.double() * ce.double()).sum()
        if need_grad:
            grad.index_copy_(0, rows, block.to(grad.dtype))
    return loss.to(acc), ce_all, grad


@_masked_ce_logits.register_fake
def _(logits, targets, coef, chunk_size, need_grad):
    N = logits.shape[0]
    acc = _acc(logits.dtype)
    return (logits.new_empty((), dtype=acc), logits.new_empty(N, dtype=acc),
            torch.empty_like(logits) if need_grad else logits.new_empty(0))


@torch.library.custom_op("diffkernels::masked_ce_hidden", mutates_args=())
def _masked_ce_hidden(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, coef: Tensor,
                      chunk_size: int, need_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, per-token CE, grad hidden (N, H), grad weight (V, H), grad bias (V,)); grads empty without need_grad."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    acc = _acc(hidden.dtype)
    ce_all = torch.zeros(N, dtype=acc, device=dev)
    loss = torch.zeros((), dtype=torch.float64, device=dev)
    if need_grad:
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros(V, H, dtype=acc, device=dev)  # accumulated over chunks
        grad_bias = torch.zeros(V, dtype=acc, device=dev) if bias is not None else hidden.new_empty(0)
    active = _active(coef)
    for start in range(0, active.numel(), chunk_size):
        rows = active[start:start + chunk_size]
        h = hidden.index_select(0, rows)
        block = (h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())).to(acc)
        c = coef.index_select(0, rows).to(acc)
        ce = _chunk_ce_(block, targets.index_select(0, rows), c)
        ce_all.index_copy_(0, rows, ce)
        loss += (c.double() * ce.double()).sum()
        if need_grad:
            d = block.to(weight.dtype)
            grad_hidden.index_copy_(0, rows, (d @ weight).to(hidden.dtype))
            grad_weight.add_(d.t() @ h)  # the chunk's product in the input dtype, accumulated in float32
            if bias is not None:
                grad_bias.add_(block.sum(dim=0))
    if not need_grad:
        return loss.to(acc), ce_all, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    if bias is not None:
        grad_bias = grad_bias.to(weight.dtype)
    return loss.to(acc), ce_all, grad_hidden, grad_weight.to(weight.dtype), grad_bias


@_masked_ce_hidden.register_fake
def _(hidden, weight, bias, targets, coef, chunk_size, need_grad):
    N = hidden.shape[0]
    acc = _acc(hidden.dtype)
    loss = hidden.new_empty((), dtype=acc)
    ce = hidden.new_empty(N, dtype=acc)
    if not need_grad:
        return loss, ce, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    grad_bias = weight.new_empty(weight.shape[0]) if bias is not None else hidden.new_empty(0, dtype=torch.float32)
    return loss, ce, torch.empty_like(hidden), torch.empty_like(weight), grad_bias


# --- autograd: the gradients were computed in forward; backward rescales them in place -------


def _scale_(grad: Tensor, grad_output: Tensor) -> None:
    if grad.numel():
        factor = grad_output.to(_acc(grad.dtype)).expand(grad.shape[0])
        torch.ops.diffkernels.scale_rows_(grad, factor)


SECOND_BACKWARD = (
    "diffkernels masked cross-entropy: this graph was already differentiated once; the gradients are "
    "computed in the forward pass and rescaled in place by the first backward."
)


def _setup_logits(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero gradients for the auxiliary outputs
    ctx.save_for_backward(output[2])


def _backward_logits(ctx, grad_loss, _ce, _grad):
    (grad,) = saved_tensors(ctx, SECOND_BACKWARD)
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    _scale_(grad, grad_loss)
    return grad, None, None, None, None


def _setup_hidden(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero gradients for the auxiliary outputs
    ctx.save_for_backward(*output[2:])
    ctx.has_bias = inputs[2] is not None


def _backward_hidden(ctx, grad_loss, *_):
    grads = saved_tensors(ctx, SECOND_BACKWARD)
    if grad_loss is None:
        return (None,) * 7
    wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    out = []
    for g, want in zip(grads, wanted):
        if want:
            _scale_(g, grad_loss)
        out.append(g if want else None)
    return out[0], out[1], out[2], None, None, None, None


_masked_ce_logits.register_autograd(_backward_logits, setup_context=_setup_logits)
_masked_ce_hidden.register_autograd(_backward_hidden, setup_context=_setup_hidden)
'''


def load_head():
    """The embedded source as a module, its custom ops renamed so both versions can coexist."""
    src = HEAD_SOURCE.replace('"diffkernels::masked_ce_', '"diffkernels_head::masked_ce_')
    src = src.replace("from ._inplace import saved_tensors", "from diffkernels.ops.scale_rows import saved_tensors")
    mod = types.ModuleType("diffkernels_head_masked_ce")
    mod.__file__ = f"<diffkernels/ops/masked_ce.py at {HEAD_COMMIT[:7]}>"
    sys.modules[mod.__name__] = mod
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)  # noqa: S102 -- our own source, embedded
    return mod


def head_source_check() -> str:
    """Whether the embedded source is the file at HEAD_COMMIT (when git and that commit are here)."""
    try:
        out = subprocess.run(["git", "show", f"{HEAD_COMMIT}:diffkernels/ops/masked_ce.py"], cwd=REPO,
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"not checked ({type(exc).__name__})"
    if out.returncode != 0:
        return "not checked (commit not in this checkout)"
    return "identical to git" if out.stdout == HEAD_SOURCE else "DIFFERS from git"


# --- helpers ----------------------------------------------------------------------------------------


def machine(device) -> dict:
    info = {"date": now_iso(), "command": command_line(), "git_commit": git_commit(),
            "python": platform.python_version(), "torch": torch.__version__, "triton": triton_version(),
            "head_commit": HEAD_COMMIT, "head_source_sha256": hashlib.sha256(HEAD_SOURCE.encode()).hexdigest(),
            "head_source_check": head_source_check(),
            "env": {k: os.environ[k] for k in ("TRITON_INTERPRET", "DIFFKERNELS_BACKEND") if k in os.environ}}
    if device.type == "cuda":
        g = gpu_info(device)
        info.update(device=g["name"], cuda=g["cuda"], sm_count=g["sm_count"], l2_MiB=(g["l2_bytes"] or 0) / MiB,
                    memory_GiB=g["memory_bytes"] / 2**30)
    else:
        info.update(device=f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    return info


# --- inputs and variants ------------------------------------------------------------------------------


def make_inputs(B, L, H, V, dtype, device, n_masks):
    gen = torch.Generator(device=device).manual_seed(SEED + V)
    hidden = torch.randn(B, L, H, generator=gen, device=device, dtype=torch.float32).to(dtype)
    weight = (torch.randn(V, H, generator=gen, device=device, dtype=torch.float32) / math.sqrt(H)).to(dtype)
    targets = torch.randint(0, V - 1, (B, L), generator=gen, device=device)
    order = torch.randperm(B, generator=torch.Generator().manual_seed(SEED))
    p = ((order.double() + 0.5) / B).to(torch.float32).to(device)  # the B stratified midpoints, mean 1/2
    masks = []
    for j in range(n_masks):
        mt = mask_tokens(targets, p, SEED + 1000 * j, mask_id=V - 1)
        # The "row" normaliser's coefficients (as masked_diffusion_loss builds them).
        row = mt.row_weight.double() / (mt.eligible_count.clamp(min=1).double()[mt.source_row] * B)
        coef = (mt.weights.double() * row[:, None]).reshape(-1).to(torch.float32)
        masks.append({"coef": coef, "targets": targets[mt.source_row].reshape(-1).contiguous(),
                      "n": int((coef != 0).sum())})
    return hidden.requires_grad_(True), weight.requires_grad_(True), masks


def variant_fns(head, hidden, weight, masks, V, backend=None):
    H = hidden.shape[-1]

    def h2():
        return hidden.reshape(-1, H)

    def head_loss(m):
        return head._masked_ce_hidden(h2(), weight, None, m["targets"], m["coef"], head.default_chunk_size(V), True)[0]

    def new_loss(chunks):
        def f(m):
            cs = 0 if chunks is None else math.ceil(m["n"] / chunks)
            with diffkernels.use_backend(backend):
                return masked_cross_entropy(m["targets"], m["coef"], hidden=h2(), lm_head_weight=weight, chunk_size=cs)
        return f

    def eager_full(m):
        logits = h2() @ weight.t()
        tgt = torch.where(m["coef"] != 0, m["targets"], -100)
        ce = F.cross_entropy(logits.float(), tgt, ignore_index=-100, reduction="none")
        return (ce * m["coef"]).sum()

    def eager_gathered(m):
        idx = (m["coef"] != 0).nonzero().squeeze(1)
        logits = h2().index_select(0, idx) @ weight.t()
        ce = F.cross_entropy(logits.float(), m["targets"].index_select(0, idx), reduction="none")
        return (ce * m["coef"].index_select(0, idx)).sum()

    return {"head": head_loss, "new": new_loss(None), "new_2chunks": new_loss(2), "new_4chunks": new_loss(4),
            "eager_full": eager_full, "eager_gathered": eager_gathered}


def uses_triton(device, dtype, backend) -> bool:
    with diffkernels.use_backend(backend):
        return new_ops.row_kernel(device, dtype)[1]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def accumulation_mode(device, dtype, chunks) -> str:
    if chunks <= 1:
        return "direct (one chunk)"
    acc = new_ops.acc_dtype(dtype)
    if dtype == acc:
        return "direct (addmm_ in the input dtype)"
    return "gemm_fp32 (addmm out_dtype=float32)" if new_ops.gemm_accumulates_in_fp32(str(device), dtype) \
        else "add_fp32 (bf16 product + float32 add)"


# --- one shape --------------------------------------------------------------------------------------


def bench_shape(shape, dtype, device, args, head) -> dict:
    B, L, H, V = shape
    row = {"shape": {"B": B, "L": L, "H": H, "V": V}, "dtype": str(dtype).replace("torch.", ""), "errors": {}}
    try:
        hidden, weight, masks = make_inputs(B, L, H, V, dtype, device, args.masks)
    except Exception as exc:  # noqa: BLE001
        row["errors"]["setup"] = err_s(exc)
        return row
    T = round(sum(m["n"] for m in masks) / len(masks))
    N = B * L
    row.update(tokens=N, masked_mean=T, masked_fraction=T / N, masks=len(masks),
               head_chunk_tokens=head.default_chunk_size(V),
               head_chunks=math.ceil(T / head.default_chunk_size(V)),
               new_chunk_tokens=new_ops.chunk_tokens(0, V, dtype, uses_triton(device, dtype, args.backend)),
               new_path="triton" if uses_triton(device, dtype, args.backend) else "torch")
    row["new_chunks"] = math.ceil(T / row["new_chunk_tokens"])
    row["accumulation"] = {v: accumulation_mode(device, dtype, c) for v, c in
                           (("new", row["new_chunks"]), ("new_2chunks", 2), ("new_4chunks", 4))}
    fns = variant_fns(head, hidden, weight, masks, V, args.backend)
    fns = {k: v for k, v in fns.items() if k not in args.skip}

    def step_fn(name):
        def step(i=0):
            hidden.grad = None
            weight.grad = None
            loss = fns[name](masks[i % len(masks)])
            loss.backward()
            return loss
        return step

    steps = {k: step_fn(k) for k in fns}

    # 1. Check: every variant against eager_full (or the first that runs), before any timing.
    tol_loss = 1e-4
    tol_grad = 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
    row["tolerance"] = {"loss": tol_loss, "grad": tol_grad}
    check, ref = {}, None
    order = ["eager_full"] + [k for k in steps if k != "eager_full"] if "eager_full" in steps else list(steps)
    for name in order:
        try:
            loss = float(steps[name](0).detach())
            sync(device)
            g = (hidden.grad.detach().clone(), weight.grad.detach().clone())
            if ref is None:
                ref = (name, loss, g)
                check[name] = {"loss": loss, "reference": True}
            else:
                c = {"loss": loss, "loss_rel": rel(loss, ref[1]), "grad_hidden_rel": grad_rel(g[0], ref[2][0]),
                     "grad_weight_rel": grad_rel(g[1], ref[2][1])}
                c["ok"] = c["loss_rel"] <= tol_loss and c["grad_hidden_rel"] <= tol_grad and c["grad_weight_rel"] <= tol_grad
                check[name] = c
                if not c["ok"]:
                    row["errors"][f"check:{name}"] = (f"disagrees with {ref[0]}: loss rel {c['loss_rel']:.2e}, grad h "
                                                      f"{c['grad_hidden_rel']:.2e}, grad W {c['grad_weight_rel']:.2e}")
            del g
        except Exception as exc:  # noqa: BLE001
            row["errors"][name] = err_s(exc)
            traceback.print_exc()
            steps.pop(name, None)
        hidden.grad = weight.grad = None
        free(device)
    row["check"] = check
    row["check_reference"] = ref[0] if ref else None
    del ref
    free(device)

    # 2. Timing: warm-up, then interleaved rounds.
    try:
        names = list(steps)
        for name in names:
            for i in range(args.warmup):
                steps[name](i)
        sync(device)
        samples = {n: [] for n in names}
        for r in range(args.reps):
            for j in range(len(names)):
                name = names[(r + j) % len(names)]
                samples[name].append(time_once(lambda: steps[name](r), device))
        row["time"] = {n: stats(s) for n, s in samples.items()}
    except Exception as exc:  # noqa: BLE001
        row["errors"]["timing"] = err_s(exc)
        traceback.print_exc()
    hidden.grad = weight.grad = None
    free(device)

    # 3. Peak extra memory of one step.
    row["peak_extra_MiB"] = {}
    for name in list(steps):
        try:
            row["peak_extra_MiB"][name] = peak_extra_mib(lambda: steps[name](0), device)
        except Exception as exc:  # noqa: BLE001
            row["errors"][f"memory:{name}"] = err_s(exc)
        hidden.grad = weight.grad = None
    free(device)
    item = torch.empty((), dtype=dtype).element_size()
    row["grads_MiB"] = (N * H + V * H) * item / MiB
    row["logits_MiB"] = N * V * item / MiB

    # 4. GEMM ceiling and the new op's three GEMMs alone.
    try:
        row["gemm"] = gemm_section(T, H, V, dtype, device, args)
    except Exception as exc:  # noqa: BLE001
        row["errors"]["gemm"] = err_s(exc)
        traceback.print_exc()
    free(device)

    # 5. Diagnostics: the row kernel alone (+ sweep); the previous version's passes alone.
    try:
        row["kernel"] = kernel_section(T, V, dtype, device, args)
    except Exception as exc:  # noqa: BLE001
        row["errors"]["kernel"] = err_s(exc)
        traceback.print_exc()
    free(device)
    try:
        row["head_parts"] = head_parts_section(head, T, H, V, dtype, device, args)
    except Exception as exc:  # noqa: BLE001
        row["errors"]["head_parts"] = err_s(exc)
        traceback.print_exc()
    del hidden, weight, masks, fns, steps
    free(device)
    derive(row)
    return row


def gemm_section(T, H, V, dtype, device, args) -> dict:
    gen = torch.Generator(device=device).manual_seed(SEED + 1)
    a = torch.randn(T, H, generator=gen, device=device).to(dtype)
    w = (torch.randn(V, H, generator=gen, device=device) / math.sqrt(H)).to(dtype)
    x = torch.empty(T, V, device=device, dtype=dtype)
    gw = torch.empty(V, H, device=device, dtype=dtype)
    gh = torch.empty(T, H, device=device, dtype=dtype)
    flops = 2 * T * H * V
    out = {"T": T, "flops_per_gemm": flops}
    fwd = time_fn(lambda: torch.mm(a, w.t(), out=x), device, args.reps)
    out["matmul"] = {**fwd, "TFLOPs": flops / (fwd["median_ms"] * 1e-3) / 1e12,
                     "note": f"(T, H) @ (H, V) = ({T}, {H}) @ ({H}, {V}), {str(dtype).replace('torch.', '')}"}
    x.normal_()
    gh_t = time_fn(lambda: torch.mm(x, w, out=gh), device, args.reps)
    gw_t = time_fn(lambda: torch.mm(x.t(), a, out=gw), device, args.reps)
    out["grad_hidden"] = {**gh_t, "TFLOPs": flops / (gh_t["median_ms"] * 1e-3) / 1e12, "note": "(T, V) @ (V, H)"}
    out["grad_weight"] = {**gw_t, "TFLOPs": flops / (gw_t["median_ms"] * 1e-3) / 1e12, "note": "(T, V)^T @ (T, H)"}
    out["floor_ms"] = 3 * flops / (out["matmul"]["TFLOPs"] * 1e12) * 1e3
    out["gemm_part_ms"] = fwd["median_ms"] + gh_t["median_ms"] + gw_t["median_ms"]
    return out


def kernel_section(T, V, dtype, device, args) -> dict:
    if device.type != "cuda" and not interpreting():
        return {"skipped": "the Triton kernel runs on CUDA (or on CPU with TRITON_INTERPRET=1)"}
    from diffkernels.triton.masked_ce import launch_config, masked_ce_rows

    gen = torch.Generator(device=device).manual_seed(SEED + 2)
    buf = (torch.randn(T, V, generator=gen, device=device) * 3).to(dtype)
    N = 2 * T
    rows = torch.arange(T, device=device) * 2
    targets = torch.randint(0, V, (N,), generator=gen, device=device)
    coef = torch.full((N,), 1.0 / T, device=device)
    ce = torch.zeros(N, device=device)
    item = buf.element_size()
    logits = T * V
    copy_dst = torch.empty_like(buf)
    cp = time_fn(lambda: copy_dst.copy_(buf), device, args.reps)
    del copy_dst
    out = {"logits": logits, "copy": {**cp, "GBps": 2 * item * logits / (cp["median_ms"] * 1e-3) / 1e9,
                                      "note": "copy_ of the (T, V) buffer: read + write"}}
    default = launch_config(V, device)
    configs = [default] + [(b, w) for b in (1024, 2048, 4096, 8192) for w in (4, 8, 16) if (b, w) != default]
    if args.quick:
        configs = configs[:4]
    sweep = []
    for blk, warps in configs:
        try:
            t = time_fn(lambda: masked_ce_rows(buf, targets, coef, ce, rows=rows, grad=buf, block=blk, num_warps=warps),
                        device, args.reps)
            sweep.append({"block": blk, "num_warps": warps, **t,
                          "GBps_6B": 3 * item * logits / (t["median_ms"] * 1e-3) / 1e9,
                          "GBps_4B": 2 * item * logits / (t["median_ms"] * 1e-3) / 1e9})
        except Exception as exc:  # noqa: BLE001
            sweep.append({"block": blk, "num_warps": warps, "error": err_s(exc)})
    out["default"] = {"block": default[0], "num_warps": default[1]}
    out["sweep"] = sweep
    ok = [s for s in sweep if "error" not in s]
    if ok:
        out["default_ms"] = ok[0]["median_ms"] if (ok[0]["block"], ok[0]["num_warps"]) == default else None
        best = min(ok, key=lambda s: s["median_ms"])
        out["best"] = {"block": best["block"], "num_warps": best["num_warps"], "median_ms": best["median_ms"]}
    nograd = time_fn(lambda: masked_ce_rows(buf, targets, coef, ce, rows=rows, grad=None), device, args.reps)
    out["no_grad"] = {**nograd, "GBps_2B": item * logits / (nograd["median_ms"] * 1e-3) / 1e9}
    return out


def head_parts_section(head, T, H, V, dtype, device, args) -> dict:
    """The previous version's per-step costs outside the GEMMs: its float32 elementwise passes over
    every chunk (upcast, _chunk_ce_, downcast) and its grad-W accumulation (a (V, H) product per
    chunk added into float32)."""
    chunk = head.default_chunk_size(V)
    n_chunks = math.ceil(T / chunk)
    gen = torch.Generator(device=device).manual_seed(SEED + 3)
    buf = (torch.randn(min(T, chunk), V, generator=gen, device=device) * 3).to(dtype)
    tg = torch.randint(0, V, (buf.shape[0],), generator=gen, device=device)
    c = torch.full((buf.shape[0],), 1.0 / T, device=device)
    h = torch.randn(buf.shape[0], H, generator=gen, device=device).to(dtype)
    acc = torch.zeros(V, H, device=device, dtype=new_ops.acc_dtype(dtype))

    def elementwise():
        for _ in range(n_chunks):
            block = buf.to(new_ops.acc_dtype(dtype))
            head._chunk_ce_(block, tg, c)
            block.to(dtype)

    def accumulate():
        for _ in range(n_chunks):
            acc.add_(buf.t() @ h)

    def gemm_only():
        for _ in range(n_chunks):
            buf.t() @ h

    reps = max(3, args.reps // 2)
    out = {"chunks": n_chunks, "chunk_tokens": chunk}
    out["elementwise"] = time_fn(elementwise, device, reps)
    out["grad_w_gemm_plus_add"] = time_fn(accumulate, device, reps)
    out["grad_w_gemm_only"] = time_fn(gemm_only, device, reps)
    out["grad_w_add_overhead_ms"] = out["grad_w_gemm_plus_add"]["median_ms"] - out["grad_w_gemm_only"]["median_ms"]
    out["bytes_note"] = ("per chunk: grad-W product written in bf16 and added into float32: "
                         f"~10 B x V x H = {10 * V * H / 1e9:.2f} GB; x {n_chunks} chunks")
    return out


def derive(row):
    t = row.get("time", {})
    med = {k: v["median_ms"] for k, v in t.items()}
    row["ratio_vs_eager_full"] = {k: med[k] / med["eager_full"] for k in med if "eager_full" in med}
    row["ratio_vs_head"] = {k: med[k] / med["head"] for k in med if "head" in med}
    pm = row.get("peak_extra_MiB", {})
    if pm.get("eager_full"):
        row["memory_vs_eager_full"] = {k: v / pm["eager_full"] for k, v in pm.items() if v is not None}
    g = row.get("gemm")
    if g:
        row["frac_of_floor"] = {k: g["floor_ms"] / v for k, v in med.items()}
        if "new" in med:
            row["new_gemm_part_frac"] = g["gemm_part_ms"] / med["new"]
            row["gemm_part_frac_of_ceiling"] = g["floor_ms"] / g["gemm_part_ms"]
            k = row.get("kernel", {}).get("default_ms")
            if k is not None:
                row["new_other_ms"] = med["new"] - g["gemm_part_ms"] - k


# --- output -----------------------------------------------------------------------------------------


def f_ms(s):
    return f"{s['median_ms']:.2f} ± {(s['q3_ms'] - s['q1_ms']) / 2:.2f}" if s else "—"


def to_markdown(meta, rows) -> str:
    L = [f"# masked cross-entropy from hidden states: previous vs new — {meta['device']}", ""]
    L.append(f"- {meta['date']}; commit `{meta['git_commit']}`; command `{meta['command']}`")
    L.append(f"- python {meta['python']}, torch {meta['torch']}, triton {meta['triton']}"
             + (f", CUDA {meta['cuda']}, {meta['sm_count']} SMs, L2 {meta['l2_MiB']:.0f} MiB" if "cuda" in meta else ""))
    L.append(f"- `head` = diffkernels/ops/masked_ce.py at {meta['head_commit'][:7]} (embedded, sha256 "
             f"{meta['head_source_sha256'][:12]}…, {meta['head_source_check']})")
    L.append("- one step = loss + backward w.r.t. hidden (B·L, H) and W (V, H); ms = median ± IQR/2 of "
             f"{meta['reps']} interleaved samples after warm-up ({'CUDA events' if 'cuda' in meta else 'perf_counter'})")
    L.append("")
    for row in rows:
        s = row["shape"]
        L.append(f"## B·L = {s['B']}×{s['L']}, H = {s['H']}, V = {s['V']}, {row['dtype']}")
        L.append("")
        if "masked_mean" in row:
            L.append(f"- masked tokens T = {row['masked_mean']} ({row['masked_fraction']:.3f}); head: {row['head_chunks']} "
                     f"chunk(s) of ≤ {row['head_chunk_tokens']} tokens; new ({row['new_path']} path): {row['new_chunks']} "
                     f"chunk(s) of ≤ {row['new_chunk_tokens']}; grad-W accumulation: "
                     + "; ".join(f"{k}: {v}" for k, v in row.get("accumulation", {}).items()))
        g = row.get("gemm")
        if g:
            L.append(f"- GEMM ceiling: {g['matmul']['TFLOPs']:.1f} TFLOP/s ({g['matmul']['note']}, {g['matmul']['median_ms']:.2f} ms); "
                     f"floor = 3 GEMMs = **{g['floor_ms']:.2f} ms**; the new op's 3 GEMMs alone: logits "
                     f"{g['matmul']['median_ms']:.2f} + grad h {g['grad_hidden']['median_ms']:.2f} ({g['grad_hidden']['TFLOPs']:.0f} TFLOP/s) "
                     f"+ grad W {g['grad_weight']['median_ms']:.2f} ({g['grad_weight']['TFLOPs']:.0f} TFLOP/s) = "
                     f"{g['gemm_part_ms']:.2f} ms ({100 * row.get('gemm_part_frac_of_ceiling', 0):.0f}% of ceiling)")
        L.append("")
        L.append("| variant | ms | vs eager_full | vs head | % GEMM floor | peak extra MiB | mem vs eager_full | loss | loss rel | grad h rel | grad W rel | check |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name in VARIANTS:
            if name not in row.get("check", {}) and name not in row.get("time", {}) and name not in row["errors"]:
                continue
            t = row.get("time", {}).get(name)
            c = row.get("check", {}).get(name, {})
            pm = row.get("peak_extra_MiB", {}).get(name)
            mem_r = row.get("memory_vs_eager_full", {}).get(name)
            fl = row.get("frac_of_floor", {}).get(name)
            cells = [f"**{name}**" if name == "new" else name, f_ms(t),
                     f"{row['ratio_vs_eager_full'][name]:.2f}×" if name in row.get("ratio_vs_eager_full", {}) else "—",
                     f"{row['ratio_vs_head'][name]:.2f}×" if name in row.get("ratio_vs_head", {}) else "—",
                     f"{100 * fl:.0f}%" if fl else "—", f"{pm:.0f}" if pm is not None else "n/a",
                     f"{mem_r:.2f}" if mem_r is not None else "—",
                     f"{c['loss']:.6f}" if "loss" in c else "—",
                     "ref" if c.get("reference") else (f"{c['loss_rel']:.1e}" if "loss_rel" in c else "—"),
                     f"{c['grad_hidden_rel']:.1e}" if "grad_hidden_rel" in c else "—",
                     f"{c['grad_weight_rel']:.1e}" if "grad_weight_rel" in c else "—",
                     "ref" if c.get("reference") else ("✓" if c.get("ok") else ("✗" if c else "error"))]
            L.append("| " + " | ".join(cells) + " |")
        L.append("")
        L.append(f"grads (hidden + W) = {row.get('grads_MiB', 0):.0f} MiB; full logits = {row.get('logits_MiB', 0):.0f} MiB; "
                 f"tolerances: loss {row.get('tolerance', {}).get('loss')}, grads {row.get('tolerance', {}).get('grad')}.")
        L.append("")
        k = row.get("kernel")
        if k and "sweep" in k:
            L.append(f"Triton row kernel alone on the (T, V) chunk (in place, grad wanted): copy_ of the buffer "
                     f"{k['copy']['median_ms']:.2f} ms = {k['copy']['GBps']:.0f} GB/s; CE only (no grad) "
                     f"{k['no_grad']['median_ms']:.2f} ms = {k['no_grad']['GBps_2B']:.0f} GB/s")
            L.append("")
            L.append("| BLOCK | warps | ms | GB/s at 6 B/logit | GB/s at 4 B/logit (2nd read from L2) |")
            L.append("|---|---|---|---|---|")
            for sw in k["sweep"]:
                mark = " (default)" if (sw["block"], sw["num_warps"]) == (k["default"]["block"], k["default"]["num_warps"]) else ""
                if "error" in sw:
                    L.append(f"| {sw['block']} | {sw['num_warps']}{mark} | error: {sw['error']} | | |")
                else:
                    L.append(f"| {sw['block']} | {sw['num_warps']}{mark} | {f_ms(sw)} | {sw['GBps_6B']:.0f} | {sw['GBps_4B']:.0f} |")
            L.append("")
        elif k:
            L.append(f"Triton row kernel alone: {k.get('skipped')}")
            L.append("")
        hp = row.get("head_parts")
        if hp:
            L.append(f"Previous version's non-GEMM costs alone ({hp['chunks']} chunks of {hp['chunk_tokens']} tokens): "
                     f"float32 elementwise passes {f_ms(hp['elementwise'])} ms; grad-W product + float32 add "
                     f"{f_ms(hp['grad_w_gemm_plus_add'])} ms vs product alone {f_ms(hp['grad_w_gemm_only'])} ms "
                     f"(add overhead {hp['grad_w_add_overhead_ms']:.2f} ms; {hp['bytes_note']}).")
            L.append("")
        if "new_other_ms" in row:
            L.append(f"new = 3 GEMMs {row['gemm']['gemm_part_ms']:.2f} ms + row kernel {row['kernel']['default_ms']:.2f} ms + "
                     f"rest (gathers, scatters, zeroing, host sync, loss) {row['new_other_ms']:.2f} ms.")
            L.append("")
        if row["errors"]:
            L.append("Errors: " + "; ".join(f"`{k}`: {v}" for k, v in row["errors"].items()))
            L.append("")
    L.append("## Targets (issue 6: GEMM part ≥ 60% of the bf16 matmul ceiling; issue 4: time ≤ 0.7× and peak memory ≤ 0.25× eager full logits)")
    L.append("")
    L.append("| V | new / eager_full time | floor / new time | floor / new's 3 GEMMs alone | new / eager_full memory |")
    L.append("|---|---|---|---|---|")
    for row in rows:
        def judge(v, lim, le):
            return "—" if v is None else f"{v:.2f} ({'PASS' if (v <= lim if le else v >= lim) else 'FAIL'})"
        L.append(f"| {row['shape']['V']} | {judge(row.get('ratio_vs_eager_full', {}).get('new'), 0.7, True)} | "
                 f"{judge(row.get('frac_of_floor', {}).get('new'), 0.6, False)} | "
                 f"{judge(row.get('gemm_part_frac_of_ceiling'), 0.6, False)} | "
                 f"{judge(row.get('memory_vs_eager_full', {}).get('new'), 0.25, True)} |")
    L.append("")
    return "\n".join(L)


def main(argv=None):
    ap = base_parser(__doc__, quick_help="tiny shapes (CPU) / fewer samples",
                     device_default="cuda" if torch.cuda.is_available() else "cpu", first_paragraph=False,
                     formatter_class=argparse.HelpFormatter)
    ap.add_argument("--dtype", default=None, choices=("bf16", "fp32", "fp16"), help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--vocab", type=int, nargs="*", default=None, help="override V")
    ap.add_argument("--reps", type=int, default=None, help="timed samples per variant (default 15; >= 10)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--masks", type=int, default=2, help="mask draws to rotate over")
    ap.add_argument("--skip", nargs="*", default=[], choices=VARIANTS)
    ap.add_argument("--backend", default=None, choices=("triton", "torch"),
                    help="force the diffkernels backend of the new variants (CPU: triton needs TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    args.reps = max(10, args.reps or 15)
    key = device.type + ("_quick" if args.quick and device.type == "cpu" else "")
    shapes = SHAPES[key]
    if args.vocab:
        shapes = [(B, L, H, V) for V in args.vocab for (B, L, H, _) in shapes[:1]]
    meta = machine(device)
    meta.update(reps=args.reps, dtype=str(dtype).replace("torch.", ""), shapes=shapes, backend=args.backend)
    head = load_head()
    rows = []
    for shape in shapes:
        print(f"[bench] {shape} {dtype}", file=sys.stderr, flush=True)
        try:
            rows.append(bench_shape(shape, dtype, device, args, head))
        except Exception as exc:  # noqa: BLE001 -- keep the other shapes
            traceback.print_exc()
            rows.append({"shape": dict(zip("BLHV", shape)), "dtype": str(dtype), "errors": {"shape": err_s(exc)}})
        free(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"masked_ce_variants_{key}" + ("_quick" if args.quick and device.type == "cuda" else "")
    write_json(out / f"{stem}.json", {"meta": meta, "rows": rows})  # first: it survives a rendering failure
    try:
        md = to_markdown(meta, rows)
    except Exception as exc:  # noqa: BLE001 -- the JSON is written; say what broke
        traceback.print_exc()
        md = f"# masked cross-entropy variants\n\nMarkdown rendering failed ({err_s(exc)}); see {stem}.json\n"
    print(md)
    (out / f"{stem}.md").write_text(md)
    print(f"[bench] wrote {out / stem}.md and .json", file=sys.stderr)


if __name__ == "__main__":
    main()
