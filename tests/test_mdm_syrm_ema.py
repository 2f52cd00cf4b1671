"""SyRM (eligible set, group weights, loss) on handmade examples, and the bin-wise EMA control
variate: update/adjust semantics against hand-computed sequences, its statistics against a direct
computation, and the gradient identity (the adjustment never changes the gradient)."""

import math

import pytest
import torch

from diffkernels.mdm.ema import BinnedEMABaseline
from diffkernels.mdm.masking import MaskedTokens, mask_tokens
from diffkernels.mdm.loss import masked_cross_entropy
from diffkernels.mdm.syrm import SyRMWeights, syrm_coefficients, syrm_loss, syrm_weights

T, F = True, False
INF = float("inf")

# --- SyRM: eligible set and weights -----------------------------------------------------------

IDS = torch.tensor([[5, 1, 7, 2, 9, 3],
                    [1, 1, 4, 2, 0, 0],
                    [2, 3, 4, 5, 6, 8]])
RESPONSE = torch.tensor([[F, F, F, T, T, T],
                         [F, F, F, T, F, F],   # positions 4, 5 are padding (id 0)
                         [F, F, T, T, T, T]])
PROMPT = torch.tensor([[T, T, T, F, F, F],
                       [T, T, T, F, F, F],
                       [T, T, F, F, F, F]])


def test_syrm_weights_from_ids():
    eligible, weight = syrm_weights(IDS, RESPONSE, syntax_ids=[1, 0], alpha=0.75, prompt_mask=PROMPT)
    assert torch.equal(eligible, torch.tensor([[F, T, F, T, T, T], [T, T, F, T, F, F], [F, F, T, T, T, T]]))
    assert weight.dtype == torch.float32
    assert torch.equal(weight, torch.tensor([[0, .25, 0, .75, .75, .75],
                                             [.25, .25, 0, .75, 0, 0],
                                             [0, 0, .75, .75, .75, .75]]))
    # Without prompt_mask every non-response position counts as prompt: the padding (id 0) is caught.
    eligible, weight = syrm_weights(IDS, RESPONSE, syntax_ids=torch.tensor([1, 0]), alpha=0.75)
    assert torch.equal(eligible[1], torch.tensor([T, T, F, T, T, T]))
    assert torch.equal(weight[1], torch.tensor([.25, .25, 0, .75, .25, .25]))


def test_syrm_weights_predicate_union_and_response_wins():
    pred = lambda ids: ids >= 7  # noqa: E731  (7 in the prompt of row 0; 9 and 8 are response tokens)
    eligible, weight = syrm_weights(IDS, RESPONSE, syntax_predicate=pred, alpha=0.5, prompt_mask=PROMPT)
    assert torch.equal(eligible, RESPONSE | torch.tensor([[F, F, T, F, F, F], [F] * 6, [F] * 6]))
    assert torch.equal(weight, 0.5 * eligible.float())
    eligible, _ = syrm_weights(IDS, RESPONSE, syntax_ids=[1], syntax_predicate=pred, alpha=0.5, prompt_mask=PROMPT)
    assert torch.equal(eligible[0], torch.tensor([F, T, T, T, T, T]))
    # An empty id set: only the response. int32 ids work the same.
    eligible, weight = syrm_weights(IDS.int(), RESPONSE, syntax_ids=[], alpha=1.0)
    assert torch.equal(eligible, RESPONSE) and torch.equal(weight, RESPONSE.float())
    eligible, weight = syrm_weights(IDS, RESPONSE, syntax_ids=[1, 0], alpha=0.0, prompt_mask=PROMPT)
    assert torch.equal(weight > 0, eligible & ~RESPONSE)


