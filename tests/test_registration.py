"""torch.library integration: opcheck, torch.compile(fullgraph=True), fake tensors."""

import pytest
import torch

import diffkernels as dk
from diffkernels.sparse import loss as sparse_loss

from conftest import BACKEND_DEVICE


def sample_args(device, dtype=torch.float32, weight=True, normalize="expected", reduction="mean", fused=True):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 2, 5, 4, generator=g, dtype=dtype).to(device).requires_grad_()
    target = torch.randn(3, 2, 5, 4, generator=g, dtype=dtype).to(device)
    w = (torch.rand(3, generator=g, dtype=dtype) + 0.5).to(device) if weight else None
    return (pred, target, w, 0.6, 1234, 2, normalize, reduction, fused)


@pytest.mark.parametrize("normalize,reduction,fused", [
    ("expected", "mean", True), ("kept", "none", True), ("all", "sum", False), ("kept", "mean", False)])
def test_opcheck_sparse_mse(backend_device, normalize, reduction, fused):
    _, device = backend_device
    args = sample_args(device, normalize=normalize, reduction=reduction, fused=fused)
    # test_autograd_registration and the fake/schema checks; the AOT check re-runs backward on a
    # graph built from this op, which the in-place fused gradient does not support, so it runs
    # in the "recompute" form (fused=False) only.
    tests = ["test_schema", "test_autograd_registration", "test_faketensor"]
    if not fused:
        tests.append("test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.diffkernels.sparse_mse.default, args, test_utils=tests)


def test_opcheck_sparse_mse_grad(backend_device):
    _, device = backend_device
    pred, target = torch.randn(2, 6, device=device), torch.randn(2, 6, device=device)
    torch.library.opcheck(torch.ops.diffkernels.sparse_mse_grad.default,
                          (pred, target, torch.ones(2, device=device), 0.5, 7, 1))


@pytest.mark.parametrize("backward", ["fused", "recompute"])
def test_compile_fullgraph_training_step(backward):
    """The forward + loss of a training step compiles as one graph; AOTAutograd compiles its backward.

    (``loss.backward()`` itself cannot live inside a fullgraph region without compiled autograd.)
    """
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 16))
    reference_model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 16))
    reference_model.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference_model.parameters(), lr=0.1)
    sigma = torch.rand(8, generator=g) + 0.1

    def forward_loss(net, x, target, seed):
        pred = net(x)
        weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
        return dk.sparse_mse_loss(pred, target, 0.75, seed, weight=weight, backward=backward)

    compiled = torch.compile(forward_loss, fullgraph=True)
    torch._dynamo.utils.counters.clear()
    for seed in range(4):  # different seeds must not break the graph
        x, target = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
        for fn, net, optimizer in ((compiled, model, opt), (forward_loss, reference_model, ref_opt)):
            loss = fn(net, x, target, seed)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        torch.testing.assert_close(model(x), reference_model(x), rtol=1e-5, atol=1e-6)
    # A new seed each step costs at most one recompile (the seed becomes a dynamic int), not one per step.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
    for p, q in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        pred = torch.empty(4, 3, 8, 8, dtype=torch.bfloat16, requires_grad=True)
        target = torch.empty(4, 3, 8, 8, dtype=torch.bfloat16)
        loss = dk.sparse_mse_loss(pred, target, 0.5, 1, reduction="none")
        assert loss.shape == (4,) and loss.dtype == torch.float32
        assert dk.sparse_mse_loss(pred, target, 0.5, 1).shape == ()


def test_public_names():
    assert dk.sparse_mse_loss is dk.sparse.sparse_mse_loss is sparse_loss.sparse_mse_loss
    for name in dk.__all__:
        assert hasattr(dk, name)


def _bad_calls():
    """(op name, arguments with one wrong shape or dtype, what the error must say), as pytest params."""
    i64, b = torch.int64, torch.bool
    e = torch.empty
    sparse = (0.5, 1, 1, "expected", "mean", False)
    calls = [
        ("sparse_mse", (e(3, 4), e(3, 5), None, *sparse), "target must have pred's shape"),
        ("sparse_mse", (e(3, 4), e(3, 4, dtype=torch.float64), None, *sparse), "target must have pred's dtype"),
        ("sparse_mse", (e(3, 4), e(3, 4), e(4), *sparse), "weight must have shape"),
        ("sparse_mse", (e(3, 4), e(3, 4), None, 0.5, 1, 3, "expected", "mean", False), "channels"),
        ("sparse_mse", (e(3, 4), e(3, 4), None, 0.5, 1, 1, "expected", "avg", False), "reduction"),
        ("sparse_mse_grad", (e(3, 4), e(3, 4), e(2), 0.5, 1, 1), "grad_scale must have shape"),
        ("scale_rows_", (e(3, 4), e(4)), "factor must have shape"),
        ("scale_rows_", (e(3, 4, dtype=i64), e(3)), "grad must be floating-point"),
        ("mask_tokens", (e(2, 5, dtype=i64), e(2, 7), 1, 9, None, None, False), "table must be a contiguous"),
        ("mask_tokens", (e(2, 5, dtype=i64), e(2, 8), 1, 9, e(2, 4, dtype=b), None, False), "eligible"),
        ("mask_tokens", (e(10, dtype=i64), e(2, 8), 1, 9, None, None, False), "ids must be a contiguous"),
        ("masked_ce_logits", (e(6, 5), e(6, dtype=i64), e(5), 0, True), "coef must be a contiguous"),
        ("masked_ce_logits", (e(6, 5), e(6, dtype=torch.int32), e(6), 0, True), "targets must be int64"),
        ("masked_ce_logits", (e(6), e(6, dtype=i64), e(6), 0, True), "logits must have shape"),
        ("masked_ce_hidden", (e(6, 4), e(5, 3), None, e(6, dtype=i64), e(6), 0, True), "weight must have shape"),
        ("masked_ce_hidden", (e(6, 4), e(5, 4), e(4), e(6, dtype=i64), e(6), 0, True), "bias must have shape"),
        ("masked_ce_hidden", (e(6, 4), e(5, 4, dtype=torch.float64), None, e(6, dtype=i64), e(6), 0, True),
         "weight must have hidden's dtype"),
    ]
    return [pytest.param(name, args, match, id=f"{name}: {match}") for name, args, match in calls]


@pytest.mark.parametrize("name,args,match", _bad_calls())
def test_custom_ops_called_directly_check_their_arguments(name, args, match):
    """The fake kernels (what torch.compile and export trace) and the custom ops themselves check
    what the kernels assume, so calling the op directly cannot skip the public functions' checks."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = getattr(torch.ops.diffkernels, name)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises((ValueError, TypeError), match=match):
            op(*fake)
    real = [a.zero_() if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises((ValueError, TypeError), match=match):
        op(*real)
