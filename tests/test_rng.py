"""The Philox convention: known answers, and bit-exact agreement of Python, C++ and Triton."""

import random

import pytest
import torch

from diffkernels import _backend, _native
from diffkernels.rng import MASK32, fold_seed, philox4x32, philox4x32_torch, seed_to_int64, uniform

# Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]

HAS_CPP = _native.load()
HAS_TRITON = _backend.unavailable("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu")) is None


def random_seeds(rng, n=6):
    return [0, 1, 2**32 - 1, 2**32, 2**64 - 1, -7] + [rng.getrandbits(64) for _ in range(n)]


def random_indices(rng, n=3000):
    """Indices spread over [0, 2**62), with clusters around the 2**32 word boundary of the counter."""
    parts = [
        torch.randint(0, 2**20, (n,)),
        torch.randint(2**34 - 2000, 2**34 + 2000, (n,)),  # counter = index // 4 crosses 2**32
        torch.tensor([rng.getrandbits(62) for _ in range(n)]),
    ]
    return torch.cat(parts)


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_known_answers_scalar(counter, key, expected):
    assert philox4x32(counter, key) == expected


def test_known_answers_torch():
    # The vectorised torch version supports counters (c0, c1, 0, 0); the first KAT has that form.
    counter, key, expected = KAT[0]
    seed = key[0] | (key[1] << 32)
    words = philox4x32_torch(torch.tensor([counter[0]]), torch.tensor([counter[1]]), seed)
    assert tuple(int(w) for w in words) == expected


def test_torch_matches_scalar_definition():
    rng = random.Random()
    for seed in random_seeds(rng, 3):
        counters = [rng.getrandbits(64) for _ in range(64)] + [2**32 - 1, 2**32, 0]
        lo = torch.tensor([c & MASK32 for c in counters])
        hi = torch.tensor([c >> 32 for c in counters])
        words = philox4x32_torch(lo, hi, seed)
        s = seed % 2**64
        for i, c in enumerate(counters):
            expected = philox4x32((c & MASK32, c >> 32, 0, 0), (s & MASK32, s >> 32))
            assert tuple(int(w[i]) for w in words) == expected, (seed, c)


def test_uniform_range_and_conversion():
    u = uniform(123, torch.arange(200_000))
    assert u.dtype == torch.float32
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005
    # The conversion reads the word as int32 and folds negatives with ~x.
    s = 2**63 + 12345
    words = philox4x32((5, 0, 0, 0), (s & MASK32, s >> 32))
    for w, got in zip(words, uniform(s, torch.arange(20, 24)).tolist()):
        x = w - 2**32 if w >= 2**31 else w
        x = ~x if x < 0 else x
        expected = torch.tensor(float(x), dtype=torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)
        assert got == float(expected)


def test_seed_is_taken_modulo_2_64():
    idx = torch.arange(64)
    assert torch.equal(uniform(-1, idx), uniform(2**64 - 1, idx))
    assert torch.equal(uniform(2**64 + 3, idx), uniform(3, idx))
    assert seed_to_int64(2**64 - 1) == -1 and seed_to_int64(5) == 5


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension unavailable")
def test_cpp_matches_reference():
    rng = random.Random()
    idx = random_indices(rng)
    for seed in random_seeds(rng):
        got = _native.ops().philox_uniform(seed_to_int64(seed), idx)
        assert torch.equal(got, uniform(seed, idx)), seed


@pytest.mark.skipif(not HAS_CPP, reason="C++ extension unavailable")
@pytest.mark.parametrize("force_scalar", [False, True], ids=["batched-simd", "scalar"])
def test_cpp_batched_generator_matches_reference(force_scalar):
    rng = random.Random()
    counters = [0, 5, 2**32 - 8, 2**32 - 31, 2**32 - 1, 2**40 + 3, 2**61 - 100] + [rng.getrandbits(60) for _ in range(5)]
    for seed in random_seeds(rng, 2):
        for c0 in counters:
            got = _native.ops().philox_uniform_batch(seed_to_int64(seed), c0, force_scalar)
            expected = uniform(seed, torch.arange(4 * c0, 4 * c0 + got.numel()))
            assert torch.equal(got, expected), (seed, c0)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton unavailable (no GPU and no TRITON_INTERPRET=1)")
def test_triton_matches_reference():
    from diffkernels.triton import philox as triton_philox

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = random.Random()
    idx = random_indices(rng, 1000)
    for seed in random_seeds(rng, 3):
        got = triton_philox.uniform(seed_to_int64(seed), idx.to(device)).cpu()
        assert torch.equal(got, uniform(seed, idx)), seed


def test_fold_seed():
    rng = random.Random()
    base = rng.getrandbits(64)
    assert fold_seed(base, 3, 1) == fold_seed(base, 3, 1)
    derived = {fold_seed(base, step, rank) for step in range(50) for rank in range(4)}
    assert len(derived) == 200 and base not in derived
    assert all(0 <= s < 2**64 for s in derived)
    assert fold_seed(base) == base % 2**64
    assert fold_seed(base, 1, 2) != fold_seed(base, 2, 1)
    # Streams of derived seeds look independent of each other.
    idx = torch.arange(100_000)
    a, b = uniform(fold_seed(base, 0), idx), uniform(fold_seed(base, 1), idx)
    corr = torch.corrcoef(torch.stack([a, b]).double())[0, 1]
    assert abs(float(corr)) < 0.02
    with pytest.raises(TypeError):
        fold_seed(1.5)
