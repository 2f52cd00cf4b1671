"""Counter-based random numbers shared bit-for-bit by every backend.

Convention (ARCHITECTURE.md): the uniform ``U(seed, i)`` for element or token
index ``i`` is word ``i % 4`` of Triton's ``tl.rand4x(seed, i // 4)``. That is
Philox4x32-10 with key ``(seed & 0xFFFFFFFF, seed >> 32)`` and counter
``(c & 0xFFFFFFFF, c >> 32, 0, 0)`` for ``c = i // 4``; each output word ``x``
is read as a signed int32, folded to ``x if x >= 0 else ~x`` and multiplied in
float32 by ``4.6566127342e-10``. One Philox call yields four uniforms, so
neighbouring elements share a call (a quarter of the integer multiplies of one
call per element).

Seeds are any integer (Python int or numpy integer); they are taken modulo 2**64 (so -1 and 2**64 - 1 are
the same seed). ``fold_seed`` derives independent streams, e.g. per training
step and per data-parallel rank.
"""

from __future__ import annotations

import numbers

import torch

__all__ = [
    "philox4x32",
    "philox4x32_torch",
    "uniform",
    "fold_seed",
    "seed_to_int64",
]

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53  # multiplies counter word 0
PHILOX_M1 = 0xCD9E8D57  # multiplies counter word 2
PHILOX_W0 = 0x9E3779B9  # key bump, word 0
PHILOX_W1 = 0xBB67AE85  # key bump, word 1
PHILOX_ROUNDS = 10
UNIFORM_SCALE = 4.6566127342e-10  # largest scale with INT32_MAX * scale < 1 in float32


def _as_uint64(seed: int) -> int:
    # Any integer type (Python int, numpy integers, 0-d integer tensors via __index__); bool is
    # rejected because True as a seed is almost always a bug.
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer (Python int or numpy integer), got {type(seed).__name__}")
    return int(seed) % (1 << 64)


def seed_to_int64(seed: int) -> int:
    """The seed's 64 bits as a signed int64 (how ops pass it through the dispatcher)."""
    s = _as_uint64(seed)
    return s - (1 << 64) if s >= (1 << 63) else s


def philox4x32(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """Scalar Philox4x32-10 on Python ints (the textbook definition; used for seeds and tests)."""
    c0, c1, c2, c3 = (int(c) & MASK32 for c in counter)
    k0, k1 = (int(k) & MASK32 for k in key)
    for _ in range(PHILOX_ROUNDS):
        p0 = PHILOX_M0 * c0
        p1 = PHILOX_M1 * c2
        c0, c1, c2, c3 = (
            (p1 >> 32) ^ c1 ^ k0,
            p1 & MASK32,
            (p0 >> 32) ^ c3 ^ k1,
            p0 & MASK32,
        )
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of the constant ``a`` times the uint32 values ``b`` (held in int64).

    Products of two 32-bit numbers overflow int64, so ``a`` is split in 16-bit halves.
    """
    a_hi, a_lo = a >> 16, a & 0xFFFF
    t_hi = b * a_hi  # < 2**48
    t_lo = b * a_lo  # < 2**48
    hi = (t_hi + (t_lo >> 16)) >> 16
    lo = (((t_hi & 0xFFFF) << 16) + t_lo) & MASK32
    return hi, lo


def philox4x32_torch(counter_lo: torch.Tensor, counter_hi: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    """Vectorised Philox4x32-10 in plain PyTorch int64 arithmetic (any device).

    ``counter_lo``/``counter_hi`` hold uint32 values in int64 tensors; returns the
    four output words, also as uint32 values in int64 tensors.
    """
    s = _as_uint64(seed)
    k0, k1 = s & MASK32, s >> 32
    c0 = counter_lo
    c1 = counter_hi
    c2 = torch.zeros_like(counter_lo)
    c3 = torch.zeros_like(counter_lo)
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def _words_to_uniform(word: torch.Tensor) -> torch.Tensor:
    signed = torch.where(word >= (1 << 31), word - (1 << 32), word)  # read as int32
    folded = torch.where(signed < 0, -signed - 1, signed)  # ~x, in [0, 2**31)
    return folded.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=word.device)


def uniform(seed: int, index: torch.Tensor) -> torch.Tensor:
    """``U(seed, index)`` as float32, elementwise for an integer tensor of indices >= 0.

    Examples:
        >>> import torch
        >>> from diffkernels.rng import uniform
        >>> uniform(1234, torch.arange(4))  # the same numbers on every backend and device
        tensor([0.2544, 0.2931, 0.5313, 0.4079])
    """
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index must be a torch.Tensor, got {type(index).__name__}")
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"index must be an int32 or int64 tensor, got {index.dtype}")
    from ._validate import check_not_meta  # here: _validate imports this module

    check_not_meta(index, "index")
    index = index.to(torch.int64)
    if index.numel() and bool((index < 0).any()):
        raise ValueError("index must be non-negative")
    counter = index >> 2
    words = philox4x32_torch(counter & MASK32, counter >> 32, seed)
    lane = index & 3
    word = torch.where(lane == 0, words[0], torch.where(lane == 1, words[1], torch.where(lane == 2, words[2], words[3])))
    return _words_to_uniform(word)


def fold_seed(seed: int, *values: int) -> int:
    """Derive an independent 64-bit seed from ``seed`` and integers (step, rank, ...).

    Each value is hashed in with one Philox call keyed by the current seed, with a
    counter word that no data stream uses (streams use (c lo, c hi, 0, 0)), so a
    folded seed never collides with a stream position of its parent.
    Returns a Python int in [0, 2**64).

    Examples:
        >>> from diffkernels import fold_seed
        >>> base_seed, step = 1234, 5
        >>> fold_seed(base_seed, step, 0)  # rank 0's seed at this step
        5843491324269899615
        >>> fold_seed(base_seed, step, 1) != fold_seed(base_seed, step, 0)  # rank 1 draws other masks
        True
        >>> fold_seed(-1) == fold_seed(2**64 - 1)  # seeds are taken modulo 2**64
        True
    """
    s = _as_uint64(seed)
    for v in values:
        v = _as_uint64(v)
        w = philox4x32((v & MASK32, v >> 32, 0x5EED_F01D, 1), (s & MASK32, s >> 32))
        s = w[0] | (w[1] << 32)
    return s
