"""No silent wrong answers from the ops: arguments on other devices (meta included) and of wrong types
are clear errors, second-order gradients are right or refused, rare ids never wrap, out-of-vocabulary
targets fail on every backend, numpy seeds equal Python seeds, and empty or strided inputs give the
documented results."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import diffkernels as dk
from diffkernels.mdm import masked_cross_entropy, masked_diffusion_loss, mask_tokens
from diffkernels.mdm import samplers as S
from diffkernels.mdm.syrm import syrm_weights
from diffkernels.mdm.variance import variance_decomposition
from diffkernels.reference import sparse_mse as ref_sparse

META = torch.device("meta")
H, V = 4, 7


class PassThrough(TorchDispatchMode):
    """Changes nothing, but makes the ops take their custom-op path."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def lm_batch(gen, B=2, L=5, dtype=torch.float32):
    ids = torch.randint(0, V - 1, (B, L), generator=gen)
    masked = mask_tokens(ids, 0.6, int(torch.randint(0, 2**40, (1,), generator=gen)), mask_id=V - 1)
    hidden = torch.randn(B, L, H, generator=gen, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, H, generator=gen, dtype=dtype, requires_grad=True)
    bias = torch.randn(V, generator=gen, dtype=dtype, requires_grad=True)
    return ids, masked, hidden, weight, bias


# --- 1. devices: every tensor argument on one device, meta rejected outside tracing ------------


def test_lm_head_bias_on_meta_is_an_error_not_garbage(gen):
    """A meta bias (as after an empty-weights init) used to dispatch the shape-only fake kernel,
    whose loss and gradients were uninitialised memory."""
    ids, masked, hidden, weight, _ = lm_batch(gen)
    bias = torch.empty(V, device=META)
    with pytest.raises(ValueError, match="lm_head_bias must be on the device of hidden"):
        masked_diffusion_loss(masked, ids, hidden=hidden, lm_head_weight=weight, lm_head_bias=bias)
    with pytest.raises(ValueError, match="lm_head_bias must be on the device of hidden"):
        masked_cross_entropy(ids, masked.weights, hidden=hidden, lm_head_weight=weight, lm_head_bias=bias)


def test_custom_ops_called_directly_refuse_mixed_devices(gen):
    """The dispatcher runs the fake kernel when one argument is a meta tensor: it must fail."""
    N = 6
    hidden, weight = torch.randn(N, H, generator=gen), torch.randn(V, H, generator=gen)
    targets, coef = torch.randint(0, V, (N,), generator=gen), torch.ones(N)
    with pytest.raises(ValueError, match="one device"):
        torch.ops.diffkernels.masked_ce_hidden(hidden, weight, torch.empty(V, device=META), targets, coef, 0, True)
    with pytest.raises(ValueError, match="one device"):
        torch.ops.diffkernels.masked_ce_logits(torch.randn(N, V), targets, coef.to(META), 0, True)
    pred = torch.randn(3, 4, generator=gen)
    with pytest.raises(ValueError, match="one device"):
        torch.ops.diffkernels.sparse_mse(pred, pred.clone(), torch.ones(3, device=META), 0.5, 1, 1, "expected",
                                         "mean", False)
    with pytest.raises(ValueError, match="one device"):
        torch.ops.diffkernels.sparse_mse_grad(pred, pred.to(META), torch.ones(3), 0.5, 1, 1)
    with pytest.raises(ValueError, match="one device"):
        torch.ops.diffkernels.scale_rows_(pred, torch.ones(3, device=META))
    ids = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="one device"):
        torch.ops.diffkernels.mask_tokens(ids, torch.ones(2, 8), 1, 9, torch.ones(2, 3, dtype=torch.bool, device=META),
                                          None, False)


