"""diffkernels::scale_rows_, the in-place rescale shared by the backward of sparse_mse and masked_ce:
every backend against the float64 product, rows with factor 1 untouched, opcheck."""

import pytest
import torch

from diffkernels.ops import _kernels


def test_opcheck(backend_device):
    _, device = backend_device
    grad = torch.randn(3, 8, device=device)
    factor = torch.tensor([1.0, 2.0, -0.5], device=device)
    torch.library.opcheck(torch.ops.diffkernels.scale_rows_.default, (grad, factor))


def test_skips_rows_with_factor_one(backend_device):
    _, device = backend_device
    grad = torch.randn(3, 1000, device=device)
    before = grad.clone()
    torch.ops.diffkernels.scale_rows_(grad, torch.tensor([1.0, 3.0, 1.0], device=device))
    assert torch.equal(grad[0], before[0]) and torch.equal(grad[2], before[2])
    torch.testing.assert_close(grad[1], 3.0 * before[1], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_every_backend_rounds_the_product_once(backend_device, dtype, gen):
    """grad[b] * factor[b] in the accumulation dtype, rounded once to grad's dtype, for an expanded
    (stride-0) factor too, as masked_ce's backward passes it."""
    backend, device = backend_device
    grad = torch.randn(4, 3, 50, generator=gen).to(dtype).to(device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    factors = [torch.rand(4, generator=gen, dtype=acc).to(device) + 0.5,
               torch.tensor(0.75, dtype=acc, device=device).expand(4)]
    # Triton's interpreter (CPU tensors) converts float32 to bfloat16 by truncation, the GPU rounds to nearest.
    truncates = backend == "triton" and device == "cpu" and dtype == torch.bfloat16
    for factor in factors:
        got = grad.clone()
        _kernels.kernels_for(backend).scale_rows_(got, factor)
        product = (grad.double() * factor.double()[:, None, None]).to(acc)
        if truncates:
            product = (product.view(torch.int32) & ~0xFFFF).view(torch.float32)
        assert torch.equal(got, product.to(dtype))
