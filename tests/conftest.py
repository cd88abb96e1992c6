"""Test setup shared by every module.

Triton decides once, when it is first imported, whether it can interpret kernels on the CPU, so
TRITON_INTERPRET=1 is set before anything imports it. The kernels read the variable at call time:
only tests marked `triton` (the kernel tests) keep it; every other test runs with it unset, so the
model's CPU path (and any train.py subprocess) uses plain PyTorch and stays fast.

Tests use tiny models, which run fastest on one thread (two threads on a busy 2-core machine crawl).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


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