def _lm_calls(gen):
    """(argument name, call with that argument moved to meta) for every tensor argument of the LM ops."""
    ids, masked, hidden, weight, bias = lm_batch(gen)
    logits = torch.randn(2, 5, V, generator=gen, requires_grad=True)
    m = lambda t: t.detach().to(META)  # noqa: E731

    def ce(**over):
        kw = dict(hidden=hidden, lm_head_weight=weight, lm_head_bias=bias)
        kw.update(over)
        args = dict(targets=ids, coef=masked.weights)
        for k in ("targets", "coef"):
            if k in kw:
                args[k] = kw.pop(k)
        return lambda: masked_cross_entropy(args["targets"], args["coef"], **kw)

    def mdl(**over):
        kw = dict(hidden=hidden, lm_head_weight=weight, importance=torch.ones(2))
        kw.update(over)
        targets = kw.pop("targets", ids)
        return lambda: masked_diffusion_loss(masked, targets, **kw)

    return [
        ("targets", ce(targets=m(ids))), ("coef", ce(coef=m(masked.weights))),
        ("lm_head_weight", ce(lm_head_weight=m(weight))), ("lm_head_bias", ce(lm_head_bias=m(bias))),
        ("targets", lambda: masked_cross_entropy(m(ids), masked.weights, logits=logits)),
        ("coef", lambda: masked_cross_entropy(ids, m(masked.weights), logits=logits)),
        ("targets", mdl(targets=m(ids))), ("importance", mdl(importance=torch.ones(2, device=META))),
        ("device of hidden", mdl(hidden=m(hidden), lm_head_weight=m(weight))),
    ]


def test_every_lm_tensor_argument_is_device_checked(gen):
    for name, call in _lm_calls(gen):
        with pytest.raises(ValueError, match=f"{name}( must be on the device|( \\(meta\\))?, got)"):
            call()


def test_every_sparse_and_mask_tensor_argument_is_device_checked(gen):
    pred, target = torch.randn(2, 6, generator=gen), torch.randn(2, 6, generator=gen)
    with pytest.raises(ValueError, match="weight must be on the device of pred"):
        dk.sparse_mse_loss(pred, target, 0.5, 1, weight=torch.ones(2, device=META))
    ids = torch.randint(0, 9, (2, 6), generator=gen)
    calls = {
        "eligible": dict(eligible=torch.ones(2, 6, dtype=torch.bool, device=META)),
        "p": dict(p=torch.full((2,), 0.5, device=META)),
        "rare": dict(rare=torch.tensor([1, 2], device=META), rare_delta=0.1),
    }
    for name, kw in calls.items():
        kw = {"p": 0.5, **kw}
        with pytest.raises(ValueError, match=f"{name} must .*device"):
            mask_tokens(ids, kw.pop("p"), 1, mask_id=99, **kw)


def test_meta_tensors_are_rejected_by_every_public_function():
    m = torch.empty(2, 3, device=META)
    with pytest.raises(ValueError, match="meta tensors are not supported"):
        dk.sparse_mse_loss(m, m, 0.5, 1)
    with pytest.raises(ValueError, match="meta tensors are not supported"):
        dk.SparseMSELoss(0.5)(m, m, 1)
    with pytest.raises(ValueError, match="meta tensors are not supported"):
        dk.sparse_mask((2, 3), 0.5, 1, device="meta")
    with pytest.raises(ValueError, match="meta tensors are not supported"):
        mask_tokens(torch.zeros(2, 3, dtype=torch.int64, device=META), 0.5, 1, mask_id=9)
    t, c = torch.zeros(2, dtype=torch.int64, device=META), torch.ones(2, device=META)
    with pytest.raises(ValueError, match="meta tensors are not supported"):
        masked_cross_entropy(t, c, logits=torch.empty(2, V, device=META))
    with pytest.raises(ValueError, match="meta tensors are not supported"):
        masked_cross_entropy(t, c, hidden=torch.empty(2, H, device=META), lm_head_weight=torch.empty(V, H, device=META))


def test_fake_tensor_tracing_still_works():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        ids = torch.zeros(2, 5, dtype=torch.int64)
        masked = mask_tokens(ids, torch.full((2,), 0.5), 1, mask_id=V - 1, mode="mirror", rare=[1], rare_delta=0.1)
        assert masked.noisy_ids.shape == (4, 5)
        hidden = torch.empty(4, 5, H, requires_grad=True)
        weight = torch.empty(V, H, requires_grad=True)
        loss = masked_diffusion_loss(masked, ids, hidden=hidden, lm_head_weight=weight, lm_head_bias=torch.empty(V))
        assert loss.shape == () and loss.dtype == torch.float32
        # meta tensors inside fake-tensor tracing keep their shape-only meaning
        pred = torch.empty(3, 4, device=META)
        assert dk.sparse_mse_loss(pred, pred, 0.5, 1, reduction="none").shape == (3,)


