"""python_examples/estimator_comparison.py runs end to end on a tiny problem (the documented run is larger)."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python_examples"))

import estimator_comparison  # noqa: E402


def test_estimator_comparison_smoke(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        result = estimator_comparison.main([
            "--num-points", "300", "--dim", "4", "--components", "3", "--subset", "20", "--queries", "64",
            "--reference-queries", "128", "--repeats", "2", "--num-sigmas", "4", "--c-factors", "4",
            "--out", str(tmp_path / "cmp"),
        ])
    finally:
        torch.set_num_threads(threads)
    assert set(result["estimators"]) == {"full (A-B, same queries)", "SNIS", "DOL (C = 1)", "cDOL (C = 4 N/L)"}
    assert "| SNIS |" in capsys.readouterr().out
    saved = json.loads((tmp_path / "cmp.json").read_text())
    assert len(saved["estimators"]["SNIS"]["estimates"]) == 2
    assert (tmp_path / "cmp.md").read_text().startswith("Gaussian mixture: N = 300")
