"""kernels/attention.py: the Triton kernels (run by the interpreter on CPU) against the float64 spec.

Shapes are odd on purpose (T = 1, 77, 130 against 32..128-wide tiles), both GQA 4:1 and 1:1, causal
and not, and most cases use strided views of a fused projection, the layout model.py passes in.
"""

import pytest
import torch
import torch.nn.functional as F

import kernels.attention as attention_module
from configurator import UserError
from kernels.attention import attention, attention_ref, uses_triton

pytestmark = pytest.mark.triton  # conftest.py keeps TRITON_INTERPRET=1 for these tests


def make_inputs(B, Hq, Hkv, T, D, dtype, model_layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if model_layout:  # strided views into one fused projection, as model.py makes q, k, v
        fused = torch.randn(B, T, (2 * Hq + 2 * Hkv) * D, generator=gen).to(dtype)  # (B, T, (2*Hq + 2*Hkv) * D)
        parts = fused.split([Hq * D, Hkv * D, Hkv * D, Hq * D], dim=-1)
        return [part.view(B, T, -1, D).transpose(1, 2) for part in parts]  # q, k, v, grad_out: (B, H, T, D)
    return [torch.randn(B, H, T, D, generator=gen).to(dtype) for H in (Hq, Hkv, Hkv, Hq)]  # (B, H, T, D)


def relative_error(actual: torch.Tensor, ref: torch.Tensor) -> float:
    """max|a - ref| / max|ref|; absolute where ref is exactly 0 (dq, dk at T=1: softmax over one key)."""
    scale = ref.abs().max().item()
    return (actual.double() - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def outputs_and_grads(fn, q, k, v, grad_out, causal, dtype=None):
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, causal=causal)
    out.backward(grad_out.to(dtype or grad_out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def cases():
    """Every T x D x (GQA 4:1, 1:1) x causal x dtype, plus the head-dim-128 tiles; batch, layout and
    seed vary across cases so each sees strides and batch offsets other than the trivial ones."""
    out = []
    for dtype, dtype_name in ((torch.float32, "fp32"), (torch.float16, "fp16")):
        for T in (1, 77, 130):
            for D in (16, 32, 64):
                for Hq, Hkv in ((4, 1), (2, 2)):
                    for causal in (True, False):
                        i = len(out)
                        B, model_layout = 1 + i % 2, i % 3 != 0
                        name = f"{dtype_name}-T{T}-D{D}-{Hq}:{Hkv}-{'causal' if causal else 'full'}"
                        out.append(pytest.param(B, Hq, Hkv, T, D, causal, dtype, model_layout, i, id=name))
    out.append(pytest.param(1, 2, 1, 77, 128, True, torch.float16, True, 0, id="fp16-T77-D128-2:1-causal"))
    out.append(pytest.param(1, 2, 2, 130, 128, False, torch.float32, False, 1, id="fp32-T130-D128-2:2-full"))
    return out


@pytest.mark.parametrize("B,Hq,Hkv,T,D,causal,dtype,model_layout,seed", cases())
def test_matches_float64_reference(B, Hq, Hkv, T, D, causal, dtype, model_layout, seed):
    q, k, v, grad_out = make_inputs(B, Hq, Hkv, T, D, dtype, model_layout, seed)
    assert uses_triton(q)
    got = outputs_and_grads(attention, q, k, v, grad_out, causal)
    want = outputs_and_grads(attention_ref, q, k, v, grad_out, causal, dtype=torch.float64)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape and g.dtype == dtype, name
        err = relative_error(g, w)
        assert err <= tolerance, f"{name}: relative error {err:.2e} > {tolerance:.0e}"


def test_kernels_really_run_under_the_interpreter(monkeypatch):
    launched = []
    real_launch = attention_module.launch

    def counting_launch(kernel, *args, **meta):
        launched.append(kernel.__name__)
        return real_launch(kernel, *args, **meta)

    def no_sdpa(*args, **kwargs):
        raise AssertionError("attention() fell back to SDPA")

    monkeypatch.setattr(attention_module, "launch", counting_launch)
    monkeypatch.setattr(F, "scaled_dot_product_attention", no_sdpa)
    q, k, v, grad_out = make_inputs(1, 4, 2, 40, 32, torch.float32, model_layout=True)
    assert uses_triton(q)
    got = outputs_and_grads(attention, q, k, v, grad_out, causal=True)
    assert launched == ["_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel",
                        "_attn_bwd_dq_kernel"]
    want = outputs_and_grads(attention_ref, q, k, v, grad_out, True, dtype=torch.float64)
    assert max(relative_error(g, w) for g, w in zip(got, want)) <= 1e-4


def test_cpu_without_interpreter_uses_sdpa(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(attention_module, "launch", lambda *args, **meta: pytest.fail("Triton kernel launched"))
    q, k, v, grad_out = make_inputs(1, 4, 2, 33, 32, torch.float32, model_layout=False)
    assert not uses_triton(q)
    got = outputs_and_grads(attention, q, k, v, grad_out, causal=True)
    want = outputs_and_grads(attention_ref, q, k, v, grad_out, True, dtype=torch.float64)
    assert max(relative_error(g, w) for g, w in zip(got, want)) <= 1e-5


@pytest.mark.parametrize("causal", [True, False])
def test_unsupported_head_dim_falls_back_to_reference_values(monkeypatch, causal):
    monkeypatch.setattr(attention_module, "launch", lambda *args, **meta: pytest.fail("Triton kernel launched"))
    q, k, v, grad_out = make_inputs(2, 4, 1, 19, 48, torch.float32, model_layout=True)
    assert not uses_triton(q)
    got = outputs_and_grads(attention, q, k, v, grad_out, causal)
    want = outputs_and_grads(attention_ref, q, k, v, grad_out, causal, dtype=torch.float64)
    assert max(relative_error(g, w) for g, w in zip(got, want)) <= 1e-5


def test_bf16_on_cpu_is_not_sent_to_the_interpreter():
    # The interpreter multiplies bf16 dot operands as raw bits; bf16 is checked on a GPU only.
    q = torch.zeros(1, 2, 8, 32, dtype=torch.bfloat16)
    assert not uses_triton(q)
    assert uses_triton(q.float()) and uses_triton(q.half())


def test_bad_shapes_raise_user_errors():
    q = torch.zeros(1, 4, 8, 32)
    with pytest.raises(UserError, match="multiple"):
        attention(q, torch.zeros(1, 3, 8, 32), torch.zeros(1, 3, 8, 32))
    with pytest.raises(UserError, match="differ"):
        attention(q, torch.zeros(1, 2, 9, 32), torch.zeros(1, 2, 9, 32))
    with pytest.raises(UserError, match="dtypes"):
        attention(q, torch.zeros(1, 2, 8, 32).half(), torch.zeros(1, 2, 8, 32).half())