# --- 2. second-order gradients ------------------------------------------------------------------


def _penalty_weight_grad(loss_fn, device="cpu"):
    """d/dW of ||d loss / dW||^2 for a tiny tanh layer: needs the loss's second derivative."""
    g = torch.Generator().manual_seed(0)
    x, target = (torch.randn(4, 6, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    W = torch.randn(6, 6, generator=g, dtype=torch.float64).to(device).requires_grad_()
    loss = loss_fn(torch.tanh(x @ W), target)
    (gw,) = torch.autograd.grad(loss, W, create_graph=True)
    (out,) = torch.autograd.grad(gw.pow(2).sum(), W)
    return out


def test_gradient_penalty_through_recompute_matches_reference(backend_device):
    _, device = backend_device
    expected = _penalty_weight_grad(lambda p, t: ref_sparse.sparse_mse_loss(p, t, 0.5, 3), device)
    got = _penalty_weight_grad(lambda p, t: dk.sparse_mse_loss(p, t, 0.5, 3, backward="recompute"), device)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("normalize,reduction,granularity", [
    ("expected", "mean", "element"), ("kept", "none", "pixel"), ("all", "sum", "element")])
@pytest.mark.parametrize("custom_op", [False, True], ids=["eager", "custom_op"])
def test_recompute_gradgradcheck_float64(backend_device, normalize, reduction, granularity, custom_op):
    backend, device = backend_device
    if backend == "triton" and not torch.cuda.is_available() and (normalize != "kept" or custom_op):
        pytest.skip("the interpreter takes ~10 s per gradgradcheck: one case covers the Triton kernels")
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 2, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    target = torch.randn(2, 2, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    weight = (torch.rand(2, generator=g, dtype=torch.float64) + 0.5).to(device).requires_grad_()

    def f(p, t, w):
        return dk.sparse_mse_loss(p, t, 0.4, 11, weight=w, normalize=normalize, reduction=reduction,
                                  granularity=granularity, backward="recompute")

    if custom_op:
        with PassThrough():
            assert torch.autograd.gradgradcheck(f, (pred, target, weight))
    else:
        assert torch.autograd.gradgradcheck(f, (pred, target, weight))


def test_fused_backward_refuses_create_graph():
    with pytest.raises(RuntimeError, match="backward='recompute'"):
        _penalty_weight_grad(lambda p, t: dk.sparse_mse_loss(p, t, 0.5, 3))
    with PassThrough(), pytest.raises(RuntimeError, match="backward='recompute'"):
        _penalty_weight_grad(lambda p, t: dk.sparse_mse_loss(p, t, 0.5, 3))


def test_masked_ce_refuses_create_graph(gen):
    ids, masked, hidden, weight, bias = lm_batch(gen)
    for kw in (dict(hidden=hidden, lm_head_weight=weight, lm_head_bias=bias),
               dict(logits=(hidden @ weight.t()).detach().requires_grad_())):
        loss = masked_diffusion_loss(masked, ids, **kw)
        with pytest.raises(RuntimeError, match="no second-order gradients"):
            torch.autograd.grad(loss, next(iter(kw.values())), create_graph=True)


# --- 3. rare ids ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rare", [[2**32 + 1], [-(2**32) + 1], [2**70 + 1], torch.tensor([2**32 + 1])], ids=str)
def test_rare_ids_beyond_int32_never_alias(rare):
    """With int32 ids, rare id 2**32 + 1 used to be cast to int32, where it wraps to 1."""
    ids = torch.tensor([[1, 2, 1, 3, 1, 1, 4, 1]] * 3, dtype=torch.int32)
    plain = mask_tokens(ids, 0.3, 5, mask_id=99)
    out = mask_tokens(ids, 0.3, 5, mask_id=99, rare=rare, rare_delta=0.6)
    assert torch.equal(out.masked, plain.masked) and torch.equal(out.weights, plain.weights)
    # the same id that does fit does change the mask
    hit = mask_tokens(ids, 0.3, 5, mask_id=99, rare=[1], rare_delta=0.6)
    assert not torch.equal(hit.weights, plain.weights)


@pytest.mark.parametrize("empty", [[], (), torch.tensor([], dtype=torch.int64), np.array([], dtype=np.int64)], ids=str)
def test_empty_rare_means_no_rare_tokens(empty):
    ids = torch.randint(0, 10, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = mask_tokens(ids, 0.4, 7, mask_id=99)
    out = mask_tokens(ids, 0.4, 7, mask_id=99, rare=empty, rare_delta=0.5)
    assert torch.equal(out.masked, plain.masked) and torch.equal(out.weights, plain.weights)


def test_rare_as_numpy_or_unsigned_tensor():
    ids = torch.randint(0, 10, (2, 16), generator=torch.Generator().manual_seed(0))
    want = mask_tokens(ids, 0.4, 7, mask_id=99, rare=[3, 4], rare_delta=0.5)
    for rare in (np.array([3, 4]), torch.tensor([3, 4], dtype=torch.uint32),
                 torch.tensor([[3], [4]], dtype=torch.int16), {3, 4}, [3, 4, 2**70]):
        out = mask_tokens(ids, 0.4, 7, mask_id=99, rare=rare, rare_delta=0.5)
        assert torch.equal(out.weights, want.weights)
    for bad in ([1.5], [True], "12", torch.tensor([1.0]), torch.tensor([1], dtype=torch.uint64)):
        with pytest.raises(TypeError, match="rare"):
            mask_tokens(ids, 0.4, 7, mask_id=99, rare=bad)


# --- 4. out-of-vocabulary targets and scalar arguments ---------------------------------------------


@pytest.mark.parametrize("form", ["logits", "hidden"])
@pytest.mark.parametrize("bad", [V, V + 5, -1, -100])
def test_out_of_vocabulary_target_is_the_same_error_on_every_backend(backend_device, form, bad):
    """The Triton path used to return NaN, the plain path an indexing RuntimeError."""
    backend, device = backend_device
    if device == "cuda":
        pytest.skip("on CUDA tensors the check is an asynchronous device-side assert")
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, V, (6,), generator=g)
    coef = torch.ones(6)
    coef[0] = 0.0
    targets[0] = -100  # no loss there: any id is fine and never read
    kw = (dict(logits=torch.randn(6, V, generator=g, requires_grad=True)) if form == "logits" else
          dict(hidden=torch.randn(6, H, generator=g, requires_grad=True),
               lm_head_weight=torch.randn(V, H, generator=g)))
    kw = {k: v.to(device) for k, v in kw.items()}
    targets, coef = targets.to(device), coef.to(device)
    assert torch.isfinite(masked_cross_entropy(targets, coef, **kw))
    targets[3] = bad
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, V\).*token 3 has target"):
        masked_cross_entropy(targets, coef, **kw)


def test_empty_vocabulary_is_rejected():
    with pytest.raises(ValueError, match="V = 0"):
        masked_cross_entropy(torch.zeros(2, dtype=torch.int64), torch.ones(2), logits=torch.empty(2, 0))
    with pytest.raises(ValueError, match="V = 0"):
        masked_cross_entropy(torch.zeros(2, dtype=torch.int64), torch.ones(2), hidden=torch.randn(2, H),
                             lm_head_weight=torch.empty(0, H))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(normalizer="global", num_tokens=math.inf), ValueError, "num_tokens"),
    (dict(normalizer="global", num_tokens=math.nan), ValueError, "num_tokens"),
    (dict(normalizer="global", num_tokens=0), ValueError, "num_tokens"),
    (dict(normalizer="global", num_tokens=-3.0), ValueError, "num_tokens"),
    (dict(normalizer="global", num_tokens="5"), TypeError, "num_tokens"),
    (dict(normalizer="global", num_tokens=torch.tensor(5.0)), TypeError, "num_tokens"),
    (dict(num_tokens=5.0), ValueError, "num_tokens applies"),
    (dict(row_clamp=math.inf), ValueError, "row_clamp"),
    (dict(row_clamp=math.nan), ValueError, "row_clamp"),
    (dict(row_clamp=-1.0), ValueError, "row_clamp"),
    (dict(row_clamp="1.0"), TypeError, "row_clamp"),
    (dict(chunk_size="4"), TypeError, "chunk_size"),
    (dict(chunk_size=-1), TypeError, "chunk_size"),
])
def test_bad_scalar_arguments_of_the_lm_loss(gen, kwargs, exc, match):
    ids, masked, hidden, weight, _ = lm_batch(gen)
    with pytest.raises(exc, match=match):
        masked_diffusion_loss(masked, ids, hidden=hidden, lm_head_weight=weight, **kwargs)


