"""Bad input gets a clear error that names the argument."""

import pytest
import torch

import diffkernels as dk


def good():
    return torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(mask_ratio=1.0), ValueError, "mask_ratio"),
    (dict(mask_ratio=-0.1), ValueError, "mask_ratio"),
    (dict(mask_ratio=float("nan")), ValueError, "mask_ratio"),
    (dict(mask_ratio=True), TypeError, "mask_ratio"),
    (dict(mask_ratio=torch.tensor(0.5)), TypeError, "mask_ratio"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(seed=True), TypeError, "seed"),
    (dict(granularity="voxel"), ValueError, "granularity"),
    (dict(normalize="batch"), ValueError, "normalize"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(backward="lazy"), ValueError, "backward"),
    (dict(weight=torch.ones(3)), ValueError, "weight"),
    (dict(weight=torch.ones(2, 1)), ValueError, "weight"),
    (dict(weight=torch.ones(2, dtype=torch.int64)), TypeError, "weight"),
    (dict(weight=[1.0, 1.0]), TypeError, "weight"),
])
def test_bad_arguments(kwargs, exc, match):
    pred, target = good()
    args = dict(mask_ratio=0.5, seed=1)
    args.update({k: v for k, v in kwargs.items() if k in ("mask_ratio", "seed")})
    rest = {k: v for k, v in kwargs.items() if k not in ("mask_ratio", "seed")}
    with pytest.raises(exc, match=match):
        dk.sparse_mse_loss(pred, target, args["mask_ratio"], args["seed"], **rest)


def test_bad_tensors():
    pred, target = good()
    with pytest.raises(ValueError, match="same shape"):
        dk.sparse_mse_loss(pred, target[:, :2], 0.5, 1)
    with pytest.raises(TypeError, match="same dtype"):
        dk.sparse_mse_loss(pred, target.double(), 0.5, 1)
    with pytest.raises(TypeError, match="pred must be a floating-point"):
        dk.sparse_mse_loss(pred.long(), target.long(), 0.5, 1)
    with pytest.raises(TypeError, match="target must be a floating-point"):
        dk.sparse_mse_loss(pred, target.int(), 0.5, 1)
    with pytest.raises(TypeError, match="pred must be a torch.Tensor"):
        dk.sparse_mse_loss(pred.numpy(), target, 0.5, 1)
    with pytest.raises(ValueError, match="0-d"):
        dk.sparse_mse_loss(torch.tensor(1.0), torch.tensor(2.0), 0.5, 1)
    with pytest.raises(ValueError, match="no elements per sample"):
        dk.sparse_mse_loss(torch.zeros(2, 0), torch.zeros(2, 0), 0.5, 1)
    with pytest.raises(ValueError, match="granularity='pixel'.*no channel dimension"):
        dk.sparse_mse_loss(torch.zeros(4), torch.zeros(4), 0.5, 1, granularity="pixel")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="same device"):
            dk.sparse_mse_loss(pred, target.cuda(), 0.5, 1)
        with pytest.raises(ValueError, match="weight must be on"):
            dk.sparse_mse_loss(pred, target, 0.5, 1, weight=torch.ones(2, device="cuda"))
    else:
        with pytest.raises(ValueError, match="same device"):
            dk.sparse_mse_loss(pred, target.to("meta"), 0.5, 1)


def test_sparse_mask_errors():
    with pytest.raises(ValueError, match="batch dimension"):
        dk.sparse_mask((), 0.5, 1)
    with pytest.raises(ValueError, match="non-negative"):
        dk.sparse_mask((2, -1), 0.5, 1)
    with pytest.raises(ValueError, match="mask_ratio"):
        dk.sparse_mask((2, 3), 1.5, 1)
    with pytest.raises(ValueError, match="no channel dimension"):
        dk.sparse_mask((5,), 0.5, 1, granularity="pixel")


def test_large_seeds_are_accepted():
    pred, target = good()
    for seed in (2**64 - 1, -(2**63), 2**70 + 5):
        assert torch.isfinite(dk.sparse_mse_loss(pred, target, 0.5, seed))
    assert torch.equal(dk.sparse_mask((2, 8), 0.5, -1), dk.sparse_mask((2, 8), 0.5, 2**64 - 1))
