"""memorization(): Gu et al.'s d1/d2 < 1/3 metric against a brute-force cdist, duplicates, streaming."""

import math

import numpy as np
import pytest
import torch

from diffkernels.optimal_loss.estimators import data as E
from diffkernels.optimal_loss import memorization


def _brute(samples, train, threshold=1 / 3):
    a = samples.reshape(len(samples), -1).double()
    b = train.reshape(len(train), -1).double()
    d = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(a.shape[1])
    top = d.topk(2, dim=1, largest=False)
    d1, d2 = top.values[:, 0], top.values[:, 1]
    return d1, d2, top.indices[:, 0], (d1 / d2 < threshold)


def test_matches_brute_force(gen):
    train = torch.rand(300, 3, 4, 4, generator=gen) * 255
    # Half the samples are near copies of training images (memorised), half are fresh.
    samples = torch.cat([train[:40] + torch.randn(40, 3, 4, 4, generator=gen), torch.rand(40, 3, 4, 4, generator=gen) * 255])
    res = memorization(samples, train)
    d1, d2, nearest, mem = _brute(samples, train)
    torch.testing.assert_close(res.d1, d1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(res.d2, d2, rtol=1e-10, atol=1e-10)
    assert torch.equal(res.nearest, nearest) and torch.equal(res.memorized, mem)
    assert res.fraction == pytest.approx(float(mem.double().mean())) and res.fraction >= 0.45
    assert res.mean_d1 == pytest.approx(float(d1.mean()))
    assert res.to_dict()["memorized_fraction"] == res.fraction
    assert len(res.to_dict(per_sample=True)["d1"]) == 80


def test_exact_duplicates_and_threshold():
    train = torch.tensor([[0.0, 0.0], [0.0, 0.0], [100.0, 0.0], [0.0, 90.0]])
    samples = torch.tensor([[0.0, 0.0], [50.0, 0.0], [99.0, 0.0]])
    res = memorization(samples, train)
    # An exact copy of a duplicated training image: d1 = d2 = 0, counted as memorised.
    assert res.d1[0] == 0 and res.d2[0] == 0 and bool(res.memorized[0])
    assert not bool(res.memorized[1])  # equidistant: ratio 1
    assert bool(res.memorized[2]) and res.d1[2] == pytest.approx(1 / math.sqrt(2))
    assert res.fraction == pytest.approx(2 / 3)
    assert memorization(samples, train, threshold=1.0).fraction == pytest.approx(2 / 3)
    for bad in (0.0, 1.5, "x"):
        with pytest.raises(ValueError, match="threshold"):
            memorization(samples, train, threshold=bad)
    with pytest.raises(ValueError, match="at least 2"):
        memorization(samples, train[:1])
    with pytest.raises(ValueError, match="different sizes"):
        memorization(samples, torch.zeros(5, 3))


def test_memmap_train_streams(tmp_path, monkeypatch, gen):
    train = (torch.rand(257, 12, generator=gen) * 255).double()
    samples = train[::7] + 0.5
    ref = memorization(samples, train)
    np.save(tmp_path / "train.npy", train.numpy().reshape(257, 3, 4))
    monkeypatch.setattr(E, "HOST_CHUNK_ELEMENTS", 12 * 25)  # 11 host chunks, the last of 7 rows
    got = memorization(samples.numpy(), np.load(tmp_path / "train.npy", mmap_mode="r"))
    torch.testing.assert_close(got.d1, ref.d1)
    torch.testing.assert_close(got.d2, ref.d2)
    assert torch.equal(got.nearest, ref.nearest) and got.fraction == ref.fraction == 1.0


def test_digits_against_cdist():
    pytest.importorskip("sklearn")
    from diffkernels.datasets import load_digits, to_pixels

    train = to_pixels(load_digits().double()).flatten(1)
    noise = 0.05 * torch.randn(50, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    samples = to_pixels(train[:50] / 127.5 - 1 + noise)
    ours = memorization(samples, train)
    d1, d2 = (torch.cdist(samples, train) / 8.0).topk(2, largest=False).values.T  # d = ||a - b|| / sqrt(D)
    assert ours.fraction == pytest.approx(float((d1 / d2 < 1 / 3).double().mean()))
    assert ours.mean_d1 == pytest.approx(float(d1.mean()), rel=1e-7)  # cdist is mm-based


@pytest.mark.parametrize("where", ["samples", "train"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_an_error(where, value, gen):
    """A NaN sample has ratio NaN, which used to count as memorised (NaN -> 0 < 1/3): reject it."""
    train = torch.rand(20, 6, generator=gen) * 255
    samples = train[:5] + 1.0
    bad = (samples if where == "samples" else train).clone()
    bad[3, 4] = value
    args = (bad, train) if where == "samples" else (samples, bad)
    with pytest.raises(ValueError, match=f"{where} row 3 contains NaN or Inf"):
        memorization(*args)
    with pytest.raises(ValueError, match=f"{where} row 3"):  # numpy too (a memmap is scanned in chunks)
        memorization(*(a.numpy() for a in args))


def test_argument_names_in_errors():
    with pytest.raises(ValueError, match="samples is empty"):
        memorization(torch.zeros(0, 4), torch.zeros(3, 4))
    with pytest.raises(TypeError, match="train must be"):
        memorization(torch.zeros(2, 4), [[0.0] * 4] * 3)
    with pytest.raises(ValueError, match="threshold"):
        memorization(torch.zeros(2, 4), torch.zeros(3, 4), threshold=True)
    assert memorization(torch.zeros(2, 4), torch.ones(3, 4), threshold=np.float32(0.5)).threshold == 0.5
