"""Checkpoints of estimate_curve: kill a run after its first noise level, resume, get the same numbers."""

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from diffkernels.optimal_loss import estimate_curve
from diffkernels.optimal_loss.estimators import curve
from diffkernels.optimal_loss.estimators import data as data_module

SIGMAS = [0.05, 0.2, 0.8, 3.0, 10.0]
KW = dict(estimator="cdol", num_queries=128, subset_size=40, seed=5, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: no OpenMP overhead


def _data():
    return torch.randn(300, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)


# The child computes the same curve; every checkpoint write is followed by a pause, so that the
# parent can kill it between levels (SIGKILL: no cleanup, as in a crash or a pre-empted job).
CHILD = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    from diffkernels.optimal_loss.estimators import curve
    write = curve.atomic_write_json
    def slow_write(path, obj):
        write(path, obj)
        time.sleep(30)
    curve.atomic_write_json = slow_write
    data = torch.randn(300, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    curve.estimate_curve(data, {sigmas!r}, checkpoint=sys.argv[1], **{kw!r})
""")


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    ckpt = tmp_path / "curve.ckpt.json"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(sigmas=SIGMAS, kw=KW))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ckpt.exists():
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the child wrote no checkpoint"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    saved = json.loads(ckpt.read_text())
    assert 1 <= len(saved["levels"]) < len(SIGMAS)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left

    resumed = estimate_curve(_data(), SIGMAS, checkpoint=ckpt, **KW)
    fresh = estimate_curve(_data(), SIGMAS, **KW)
    np.testing.assert_array_equal(resumed.j_star, fresh.j_star)
    np.testing.assert_array_equal(resumed.stderr, fresh.stderr)
    assert len(json.loads(ckpt.read_text())["levels"]) == len(SIGMAS)


def test_resume_loads_finished_levels(tmp_path, monkeypatch):
    ckpt = tmp_path / "c.json"
    first = estimate_curve(_data(), SIGMAS, checkpoint=ckpt, **KW)
    calls = []
    monkeypatch.setattr(curve, "estimate_level", lambda *a, **k: calls.append(1))
    again = estimate_curve(_data(), SIGMAS, checkpoint=ckpt, **KW)  # nothing is recomputed
    assert calls == []
    np.testing.assert_array_equal(again.j_star, first.j_star)


def test_mismatching_settings_are_an_error(tmp_path):
    ckpt = tmp_path / "c.json"
    estimate_curve(_data(), SIGMAS[:2], checkpoint=ckpt, **KW)
    with pytest.raises(ValueError, match="num_queries: 128 != 64"):
        estimate_curve(_data(), SIGMAS[:2], checkpoint=ckpt, **{**KW, "num_queries": 64})
    with pytest.raises(ValueError, match="sigmas"):
        estimate_curve(_data(), SIGMAS[:3], checkpoint=ckpt, **KW)
    with pytest.raises(ValueError, match="data"):
        estimate_curve(_data() + 1.0, SIGMAS[:2], checkpoint=ckpt, **KW)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        estimate_curve(_data(), SIGMAS[:2], checkpoint=tmp_path / "junk.json", **KW)
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="not a diffkernels"):
        estimate_curve(_data(), SIGMAS[:2], checkpoint=tmp_path / "other.json", **KW)


def test_resume_on_changed_data_is_an_error(tmp_path, monkeypatch):
    """The checkpoint records a checksum of every value: a change anywhere (not only in a few sampled
    rows) or a reordering stops the resume; the same values stored otherwise (float32 vs float64 of
    exactly representable values, a memmap read in host chunks) resume."""
    data = _data()
    ckpt = tmp_path / "c.json"
    estimate_curve(data, SIGMAS[:2], checkpoint=ckpt, **KW)
    changed = data.clone()
    changed[100, 2] += 1e-9  # row 100: not one of rows 0, 1, 2, N/2, N-1
    swapped = data.clone()
    swapped[[10, 20]] = data[[20, 10]]
    for other in (changed, swapped):
        with pytest.raises(ValueError, match="other data"):
            estimate_curve(other, SIGMAS[:2], checkpoint=ckpt, **KW)
    rounded = data.float()
    ckpt32 = tmp_path / "c32.json"
    first = estimate_curve(rounded.double(), SIGMAS[:2], checkpoint=ckpt32, **KW)
    np.save(tmp_path / "d.npy", rounded.numpy())
    monkeypatch.setattr(data_module, "HOST_CHUNK_ELEMENTS", 4 * 32)
    monkeypatch.setattr(data_module, "SCAN_ELEMENTS_CPU", 4 * 7)
    monkeypatch.setattr(curve, "estimate_level", lambda *a, **k: pytest.fail("a finished level was recomputed"))
    again = estimate_curve(np.load(tmp_path / "d.npy", mmap_mode="r"), SIGMAS[:2], checkpoint=ckpt32, **KW)
    np.testing.assert_array_equal(again.j_star, first.j_star)


def _good_checkpoint(tmp_path):
    ckpt = tmp_path / "good.json"
    estimate_curve(_data(), SIGMAS[:2], checkpoint=ckpt, **KW)
    return json.loads(ckpt.read_text())


@pytest.mark.parametrize("damage, match", [
    (lambda c: [c], "not a diffkernels"),
    (lambda c: {**c, "format": "diffkernels.optimal_loss.curve/1"}, "format"),
    (lambda c: {k: v for k, v in c.items() if k != "settings"}, "settings"),
    (lambda c: {**c, "settings": "x"}, "settings"),
    (lambda c: {**c, "levels": [1, 2]}, "levels"),
    (lambda c: {**c, "levels": {"0": "x"}}, "level 0"),
    (lambda c: {**c, "levels": {"7": c["levels"]["0"]}}, "level '7'"),
    (lambda c: {**c, "levels": {"zero": c["levels"]["0"]}}, "level 'zero'"),
    (lambda c: {**c, "levels": {"0": {k: v for k, v in c["levels"]["0"].items() if k != "j_ab"}}}, "j_ab"),
    (lambda c: {**c, "levels": {"0": {**c["levels"]["0"], "se_ab": "0.1"}}}, "se_ab"),
    (lambda c: {**c, "levels": {"1": c["levels"]["0"]}}, "sigma"),
])
def test_malformed_checkpoint_is_a_clear_error(tmp_path, damage, match):
    """Any damaged or foreign file is a ValueError that names the file (never a KeyError or TypeError)."""
    ckpt = tmp_path / "damaged.json"
    ckpt.write_text(json.dumps(damage(_good_checkpoint(tmp_path))))
    with pytest.raises(ValueError, match=match) as info:
        estimate_curve(_data(), SIGMAS[:2], checkpoint=ckpt, **KW)
    assert str(ckpt) in str(info.value)
