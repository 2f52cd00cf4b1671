"""mask_tokens: bit-exact against the reference on every backend, and the estimators it feeds are unbiased."""

import itertools

import pytest
import torch

import diffkernels as dk
from diffkernels.mdm.masking import mask_tokens
from diffkernels.reference import mask_tokens as ref
from diffkernels.rng import uniform

RARE = [3, 4, 5]


def make_batch(gen, B=5, L=37, dtype=torch.int64, device="cpu"):
    ids = torch.randint(0, 50, (B, L), generator=gen, dtype=dtype)
    p = torch.rand(B, generator=gen) * 0.95 + 0.04
    eligible = torch.rand(B, L, generator=gen) > 0.25
    return ids.to(device), p.to(device), eligible.to(device)


CASES = [
    dict(mode="standard"),
    dict(mode="standard", use_eligible=True, use_rare=True),
    dict(mode="mirror"),
    dict(mode="mirror", use_eligible=True, mirror_max_t=0.6),
    dict(mode="mirror", use_rare=True, union_weights=True),
    dict(mode="mirror", use_eligible=True, use_rare=True, union_weights=True, mirror_max_t=0.5),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=str)
def test_matches_reference_bit_for_bit(backend_device, gen, case, dtype):
    _, device = backend_device
    ids, p, eligible = make_batch(gen, dtype=dtype, device=device)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen)) * 3
    kw = dict(mask_id=99, mode=case["mode"], rare_delta=0.2)
    if case.get("use_eligible"):
        kw["eligible"] = eligible
    if case.get("use_rare"):
        kw["rare"] = RARE
    if case.get("union_weights"):
        kw["union_weights"] = True
    if "mirror_max_t" in case:
        kw["mirror_max_t"] = case["mirror_max_t"]
    out = mask_tokens(ids, p, seed, **kw)

    mirror = case["mode"] == "mirror"
    rows = (p < case["mirror_max_t"]) if "mirror_max_t" in case else (torch.ones_like(p, dtype=torch.bool) if mirror else None)
    rare = torch.isin(ids, torch.tensor(RARE, dtype=ids.dtype, device=device)) if case.get("use_rare") else None
    noisy, masked, weights = ref.mask_tokens(
        ids, p, seed, mask_id=99, eligible=kw.get("eligible"), mirror=mirror, mirror_rows=rows, rare=rare,
        rare_delta=0.2, union_weights=case.get("union_weights", False))
    B, L = ids.shape
    copies = 2 if mirror else 1
    assert out.noisy_ids.shape == (copies * B, L) and out.noisy_ids.dtype == dtype
    assert torch.equal(out.noisy_ids, noisy.view(-1, L))
    assert torch.equal(out.masked, masked.view(-1, L))
    assert torch.equal(out.weights, weights.view(-1, L))
    expected_count = eligible.sum(1) if "eligible" in kw else torch.full((B,), L, device=device)
    assert torch.equal(out.eligible_count, expected_count)
    assert torch.equal(out.source_row, torch.arange(B, device=device).repeat(copies))
    assert torch.equal(out.p, p.repeat(copies))


def test_mirror_copies_are_antithetic(gen):
    ids, p, _ = make_batch(gen, B=8, L=500)
    p[:4] = torch.rand(4, generator=gen) * 0.5  # p <= 1/2: the two copies must be disjoint
    seed = 77
    out = mask_tokens(ids, p, seed, mask_id=99, mode="mirror")
    B, L = ids.shape
    u = uniform(seed, torch.arange(B * L)).view(B, L)
    m1, m2 = out.masked[:B], out.masked[B:]
    assert torch.equal(m1, u < p[:, None])
    assert torch.equal(m2, u > 1 - p[:, None])
    assert not (m1[:4] & m2[:4]).any()
    assert torch.equal(out.row_weight, torch.full((2 * B,), 0.5))


def test_mirror_max_t_switches_off_second_copies(gen):
    ids, p, _ = make_batch(gen, B=6, L=40)
    p = torch.tensor([0.1, 0.95, 0.5, 0.89, 0.91, 0.3])
    out = mask_tokens(ids, p, 5, mask_id=99, mode="mirror", mirror_max_t=0.9)
    on = p < 0.9
    assert torch.equal(out.row_weight, torch.cat([torch.where(on, 0.5, 1.0), torch.where(on, 0.5, 0.0)]))
    assert not out.masked[6:][~on].any() and (out.weights[6:][~on] == 0).all()


def test_isad_tokens_use_q(gen):
    L = 20000
    ids = torch.randint(0, 10, (2, L), generator=gen)
    p = torch.tensor([0.3, 0.85])
    out = mask_tokens(ids, p, 3, mask_id=99, rare=[1, 2], rare_delta=0.2)
    rare = (ids == 1) | (ids == 2)
    for b, q in ((0, 0.5), (1, 1.0)):
        w = out.weights[b][out.masked[b] & rare[b]]
        assert torch.all(w == torch.tensor(1.0, dtype=torch.float32) / torch.tensor(q, dtype=torch.float32))
        rate = out.masked[b][rare[b]].double().mean()
        assert abs(float(rate) - q) < 5 * (q * (1 - q) / int(rare[b].sum())) ** 0.5 + 1e-12


