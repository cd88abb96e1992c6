"""spin_kernels/__init__.py, what both kernel files share: without triton they import and take the PyTorch
paths; with it, kernels run only in the mode triton was first imported in (conftest.py imports it to
interpret), and asking for the other mode is a KernelError that says how to fix it, never a fallback; the model
shows it to people as a UserError."""

import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")  # where triton is not installed this file skips instead of failing to import
import triton.language as tl  # noqa: E402

from spin_kernels import KernelError, launch, triton_interprets
from spin_kernels.attention import _attn_fwd_kernel, attention
from spin_kernels.logprob import token_logprobs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # as on macOS: `import triton` fails
import torch
import spin_kernels.attention as attention_module
import spin_kernels.logprob as logprob_module
q = torch.randn(1, 4, 9, 16)  # (B, Hq, T, D)
k, v = torch.randn(2, 1, 2, 9, 16)  # (B, Hkv, T, D)
assert not attention_module.uses_triton(q)
want = attention_module.attention_ref(q, k, v)
assert torch.allclose(attention_module.attention(q, k, v), want, atol=1e-6)
hidden, weight, targets = torch.randn(5, 8), torch.randn(11, 8), torch.tensor([1, -100, 3, 10, 0])
assert not logprob_module.uses_triton(hidden)
want = logprob_module.token_logprobs_ref(hidden, weight, targets)
assert torch.allclose(logprob_module.token_logprobs(hidden, weight, targets), want, atol=1e-6)
print("fell back")
"""


def test_without_triton_the_kernels_import_and_fall_back_to_pytorch():
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # asked to interpret, but there is no triton
    out = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "fell back" in out.stdout, out.stderr[-3000:]


def identity(x):
    return x


def run_attention():
    q = torch.zeros(1, 2, 8, 32)
    attention(q, q, q)


def run_logprobs():
    token_logprobs(torch.zeros(3, 8), torch.zeros(5, 8), torch.tensor([0, 1, 2]))


@pytest.mark.triton
@pytest.mark.parametrize("run", [run_attention, run_logprobs])
def test_interpreter_switched_on_too_late_is_an_error(monkeypatch, run):
    # As if triton had been imported before TRITON_INTERPRET=1: its own helpers are GPU functions.
    monkeypatch.setattr(tl, "sum", triton.JITFunction(identity))
    with pytest.raises(KernelError, match="TRITON_INTERPRET=1 was set after triton was first imported"):
        run()


@pytest.mark.triton
def test_the_model_shows_a_kernel_error_as_a_user_error(monkeypatch):
    from configurator import UserError
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=32,
                          attention="triton"))
    monkeypatch.setattr(tl, "sum", triton.JITFunction(identity))
    idx = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(UserError, match="TRITON_INTERPRET=1 was set after") as caught:
        model.token_logprobs(idx, idx)
    assert not isinstance(caught.value, KernelError) and "\n" not in str(caught.value)


def test_compiling_after_triton_was_imported_to_interpret_is_an_error():
    # Only CUDA tensors reach a launch with TRITON_INTERPRET unset; the check comes before any argument is read.
    assert "TRITON_INTERPRET" not in os.environ and triton_interprets()
    with pytest.raises(KernelError, match="can only be interpreted"):
        launch(_attn_fwd_kernel, (1,))
