"""The eager fast paths of sparse_mse_loss and mask_tokens: taken in plain eager mode, skipped
wherever something intercepts the op, identical results either way, and few tensor ops a call."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import diffkernels as dk
from diffkernels.mdm.masking import mask_tokens
from diffkernels.ops import _kernels, mask_tokens as mask_op
from diffkernels.ops import sparse_mse as ops_mod
from diffkernels.reference import mask_tokens as ref_mdm


class PassThrough(TorchDispatchMode):
    """A dispatch mode that changes nothing, but makes the ops take the custom-op path."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def loss_and_grads(pred, target, weight, backward, **kw):
    inputs = [t.detach().clone().requires_grad_() for t in (pred, target, weight)]
    loss = dk.sparse_mse_loss(inputs[0], inputs[1], 0.6, 77, weight=inputs[2], backward=backward, **kw)
    up = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)).to(loss.device) + 0.5
    return loss.detach(), torch.autograd.grad(loss, inputs, up)


@pytest.mark.parametrize("backward", ["fused", "recompute"])
@pytest.mark.parametrize("normalize,reduction", [("expected", "mean"), ("kept", "none"), ("all", "sum")])
def test_sparse_mse_fast_path_matches_custom_op(backend_device, gen, backward, normalize, reduction):
    _, device = backend_device
    pred = torch.randn(3, 2, 5, generator=gen).to(device)
    target = torch.randn(3, 2, 5, generator=gen).to(device)
    weight = (torch.rand(3, generator=gen) + 0.5).to(device)
    kw = dict(normalize=normalize, reduction=reduction, granularity="pixel")
    fast = loss_and_grads(pred, target, weight, backward, **kw)
    with PassThrough():
        slow = loss_and_grads(pred, target, weight, backward, **kw)
    assert torch.equal(fast[0], slow[0])
    for a, b in zip(fast[1], slow[1]):
        assert torch.equal(a, b)


def test_sparse_mse_fast_path_is_taken(monkeypatch, gen):
    pred = torch.randn(2, 6, generator=gen, requires_grad=True)
    target = torch.randn(2, 6, generator=gen)
    loss = dk.sparse_mse_loss(pred, target, 0.5, 3, backward="recompute")
    assert type(loss.grad_fn).__name__ == "_SparseMSEFunctionBackward"

    def no_custom_op(*args):
        raise AssertionError("the custom op ran in plain eager mode")

    monkeypatch.setattr(ops_mod, "sparse_mse_op", no_custom_op)
    dk.sparse_mse_loss(pred, target, 0.5, 3).backward()
    with torch.no_grad():
        dk.sparse_mse_loss(pred, target, 0.5, 3)
    with PassThrough(), pytest.raises(AssertionError, match="custom op ran"):
        dk.sparse_mse_loss(pred, target, 0.5, 3)


@pytest.mark.parametrize("backward", ["fused", "recompute"])
def test_sparse_mse_compiled_matches_eager(gen, backward):
    torch._dynamo.reset()
    pred = torch.randn(4, 3, 6, generator=gen)
    target = torch.randn(4, 3, 6, generator=gen)
    weight = torch.rand(4, generator=gen) + 0.5

    def f(p, t, w):
        return dk.sparse_mse_loss(p, t, 0.7, 5, weight=w, normalize="kept", reduction="none", backward=backward)

    compiled = torch.compile(f, fullgraph=True)
    results = []
    for fn in (f, compiled):
        inputs = [x.clone().requires_grad_() for x in (pred, target, weight)]
        loss = fn(*inputs)
        results.append((loss.detach(), torch.autograd.grad(loss, inputs, torch.linspace(0.5, 2.0, 4))))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    assert torch.equal(eager_loss, compiled_loss)
    for a, b in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


class StubKernels:
    """A backend whose primitives issue no tensor ops, so that the profiler sees only the wrapper's.
    Its outputs are made in advance and not kept, so autograd can take over the gradient buffer."""

    def __init__(self, pred, calls):
        B = pred.shape[0]
        self.outputs = [(torch.rand(B, dtype=torch.float64), torch.full((B,), 3, dtype=torch.int64),
                         torch.zeros_like(pred)) for _ in range(calls)]

    def sparse_mse_fwd(self, pred, target, mask_ratio, seed, channels, grad_scale):
        return self.outputs.pop()

    def scale_rows_(self, grad, factor):
        pass


