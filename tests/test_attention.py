"""spin_kernels/attention.py: the Triton kernels (run by the interpreter on CPU) against the float64 spec.

Shapes are odd on purpose (T = 1, 77, 130 against 32..128-wide tiles), both GQA 4:1 and 1:1, causal
and not, and most cases use strided views of a fused projection, the layout model.py passes in. The masks of
packed rows and sliding windows are checked against attention_ref with packing.visible_mask, on random rows of
documents whose boundaries fall anywhere in the tiles.
"""

import random

import pytest
import torch
import torch.nn.functional as F

import spin_kernels.attention as attention_module
from spin_kernels import KernelError
from spin_kernels.attention import attention, attention_ref, uses_triton
from packing import RowLayout, visible_mask

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


def outputs_and_grads(fn, q, k, v, grad_out, causal, dtype=None, **mask):
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, causal=causal, **mask)
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


def random_layout(B: int, T: int, seed: int) -> RowLayout:
    """Rows of documents (a prompt of 0-10 tokens, then 1-3 response segments whose positions continue from it),
    the last cut at the row's end or followed by 0-5 padding tokens (one-token documents)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(B):
        positions, starts, ends, segments = [], [], [], []
        docs_end = T - rng.randint(0, min(5, T - 1))
        while len(positions) < docs_end:
            prompt, start = rng.randint(0, 10), len(positions)
            doc_positions, doc_segments = list(range(prompt)), [0] * prompt
            for segment in range(1, rng.randint(1, 3) + 1):
                n = rng.randint(1, 20)
                doc_positions += range(prompt, prompt + n)
                doc_segments += [segment] * n
            n = min(len(doc_positions), docs_end - start)
            positions, segments = positions + doc_positions[:n], segments + doc_segments[:n]
            starts, ends = starts + [start] * n, ends + [start + n] * n
        pad = range(len(positions), T)
        rows.append((positions + [0] * len(pad), starts + list(pad), ends + [t + 1 for t in pad],
                     segments + [0] * len(pad)))
    return RowLayout(*(torch.tensor(column, dtype=torch.int32) for column in zip(*rows)))


def masked_cases():
    """Packed rows, sliding windows and both. Windows from 1 (a token sees itself only) to 200, which gives
    every stage of every kernel at T=300: masked blocks at the window's far edge, blocks seen whole, masked
    diagonal blocks; T = 1, 77, 130, 300 against the 32..128-wide tiles."""
    fp32 = [(77, True, None), (130, True, None), (300, True, None), (130, True, 37), (300, True, 37), (1, False, 1),
            (77, False, 1), (77, False, 8), (300, False, 8), (130, False, 100), (300, False, 200)]
    fp16 = [(130, True, None), (300, True, 37), (300, False, 200)]
    out = []
    for dtype, dtype_name, shapes in ((torch.float32, "fp32", fp32), (torch.float16, "fp16", fp16)):
        for T, packed, window in shapes:
            i = len(out)
            Hq, Hkv = ((4, 1), (2, 2))[i % 2]
            B, D, model_layout = 1 + i % 2, (16, 32, 64)[i % 3], i % 3 != 0
            name = f"{dtype_name}-T{T}-D{D}-{Hq}:{Hkv}-{'packed' if packed else 'rows'}-window{window}"
            out.append(pytest.param(B, Hq, Hkv, T, D, packed, window, dtype, model_layout, i, id=name))
    return out


@pytest.mark.parametrize("B,Hq,Hkv,T,D,packed,window,dtype,model_layout,seed", masked_cases())
def test_masked_kernels_match_the_masked_reference(B, Hq, Hkv, T, D, packed, window, dtype, model_layout, seed,
                                                   monkeypatch):
    q, k, v, grad_out = make_inputs(B, Hq, Hkv, T, D, dtype, model_layout, seed)
    layout = random_layout(B, T, seed) if packed else None
    mask = visible_mask(layout, T, window, q.device)
    launched = []
    real_launch = attention_module.launch

    def recording_launch(kernel, *args, **meta):
        launched.append((kernel.__name__, meta.get("PACKED"), meta.get("WINDOWED")))
        return real_launch(kernel, *args, **meta)

    with monkeypatch.context() as patched:  # the masked kernels themselves, never a fallback to SDPA
        patched.setattr(attention_module, "launch", recording_launch)
        patched.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: pytest.fail("fell back to SDPA"))
        got = outputs_and_grads(attention, q, k, v, grad_out, True, layout=layout, window=window)
    flags = (packed, window is not None and window < T)  # a window as long as the row is no window
    assert {name for name, *_ in launched} == {"_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_kernel"}
    assert all((p, w) == flags for name, p, w in launched if name != "_attn_bwd_delta_kernel"), launched
    want = outputs_and_grads(attention_ref, q, k, v, grad_out, True, dtype=torch.float64, mask=mask)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape and g.dtype == dtype, name
        err = relative_error(g, w)
        assert err <= tolerance, f"{name}: relative error {err:.2e} > {tolerance:.0e}"


def test_the_masks_really_cut_attention():
    """The masked outputs differ from plain causal attention (the masks are not silently ignored), and a
    document's outputs do not change when another document in its row does."""
    q, k, v, _ = make_inputs(1, 2, 2, 90, 16, torch.float32, model_layout=False)
    layout = random_layout(1, 90, seed=3)
    plain = attention(q, k, v)
    assert (attention(q, k, v, window=5) - plain).abs().max() > 1e-2
    packed = attention(q, k, v, layout=layout)
    assert (packed - plain).abs().max() > 1e-2
    first_doc_end = int(layout.doc_ends[0, 0])
    changed = [t.clone() for t in (q, k, v)]
    for t in changed:
        t[:, :, first_doc_end:] = torch.randn_like(t[:, :, first_doc_end:])
    again = attention(*changed, layout=layout)
    assert torch.equal(again[:, :, :first_doc_end], packed[:, :, :first_doc_end])


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
    assert launched == ["_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_kernel", "_attn_bwd_kernel"]
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
    with pytest.raises(KernelError, match="multiple"):
        attention(q, torch.zeros(1, 3, 8, 32), torch.zeros(1, 3, 8, 32))
    with pytest.raises(KernelError, match="differ"):
        attention(q, torch.zeros(1, 2, 9, 32), torch.zeros(1, 2, 9, 32))
    with pytest.raises(KernelError, match="dtypes"):
        attention(q, torch.zeros(1, 2, 8, 32).half(), torch.zeros(1, 2, 8, 32).half())
