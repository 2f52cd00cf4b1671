"""Data sharded across ``torch.distributed`` ranks for :func:`estimate_curve` (gloo on CPU, nccl on GPU).

How it works. Rank r holds rows [offset_r, offset_r + n_r) of the global dataset (contiguous shards
in rank order; :func:`shard_bounds` gives an even split). Every rank passes the same arguments and
seed, so every rank draws the same queries: source rows n_m and subsets are global indices. Then:

- Before the first level every rank sums its rows (float64) and checksums them; the sums and
  checksums are gathered and added in rank order, so every rank centres the data on the same mean
  and records the same data checksum in a checkpoint.

- A query's source row x_{n_m} lives on one rank. Each rank writes the rows it owns into a zero
  (M, D) float64 tensor and an ``all_reduce(SUM)`` gives every rank all of them; adding zeros is
  exact, so the rows arrive bit for bit.
- Each rank computes the softmax partial of the queries over its own rows (for the subset
  estimators, over the subset rows that fall in its shard), the partials are packed into one
  (M, 2D + 3) float64 tensor, ``all_gather``-ed and merged with :func:`merge_partials` in rank
  order, so every rank holds the same merged partial. This equals the single-process result up to
  float64 rounding (a different merge order), i.e. to ~1e-15 relative.
- cDOL's source-row partial is merged once, after the ranks' partials.

Memory of the gather: world_size * batch * (2D + 3) float64 per rank; lower ``batch_size`` when
that is too much. Checkpoints are read by rank 0 and broadcast, and written by rank 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .posterior import PosteriorPartial, merge_partials

__all__ = ["shard_bounds", "shard_layout", "gather_rows", "all_merge_partials", "on_all_ranks"]


def shard_bounds(N: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank ``rank``'s contiguous, nearly equal shard of N rows.

    Examples:
        >>> from diffkernels.optimal_loss import shard_bounds
        >>> [shard_bounds(10, rank, 3) for rank in range(3)]
        [(0, 4), (4, 7), (7, 10)]
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    base, extra = divmod(N, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _comm_device(device: torch.device, group) -> torch.device:
    # nccl only moves CUDA tensors; gloo moves CPU (and some CUDA) tensors.
    return device if dist.get_backend(group) == "nccl" else torch.device("cpu")


def shard_layout(n_local: int, D: int, device: torch.device, group) -> tuple[int, int]:
    """(this rank's offset, global N) from every rank's shard size; checks that D agrees."""
    world = dist.get_world_size(group)
    mine = torch.tensor([n_local, D], dtype=torch.int64, device=_comm_device(device, group))
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    sizes = [int(t[0]) for t in every]
    dims = {int(t[1]) for t in every}
    if len(dims) != 1:
        raise ValueError(f"ranks hold data with different numbers of columns D: {sorted(dims)}")
    rank = dist.get_rank(group)
    return sum(sizes[:rank]), sum(sizes)


def gather_rows(rows: Tensor, group) -> Tensor:
    """Rows that each rank filled where it owns them (zeros elsewhere), completed on every rank."""
    comm = rows.to(_comm_device(rows.device, group))
    dist.all_reduce(comm, op=dist.ReduceOp.SUM, group=group)
    return comm.to(rows.device)


def _pack(p: PosteriorPartial) -> Tensor:
    return torch.cat([p.center, p.log_max[:, None], p.sum_w[:, None], p.sum_wy, p.sum_wyy[:, None]], dim=1)


def _unpack(t: Tensor, D: int) -> PosteriorPartial:
    return PosteriorPartial(t[:, :D], t[:, D], t[:, D + 1], t[:, D + 2:2 * D + 2], t[:, 2 * D + 2])


def all_merge_partials(part: PosteriorPartial, group) -> PosteriorPartial:
    """Merge every rank's partial (same queries, disjoint rows) exactly; the same result on every rank."""
    D = part.center.shape[1]
    device = part.center.device
    packed = _pack(part).to(_comm_device(device, group)).contiguous()
    every = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, packed, group=group)
    return merge_partials(*[_unpack(t.to(device), D) for t in every])


def on_all_ranks(fn, group, only_rank0: bool = False, gather: bool = False):
    """Run ``fn`` (on rank 0 only if ``only_rank0``) and share its result or its error with every rank,
    so that an error on one rank raises everywhere instead of leaving the others in a collective.
    Returns rank 0's result, or with ``gather`` the list of every rank's results in rank order."""
    if group is None:
        return [fn()] if gather else fn()
    rank = dist.get_rank(group)
    outcome = (None, None)
    if rank == 0 or not only_rank0:
        try:
            outcome = (fn(), None)
        except (ValueError, TypeError) as exc:
            outcome = (None, f"{type(exc).__name__}: {exc}")
    every = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, outcome, group=group)
    errors = [f"rank {r}: {err}" for r, (_, err) in enumerate(every) if err]
    if errors:
        raise ValueError("; ".join(errors))
    return [result for result, _ in every] if gather else every[0][0]
