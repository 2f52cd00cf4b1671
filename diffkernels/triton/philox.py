"""The shared RNG convention (docs/METHODS.md section 0.2, diffkernels/rng.py) inside Triton kernels."""

import triton
import triton.language as tl


@triton.jit
def uniform_tile(seed, counter):
    """Uniforms for the 4 mask indices of each counter: tile [G, 4], tile[g, w] = U(seed, 4 * counter[g] + w)."""
    u0, u1, u2, u3 = tl.rand4x(seed, counter)
    word = tl.arange(0, 4)[None, :]
    return tl.where(
        word == 0,
        u0[:, None],
        tl.where(word == 1, u1[:, None], tl.where(word == 2, u2[:, None], u3[:, None])),
    )


@triton.jit
def row_tile(R, T, seed, G: tl.constexpr):
    """This program's tile of a stream of rows of R draws (draw (b, r) at index b * R + r).

    Program p covers row b = p // T, counters (b * R) // 4 + (p % T) * G + [0, G): 4 * G draws
    aligned to Philox counters, so each uniform of a row is generated once (the C++ kernels walk
    the same tiles, csrc/row_tiles.h). Returns pid, b, the row positions r [G, 4], whether they lie
    inside the row, and the uniforms.
    """
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    row_start = b * R
    counter = (row_start >> 2) + (pid % T) * G + tl.arange(0, G).to(tl.int64)
    r = 4 * counter[:, None] + tl.arange(0, 4)[None, :] - row_start
    inside = (r >= 0) & (r < R)
    return pid, b, r, inside, uniform_tile(seed, counter)


def tasks_per_row(R: int, G: int) -> int:
    """Programs per row for row_tile: enough aligned spans of 4 * G draws to cover R of them."""
    return triton.cdiv(R + 3, 4 * G)


@triton.jit
def uniform_kernel(index_ptr, out_ptr, numel, seed, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    index = tl.load(index_ptr + offs, mask=inside, other=0)
    u0, u1, u2, u3 = tl.rand4x(seed, index >> 2)
    word = index & 3
    u = tl.where(word == 0, u0, tl.where(word == 1, u1, tl.where(word == 2, u2, u3)))
    tl.store(out_ptr + offs, u, mask=inside)


def uniform(seed: int, index):
    """U(seed, index) for an int64 tensor of indices (one Philox call per element; for tests)."""
    import torch

    out = torch.empty(index.shape, dtype=torch.float32, device=index.device)
    n = index.numel()
    BLOCK = 1024
    if n:
        uniform_kernel[(triton.cdiv(n, BLOCK),)](index.contiguous(), out, n, seed, BLOCK=BLOCK)
    return out