def test_numpy_scalars_are_accepted(gen):
    ids, masked, hidden, weight, _ = lm_batch(gen)
    a = masked_diffusion_loss(masked, ids, hidden=hidden, lm_head_weight=weight, normalizer="global", num_tokens=7)
    b = masked_diffusion_loss(masked, ids, hidden=hidden, lm_head_weight=weight, normalizer="global",
                              num_tokens=np.float32(7))
    assert torch.equal(a, b)
    pred, target = torch.randn(2, 6, generator=gen), torch.randn(2, 6, generator=gen)
    assert torch.equal(dk.sparse_mse_loss(pred, target, np.float64(0.25), 1), dk.sparse_mse_loss(pred, target, 0.25, 1))


def test_string_floats_are_type_errors_everywhere():
    pred = torch.randn(2, 6)
    ids = torch.randint(0, 9, (2, 6))
    calls = {
        "mask_ratio": [lambda: dk.sparse_mse_loss(pred, pred, "0.9", 1), lambda: dk.sparse_mask((2, 6), "0.9", 1),
                       lambda: dk.SparseMSELoss("0.9")],
        "p": [lambda: mask_tokens(ids, "0.5", 1, mask_id=99)],
        "rare_delta": [lambda: mask_tokens(ids, 0.5, 1, mask_id=99, rare=[1], rare_delta="0.2")],
        "mirror_max_t": [lambda: mask_tokens(ids, 0.5, 1, mask_id=99, mode="mirror", mirror_max_t="0.5")],
        "alpha": [lambda: syrm_weights(ids, ids > 4, syntax_ids=[1], alpha="0.5")],
        "t_min": [lambda: S.Clipped("0.1", 0.9)],
        "seed": [lambda: dk.sparse_mse_loss(pred, pred, 0.5, "1"), lambda: mask_tokens(ids, 0.5, "1", mask_id=99),
                 lambda: S.Uniform().sample(2, "1")],
    }
    for name, fns in calls.items():
        for fn in fns:
            with pytest.raises(TypeError, match=name):
                fn()


