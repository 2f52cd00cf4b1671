"""Test setup: on a machine without a GPU, run the Triton kernels in the interpreter on CPU.

TRITON_INTERPRET must be set before any Triton kernel is defined, i.e. before diffkernels.triton
is imported; conftest.py is imported before the test modules, so this is the place.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import diffkernels  # noqa: E402
from diffkernels import _backend  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def backends_for(device: str) -> list[str]:
    """Every backend that can run on ``device`` here (the reference always can)."""
    names = []
    for name in ("triton", "cuda", "cpp", "torch"):
        if _backend.unavailable(name, torch.device(device)) is None:
            names.append(name)
    return names


BACKEND_DEVICE = [(b, d) for d in DEVICES for b in backends_for(d)]


@pytest.fixture(params=BACKEND_DEVICE, ids=[f"{b}-{d}" for b, d in BACKEND_DEVICE])
def backend_device(request):
    """(backend, device), with the backend forced for the duration of the test."""
    backend, device = request.param
    with diffkernels.use_backend(backend):
        yield backend, device


@pytest.fixture
def gen():
    """A fresh random generator per test, seeded from the test's own random state (no fixed data)."""
    g = torch.Generator()
    g.seed()
    return g


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny tensors, where OpenMP only adds overhead on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- hypothesis profiles (tests/test_properties_*.py) ------------------------------------------
# "ci" (default): few examples, derandomized so CI runs the same examples every time; "long": a
# deeper random search, run by hand: HYPOTHESIS_PROFILE=long python -m pytest tests/test_properties_*.py
try:
    from hypothesis import HealthCheck, settings as _hyp_settings
except ImportError:  # hypothesis is a test extra; the other test files do not need it
    pass
else:
    _hyp_settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, database=None,
                                   suppress_health_check=[HealthCheck.too_slow])
    _hyp_settings.register_profile("long", max_examples=500, deadline=None, print_blob=True,
                                   suppress_health_check=[HealthCheck.too_slow])
    _hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
