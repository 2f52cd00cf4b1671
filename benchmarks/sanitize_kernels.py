"""Runs every CUDA kernel once on odd shapes; meant to run under `compute-sanitizer --tool memcheck`.

Shapes are chosen so that rows do not start on a Philox-counter boundary and blocks end mid-row,
which is where a computed index would go out of bounds.
"""

import torch

import diffkernels as dk
from diffkernels import mdm


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA device"
    g = torch.Generator(device="cuda").manual_seed(0)
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
    torch.cuda.synchronize()
    print("sanitize_kernels: all kernels ran")


if __name__ == "__main__":
    main()