# --- 5. seeds: numpy integers are the same seeds as Python ints -------------------------------------


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if dataclasses.is_dataclass(a):
        return _same(list(vars(a).values()), list(vars(b).values()))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def _loss_fn(x, t, seed, **_):
    return float(torch.rand(1, generator=torch.Generator().manual_seed(seed % 2**63)).item()) + x * t


def _seeded_calls():
    pred, target = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    ids = torch.randint(0, 9, (3, 12), generator=torch.Generator().manual_seed(0))
    grid = S.PPOTSGrid(t=torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), g=torch.tensor([1.0, 2.0, 4.0]),
                       v=torch.zeros(3), w=torch.tensor([1.0, 2.0, 4.0]))
    ppots = S.PPOTSSampler([0.0, 0.5, 1.0], [1.0, 2.0, 3.0], stratify=True)
    param = torch.ones(3, requires_grad=True)
    return {
        "sparse_mse_loss": lambda s: dk.sparse_mse_loss(pred, target, 0.5, s, granularity="pixel"),
        "SparseMSELoss": lambda s: dk.SparseMSELoss(0.5)(pred, target, s),
        "sparse_mask": lambda s: dk.sparse_mask((2, 3, 4), 0.5, s),
        "mask_tokens": lambda s: mask_tokens(ids, 0.5, s, mask_id=99, mode="mirror", rare=[1], rare_delta=0.2),
        **{f"{type(smp).__name__}.sample": (lambda smp: lambda s: smp.sample(3, s, rank=1, world_size=2))(smp)
           for smp in (S.Uniform(), S.Stratified(), S.LowDiscrepancy(), S.Clipped(0.1, 0.9), ppots)},
        "sample_global": lambda s: S.Stratified(3).sample_global(7, s),
        "estimate_ppots_grid": lambda s: S.estimate_ppots_grid(_loss_fn, [0.5, 1.0], T=3, a=2, c=2, seed=s,
                                                               progress=False),
        "fit_epr": lambda s: S.fit_epr(grid, restarts=2, seed=s) if _has_scipy() else None,
        "variance_decomposition": lambda s: variance_decomposition(_loss_fn, [0.5, 1.0, 2.0], n_x=3, n_t=2, n_m=2,
                                                                   seed=s, progress=False),
        "projection_seed": lambda s: variance_decomposition(
            lambda x, t, seed, **_: (param * x * t).sum(), [0.5, 1.0], n_x=3, n_t=2, n_m=2, seed=1, grad=True,
            params=[param], num_projections=2, projection_seed=s, progress=False).grad,
    }


