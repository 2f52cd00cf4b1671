"""The data as the engines read it: chunk by chunk, moved to the compute device once per chunk.

:class:`DataSource` wraps a tensor of data rows (any float dtype, on the compute device or in host
memory), optionally less a shift vector and divided by a power-of-two scale, cuts it into chunks and
feeds them to the engines of every query block. It also records the largest magnitude it read, which
tells the caller whether the values were finite and within the range the engines compute exactly in.
Memory stays O(M D + M chunk): no (M, N) matrix is ever formed.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from .blocks import BlockEngine, Chunk, gather_rows

__all__ = ["DataSource", "default_block_sizes", "screen_chunk_rows", "slab_elements", "merge_best", "TILE_ELEMENTS_CPU", "TILE_ELEMENTS_CUDA"]

# Elements of one (queries x chunk) float64 logit tile: bounds the memory beyond the outputs.
TILE_ELEMENTS_CUDA = 1 << 25  # 256 MiB of float64
TILE_ELEMENTS_CPU = 1 << 22  # 32 MiB: stays near the CPU's caches


def default_block_sizes(M: int, device: torch.device) -> tuple[int, int]:
    """(queries per block, data rows per chunk): a block x chunk float64 tile of TILE_ELEMENTS.

    Blocks of a few thousand queries keep the chunks long (thousands of rows), so the per-chunk merge
    (a few passes over block x D) stays a small fraction of the two GEMMs (4 block x chunk x D flops).
    """
    if device.type == "cuda":
        tile, block = TILE_ELEMENTS_CUDA, 4096
    else:
        tile, block = TILE_ELEMENTS_CPU, 512
    block = max(1, min(M, block))
    return block, max(256, tile // block)


def tile_elements(device: torch.device) -> int:
    return TILE_ELEMENTS_CUDA if device.type == "cuda" else TILE_ELEMENTS_CPU


def slab_elements(device: torch.device) -> int:
    """Elements of one gathered (queries, rows, D) float64 slab of the exact recomputations. On the CPU
    small (4 MiB): its temporaries are then reused from slab to slab instead of page-faulted in afresh."""
    return TILE_ELEMENTS_CUDA if device.type == "cuda" else 1 << 19


def screen_chunk_rows(chunk: int, D: int, device: torch.device) -> int:
    """Data rows per chunk for the float32 screens: also at most a tile of chunk x D elements, so the
    chunk's float32 (centred) rows stay small and are reused by every query block."""
    return min(chunk, max(256, tile_elements(device) // max(1, D)))


class DataSource:
    """Rows (data[n] - shift) / scale, in chunks of ``chunk_rows`` on ``device``; row n is numbered
    ``first_index + n`` (the number :class:`~.blocks.QueryBlock` ``exclude`` refers to).

    ``largest``: the largest |value| of the rows read so far, as a float64 scalar tensor on ``device``
    (NaN if a NaN was read, None before the first chunk), accumulated without host syncs.
    """

    def __init__(self, data: Tensor, device: torch.device, chunk_rows: int, first_index: int = 0,
                 shift: Optional[Tensor] = None, scale: float = 1.0):
        self.data, self.device, self.chunk_rows, self.first_index = data, device, chunk_rows, first_index
        self.shift, self.scale = shift, scale
        self.n = data.shape[0]
        self.largest: Optional[Tensor] = None
        self._measured: set[int] = set()

    def chunks(self) -> Iterator[Chunk]:
        for start in range(0, self.n, self.chunk_rows):
            rows = self.data[start:start + self.chunk_rows].to(device=self.device, non_blocking=True)
            if self.shift is not None:
                rows = rows.to(torch.float64) - self.shift  # a new tensor: the caller's data is never written
            if self.scale != 1.0:
                rows = rows.to(torch.float64) * (1.0 / self.scale)  # a power of two: exact
            if start not in self._measured:  # each chunk once, however many blocks read it
                self._measured.add(start)
                # max |value| in one fast read pass (no |rows| copy); NaN if the chunk holds one.
                lo, hi = torch.aminmax(rows)
                big = torch.maximum(hi, -lo).to(torch.float64)
                self.largest = big if self.largest is None else torch.maximum(self.largest, big)  # keeps NaN
            yield Chunk(rows, start, self.first_index + start)

    def feed(self, engines: Sequence[BlockEngine]) -> None:
        """Give every chunk to every engine, in data order for each engine, moving each chunk once."""
        chunk_outer = all(getattr(e, "chunk_outer", False) for e in engines)
        if self.data.device == self.device and not chunk_outer:
            # data resident: query blocks outside, so each block streams long chunks
            for engine in engines:
                for ch in self.chunks():
                    engine.add(ch)
        else:  # data elsewhere (host memory), or screens sharing a chunk's float32 rows: each chunk once
            for ch in self.chunks():
                for engine in engines:
                    engine.add(ch)

    def gather(self, index: Tensor, device: torch.device) -> Tensor:
        """Rows ``index`` (positions in the data, any shape) in float64 on ``device``."""
        return gather_rows(self.data, index, device, self.shift, self.scale)

    @property
    def storage_device(self) -> torch.device:
        return self.data.device


def merge_best(vals: Tensor, rows: Tensor, new_vals: Tensor, new_rows: Tensor, keep: int, largest: bool):
    """The ``keep`` best of two (values, row numbers) sets per query, sorted (the running top-k over chunks)."""
    vals = torch.cat([vals, new_vals], dim=1)
    vals, pos = vals.topk(min(keep, vals.shape[1]), dim=1, largest=largest, sorted=True)
    return vals, torch.cat([rows, new_rows], dim=1).gather(1, pos)
