"""The data checksum that checkpoints record: an independent pure-Python reference of its definition
(so the int64 tensor arithmetic must wrap exactly mod 2^64), additivity over any split of the rows
(pieces of the data pass, ranks' shards), independence of the storage dtype, and sensitivity."""

import struct

import numpy as np
import pytest
import torch

from diffkernels.optimal_loss.estimators import data as E

MASK = (1 << 64) - 1


def _mix(v: int) -> int:
    v = (v * (0xBF58476D1CE4E5B9)) & MASK
    v ^= v >> 32
    return (v * 0x94D049BB133111EB) & MASK


def _reference_checksum(rows: np.ndarray, first_row: int) -> int:
    """The documented definition with Python integers: sum over rows of mix(row_sum ^ mix(row + salt)),
    row_sum = sum over columns of mix(bits(value) ^ mix(column + salt)), all mod 2^64."""
    n, D = rows.shape
    columns = [_mix(d + E.COLUMN_SALT) for d in range(D)]
    total = 0
    for i in range(n):
        row_sum = 0
        for d in range(D):
            bits = struct.unpack("<Q", struct.pack("<d", float(rows[i, d])))[0]
            row_sum = (row_sum + _mix(bits ^ columns[d])) & MASK
        total = (total + _mix(row_sum ^ _mix(first_row + i + E.ROW_SALT))) & MASK
    return total


def test_checksum_matches_the_python_reference():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(9, 5, generator=g, dtype=torch.float64)
    rows[0, :] = torch.tensor([0.0, -0.0, 1e-310, -1e300, 2.0**-149])  # zeros, subnormal, huge
    assert E.data_checksum(rows, 123) == _reference_checksum(rows.numpy(), 123)


def test_checksum_adds_up_over_any_split_and_ignores_the_storage_dtype():
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 256, (50, 7), generator=g).float()  # exact in every dtype below
    whole = E.data_checksum(data.double(), 0)
    for cuts in ([0, 50], [0, 1, 49, 50], [0, 13, 14, 31, 50]):
        parts = sum(E.data_checksum(data[a:b].double(), a) for a, b in zip(cuts, cuts[1:])) % (1 << 64)
        assert parts == whole
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.uint8, torch.int32):
        assert E.LocalRows(data.to(dtype), torch.device("cpu")).scan()[1] == whole
    for dtype in (np.float32, np.uint8):  # numpy arrays and memmaps
        assert E.LocalRows(data.numpy().astype(dtype), torch.device("cpu")).scan()[1] == whole


def test_checksum_sees_every_change():
    g = torch.Generator().manual_seed(2)
    data = torch.randint(0, 17, (40, 6), generator=g).double() / 8.0 - 1.0  # round values: many zero bits
    whole = E.data_checksum(data, 0)
    variants = []
    one_bit = data.clone()
    one_bit.view(torch.int64)[17, 3] ^= 1  # the last mantissa bit
    variants.append(one_bit)
    for i, j in ((0, 1), (3, 35)):
        rows = data.clone()
        rows[[i, j]] = data[[j, i]]
        variants.append(rows)
        cols = data.clone()
        cols[5, [i % 6, (j + 1) % 6]] = data[5, [(j + 1) % 6, i % 6]]
        variants.append(cols)
    for v in variants:
        assert not torch.equal(v, data)
        assert E.data_checksum(v, 0) != whole
    assert E.data_checksum(data, 1) != whole  # the same rows at another position


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_scan_names_the_first_bad_row(bad, monkeypatch):
    monkeypatch.setattr(E, "SCAN_ELEMENTS_CPU", 3 * 4)  # several pieces
    data = np.zeros((30, 3), dtype=np.float32)
    data[[22, 27], 1] = bad
    with pytest.raises(ValueError, match="train row 22 contains NaN or Inf"):
        E.LocalRows(data, torch.device("cpu"), name="train").scan()


# --- conversions, schedules and scaling fits: strings and other non-numbers are errors -------------

from diffkernels.optimal_loss import (  # noqa: E402
    adaptive_density, edm_schedule_loss, find_s_star, fit_power_law, fit_scaling_law, interpolate_log,
    loss_factor, loss_weight, s_from_flow, s_from_vp, sample_sigmas,
)

GRID = np.geomspace(0.01, 10.0, 6)
J = GRID**2 / (1.0 + GRID**2)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: interpolate_log("0.5", GRID, J), TypeError, "s must be real numbers"),
    (lambda: interpolate_log(0.5, GRID.astype(str), J), TypeError, "sigmas must be real numbers"),
    (lambda: interpolate_log(0.5, GRID, [str(v) for v in J]), TypeError, "j_star must be real numbers"),
    (lambda: loss_factor(True, "eps"), TypeError, "s must be real numbers"),
    (lambda: loss_factor(0.5, "edm", sigma_data="0.5"), TypeError, "sigma_data"),
    (lambda: loss_factor(0.5, "edm", sigma_data=float("inf")), ValueError, "sigma_data"),
    (lambda: s_from_vp(sigma="0.5"), TypeError, "sigma"),
    (lambda: s_from_flow("0.5"), TypeError, "t must be"),
    (lambda: edm_schedule_loss(GRID, J, p_std="1.2"), TypeError, "p_std"),
    (lambda: edm_schedule_loss(GRID, J, p_mean=float("nan")), ValueError, "p_mean"),
    (lambda: find_s_star(GRID, J, rel="0.1"), TypeError, "rel"),
    (lambda: loss_weight(0.5, GRID, J, a="1"), TypeError, "a must be"),
    (lambda: loss_weight(0.5, GRID, J, bump_height=float("nan")), ValueError, "bump_height"),
    (lambda: adaptive_density(GRID, np.ones(6), J + 1.0, J, floor="0"), TypeError, "floor"),
    (lambda: adaptive_density(GRID, np.ones(5), J + 1.0, J), ValueError, "match sigmas in length"),
    (lambda: adaptive_density(GRID, np.full(6, np.nan), J + 1.0, J), ValueError, "finite"),
    (lambda: sample_sigmas(2.5, GRID, J), ValueError, "n must be"),
    (lambda: sample_sigmas(-1, GRID, J), ValueError, "n must be"),
    (lambda: fit_power_law(["1", "2"], [1.0, 2.0]), TypeError, "x must be real numbers"),
    (lambda: fit_scaling_law([1.0, 2.0, 4.0], [3.0, 2.0, 1.5], j_star="1"), TypeError, "j_star"),
])
def test_schedule_functions_reject_non_numbers(call, exc, match):
    """A string such as "0.5" used to be converted silently by numpy; now every argument is checked."""
    with pytest.raises(exc, match=match):
        call()


def test_schedule_functions_accept_numbers_of_every_kind():
    assert sample_sigmas(0, GRID, J).shape == (0,)
    np.testing.assert_array_equal(interpolate_log(torch.tensor([0.5]), GRID, J), interpolate_log([0.5], GRID, J))
    assert loss_factor(np.float32(0.5), "edm", sigma_data=np.float32(0.5)) == pytest.approx(8.0)