def _has_scipy():
    import importlib.util

    return importlib.util.find_spec("scipy") is not None


@pytest.mark.parametrize("name", list(_seeded_calls()))
def test_numpy_seed_equals_python_seed(name):
    call = _seeded_calls()[name]
    for py, npy in ((123456789, np.int64(123456789)), (2**64 - 1, np.uint64(2**64 - 1)), (-1, np.int32(-1))):
        assert _same(call(py), call(npy)), (name, py)
    with pytest.raises(TypeError, match="seed"):
        call(np.float64(1.0))


# --- 6. empty and strided inputs --------------------------------------------------------------------


def test_empty_inputs(backend_device):
    _, device = backend_device
    for shape in ((0, 3, 4), (0,), (0, 0)):
        pred = torch.zeros(shape, device=device, requires_grad=True)
        weight = torch.ones(0, device=device, requires_grad=True)
        for backward in ("fused", "recompute"):
            loss = dk.sparse_mse_loss(pred, torch.zeros(shape, device=device), 0.5, 1, weight=weight, reduction="sum",
                                      normalize="kept", backward=backward)
            gp, gw = torch.autograd.grad(loss, (pred, weight))
            assert loss.item() == 0.0 and gp.shape == shape and gw.shape == (0,)
    with pytest.raises(ValueError, match="no elements per sample"):
        dk.sparse_mse_loss(torch.zeros(2, 0, device=device), torch.zeros(2, 0, device=device), 0.5, 1)
    assert dk.sparse_mask((3, 0, 2), 0.5, 1, granularity="pixel", device=device).shape == (3, 0, 2)
    for B, L in ((0, 5), (3, 0), (0, 0)):
        ids = torch.zeros(B, L, dtype=torch.int64, device=device)
        out = mask_tokens(ids, 0.5, 1, mask_id=9, mode="mirror", rare=[1], rare_delta=0.1,
                          eligible=torch.ones(B, L, dtype=torch.bool, device=device))
        assert out.noisy_ids.shape == (2 * B, L) and out.eligible_count.shape == (B,)
        hidden = torch.randn(2 * B, L, H, device=device, requires_grad=True)
        weight = torch.randn(V, H, device=device, requires_grad=True)
        for kw in (dict(hidden=hidden, lm_head_weight=weight),
                   dict(logits=torch.randn(2 * B, L, V, device=device, requires_grad=True))):
            loss = masked_diffusion_loss(out, ids, **kw)
            grads = torch.autograd.grad(loss, list(kw.values()))
            assert loss.item() == 0.0 and all(not g.any() for g in grads)


def test_zero_hidden_size_is_bias_only(backend_device):
    """H = 0: the logits are the bias alone (reshape(-1, 0) used to fail)."""
    _, device = backend_device
    g = torch.Generator().manual_seed(0)
    targets, coef = torch.randint(0, V, (4,), generator=g), torch.rand(4, generator=g) + 0.5
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    hidden = torch.empty(4, 0, dtype=torch.float64, device=device)
    weight = torch.empty(V, 0, dtype=torch.float64, device=device)
    b = bias.to(device).requires_grad_()
    loss = masked_cross_entropy(targets.to(device), coef.to(device), hidden=hidden, lm_head_weight=weight,
                                lm_head_bias=b)
    b_ref = bias.clone().requires_grad_()
    expected = (coef.double() * torch.nn.functional.cross_entropy(b_ref.expand(4, V), targets, reduction="none")).sum()
    torch.testing.assert_close(loss.cpu(), expected.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.autograd.grad(loss, b)[0].cpu(), torch.autograd.grad(expected, b_ref)[0],
                               rtol=1e-12, atol=1e-15)


