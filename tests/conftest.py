"""Test setup: the Triton kernels run on CPU under the interpreter (unless the
caller set TRITON_INTERPRET, as `make gpu-check` does with 0 for the CUDA tests),
and every kernel output starts as NaN (COOPSEG_POISON) so unwritten elements fail.

Fixtures and markers live here; plain helpers (the tolerance table, the comparison
with the reference, the peak-memory counter) in helpers.py."""
import os

# Both must be set before triton / the extension read them.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["COOPSEG_POISON"] = "1"
os.environ.pop("COOPSEG_BACKEND", None)

import pytest  # noqa: E402
import torch  # noqa: E402

import coopseg_kernels  # noqa: E402

CUDA = torch.cuda.is_available()


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# Backends that run in this process: C++ on CPU, Triton on CPU through the interpreter.
CPU_BACKENDS = [
    pytest.param("cpp", marks=pytest.mark.skipif(not coopseg_kernels.HAS_CPP, reason="C++ extension not built")),
    pytest.param("triton", marks=pytest.mark.skipif(not _has_triton(), reason="triton not installed")),
]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture
def set_threads():
    """torch.set_num_threads for the test; the count in force before is restored after it."""
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (make gpu-check)")
    config.addinivalue_line("markers", "slow: long/big opt-in test (--runslow or COOPSEG_SLOW=1)")


def pytest_collection_modifyitems(config, items):
    runslow = config.getoption("--runslow") or os.environ.get("COOPSEG_SLOW") == "1"
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow or COOPSEG_SLOW=1")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not runslow:
            item.add_marker(skip_slow)
        if "cuda" in item.keywords and not CUDA:
            item.add_marker(skip_cuda)