def test_syrm_weights_errors():
    with pytest.raises(ValueError, match="syntax_ids or syntax_predicate"):
        syrm_weights(IDS, RESPONSE)
    with pytest.raises(ValueError, match="alpha"):
        syrm_weights(IDS, RESPONSE, syntax_ids=[1], alpha=1.5)
    with pytest.raises(ValueError, match="alpha"):
        syrm_weights(IDS, RESPONSE, syntax_ids=[1], alpha=float("nan"))
    with pytest.raises(TypeError, match="alpha"):
        syrm_weights(IDS, RESPONSE, syntax_ids=[1], alpha=True)
    with pytest.raises(TypeError, match="input_ids"):
        syrm_weights(IDS.float(), RESPONSE, syntax_ids=[1])
    with pytest.raises(ValueError, match="input_ids"):
        syrm_weights(IDS[0], RESPONSE[0], syntax_ids=[1])
    with pytest.raises(TypeError, match="response_mask"):
        syrm_weights(IDS, RESPONSE.int(), syntax_ids=[1])
    with pytest.raises(ValueError, match="response_mask"):
        syrm_weights(IDS, RESPONSE[:, :5], syntax_ids=[1])
    with pytest.raises(ValueError, match="prompt_mask"):
        syrm_weights(IDS, RESPONSE, syntax_ids=[1], prompt_mask=PROMPT[:2])
    with pytest.raises(TypeError, match="syntax_ids"):
        syrm_weights(IDS, RESPONSE, syntax_ids=[1.5])
    with pytest.raises(TypeError, match="syntax_ids"):
        syrm_weights(IDS, RESPONSE, syntax_ids=3)
    with pytest.raises(TypeError, match="syntax_predicate"):
        syrm_weights(IDS, RESPONSE, syntax_predicate=3)
    with pytest.raises(TypeError, match=r"syntax_predicate\(input_ids\)"):
        syrm_weights(IDS, RESPONSE, syntax_predicate=lambda ids: (ids > 3).int())
    with pytest.raises(ValueError, match=r"syntax_predicate\(input_ids\)"):
        syrm_weights(IDS, RESPONSE, syntax_predicate=lambda ids: (ids > 3)[:, :2])


# --- SyRM: the loss ---------------------------------------------------------------------------


def handmade_batch():
    """Three rows, alpha = 0.75, p = 0.5, 0.25, 1 (weights 2, 4, 1); values worked out by hand:
    row 0: response {3,4,5}, syntax {1}; masked {1,3,5}; CE 1, 2, 4 there.
        L_resp = (2*2 + 2*4)/3 = 4, L_syn = 2*1/1 = 2, l = .75*4 + .25*2 = 3.5
    row 1: response {3}, syntax {0,1}; masked {0}; CE .5.  L_resp = 0, L_syn = 4*.5/2 = 1, l = .25
    row 2: response {2,3,4,5}, no syntax; all masked; CE 1, 2, 3, 4.  L_resp = 10/4 = 2.5:
        l = 2.5 with empty_group="renormalize", .75 * 2.5 = 1.875 with "zero"."""
    groups = syrm_weights(IDS, RESPONSE, syntax_ids=[1, 0], alpha=0.75, prompt_mask=PROMPT)
    masked = torch.tensor([[F, T, F, T, F, T], [T, F, F, F, F, F], [F, F, T, T, T, T]])
    p = torch.tensor([0.5, 0.25, 1.0])
    weights = torch.where(masked, 1 / p[:, None], 0.0)
    ce = torch.tensor([[INF, 1.0, 9.0, 2.0, 9.0, 4.0],   # inf / 9 at unmasked positions must not leak
                       [0.5, 9.0, INF, 9.0, 9.0, 9.0],
                       [INF, 9.0, 1.0, 2.0, 3.0, 4.0]])
    mt = MaskedTokens(noisy_ids=torch.where(masked, 99, IDS), masked=masked, weights=weights,
                      row_weight=torch.ones(3), eligible_count=groups.eligible.sum(1), p=p,
                      source_row=torch.arange(3))
    return groups, mt, ce


def test_syrm_loss_handmade():
    groups, mt, ce = handmade_batch()
    per_seq = syrm_loss(ce, mt, groups=groups, response_mask=RESPONSE, reduction="none")
    assert per_seq.dtype == torch.float32
    assert torch.allclose(per_seq, torch.tensor([3.5, 0.25, 2.5]), rtol=1e-6, atol=0)
    zero = syrm_loss(ce, mt, groups=groups, response_mask=RESPONSE, reduction="none", empty_group="zero")
    assert torch.allclose(zero, torch.tensor([3.5, 0.25, 1.875]), rtol=1e-6, atol=0)
    mean = syrm_loss(ce, mt, groups=groups, response_mask=RESPONSE)
    total = syrm_loss(ce, mt, groups=groups, response_mask=RESPONSE, reduction="sum")
    assert float(mean) == pytest.approx(6.25 / 3, rel=1e-6) and float(total) == pytest.approx(6.25, rel=1e-6)
    # bf16 input is accumulated in float32
    assert torch.allclose(syrm_loss(ce.bfloat16(), mt, groups=groups, response_mask=RESPONSE, reduction="none"),
                          per_seq, rtol=1e-2)


