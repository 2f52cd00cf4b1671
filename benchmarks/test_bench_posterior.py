"""benchmarks/bench_posterior.py's knn section: the wrong-neighbour-set count and the baselines it times.

The count must see a wrong set (a returned row that is not among the k nearest), must not count rows at
equal distance as wrong, and the chunked cdist baseline must merge its chunks into the true k nearest.
On tiny data with near-duplicate triples our knn is exact (0 wrong sets) on centred and pixel-scale data.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout
from benchmarks import bench_posterior as bp  # noqa: E402

CPU = torch.device("cpu")


def test_wrong_sets_counts_wrong_rows_and_accepts_ties():
    data = torch.tensor([[0.0], [1.0], [-1.0], [3.0]])
    q = torch.zeros(2, 1)
    exact = bp.exact_distances(q, data)
    # Nearest of 0: row 0 (distance 0), then rows 1 and 2 tied at distance 1.
    assert bp.wrong_sets(exact, torch.tensor([[0, 1], [0, 2]])) == 0.0
    assert bp.wrong_sets(exact, torch.tensor([[0, 1], [0, 3]])) == 0.5
    assert bp.wrong_sets(exact, torch.tensor([[1, 2], [3, 0]])) == 1.0


def test_exact_distances_are_direct_differences():
    # |x|^2 ~ 1e18: the expanded form |x|^2 - 2 x.y + |y|^2 loses ~100 to float64 rounding; direct
    # differences give these distances exactly.
    data = torch.tensor([[1e9, 0.0], [1e9, 1.0]], dtype=torch.float64)
    d = bp.exact_distances(torch.tensor([[1e9, 0.25]], dtype=torch.float64), data, chunk=1)
    assert d.dtype == torch.float64 and torch.equal(d, torch.tensor([[0.25, 0.75]], dtype=torch.float64))


@pytest.mark.parametrize("chunk", [3, 7, 100])
def test_cdist_topk_merges_chunks(chunk):
    g = torch.Generator().manual_seed(0)
    data, q = torch.randn(50, 4, generator=g), torch.randn(9, 4, generator=g)
    d, i = bp.cdist_topk(q, data, 3, chunk=chunk)
    ref = torch.cdist(q, data).square().topk(3, largest=False)
    torch.testing.assert_close(d, ref.values)
    assert torch.equal(i, ref.indices)


def test_knn_data_kinds():
    g = torch.Generator().manual_seed(1)
    centred = bp.knn_data("centred", 30, 8, CPU, g)
    pixel = bp.knn_data("pixel", 30, 8, CPU, g)
    assert centred.mean(0).abs().max() < 1e-5
    assert pixel.min() >= 0 and pixel.max() <= 255 and 100 < pixel.mean() < 156
    # Near-duplicate triples: rows 3j + 1 and 3j + 2 are within ~1e-3 of row 3j.
    assert (centred[1::3] - centred[0::3][:10]).norm(dim=1).max() < 1e-2


@pytest.mark.parametrize("kind", bp.KNN_KINDS)
def test_bench_knn_ours_exact(kind):
    faiss_ok, _ = bp.faiss_status(CPU)
    row = bp.bench_knn(kind, 24, 300, 16, CPU, 1, torch.Generator().manual_seed(2), faiss_ok)
    assert "error" not in row and row["checked_queries"] == 24
    for name in ("ours", "ours_f64", "cdist_fp32") + (("faiss",) if faiss_ok else ()):
        assert isinstance(row[f"ms_{name}"], float) and row[f"ms_{name}"] > 0, row
        assert 0.0 <= row[f"wrong_{name}"] <= 1.0
    assert row["wrong_ours"] == 0.0 and row["wrong_ours_f64"] == 0.0
