"""sparse_mse_loss / sparse_mask against the float64 reference, on every backend."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import diffkernels as dk
from diffkernels import reference as ref

from conftest import BACKEND_DEVICE, DEVICES
from diffkernels.sparse.loss import NORMALIZATIONS
from diffkernels.rng import uniform

OPTIONS = list(itertools.product(("element", "pixel"), ("expected", "all", "kept"), ("mean", "sum", "none")))
# Relative error allowed against the float64 reference. The loss is accumulated in float32 (float64
# for float64 inputs): per-element rounding of d and d*d is ~1e-7 relative, so 1e-6 leaves room.
LOSS_RTOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-6, torch.float16: 1e-6}
# Unit roundoff (relative spacing) per dtype. The kernel's gradient goes through ~4 roundings in
# its accumulation dtype (d = p - q, the per-row scale, scale * d, the upstream factor) and is
# stored in the input dtype twice (forward writes it for an upstream gradient of 1, backward
# rescales it in place), so up to 2 ulp of the input dtype; the reference rounds once from float64.
GRAD_ULP = {torch.float32: 2**-23, torch.float64: 2**-52, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def rand(shape, dtype, device, gen, requires_grad=True):
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    return x.requires_grad_(requires_grad)


def random_seed(gen):
    return int(torch.randint(-(2**62), 2**62, (1,), generator=gen)) * 2 + 1


def assert_rel(actual, expected, rtol, what):
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = expected.abs().max().clamp(min=1e-30)
    err = (actual - expected).abs().max() / scale
    assert err <= rtol, f"{what}: relative error {float(err):.3g} > {rtol:.3g}"


def assert_grad_close(actual, expected, dtype, what):
    """Within 2 ulp of the dtype plus 4 ulp of the accumulation dtype (see GRAD_ULP).

    Small float16 gradients are subnormal, where an ulp is the fixed subnormal spacing.
    """
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    subnormal_spacing = torch.finfo(dtype).smallest_normal * GRAD_ULP[dtype]
    tol = (2 * GRAD_ULP[dtype] + 4 * GRAD_ULP[acc]) * expected.abs() + 2 * subnormal_spacing
    bad = (actual - expected).abs() > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} gradient entries outside the rounding tolerance"


def check_against_reference(shape, dtype, device, gen, mask_ratio=0.7, weighted=True, **options):
    pred = rand(shape, dtype, device, gen)
    target = rand(shape, dtype, device, gen)
    weight = (torch.rand(shape[0], generator=gen, dtype=torch.float64) + 0.5).to(device).requires_grad_() if weighted else None
    seed = random_seed(gen)
    loss = dk.sparse_mse_loss(pred, target, mask_ratio, seed, weight=weight, **options)
    expected = ref.sparse_mse_loss(pred, target, mask_ratio, seed, weight=weight, **options)
    assert loss.dtype == torch.promote_types(dtype, torch.float32)
    assert loss.shape == expected.shape
    assert_rel(loss, expected, LOSS_RTOL[dtype], f"loss {shape} {dtype} {options}")

    upstream = torch.rand(loss.shape, generator=gen, dtype=torch.float64).to(device) + 0.5
    inputs = (pred, target) + ((weight,) if weighted else ())
    grads = torch.autograd.grad(loss, inputs, upstream.to(loss.dtype))
    expected_grads = torch.autograd.grad(expected, inputs, upstream.to(expected.dtype))
    for name, g, e in zip(("pred", "target", "weight"), grads, expected_grads):
        assert g.dtype == e.dtype and g.shape == e.shape
        if name == "weight":
            assert_rel(g, e, 1e-5, f"grad {name}")
        else:
            assert_grad_close(g, e, dtype, f"grad {name} {shape} {dtype} {options}")


@pytest.mark.parametrize("granularity,normalize,reduction", OPTIONS)
def test_every_option_matches_reference(backend_device, gen, granularity, normalize, reduction):
    _, device = backend_device
    check_against_reference((3, 5, 7, 9), torch.float32, device, gen, granularity=granularity,
                            normalize=normalize, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 3, 64, 64), (1, 4, 5), (5, 3)], ids=str)
def test_dtypes_and_shapes_match_reference(backend_device, gen, dtype, shape):
    _, device = backend_device
    check_against_reference(shape, dtype, device, gen, mask_ratio=0.5, granularity="pixel" if len(shape) > 2 else "element")


@pytest.mark.parametrize("mask_ratio", [0.0, 0.02, 0.98])
def test_mask_ratios_match_reference(backend_device, gen, mask_ratio):
    _, device = backend_device
    check_against_reference((4, 3, 11, 13), torch.float32, device, gen, mask_ratio=mask_ratio, normalize="kept")


def test_non_contiguous_inputs(backend_device, gen):
    _, device = backend_device
    leaf = rand((3, 8, 6, 4), torch.float32, device, gen)
    pred = leaf.transpose(1, 3)  # (3, 4, 6, 8), permuted strides
    target = rand((3, 4, 6, 16), torch.float32, device, gen, requires_grad=False)[..., ::2]  # strided
    assert not pred.is_contiguous() and not target.is_contiguous()
    seed = random_seed(gen)
    for gran in ("element", "pixel"):
        loss = dk.sparse_mse_loss(pred, target, 0.6, seed, granularity=gran)
        expected = ref.sparse_mse_loss(pred, target, 0.6, seed, granularity=gran)
        assert_rel(loss, expected, 1e-6, "loss")
        g, = torch.autograd.grad(loss, leaf)
        e, = torch.autograd.grad(expected, leaf)
        assert_grad_close(g, e, torch.float32, "grad pred")


def test_backends_agree_bit_for_bit_on_masks_and_gradients(gen):
    """Masks and float32 gradients are identical across backends; losses agree to 1e-6."""
    results = {}
    seed = random_seed(gen)
    for backend, device in BACKEND_DEVICE:
        torch.manual_seed(0)
        pred = torch.randn(3, 3, 17, 19, generator=torch.Generator().manual_seed(seed % 1000))
        target = torch.randn(3, 3, 17, 19, generator=torch.Generator().manual_seed(seed % 1000 + 1))
        pred = pred.to(device).requires_grad_()
        with dk.use_backend(backend):
            for gran in ("element", "pixel"):
                mask = dk.sparse_mask(pred.shape, 0.8, seed, granularity=gran, device=device)
                loss = dk.sparse_mse_loss(pred, target.to(device), 0.8, seed, granularity=gran, normalize="kept")
                grad, = torch.autograd.grad(loss, pred)
                results[(backend, device, gran)] = (mask.cpu(), loss.detach().cpu(), grad.cpu())
    for gran in ("element", "pixel"):
        first = results[("torch", "cpu", gran)]
        for key, (mask, loss, grad) in results.items():
            if key[2] != gran:
                continue
            assert torch.equal(mask, first[0]), key
            assert torch.equal(grad, first[2]), key
            assert_rel(loss, first[1], 1e-6, str(key))


@pytest.mark.parametrize("granularity", ["element", "pixel"])
def test_sparse_mask_matches_reference(backend_device, gen, granularity):
    _, device = backend_device
    for shape in [(3, 5, 7, 9), (2, 3, 1, 1), (1, 1), (4, 2, 33)]:
        seed = random_seed(gen)
        mask = dk.sparse_mask(shape, 0.37, seed, granularity=granularity, device=device)
        assert mask.dtype == torch.bool and mask.shape == shape and mask.device.type == device
        assert torch.equal(mask.cpu(), ref.sparse_mask(shape, 0.37, seed, granularity))


def test_gradient_is_nonzero_exactly_on_the_mask(backend_device, gen):
    _, device = backend_device
    pred = rand((4, 3, 10, 10), torch.float32, device, gen)
    target = pred.detach() + 1.0  # pred != target everywhere
    seed = random_seed(gen)
    for gran in ("element", "pixel"):
        grad, = torch.autograd.grad(dk.sparse_mse_loss(pred, target, 0.9, seed, granularity=gran), pred)
        mask = dk.sparse_mask(pred.shape, 0.9, seed, granularity=gran, device=device)
        assert torch.equal(grad != 0, mask)


@pytest.mark.parametrize("mask_ratio", [0.02, 0.5, 0.98])
def test_kept_fraction_is_one_minus_mask_ratio(mask_ratio, gen):
    n = 2_000_000
    seed = random_seed(gen)
    kept = float(dk.sparse_mask((4, n // 4), mask_ratio, seed).double().mean())
    sd = math.sqrt(mask_ratio * (1 - mask_ratio) / n)
    assert abs(kept - (1 - mask_ratio)) < 5 * sd, (kept, 1 - mask_ratio)


def test_pixel_granularity_shares_draws_across_channels(gen):
    mask = dk.sparse_mask((6, 4, 32, 32), 0.5, random_seed(gen), granularity="pixel")
    assert torch.equal(mask, mask[:, :1].expand_as(mask))
    assert 0.45 < float(mask.double().mean()) < 0.55


def test_mask_ratio_zero_is_dense_mse(backend_device, gen):
    _, device = backend_device
    pred = rand((4, 3, 8, 8), torch.float32, device, gen)
    target = rand((4, 3, 8, 8), torch.float32, device, gen)
    w = torch.rand(4, generator=gen).to(device)
    for normalize in ("expected", "all", "kept"):
        loss = dk.sparse_mse_loss(pred, target, 0.0, random_seed(gen), normalize=normalize)
        torch.testing.assert_close(loss, F.mse_loss(pred, target), rtol=1e-6, atol=0)
    weighted = dk.sparse_mse_loss(pred, target, 0.0, 7, weight=w, reduction="none")
    expected = w * ((pred - target) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(weighted, expected, rtol=1e-6, atol=0)
    g1, = torch.autograd.grad(dk.sparse_mse_loss(pred, target, 0.0, 7), pred)
    g2, = torch.autograd.grad(F.mse_loss(pred, target), pred)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-12)


def test_expected_normalisation_is_unbiased(gen):
    """Averaged over seeds, the "expected" loss estimates the dense MSE."""
    pred = torch.randn(8, 512, generator=gen)
    target = torch.randn(8, 512, generator=gen)
    dense = float(F.mse_loss(pred, target))
    est = torch.stack([dk.sparse_mse_loss(pred, target, 0.9, s) for s in range(400)]).double()
    assert abs(float(est.mean()) - dense) < 5 * float(est.std()) / math.sqrt(400)


def test_determinism_and_seed_sensitivity(backend_device, gen):
    _, device = backend_device
    pred = rand((2, 3, 16, 16), torch.float32, device, gen)
    target = rand((2, 3, 16, 16), torch.float32, device, gen)
    seed = random_seed(gen)
    l1 = dk.sparse_mse_loss(pred, target, 0.5, seed)
    g1, = torch.autograd.grad(l1, pred)
    l2 = dk.sparse_mse_loss(pred, target, 0.5, seed)
    g2, = torch.autograd.grad(l2, pred)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    m1 = dk.sparse_mask(pred.shape, 0.5, seed, device=device)
    m2 = dk.sparse_mask(pred.shape, 0.5, seed + 1, device=device)
    assert not torch.equal(m1, m2)
    assert not torch.equal(dk.sparse_mse_loss(pred, target, 0.5, seed + 1), l1)


def test_nan_policy(backend_device, gen):
    """NaN/Inf are ignored where the element is masked and propagate where it is kept."""
    _, device = backend_device
    pred = rand((3, 2, 8, 8), torch.float32, device, gen, requires_grad=False)
    target = rand((3, 2, 8, 8), torch.float32, device, gen, requires_grad=False)
    seed = random_seed(gen)
    mask = dk.sparse_mask(pred.shape, 0.7, seed, device=device)
    poisoned = pred.clone()
    poisoned[~mask] = float("nan")
    target_inf = target.clone()
    target_inf[~mask] = float("inf")
    poisoned.requires_grad_()
    loss = dk.sparse_mse_loss(poisoned, target_inf, 0.7, seed, reduction="none")
    clean = dk.sparse_mse_loss(pred, target, 0.7, seed, reduction="none")
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss, clean, rtol=0, atol=0)
    grad, = torch.autograd.grad(loss.sum(), poisoned)
    assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()

    kept_nan = pred.clone()
    first_kept = mask[1].flatten().nonzero()[0, 0]
    kept_nan[1].view(-1)[first_kept] = float("nan")
    per_sample = dk.sparse_mse_loss(kept_nan, target, 0.7, seed, reduction="none")
    assert torch.isnan(per_sample[1]) and torch.isfinite(per_sample[[0, 2]]).all()
    assert torch.isnan(dk.sparse_mse_loss(kept_nan, target, 0.7, seed))


def test_empty_batch(backend_device):
    _, device = backend_device
    pred = torch.zeros(0, 3, 4, 4, device=device, requires_grad=True)
    target = torch.zeros(0, 3, 4, 4, device=device)
    assert torch.isnan(dk.sparse_mse_loss(pred, target, 0.5, 1))  # mean of nothing, like torch.mean
    total = dk.sparse_mse_loss(pred, target, 0.5, 1, reduction="sum")
    assert total.item() == 0.0
    assert dk.sparse_mse_loss(pred, target, 0.5, 1, reduction="none").shape == (0,)
    grad, = torch.autograd.grad(total, pred)
    assert grad.shape == pred.shape
    assert dk.sparse_mask((0, 3), 0.5, 1, device=device).shape == (0, 3)


@pytest.mark.parametrize("backward", ["fused", "recompute"])
def test_empty_batch_without_channels(backend_device, backward):
    """granularity="pixel" with B = 0 and a channel dimension of size 0: the C++ and Triton kernels
    used to divide by the 0 channels (a RuntimeError, a ZeroDivisionError)."""
    _, device = backend_device
    pred = torch.zeros(0, 0, 4, device=device, requires_grad=True)
    loss = dk.sparse_mse_loss(pred, torch.zeros(0, 0, 4, device=device), 0.5, 1, granularity="pixel",
                              reduction="sum", backward=backward)
    assert loss.item() == 0.0 and torch.autograd.grad(loss, pred)[0].shape == (0, 0, 4)


def test_upstream_gradient_scaling(backend_device, gen):
    _, device = backend_device
    pred = rand((3, 4, 5), torch.float32, device, gen)
    target = rand((3, 4, 5), torch.float32, device, gen)
    seed = random_seed(gen)
    g1, = torch.autograd.grad(dk.sparse_mse_loss(pred, target, 0.5, seed), pred)
    g3, = torch.autograd.grad(3.0 * dk.sparse_mse_loss(pred, target, 0.5, seed), pred)
    torch.testing.assert_close(g3, 3.0 * g1, rtol=1e-6, atol=0)
    # Gradient of a loss that is used twice accumulates correctly.
    loss = dk.sparse_mse_loss(pred, target, 0.5, seed)
    g2, = torch.autograd.grad(loss + loss, pred)
    torch.testing.assert_close(g2, 2.0 * g1, rtol=1e-6, atol=0)


def test_second_backward_through_the_same_graph_is_an_error(backend_device, gen):
    """The saved gradient is rescaled in place, so a retained graph cannot be replayed silently."""
    _, device = backend_device
    pred = rand((2, 8), torch.float32, device, gen)
    loss = dk.sparse_mse_loss(pred, torch.zeros_like(pred), 0.5, 3)
    (2 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward='recompute'"):
        (2 * loss).backward()


def test_recompute_backward_matches_fused_and_is_reentrant(backend_device, gen):
    _, device = backend_device
    pred = rand((3, 2, 9), torch.float32, device, gen)
    target = rand((3, 2, 9), torch.float32, device, gen)
    w = torch.rand(3, generator=gen).to(device).requires_grad_()
    seed = random_seed(gen)
    for normalize, reduction in itertools.product(NORMALIZATIONS, ("mean", "none")):
        kw = dict(weight=w, normalize=normalize, reduction=reduction, granularity="pixel")
        fused = dk.sparse_mse_loss(pred, target, 0.5, seed, **kw)
        again = dk.sparse_mse_loss(pred, target, 0.5, seed, backward="recompute", **kw)
        assert torch.equal(fused, again)
        up = torch.rand(fused.shape, generator=gen).to(device)
        g1 = torch.autograd.grad(fused, (pred, target, w), up)
        g2 = torch.autograd.grad(again, (pred, target, w), up, retain_graph=True)
        g3 = torch.autograd.grad(again, (pred, target, w), up)  # a second backward through the same graph
        for a, b, c in zip(g1, g2, g3):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
            assert torch.equal(b, c)


def test_target_gradient_and_no_grad(backend_device, gen):
    _, device = backend_device
    pred = rand((2, 3, 4), torch.float32, device, gen)
    target = rand((2, 3, 4), torch.float32, device, gen)
    gp, gt = torch.autograd.grad(dk.sparse_mse_loss(pred, target, 0.3, 5), (pred, target))
    torch.testing.assert_close(gt, -gp, rtol=0, atol=0)
    with torch.no_grad():
        loss = dk.sparse_mse_loss(pred, target, 0.3, 5)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, dk.sparse_mse_loss(pred, target, 0.3, 5).detach(), rtol=0, atol=0)


def test_module_form(gen):
    pred = torch.randn(4, 3, 6, 6, generator=gen)
    target = torch.randn(4, 3, 6, 6, generator=gen)
    w = torch.rand(4, generator=gen)
    module = dk.SparseMSELoss(0.75, granularity="pixel", normalize="all", reduction="sum")
    assert "mask_ratio=0.75" in repr(module)
    expected = dk.sparse_mse_loss(pred, target, 0.75, 11, weight=w, granularity="pixel", normalize="all", reduction="sum")
    assert torch.equal(module(pred, target, 11, w), expected)
    with pytest.raises(ValueError, match="mask_ratio"):
        dk.SparseMSELoss(1.0)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_gradcheck_float64(backend, gen):
    from conftest import backends_for

    if backend not in backends_for("cpu"):
        pytest.skip(f"{backend} unavailable")
    with dk.use_backend(backend):
        for normalize, reduction in itertools.product(("expected", "kept"), ("mean", "none")):
            pred = torch.randn(3, 2, 5, dtype=torch.float64, generator=gen, requires_grad=True)
            target = torch.randn(3, 2, 5, dtype=torch.float64, generator=gen, requires_grad=True)
            w = torch.rand(3, dtype=torch.float64, generator=gen, requires_grad=True)

            def f(p, t, w):
                return dk.sparse_mse_loss(p, t, 0.4, 99, weight=w, granularity="pixel", normalize=normalize,
                                          reduction=reduction, backward="recompute")

            assert torch.autograd.gradcheck(f, (pred, target, w))


@pytest.mark.skipif(not DEVICES, reason="no device")
def test_more_than_2_31_elements():
    """Offsets past 2**31 are indexed correctly (C++ on CPU, Triton on CUDA); needs ~13 GB free."""
    device = "cuda" if "cuda" in DEVICES else "cpu"
    free = _free_memory_bytes(device)
    n = 2**31 + 4096
    if free < 3 * 2 * n + (2 << 30):
        pytest.skip(f"needs {3 * 2 * n / 2**30:.1f} GiB free, have {free / 2**30:.1f} GiB")
    if device == "cpu" and dk.backends()["default"]["cpu"] != "cpp":
        pytest.skip("needs the C++ backend on CPU")
    pred = torch.zeros(1, n, dtype=torch.bfloat16, device=device)
    target = torch.zeros(1, n, dtype=torch.bfloat16, device=device)
    window = slice(n - 3000, n)  # only the tail, past 2**31, differs
    g = torch.Generator().manual_seed(0)
    pred[0, window] = torch.randn(3000, generator=g).to(torch.bfloat16).to(device)
    pred.requires_grad_()
    seed = 2**40 + 17
    loss = dk.sparse_mse_loss(pred, target, 0.5, seed, normalize="all", reduction="sum")
    tail_keep = (uniform(seed, torch.arange(n - 3000, n)) >= 0.5).to(device)
    tail = pred.detach()[0, window].double()
    expected = torch.where(tail_keep, tail * tail, 0).sum() / n
    assert_rel(loss, expected, 1e-5, "loss past 2**31")
    grad, = torch.autograd.grad(loss, pred)
    assert torch.equal(grad[0, window] != 0, tail_keep & (tail != 0))
    assert not grad[0, : n - 3000].any()


def _free_memory_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