def test_syrm_loss_gradient():
    groups, mt, ce = handmade_batch()
    ce = ce.clone().requires_grad_()
    syrm_loss(ce, mt, groups=groups, response_mask=RESPONSE, reduction="sum").backward()
    # d l / d CE_i = w_i * s_i: row 0: response 2 * .75/3 = .5, syntax 2 * .25/1 = .5; row 1: 4 * .25/2 = .5;
    # row 2: 1 * .75/4 / .75 (renormalised) = .25; 0 wherever not masked (no NaN from the inf entries).
    expected = torch.tensor([[0, .5, 0, .5, 0, .5], [.5, 0, 0, 0, 0, 0], [0, 0, .25, .25, .25, .25]])
    assert torch.allclose(ce.grad, expected, rtol=1e-6, atol=0)


def test_syrm_loss_mirror_rows_average_the_copies():
    groups, mt, ce = handmade_batch()
    masked2 = torch.tensor([[F, F, F, F, T, F], [F, T, F, T, F, F], [F, F, T, F, F, F]])
    ce2 = torch.tensor([[9.0, 9.0, 9.0, 9.0, 3.0, 9.0], [9.0, 2.0, 9.0, 7.0, 9.0, 9.0], [9.0, 9.0, 5.0, 9.0, 9.0, 9.0]])
    w2 = torch.where(masked2, 1 / mt.p[:, None], 0.0)
    second = MaskedTokens(mt.noisy_ids, masked2, w2, torch.ones(3), mt.eligible_count, mt.p, torch.arange(3))
    both = MaskedTokens(torch.cat([mt.noisy_ids, mt.noisy_ids]), torch.cat([mt.masked, masked2]),
                        torch.cat([mt.weights, w2]), torch.full((6,), 0.5), mt.eligible_count,
                        torch.cat([mt.p, mt.p]), torch.arange(3).repeat(2))
    kw = dict(groups=groups, response_mask=RESPONSE, reduction="none")
    got = syrm_loss(torch.cat([ce, ce2]), both, **kw)
    expected = 0.5 * (syrm_loss(ce, mt, **kw) + syrm_loss(ce2, second, **kw))
    assert torch.allclose(got, expected, rtol=1e-6)
    # by hand, copy 2: row 0 L_resp = 2*3/3 = 2, L_syn = 0 -> 1.5; row 1 L_resp = 4*7 = 28, L_syn = 4*2/2 = 4
    # -> 22; row 2 L_resp = 5/4 -> 1.25
    assert torch.allclose(syrm_loss(ce2, second, **kw), torch.tensor([1.5, 22.0, 1.25]), rtol=1e-6)


def test_syrm_without_syntax_is_the_standard_loss(gen):
    B, L = 4, 40
    ids = torch.randint(2, 30, (B, L), generator=gen)
    response = torch.arange(L)[None, :] >= torch.tensor([[5], [10], [20], [35]])
    groups = syrm_weights(ids, response, syntax_ids=[], alpha=0.3)
    mt = mask_tokens(ids, torch.tensor([0.2, 0.5, 0.7, 0.9]), 17, mask_id=99, eligible=groups.eligible, mode="mirror")
    ce = torch.rand(2 * B, L, generator=gen) * 3
    standard = torch.zeros(B).index_add(0, mt.source_row, (mt.weights * ce).sum(1) * mt.row_weight) / mt.eligible_count
    got = syrm_loss(ce, mt, groups=groups, response_mask=response, reduction="none")
    assert torch.allclose(got, standard, rtol=1e-5)


def test_syrm_loss_is_unbiased(gen):
    """E over masks of l = alpha * mean_resp(CE) + (1 - alpha) * mean_syn(CE) (1/p weights)."""
    B, L, S, alpha = 3, 32, 300, 0.7
    ids = torch.randint(0, 12, (B, L), generator=gen)
    response = torch.arange(L)[None, :] >= 16
    groups = syrm_weights(ids, response.expand(B, L).clone(), syntax_ids=[0, 1, 2, 3], alpha=alpha)
    ce = torch.rand(B, L, generator=gen, dtype=torch.float64) * 2 + 0.5
    syn = groups.eligible & ~response
    target = alpha * (ce * response).sum(1) / response.sum(1) + (1 - alpha) * (ce * syn).sum(1) / syn.sum(1)
    p = torch.tensor([0.3, 0.6, 0.9])
    draws = torch.stack([syrm_loss(ce.float(), mask_tokens(ids, p, s, mask_id=99, eligible=groups.eligible),
                                   groups=groups, response_mask=response.expand(B, L), reduction="none").double()
                         for s in range(S)])
    se = draws.std(0) / math.sqrt(S)
    assert torch.all((draws.mean(0) - target).abs() <= 5 * se), (draws.mean(0), target, se)


