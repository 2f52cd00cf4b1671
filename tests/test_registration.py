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


def test_opcheck_helper_ops(backend_device):
    _, device = backend_device
    grad = torch.randn(3, 8, device=device)
    factor = torch.tensor([1.0, 2.0, -0.5], device=device)
    torch.library.opcheck(torch.ops.diffkernels.scale_rows_.default, (grad, factor))
    pred, target = torch.randn(2, 6, device=device), torch.randn(2, 6, device=device)
    torch.library.opcheck(torch.ops.diffkernels.sparse_mse_grad.default,
                          (pred, target, torch.ones(2, device=device), 0.5, 7, 1))


def test_scale_rows_skips_rows_with_factor_one(backend_device):
    _, device = backend_device
    grad = torch.randn(3, 1000, device=device)
    before = grad.clone()
    torch.ops.diffkernels.scale_rows_(grad, torch.tensor([1.0, 3.0, 1.0], device=device))
    assert torch.equal(grad[0], before[0]) and torch.equal(grad[2], before[2])
    torch.testing.assert_close(grad[1], 3.0 * before[1], rtol=0, atol=0)


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
