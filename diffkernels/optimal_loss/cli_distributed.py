"""The torchrun side of ``diffkernels optimal-loss``: this process's place in the launch (from the
environment), its device and process-group backend, its shard of the data rows, and the collective
that shares every process's input error before any work starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from ..cli import CliError


class Launch(NamedTuple):
    """This process's place in a torchrun launch."""

    rank: int
    world_size: int
    local_rank: int | None


def _env_int(name: str, lo: int, hi: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None:
        raise CliError(f"{name} is not set (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)")
    try:
        value = int(text)
    except ValueError:
        raise CliError(f"environment variable {name}={text!r} is not an integer") from None
    if value < lo or (hi is not None and value > hi):
        raise CliError(f"environment variable {name}={value} is out of range")
    return value


def launch_from_env() -> Launch | None:
    """The torchrun launch this process belongs to, or None when neither RANK nor WORLD_SIZE is set
    (one process). CliError naming a missing or malformed variable."""
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return None
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if rank >= world:
        raise CliError(f"environment variable RANK={rank} is not below WORLD_SIZE={world}")
    _env_int("MASTER_PORT", 0, 65535)
    if not os.environ.get("MASTER_ADDR"):
        raise CliError("MASTER_ADDR is not set (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)")
    local = _env_int("LOCAL_RANK", 0) if "LOCAL_RANK" in os.environ else None
    return Launch(rank, world, local)


def _process_device(text: str | None, launch: Launch) -> str:
    """This process's compute device: plain ``cuda`` (or the default where CUDA is available) is
    cuda:LOCAL_RANK, one GPU per process; ``cuda:N`` is taken as given."""
    import torch

    if text is None:
        text = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(text)
    if dev.type != "cuda" or dev.index is not None:
        return text
    if launch.local_rank is None:
        raise CliError("--device cuda under torchrun needs LOCAL_RANK (one GPU per process); or pass --device cuda:N")
    count = torch.cuda.device_count()
    if launch.local_rank >= count:
        raise CliError(f"LOCAL_RANK={launch.local_rank} but only {count} CUDA device{'s are' if count != 1 else ' is'} "
                       f"visible: start at most {count} processes per node (--nproc-per-node), or pass --device cuda:N")
    return f"cuda:{launch.local_rank}"


def _dist_backend(choice: str | None, dev: str) -> str:
    """The process group's backend: nccl for CUDA, gloo for the CPU, unless --dist-backend says otherwise."""
    import torch.distributed as dist

    if not dist.is_available():
        raise CliError("this torch is built without torch.distributed; run without torchrun")
    backend = choice or ("nccl" if dev.startswith("cuda") else "gloo")
    if backend == "nccl" and not dev.startswith("cuda"):
        raise CliError(f"--dist-backend nccl needs --device cuda (nccl moves only CUDA tensors), not {dev}")
    available = {"nccl": dist.is_nccl_available, "gloo": dist.is_gloo_available}[backend]()
    if not available:
        raise CliError(f"--dist-backend {backend}: this torch has no {backend}; use --dist-backend "
                       f"{'gloo' if backend == 'nccl' else 'nccl'}")
    return backend


def _npy_shard(spec: str, rank: int, world: int):
    """(this process's rows of the .npy file ``spec`` as an (n, D) memory map, N): only the header
    and these rows are read. DataError as from load_data, naming rows by their global index."""
    from . import shard_bounds
    from .io import DataError, load_data

    total = []

    def bounds(N):
        if N < world:
            raise DataError(f"{spec} has {N} rows, fewer than the {world} processes (WORLD_SIZE)")
        total.append(N)
        return shard_bounds(N, rank, world)

    shard = load_data(spec, rows=bounds)
    return shard, total[0]


def _load_rows(args, launch: Launch | None):
    """(the rows this process holds, N of the whole dataset)."""
    from . import shard_bounds
    from .io import DIGITS, DataError, load_data

    if launch is None:
        data = load_data(args.data, key=args.key)
        return data, data.shape[0]
    if args.data != DIGITS and Path(args.data).suffix.lower() == ".npy":
        return _npy_shard(args.data, launch.rank, launch.world_size)
    data = load_data(args.data, key=args.key)  # other formats: loaded whole, then sliced
    N = data.shape[0]
    if N < launch.world_size:
        raise DataError(f"{args.data} has {N} rows, fewer than the {launch.world_size} processes (WORLD_SIZE)")
    lo, hi = shard_bounds(N, launch.rank, launch.world_size)
    return data[lo:hi], N


def _agree(error: str | None) -> str | None:
    """Every process's error (or None) gathered: the one error they all report, or the first failing
    rank's, prefixed with its rank; None when every process is fine."""
    import torch.distributed as dist

    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, error)
    failed = [(r, e) for r, e in enumerate(every) if e is not None]
    if not failed:
        return None
    if len(failed) == len(every) and len({e for _, e in failed}) == 1:
        return failed[0][1]
    return f"rank {failed[0][0]}: {failed[0][1]}"
