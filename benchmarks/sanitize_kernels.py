"""Runs every CUDA kernel once on odd shapes; meant to run under `compute-sanitizer --tool memcheck`.

    python benchmarks/sanitize_kernels.py [--backends triton,cuda]

Shapes are chosen so that rows do not start on a Philox-counter boundary and blocks end mid-row,
which is where a computed index would go out of bounds. Each GPU backend runs in turn
(``triton``: the Triton kernels; ``cuda``: the CUDA kernels of csrc/, where built); the backend
primitives are also called directly on views whose data is not 16-byte aligned and on rows long
enough to span many blocks (the element-wise fallback and the cross-block row sums of the CUDA
kernels).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout too
import diffkernels as dk  # noqa: E402
from diffkernels import _backend, mdm  # noqa: E402
from diffkernels.ops import _kernels  # noqa: E402
from diffkernels.ops.mask_tokens import row_table  # noqa: E402

GPU_BACKENDS = ("triton", "cuda")


def offset_copy(x: torch.Tensor, offset: int) -> torch.Tensor:
    """x copied into a buffer `offset` elements from its start (offset 1: not 16-byte aligned)."""
    buf = torch.empty(x.numel() + offset, dtype=x.dtype, device=x.device)
    out = buf[offset:].view(x.shape)
    out.copy_(x)
    return out


def primitives(backend: str, g: torch.Generator) -> None:
    """The backend primitives directly: unaligned inputs, long rows, every dtype."""
    k = _kernels.kernels_for(backend)
    for shape, C in [((2, 3, 67, 129), 3), ((1, 70001), 1), ((5, 4099), 1), ((3, 3, 64, 64), 1)]:
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            for offset in (0, 1):
                p = offset_copy(torch.randn(shape, device="cuda", generator=g).to(dtype), offset)
                q = offset_copy(torch.randn(shape, device="cuda", generator=g).to(dtype), offset)
                for eta in (0.0, 0.98):
                    scale = torch.rand(shape[0], device="cuda", generator=g).to(acc)
                    _, _, grad = k.sparse_mse_fwd(p, q, eta, 17, C, scale)
                    k.sparse_mse_fwd(p, q, eta, 17, C, None)
                    factor = torch.rand(shape[0], device="cuda", generator=g).to(acc)
                    factor[0] = 1.0
                    k.scale_rows_(offset_copy(grad, offset), factor)
    for B, C, R in [(3, 1, 70001), (2, 3, 4097), (7, 1, 13)]:
        k.sparse_mask(5, B, C, R, 0.5, torch.device("cuda"))
    for B, L in [(3, 4099), (2, 8192), (5, 13)]:
        for dtype in (torch.int64, torch.int32):
            for offset in (0, 1):
                ids = offset_copy(torch.randint(0, 50, (B, L), device="cuda", generator=g, dtype=dtype), offset)
                p = torch.rand(B, device="cuda", generator=g).clamp_min(0.01)
                table = row_table(p, 0.2, torch.ones(B, dtype=torch.bool, device="cuda"), True)
                flags = offset_copy(torch.rand(B, L, device="cuda", generator=g) < 0.5, offset)
                for mirror in (False, True):
                    k.mask_tokens(ids, table, 3, 99, flags, flags, mirror)
                    k.mask_tokens(ids, table, 3, 99, None, None, mirror)


def run_api(g: torch.Generator) -> None:
    for shape in [(3, 5, 7, 9), (1, 1), (7, 3, 33, 17), (2, 4099)]:
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            pred = torch.randn(shape, device="cuda", generator=g).to(dtype).requires_grad_()
            target = torch.randn(shape, device="cuda", generator=g).to(dtype).requires_grad_()
            w = torch.rand(shape[0], device="cuda", generator=g)
            for granularity in ("element", "pixel"):
                for backward in ("fused", "recompute"):
                    loss = dk.sparse_mse_loss(pred, target, 0.7, 5, weight=w, granularity=granularity,
                                              normalize="kept", reduction="none", backward=backward)
                    torch.autograd.grad(loss, (pred, target), torch.rand_like(loss))
                dk.sparse_mask(shape, 0.3, 9, granularity=granularity, device="cuda")
    # Token masks: odd row lengths, every mode, ISAD ids and an eligibility mask.
    for B, L in [(1, 1), (3, 37), (5, 1029)]:
        ids = torch.randint(0, 50, (B, L), device="cuda", generator=g)
        p = torch.rand(B, device="cuda", generator=g).clamp_min(0.01)
        eligible = torch.rand(B, L, device="cuda", generator=g) < 0.8
        rare = torch.tensor([3, 7], device="cuda")
        for mode in ("standard", "mirror"):
            mdm.mask_tokens(ids, p, 11, mask_id=99, eligible=eligible, mode=mode, rare=rare, rare_delta=0.2,
                            union_weights=(mode == "mirror"))
    # Masked cross-entropy from hidden states (chunked online softmax, gradients in forward).
    hidden = torch.randn(3, 37, 64, device="cuda", generator=g, requires_grad=True)
    W = torch.randn(101, 64, device="cuda", generator=g, requires_grad=True)
    targets = torch.randint(0, 100, (3, 37), device="cuda", generator=g)
    loss = mdm.masked_diffusion_loss(mdm.mask_tokens(targets, 0.5, 3, mask_id=100), targets,
                                     hidden=hidden, lm_head_weight=W)
    loss.backward()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(GPU_BACKENDS),
                        help="comma-separated GPU backends to run (default: triton,cuda; unavailable ones are skipped)")
    args = parser.parse_args(argv)
    assert torch.cuda.is_available(), "needs a CUDA device"
    ran = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        why = _backend.unavailable(backend, torch.device("cuda"))
        if why is not None:
            print(f"sanitize_kernels: backend {backend!r} skipped: {why}")
            continue
        g = torch.Generator(device="cuda").manual_seed(0)
        with dk.use_backend(backend):
            run_api(g)
            primitives(backend, g)
        torch.cuda.synchronize()
        print(f"sanitize_kernels: backend {backend!r}: all kernels ran")
        ran.append(backend)
    assert ran, "no GPU backend could run"


if __name__ == "__main__":
    main()