def launch_ops(fn):
    """The aten ops ``fn`` issues that are not nested in another aten op and are not allocations,
    views or no-op conversions: on a GPU, each is a kernel launch."""
    no_launch = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::expand", "aten::view",
                 "aten::detach", "aten::as_strided", "aten::lift_fresh", "aten::promote_types"}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = []
    for event in prof.events():
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if event.name.startswith("aten::") and parent is None and event.name not in no_launch:
            if event.name in ("aten::to", "aten::contiguous") and not event.cpu_children:
                continue  # returned its input
            names.append(event.name)
    return names


def test_sparse_mse_issues_few_tensor_ops(monkeypatch, gen):
    monkeypatch.setattr(ops_mod, "_native_loss", False)  # the Python path (other backends, no native library)
    pred = torch.randn(4, 8, generator=gen, requires_grad=True)
    target = torch.randn(4, 8, generator=gen)
    stub = StubKernels(pred, calls=2)
    monkeypatch.setattr(_kernels, "for_device", lambda device: stub)

    def step():
        pred.grad = None
        dk.sparse_mse_loss(pred, target, 0.9, 1).backward()

    step()
    ops = launch_ops(step)
    # forward: the per-row gradient scale, the sum over rows, its scaling and cast; backward:
    # autograd's own upstream gradient of 1 and its copy to one factor per row for the kernel.
    assert sorted(ops) == ["aten::contiguous", "aten::full", "aten::mul", "aten::ones_like", "aten::sum"], ops
    assert "aten::_local_scalar_dense" not in ops


def test_mask_tokens_issues_few_tensor_ops(monkeypatch, gen):
    ids = torch.randint(0, 50, (4, 16), generator=gen)
    p = torch.rand(4, generator=gen) * 0.9 + 0.05
    out = [torch.empty(1, 4, 16, dtype=ids.dtype), torch.empty(1, 4, 16, dtype=torch.bool), torch.empty(1, 4, 16)]

    class Stub:
        @staticmethod
        def mask_tokens(*args):
            return out

    monkeypatch.setattr(_kernels, "for_device", lambda device: Stub)
    monkeypatch.setattr("diffkernels.mdm.masking.check_on_device", lambda condition, message, where=None: None)
    ops = launch_ops(lambda: mask_tokens(ids, p, 1, mask_id=99))
    expected = ["aten::clamp", "aten::eq", "aten::all",  # p check (on the GPU then one device-side assert)
                "aten::eq", "aten::any", "aten::bitwise_not",  # mask-id collision check, CPU only
                "aten::reciprocal", "aten::full_like", "aten::stack",  # row table
                "aten::ones", "aten::full", "aten::arange"]  # row_weight, eligible_count, source_row
    assert sorted(ops) == sorted(expected), ops