@pytest.mark.parametrize("kw", [dict(mode="standard"), dict(mode="mirror"), dict(mode="mirror", union_weights=True),
                                dict(mode="standard", rare=[0, 1, 2], rare_delta=0.3)], ids=str)
def test_weighted_masked_sum_is_unbiased(gen, kw):
    """E[sum_rows row_weight * sum_l weights * f] = sum over eligible tokens of f (Horvitz-Thompson)."""
    B, L, S = 4, 64, 400
    ids = torch.randint(0, 20, (B, L), generator=gen)
    p = torch.tensor([0.05, 0.3, 0.6, 0.97])
    eligible = torch.rand(B, L, generator=gen) > 0.3
    f = torch.rand(B, L, generator=gen, dtype=torch.float64) + 0.5
    target = (f * eligible).sum(1)
    estimates = []
    for s in range(S):
        out = mask_tokens(ids, p, s, mask_id=99, eligible=eligible, **kw)
        per_row = (out.weights.double() * f.repeat(out.noisy_ids.shape[0] // B, 1)).sum(1) * out.row_weight.double()
        estimates.append(torch.zeros(B, dtype=torch.float64).index_add_(0, out.source_row, per_row))
    est = torch.stack(estimates)
    se = est.std(0) / S**0.5
    assert torch.all((est.mean(0) - target).abs() <= 5 * se + 1e-9), (est.mean(0), target, se)


def test_mask_rate_matches_p(gen):
    ids = torch.zeros(3, 100_000, dtype=torch.int64)
    p = torch.tensor([0.02, 0.5, 0.9])
    out = mask_tokens(ids, p, 11, mask_id=1)
    rate = out.masked.double().mean(1)
    assert torch.all((rate - p.double()).abs() < 5 * (p.double() * (1 - p.double()) / 100_000).sqrt())


def test_errors():
    ids = torch.randint(0, 10, (2, 5))
    with pytest.raises(ValueError, match="p must lie in"):
        mask_tokens(ids, 0.0, 1, mask_id=99)
    with pytest.raises(ValueError, match="p must lie in"):
        mask_tokens(ids, 1.5, 1, mask_id=99)
    with pytest.raises(ValueError, match="p must lie in"):
        mask_tokens(ids, torch.tensor([0.5, 1.2]), 1, mask_id=99)
    with pytest.raises(TypeError, match="p must be"):
        mask_tokens(ids, True, 1, mask_id=99)
    with pytest.raises(ValueError, match="p must have shape"):
        mask_tokens(ids, torch.tensor([0.5, 0.5, 0.5]), 1, mask_id=99)
    with pytest.raises(TypeError, match="input_ids"):
        mask_tokens(ids.float(), 0.5, 1, mask_id=99)
    with pytest.raises(ValueError, match=r"shape \(B, L\)"):
        mask_tokens(ids[0], 0.5, 1, mask_id=99)
    with pytest.raises(ValueError, match="already occurs"):
        mask_tokens(ids, 0.5, 1, mask_id=int(ids[0, 0]))
    with pytest.raises(TypeError, match="eligible"):
        mask_tokens(ids, 0.5, 1, mask_id=99, eligible=torch.ones(2, 5))
    with pytest.raises(ValueError, match="eligible"):
        mask_tokens(ids, 0.5, 1, mask_id=99, eligible=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mode='mirror' only"):
        mask_tokens(ids, 0.5, 1, mask_id=99, union_weights=True)
    with pytest.raises(ValueError, match="mirror_max_t"):
        mask_tokens(ids, 0.5, 1, mask_id=99, mode="mirror", mirror_max_t=0.0)
    with pytest.raises(ValueError, match="mode"):
        mask_tokens(ids, 0.5, 1, mask_id=99, mode="antithetic")
    with pytest.raises(TypeError, match="rare"):
        mask_tokens(ids, 0.5, 1, mask_id=99, rare=[1.5])
    with pytest.raises(ValueError, match="does not fit"):
        mask_tokens(ids.int(), 0.5, 1, mask_id=2**40)
    # The collision check ignores ineligible positions (e.g. a prompt that contains the mask id).
    eligible = ids != 7
    mask_tokens(torch.where(eligible, ids, 7), 0.5, 1, mask_id=7, eligible=eligible)


def test_registration(backend_device):
    _, device = backend_device
    from diffkernels.ops.mask_tokens import row_table

    ids = torch.randint(0, 10, (3, 9), device=device)
    p = torch.tensor([0.2, 0.5, 0.7], device=device)
    table = row_table(p, 0.1, torch.tensor([True, False, True], device=device), True)
    eligible = torch.ones(3, 9, dtype=torch.bool, device=device)
    for args in [(ids, table, 5, 99, None, None, False), (ids, table, 5, 99, eligible, eligible, True)]:
        torch.library.opcheck(torch.ops.diffkernels.mask_tokens.default, args)


def test_compile_fullgraph():
    torch._dynamo.reset()

    def noisy_batch(ids, t, seed):
        p = (1 - 1e-3) * t + 1e-3
        return mask_tokens(ids, p, seed, mask_id=99, mode="mirror").noisy_ids

    ids = torch.randint(0, 10, (4, 16))
    t = torch.rand(4)
    compiled = torch.compile(noisy_batch, fullgraph=True)
    assert torch.equal(compiled(ids, t, 3), noisy_batch(ids, t, 3))
