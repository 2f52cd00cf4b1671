"""Runs every CUDA kernel once on odd shapes; meant to run under `compute-sanitizer --tool memcheck`.

Shapes are chosen so that rows do not start on a Philox-counter boundary and blocks end mid-row,
which is where a computed index would go out of bounds.
"""

import torch

import diffkernels as dk


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
    torch.cuda.synchronize()
    print("sanitize_kernels: all kernels ran")


if __name__ == "__main__":
    main()