def test_mask_tokens_fast_path_is_taken_and_matches_custom_op(backend_device, monkeypatch, gen):
    _, device = backend_device
    ids = torch.randint(0, 50, (3, 20), generator=gen).to(device)
    p = (torch.rand(3, generator=gen) * 0.9 + 0.05).to(device)
    kw = dict(mask_id=99, mode="mirror", rare=[1, 2, 3], rare_delta=0.2, union_weights=True, mirror_max_t=0.7)
    with PassThrough():
        slow = mask_tokens(ids, p, 8, **kw)

    def no_custom_op(*args):
        raise AssertionError("the custom op ran in plain eager mode")

    monkeypatch.setattr(mask_op, "mask_tokens_op", no_custom_op)
    fast = mask_tokens(ids, p, 8, **kw)
    for name in ("noisy_ids", "masked", "weights", "row_weight", "eligible_count", "p", "source_row"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name


def old_row_table(p, rare_delta, mirror_rows, union_weights):
    """The row table as first written (straight from the definitions), kept as an oracle."""
    one = torch.ones((), dtype=torch.float32)
    q = torch.minimum(p + torch.tensor(rare_delta, dtype=torch.float32), one)
    columns = []
    for x in (p, q):
        t2 = torch.full_like(x, 2.0) if mirror_rows is None else torch.where(mirror_rows, one - x, 2.0)
        columns += [x, t2]
    for x in (p, q):
        single = both = one / x
        if mirror_rows is not None and union_weights:
            pi = torch.minimum(2 * x, one)
            single = torch.where(mirror_rows, torch.tensor(2.0) / pi, single)
            both = torch.where(mirror_rows, one / pi, both)
        columns += [single, both]
    return torch.stack(columns, dim=1)


@pytest.mark.parametrize("rare_delta", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("rows", ["none", "all", "some"])
@pytest.mark.parametrize("union_weights", [False, True])
def test_row_table_is_bit_exact(gen, rare_delta, rows, union_weights):
    u = torch.rand(2000, generator=gen)
    p = torch.cat([u, u * 1e-30, torch.tensor([1.0, 0.5, 1e-3, 2.0**-149, 0.75])])
    mirror_rows = {"none": None, "all": torch.ones(p.shape, dtype=torch.bool),
                   "some": torch.rand(p.shape, generator=gen) < 0.5}[rows]
    expected = old_row_table(p, rare_delta, mirror_rows, union_weights)
    assert torch.equal(mask_op.row_table(p, rare_delta, mirror_rows, union_weights), expected)
    if rows == "all":  # every row mirrored: the path that skips the per-row selects
        assert torch.equal(mask_op.row_table(p, rare_delta, True, union_weights), expected)


def test_p_check_accepts_exactly_0_to_1(gen):
    ids = torch.randint(0, 50, (5, 8), generator=gen)
    mask_tokens(ids, torch.tensor([2.0**-149, 1e-30, 0.5, 1.0, 1.0 - 2**-24]), 1, mask_id=99)
    for bad in (0.0, -0.0, -1e-30, 1.0 + 2**-23, float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="p must lie in"):
            mask_tokens(ids, torch.tensor([0.5, 0.5, bad, 0.5, 0.5]), 1, mask_id=99)


def test_mask_tokens_matches_reference_with_rare_on_device_tensor(backend_device, gen):
    _, device = backend_device
    ids = torch.randint(0, 10, (2, 30), generator=gen).to(device)
    p = torch.tensor([0.3, 0.6], device=device)
    rare = torch.tensor([1, 2], device=device)
    out = mask_tokens(ids, p, 6, mask_id=99, rare=rare, rare_delta=0.3)
    noisy, masked, weights = ref_mdm.mask_tokens(ids, p, 6, mask_id=99, rare=torch.isin(ids, rare), rare_delta=0.3)
    assert torch.equal(out.masked, masked.view(2, 30)) and torch.equal(out.weights, weights.view(2, 30))


# --- the native op: backward="fused" on CPU with the autograd node in C++ ---------------------------

native_available = pytest.mark.skipif(ops_mod.native_loss() is None, reason="the native library is not built")


def is_native(loss):
    return "SparseMSELoss" in loss.grad_fn.name() and type(loss.grad_fn).__name__ == "CppFunction"


def reference_loss(pred, target, weight, mask_ratio, seed, normalize, reduction, granularity):
    """Independent float64 plain-PyTorch loss of the public docstring's formula."""
    n = pred[0].numel() if pred.shape[0] else 1
    keep = dk.sparse_mask(pred.shape, mask_ratio, seed, granularity=granularity).reshape(pred.shape[0], n)
    d = (pred.double() - target.double()).reshape(pred.shape[0], n)
    sq = torch.where(keep, d * d, 0.0).sum(1)
    z = {"expected": n * (1 - mask_ratio), "all": float(n), "kept": keep.sum(1).clamp(min=1).double()}[normalize]
    per = sq / z * (1.0 if weight is None else weight.double())
    return {"mean": per.mean(), "sum": per.sum(), "none": per}[reduction]


@native_available
def test_native_op_is_taken_for_the_fused_cpu_step(monkeypatch, gen):
    pred = torch.randn(2, 3, 4, generator=gen, requires_grad=True)
    target = torch.randn(2, 3, 4, generator=gen)

    def no_python_path(*args, **kwargs):
        raise AssertionError("the Python path ran")

    monkeypatch.setattr(ops_mod, "_forward", no_python_path)
    monkeypatch.setattr(ops_mod._SparseMSEFunction, "apply", no_python_path)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        p = pred.detach().to(dtype).requires_grad_()
        for weight in (None, torch.rand(2, generator=gen).requires_grad_()):
            loss = dk.sparse_mse_loss(p, target.to(dtype), 0.5, 3, weight=weight, granularity="pixel")
            assert is_native(loss)
            loss.backward()
    # everything else takes the Python path
    monkeypatch.undo()
    half = pred.detach().half().requires_grad_()
    assert not is_native(dk.sparse_mse_loss(half, target.half(), 0.5, 3))  # float16: recompute
    assert not is_native(dk.sparse_mse_loss(pred, target, 0.5, 3, backward="recompute"))
    with dk.use_backend("torch"):
        assert not is_native(dk.sparse_mse_loss(pred, target, 0.5, 3))
    assert dk.sparse_mse_loss(pred.detach(), target, 0.5, 3).grad_fn is None


@native_available
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_native_op_matches_python_path_and_reference(monkeypatch, gen, dtype):
    """Bitwise equal to the Python path (same ops in the same order), close to a float64 reference."""
    cases = [(normalize, reduction) for normalize in ("expected", "all", "kept")
             for reduction in ("mean", "sum", "none")]
    for shape, (normalize, reduction) in zip([(3, 2, 5), (4, 7), (0, 2, 3)] * 3, cases):
        B = shape[0]
        pred = torch.randn(shape, generator=gen).to(dtype)
        target = torch.randn(shape, generator=gen).to(dtype)
        weight = torch.rand(B, generator=gen) + 0.5
        for w in (None, weight):
            granularity = "pixel" if len(shape) == 3 else "element"
            kw = dict(normalize=normalize, reduction=reduction, granularity=granularity)
            up = torch.rand(B if reduction == "none" else (), generator=gen) + 0.5
            results = []
            for native in (True, False):
                if not native:
                    monkeypatch.setattr(ops_mod, "_native_loss", False)
                inputs = [pred.clone().requires_grad_(), target.clone().requires_grad_()]
                inputs += [] if w is None else [w.clone().requires_grad_()]
                loss = dk.sparse_mse_loss(inputs[0], inputs[1], 0.6, 11, weight=inputs[2] if w is not None else None,
                                          **kw)
                assert is_native(loss) == native
                results.append((loss.detach(), torch.autograd.grad(loss, inputs, up)))
            monkeypatch.undo()
            (loss, grads), (py_loss, py_grads) = results
            assert torch.equal(loss, py_loss) or (loss.isnan().all() and py_loss.isnan().all())
            for a, b in zip(grads, py_grads):
                assert torch.equal(a, b)
            # float64: summation order only; bfloat16/float32: the float32 loss of exactly representable inputs
            ref = reference_loss(pred, target, w, 0.6, 11, normalize, reduction, granularity)
            torch.testing.assert_close(loss.double(), ref, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0,
                                       equal_nan=True)
            if B:  # d loss / d pred of the float64 reference
                p = pred.double().requires_grad_()
                ref_grad, = torch.autograd.grad(
                    reference_loss(p, target, w, 0.6, 11, normalize, reduction, granularity), p, up.double())
                tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]  # bf16: 8-bit mantissa
                torch.testing.assert_close(grads[0].double(), ref_grad, rtol=tol, atol=0)
                torch.testing.assert_close(grads[1].double(), -ref_grad, rtol=tol, atol=0)


@native_available
def test_native_op_errors_match_python_path(monkeypatch, gen):
    pred = torch.randn(2, 8, generator=gen, requires_grad=True)
    target = torch.randn(2, 8, generator=gen)
    messages = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(ops_mod, "_native_loss", False)
        loss = dk.sparse_mse_loss(pred, target, 0.5, 3)
        assert is_native(loss) == native
        (2 * loss).backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="backward='recompute'") as second:
            (2 * loss).backward()
        loss = dk.sparse_mse_loss(pred, target, 0.5, 3)
        with pytest.raises(RuntimeError, match="create_graph=True") as create_graph:
            torch.autograd.grad(loss, pred, create_graph=True)
        messages.append((str(second.value).split("\n")[0], str(create_graph.value).split("\n")[0]))
    assert messages[0] == messages[1]
    assert messages[0] == (ops_mod.SECOND_BACKWARD, ops_mod.CREATE_GRAPH_FUSED)


@native_available
def test_native_step_issues_few_tensor_ops(gen):
    pred = torch.randn(4, 8, generator=gen, requires_grad=True)
    target = torch.randn(4, 8, generator=gen)

    def step():
        pred.grad = None
        dk.sparse_mse_loss(pred, target, 0.9, 1).backward()

    step()
    ops = launch_ops(step)
    # autograd's upstream gradient of 1 and the sum over rows; the rest is scalar code in the native op
    assert sorted(ops) == ["aten::ones_like", "aten::sum"], ops
    assert "aten::_local_scalar_dense" not in ops