def test_strided_inputs(backend_device):
    """Non-contiguous views give the results of their contiguous copies."""
    _, device = backend_device
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, 10, generator=g).to(device)
    pred, target = base[:, :, ::2].transpose(1, 2), base.flip(0)[:, :, 1::2].transpose(1, 2)
    weight = torch.rand(8, generator=g).to(device)[::2] + 0.5
    for gran in ("element", "pixel"):
        got = dk.sparse_mse_loss(pred, target, 0.5, 9, weight=weight, granularity=gran, reduction="none")
        want = dk.sparse_mse_loss(pred.contiguous(), target.contiguous(), 0.5, 9, weight=weight.contiguous(),
                                  granularity=gran, reduction="none")
        assert torch.equal(got, want)
        ref = ref_sparse.sparse_mse_loss(pred, target, 0.5, 9, weight=weight, granularity=gran, reduction="none")
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)

    ids = torch.randint(0, 9, (3, 20), generator=g).to(device)
    eligible = (torch.rand(20, 3, generator=g) > 0.2).to(device).t()
    p = (torch.rand(6, generator=g) * 0.8 + 0.1).to(device)[::2]
    got = mask_tokens(ids[:, ::2], p, 4, mask_id=99, eligible=eligible[:, ::2], rare=[1], rare_delta=0.2)
    want = mask_tokens(ids[:, ::2].contiguous(), p.contiguous(), 4, mask_id=99, eligible=eligible[:, ::2].contiguous(),
                       rare=[1], rare_delta=0.2)
    for f in ("noisy_ids", "masked", "weights", "eligible_count"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f


def test_strided_targets_and_coef_of_the_masked_ce(backend_device):
    """1-D strided targets and coef reach the Triton kernel, which indexes them as flat arrays."""
    _, device = backend_device
    g = torch.Generator().manual_seed(0)
    N = 6
    targets = torch.randint(0, V, (2 * N,), generator=g).to(device)[::2]
    coef = (torch.rand(2 * N, generator=g) + 0.5).to(device)[1::2]
    logits = torch.randn(N, V, generator=g, dtype=torch.float64).to(device)
    hidden = torch.randn(N, 2 * H, generator=g).to(device)[:, ::2]
    weight = torch.randn(H, V, generator=g).to(device).t()
    expected = (coef.double() * torch.nn.functional.cross_entropy(logits, targets, reduction="none")).sum()
    for x in (logits.float(), logits.float().t().contiguous().t()):
        got = masked_cross_entropy(targets, coef, logits=x)
        torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=0)
    expected = (coef.double() * torch.nn.functional.cross_entropy(hidden.double() @ weight.double().t(), targets,
                                                                  reduction="none")).sum()
    bias = torch.zeros(2 * V, device=device)[::2]
    got = masked_cross_entropy(targets, coef, hidden=hidden, lm_head_weight=weight, lm_head_bias=bias)
    torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=0)


def test_mask_tokens_accepts_a_numpy_integer_mask_id():
    import numpy as np

    ids = torch.randint(0, 50, (2, 16))
    p = torch.tensor([0.3, 0.7])
    a = mask_tokens(ids, p, 5, mask_id=np.int64(99))
    b = mask_tokens(ids, p, 5, mask_id=99)
    assert torch.equal(a.noisy_ids, b.noisy_ids) and torch.equal(a.masked, b.masked)
    with pytest.raises(TypeError, match="mask_id"):
        mask_tokens(ids, p, 5, mask_id=99.0)


def test_uniform_rejects_meta_indices_clearly():
    from diffkernels.rng import uniform

    with pytest.raises(ValueError, match="meta tensors are not supported"):
        uniform(3, torch.arange(8, device="meta"))
    with pytest.raises(TypeError, match="torch.Tensor"):
        uniform(3, [1, 2, 3])