def test_syrm_coefficients_with_the_fused_cross_entropy(gen):
    """sum(coef * CE) is the SyRM loss; through masked_cross_entropy the logits of unmasked tokens
    are never needed."""
    B, L, V = 3, 20, 11
    ids = torch.randint(0, V, (B, L), generator=gen)
    response = torch.arange(L)[None, :] >= torch.tensor([[8], [12], [20]])  # the last row has no response
    groups = syrm_weights(ids, response, syntax_ids=[0, 1, 2], alpha=0.6)
    mt = mask_tokens(ids, torch.tensor([0.4, 0.7, 0.9]), 3, mask_id=V, eligible=groups.eligible, mode="mirror")
    logits = torch.randn(2 * B, L, V, generator=gen, dtype=torch.float64)
    targets = ids[mt.source_row]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    handmade_groups, handmade_mt, handmade_ce = handmade_batch()
    for red in ("mean", "sum"):
        kw = dict(groups=groups, response_mask=response, reduction=red)
        coef = syrm_coefficients(mt, **kw)
        assert coef.shape == (2 * B, L) and torch.all(coef[~mt.masked] == 0)
        expected = syrm_loss(ce, mt, **kw)
        assert float((coef.double() * ce).sum()) == pytest.approx(float(expected), rel=1e-5)
        fused = masked_cross_entropy(targets, coef.double(), logits=logits)
        assert float(fused) == pytest.approx(float(expected), rel=1e-5)
        kw = dict(groups=handmade_groups, response_mask=RESPONSE, reduction=red)
        coef = syrm_coefficients(handmade_mt, **kw)
        value = (coef * torch.where(handmade_mt.masked, handmade_ce, 0.0)).sum()
        assert float(value) == pytest.approx(float(syrm_loss(handmade_ce, handmade_mt, **kw)), rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        syrm_coefficients(mt, groups=groups, response_mask=response, reduction="none")


def _core_reference(ce, masked, weights, row_weight, source_row, eligible, B):
    """The CoRE loss in plain float64: l_b = sum over b's rows of rho * sum_i 1[masked] w_i CE_i / P_b,
    P_b = the number of eligible tokens of sequence b (one normaliser for every group)."""
    per_row = (torch.where(masked, weights.double() * ce.double(), 0.0)).sum(1) * row_weight.double()
    total = torch.zeros(B, dtype=torch.float64).index_add(0, source_row, per_row)
    return total / eligible.sum(1).clamp(min=1).double()


@pytest.mark.parametrize("mode", ["standard", "mirror"])
def test_syrm_core_variant_against_a_float64_reference(gen, mode):
    B, L = 5, 24
    ids = torch.randint(0, 12, (B, L), generator=gen)
    starts = torch.tensor([[6], [10], [12], [24], [3]])  # row 3 has no response, row 4 a short prompt
    response = torch.arange(L)[None, :] >= starts
    groups = syrm_weights(ids, response, syntax_ids=[0, 1], variant="core", prompt_rate=0.3, seed=5)
    syn = groups.eligible & ~response
    # alpha = P_resp / P on response tokens, 1 - alpha on the others
    p_resp, p_all = response.sum(1, keepdim=True).double(), groups.eligible.sum(1, keepdim=True).double()
    want_w = torch.where(response, p_resp / p_all, 0.0) + torch.where(syn, 1 - p_resp / p_all, 0.0)
    assert torch.allclose(groups.weight.double(), want_w, rtol=1e-6, atol=0)
    mt = mask_tokens(ids, torch.rand(B, generator=gen) * 0.8 + 0.1, 9, mask_id=99, eligible=groups.eligible,
                     mode=mode)
    ce = torch.rand(mt.masked.shape, generator=gen, dtype=torch.float64) * 3
    ref = _core_reference(ce, mt.masked, mt.weights, mt.row_weight, mt.source_row, groups.eligible, B)
    for empty in ("renormalize", "zero"):  # every group's weight is its share: both rules agree
        got = syrm_loss(ce, mt, groups=groups, response_mask=response, reduction="none", empty_group=empty)
        assert torch.allclose(got.double(), ref, rtol=1e-5, atol=0), empty
    coef = syrm_coefficients(mt, groups=groups, response_mask=response, reduction="sum")
    assert float((coef.double() * torch.where(mt.masked, ce, 0.0)).sum()) == pytest.approx(float(ref.sum()), rel=1e-5)
    # the groups variant with the same eligible set differs (its own normaliser per group)
    fixed = syrm_weights(ids, response, syntax_ids=[0, 1], alpha=0.5, prompt_rate=0.3, seed=5)
    assert torch.equal(fixed.eligible, groups.eligible)


def test_syrm_random_prompt_tokens(gen):
    B, L, m = 64, 50, 0.25
    ids = torch.randint(20, 30, (B, L), generator=gen)  # no syntax id occurs
    response = torch.arange(L)[None, :].expand(B, L) >= 30
    prompt = (torch.arange(L)[None, :] >= 2).expand(B, L) & ~response  # positions 0, 1: special tokens
    g1 = syrm_weights(ids, response, prompt_rate=m, seed=123, prompt_mask=prompt)
    extra = g1.eligible & ~response
    assert not (extra & ~prompt).any() and torch.equal(g1.eligible & response, response)
    frac = float(extra.sum()) / float(prompt.sum())
    n = float(prompt.sum())
    assert abs(frac - m) < 5 * math.sqrt(m * (1 - m) / n), frac
    assert torch.equal(syrm_weights(ids, response, prompt_rate=m, seed=123, prompt_mask=prompt).eligible, g1.eligible)
    assert not torch.equal(syrm_weights(ids, response, prompt_rate=m, seed=124, prompt_mask=prompt).eligible,
                           g1.eligible)
    # syntax ids are always in; the random tokens come on top
    g2 = syrm_weights(ids, response, syntax_ids=[21], prompt_rate=m, seed=123, prompt_mask=prompt)
    assert torch.equal(g2.eligible, g1.eligible | (prompt & (ids == 21)))
    assert torch.equal(syrm_weights(ids, response, syntax_ids=[21], prompt_rate=1.0, seed=0).eligible,
                       torch.ones_like(response))
    with pytest.raises(ValueError, match="seed"):
        syrm_weights(ids, response, prompt_rate=m)
    with pytest.raises(ValueError, match="prompt_rate"):
        syrm_weights(ids, response, prompt_rate=1.5, seed=0)
    with pytest.raises(TypeError, match="prompt_rate"):
        syrm_weights(ids, response, prompt_rate="0.1", seed=0)
    with pytest.raises(ValueError, match="alpha"):
        syrm_weights(ids, response, syntax_ids=[1], alpha=0.5, variant="core")
    with pytest.raises(ValueError, match="variant"):
        syrm_weights(ids, response, syntax_ids=[1], variant="CoRE")


def test_syrm_loss_errors():
    groups, mt, ce = handmade_batch()
    kw = dict(groups=groups, response_mask=RESPONSE)
    with pytest.raises(TypeError, match="token_ce"):
        syrm_loss(ce.long(), mt, **kw)
    with pytest.raises(ValueError, match="token_ce"):
        syrm_loss(ce[:, :5], mt, **kw)
    with pytest.raises(TypeError, match="masked_tokens"):
        syrm_loss(ce, (mt.masked, mt.weights), **kw)
    with pytest.raises(TypeError, match="groups"):
        syrm_loss(ce, mt, groups=tuple(groups), response_mask=RESPONSE)
    with pytest.raises(ValueError, match="groups.eligible"):
        syrm_loss(ce, mt, groups=SyRMWeights(groups.eligible[:2], groups.weight), response_mask=RESPONSE)
    with pytest.raises(TypeError, match="groups.weight"):
        syrm_loss(ce, mt, groups=SyRMWeights(groups.eligible, groups.eligible), response_mask=RESPONSE)
    with pytest.raises(ValueError, match="response_mask"):
        syrm_loss(ce, mt, groups=groups, response_mask=RESPONSE[:, :3])
    with pytest.raises(ValueError, match="reduction"):
        syrm_loss(ce, mt, reduction="avg", **kw)
    with pytest.raises(ValueError, match="empty_group"):
        syrm_loss(ce, mt, empty_group="drop", **kw)


# --- EMA control variate ----------------------------------------------------------------------


def test_ema_update_and_adjust_by_hand():
    """m = 3 bins (t -> round(2t)), eta = 1/2, c = 1; the debiased baseline is
    sum_k eta (1-eta)^(n-k) mean_k / (1 - (1-eta)^n)."""
    cv = BinnedEMABaseline(num_bins=3, decay=0.5, coef=1.0)
    bins = cv.bins(torch.tensor([0.0, 0.2, 0.26, 0.5, 0.74, 0.8, 1.0]))
    assert torch.equal(bins, torch.tensor([0, 0, 1, 1, 1, 2, 2]))
    # step 1: bins 0, 1, 0; nothing seen yet, so nothing is subtracted
    out = cv(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 0.5, 0.2]))
    assert torch.equal(out, torch.tensor([1.0, 2.0, 3.0]))
    # one update per bin with the bin's batch mean: bin 0 saw mean(1, 3) = 2, bin 1 saw 2
    assert torch.allclose(cv.current_baseline(), torch.tensor([2.0, 2.0, 0.0]))
    assert torch.equal(cv.steps, torch.tensor([1, 1, 0]))
    # step 2: bins 0, 2
    out = cv(torch.tensor([4.0, 6.0]), torch.tensor([0.1, 1.0]))
    assert torch.allclose(out, torch.tensor([4.0 - 2.0, 6.0 - 0.0]))
    b0 = (0.5 * 0.5 * 2 + 0.5 * 4) / (1 - 0.25)  # 10/3
    assert torch.allclose(cv.current_baseline(), torch.tensor([b0, 2.0, 6.0]))
    # adjust alone does not move the state; it subtracts c_j b_j of each sequence's bin
    before = {k: v.clone() for k, v in cv.state_dict().items()}
    out = cv.adjust(torch.tensor([5.0, 5.0, 5.0]), torch.tensor([0.0, 0.6, 0.9]))
    assert torch.allclose(out, torch.tensor([5.0 - b0, 3.0, -1.0]))
    assert all(torch.equal(before[k], v) for k, v in cv.state_dict().items())
    # a fixed coefficient scales the baseline
    half = BinnedEMABaseline(num_bins=3, decay=0.5, coef=0.5)
    half.load_state_dict(cv.state_dict())
    assert torch.allclose(half.adjust(torch.tensor([5.0]), torch.tensor([0.0])), torch.tensor([5.0 - b0 / 2]))


