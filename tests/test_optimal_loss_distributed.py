"""estimate_curve with the data sharded over 2 gloo processes on CPU matches one process to 1e-12;
shifted data gives the same curve (all ranks centre on the same mean); the checkpoint's data checksum
is that of the whole dataset."""

import json
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffkernels.optimal_loss import estimate_curve, shard_bounds
from diffkernels.optimal_loss.estimators import data as E

SIGMAS = [0.05, 0.3, 2.0]
RUNS = {
    "full": dict(estimator="full", num_queries=150, batch_size=64),
    "snis": dict(estimator="snis", num_queries=130, subset_size=25),
    "dol": dict(estimator="dol", num_queries=130, subset_size=25),
    "cdol": dict(estimator="cdol", num_queries=130, subset_size=25),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: no OpenMP overhead


def _data():
    # N = 211: uneven shards (106 + 105 rows).
    return torch.randn(211, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir, ckpt):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        data = _data()
        lo, hi = shard_bounds(data.shape[0], rank, world)
        shard = data[lo:hi]
        if rank == 1:
            shard = shard.numpy()  # a rank may hold its shard as a numpy array (e.g. a memmap)
        results = {}
        for name, kw in RUNS.items():
            r = estimate_curve(shard, SIGMAS, seed=3, progress=False, distributed=True, device="cpu",
                               checkpoint=ckpt if name == "cdol" else None, **kw)
            results[name] = r.to_dict()
        # +64 per element: the ranks' partial sums give one mean, so the curve does not move.
        results["snis_shifted"] = estimate_curve(shard + 64.0, SIGMAS, seed=3, progress=False, distributed=True,
                                                 device="cpu", **RUNS["snis"]).to_dict()
        # A NaN in rank 1's shard raises on both ranks (no rank is left waiting in a collective).
        bad = torch.as_tensor(shard).clone()
        if rank == 1:
            bad[3, 0] = float("nan")
        try:
            estimate_curve(bad, SIGMAS, num_queries=8, progress=False, distributed=True, device="cpu")
        except ValueError as exc:
            results["error"] = str(exc)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_single_process(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    ckpt = str(tmp_path / "cdol.ckpt.json")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), ckpt), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name, kw in RUNS.items():
        single = estimate_curve(_data(), SIGMAS, seed=3, progress=False, device="cpu", **kw)
        for got in ranks:
            got = got[name]
            assert got["num_data"] == 211
            for key in ("j_star", "stderr", "j_star_ab", "stderr_ab"):
                np.testing.assert_allclose(got[key], getattr(single, key), rtol=1e-12, atol=1e-300, err_msg=f"{name} {key}")
        assert ranks[0][name] == ranks[1][name]  # every rank holds the same result
    single = estimate_curve(_data(), SIGMAS, seed=3, progress=False, device="cpu", **RUNS["snis"])
    for got in ranks:
        assert "rank 1" in got.get("error", "") and "row 3" in got["error"]
        for key in ("j_star", "stderr"):  # rounding of the centring: ~1e-16 * 64 per element
            np.testing.assert_allclose(got["snis_shifted"][key], getattr(single, key), rtol=1e-9, err_msg=key)
    # Rank 0 wrote the checkpoint after every level, with the checksum of all 211 rows.
    saved = json.loads(open(ckpt).read())
    assert sorted(saved["levels"]) == ["0", "1", "2"] and saved["settings"]["num_data"] == 211
    assert saved["settings"]["data"] == E.Dataset(E.LocalRows(_data(), torch.device("cpu")), None).fingerprint
