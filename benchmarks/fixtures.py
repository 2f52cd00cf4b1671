"""Fixtures shared by the pytest-benchmark suites (imported by name into each suite: a conftest.py here
would shadow tests/conftest.py, since both are imported as the module ``conftest``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout: diffkernels, benchmarks
from benchmarks.environment import default_device, fused_backend  # noqa: E402


@pytest.fixture(scope="module")
def backend():
    """The fused ops' compiled backend on the default device; a module's cases that use it are skipped where
    there is none."""
    try:
        return fused_backend(default_device())
    except RuntimeError as exc:
        pytest.skip(str(exc))