def test_ema_coefficient_matches_weighted_moments(gen):
    """Per-bin c = clip(Cov(l, B) / (Var(B) + eps), 0, 1) with exponentially weighted moments over the
    pairs (l_k, B_k), B_k = the debiased baseline in use when l_k arrived, recomputed directly."""
    eta, rho, eps = 0.3, 0.4, 1e-8
    cv = BinnedEMABaseline(num_bins=1, decay=eta, coef="ema", stats_decay=rho, eps=eps)
    losses = (torch.randn(12, generator=gen, dtype=torch.float64) + torch.linspace(0, 3, 12, dtype=torch.float64))
    history, pairs = [], []
    for k, loss in enumerate(losses.tolist()):
        if history:
            n = len(history)
            b = sum(eta * (1 - eta) ** (n - 1 - i) * x for i, x in enumerate(history)) / (1 - (1 - eta) ** n)
            pairs.append((loss, b))
            assert float(cv.current_baseline()[0]) == pytest.approx(b, rel=1e-5)
        out = cv(torch.tensor([loss], dtype=torch.float32), torch.tensor([0.5]))
        history.append(loss)
    # weights of the first-initialised EW recursion: (1-rho)^(n-1) for the first pair, rho (1-rho)^(n-k) after
    n = len(pairs)
    w = torch.tensor([(1 - rho) ** (n - 1)] + [rho * (1 - rho) ** (n - k) for k in range(2, n + 1)],
                     dtype=torch.float64)
    assert float(w.sum()) == pytest.approx(1.0)
    lv = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    bv = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    ml, mb = (w * lv).sum(), (w * bv).sum()
    cov, var = (w * (lv - ml) * (bv - mb)).sum(), (w * (bv - mb) ** 2).sum()
    assert float(cv.bin_cov_lb[0]) == pytest.approx(float(cov), rel=1e-4, abs=1e-6)
    assert float(cv.bin_var_b[0]) == pytest.approx(float(var), rel=1e-4, abs=1e-6)
    c = float((cov / (var + eps)).clamp(0, 1))
    assert float(cv.coefficients()[0]) == pytest.approx(c, rel=1e-3, abs=1e-5)
    assert 0.0 <= c <= 1.0 and out.shape == (1,)


def test_ema_pooled_versus_per_bin_coefficient():
    """A loss that depends on t only: the pooled regression of l on b_j(t) finds c = 1; within a
    bin the baseline is constant and uncorrelated with l, so the per-bin c is 0."""
    t = torch.linspace(0, 1, 11)
    per_bin = BinnedEMABaseline(num_bins=11, decay=0.2, coef="ema")
    pooled = BinnedEMABaseline(num_bins=11, decay=0.2, coef="pooled")
    for _ in range(30):
        per_bin(3 * t + 1, t)
        adjusted = pooled(3 * t + 1, t)
    assert torch.allclose(pooled.coefficients(), torch.ones(11), atol=1e-4)
    assert torch.allclose(adjusted, torch.zeros(11), atol=1e-4)  # l - 1 * b_j(t): the t-dependence is gone
    assert torch.equal(per_bin.coefficients(), torch.zeros(11))


def test_ema_gradient_is_unchanged_exactly(gen):
    """d/dtheta (l - c b) = d l / d theta bit for bit: b and c are constants."""
    w = torch.randn(5, generator=gen, requires_grad=True)
    x = torch.randn(64, 5, generator=gen)
    t = torch.rand(64, generator=gen)
    for coef in ("ema", "pooled", 1.0):
        cv = BinnedEMABaseline(num_bins=8, decay=0.1, coef=coef)
        for step in range(20):
            with torch.no_grad():
                cv.update(((x @ w) ** 2 + torch.randn(64, generator=gen)), t)
        loss = (x @ w) ** 2 * (1 + t)
        adjusted = cv(loss, t)
        assert adjusted.requires_grad and not any(b.requires_grad for b in cv.buffers())
        if coef == 1.0:
            assert not torch.equal(adjusted, loss)  # the value did change (c_j may be 0 for the others)
        g_raw, = torch.autograd.grad(loss.mean(), w, retain_graph=True)
        g_adj, = torch.autograd.grad(adjusted.mean(), w)
        assert torch.equal(g_raw, g_adj)


def test_ema_state_dict_round_trip(gen):
    cv = BinnedEMABaseline(num_bins=4, decay=0.05)
    for _ in range(5):
        t = torch.rand(16, generator=gen)
        cv(torch.randn(16, generator=gen) + t, t)
    other = BinnedEMABaseline(num_bins=4, decay=0.05)
    other.load_state_dict(cv.state_dict())
    t = torch.rand(8, generator=gen)
    loss = torch.randn(8, generator=gen)
    assert torch.equal(other.adjust(loss, t), cv.adjust(loss, t))
    assert "num_bins=4" in repr(cv)


def test_ema_errors():
    with pytest.raises(ValueError, match="num_bins"):
        BinnedEMABaseline(num_bins=0)
    with pytest.raises(TypeError, match="num_bins"):
        BinnedEMABaseline(num_bins=2.0)
    with pytest.raises(ValueError, match="decay"):
        BinnedEMABaseline(decay=0.0)
    with pytest.raises(ValueError, match="decay"):
        BinnedEMABaseline(decay=1.5)
    with pytest.raises(ValueError, match="stats_decay"):
        BinnedEMABaseline(stats_decay=-0.1)
    with pytest.raises(ValueError, match="coef"):
        BinnedEMABaseline(coef="optimal")
    with pytest.raises(TypeError, match="coef"):
        BinnedEMABaseline(coef=True)
    with pytest.raises(ValueError, match="eps"):
        BinnedEMABaseline(eps=-1.0)
    cv = BinnedEMABaseline(num_bins=4)
    with pytest.raises(TypeError, match="loss_per_seq"):
        cv(torch.ones(3, dtype=torch.int64), torch.rand(3))
    with pytest.raises(ValueError, match="loss_per_seq"):
        cv(torch.ones(3, 2), torch.rand(3, 2))
    with pytest.raises(TypeError, match="t must"):
        cv(torch.ones(3), torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="t must have"):
        cv(torch.ones(3), torch.rand(4))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        cv.update(torch.ones(3), torch.tensor([0.1, 1.2, 0.3]))
