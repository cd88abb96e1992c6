"""spin_kernels/logprob.py against its float64 reference, on both CPU paths: the Triton kernels in the
interpreter and the plain-PyTorch chunked path, also at logit magnitudes past exp's fp32 range. Each test pins
its path by setting TRITON_INTERPRET (read at call time) and by making the other path raise, so a silent
fallback fails the test."""

import pytest
import torch

import spin_kernels.logprob as lp
from spin_kernels.logprob import token_logprobs, token_logprobs_ref, uses_triton

pytestmark = pytest.mark.triton


def _forbid(*_args, **_kwargs):
    raise AssertionError("the other backend ran: a silent fallback")


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    """Pin one path; count the Triton kernel launches so the test can check them."""
    launches = []
    if request.param == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setattr(lp, "_lse_target_torch_", _forbid)
        monkeypatch.setattr(lp, "_dlogits_torch_", _forbid)
        real_launch = lp._launch

        def counting_launch(kernel, *args, **kw):
            launches.append(kernel)
            real_launch(kernel, *args, **kw)
        monkeypatch.setattr(lp, "_launch", counting_launch)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        monkeypatch.setattr(lp, "_launch", _forbid)
    return request.param, launches


def _problem(n_rows: int, vocab: int, n_embd: int = 24, ignore_every: int = 0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_rows, n_embd, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, n_embd, generator=gen, dtype=torch.float64) * 0.7
    targets = torch.randint(0, vocab, (n_rows,), generator=gen)
    if ignore_every:
        targets[::ignore_every] = -100
    upstream = torch.randn(n_rows, generator=gen, dtype=torch.float64)  # per-row, like SPIN's per-sequence weights
    return hidden, weight, targets, upstream


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-12)).item()


def _check_against_ref(hidden, weight, targets, upstream, dtype, chunk_bytes, tol):
    """Values and both gradients of token_logprobs(dtype) vs the float64 reference on the same rounded inputs."""
    h = hidden.to(dtype).requires_grad_()
    w = weight.to(dtype).requires_grad_()
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    want = token_logprobs_ref(h64, w64, targets)
    want_gh, want_gw = torch.autograd.grad((want * upstream).sum(), (h64, w64))

    got = token_logprobs(h, w, targets, chunk_bytes=chunk_bytes)
    assert got.dtype == torch.float32 and got.shape == targets.shape
    got_gh, got_gw = torch.autograd.grad((got * upstream.float()).sum(), (h, w))
    assert got_gh.dtype == dtype and got_gw.dtype == dtype
    assert _rel_err(got, want) < tol
    assert _rel_err(got_gh, want_gh) < tol
    assert _rel_err(got_gw, want_gw) < tol
    ignored = targets == -100
    assert (got[ignored] == 0).all() and (got_gh[ignored] == 0).all()


# bf16 (torch path only): measured 2e-3 to 7e-3 on logits up to ±300, its 8-bit mantissa rounding the logits
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_rows, vocab, slice_cols", [
    (37, 5003, None),   # odd N, one slice; V not a multiple of the kernels' 4096-wide block
    (53, 1000, 300),    # several vocabulary slices, the last one narrower
])
def test_values_and_grads_match_reference(backend, dtype, n_rows, vocab, slice_cols):
    name, launches = backend
    hidden, weight, targets, upstream = _problem(n_rows, vocab, ignore_every=4)
    chunk_bytes = None if slice_cols is None else n_rows * slice_cols * dtype.itemsize
    assert uses_triton(hidden) == (name == "triton")
    _check_against_ref(hidden, weight, targets, upstream, dtype, chunk_bytes, TOL[dtype])
    if name == "triton":
        assert lp._lse_target_kernel in launches and lp._dlogits_kernel in launches


@pytest.mark.parametrize("backend, dtype", [("torch", torch.float32), ("torch", torch.bfloat16),
                                            ("triton", torch.float32)],  # the interpreter has no bf16 arithmetic
                         indirect=["backend"], ids=["torch-fp32", "torch-bf16", "triton-fp32"])
@pytest.mark.parametrize("max_logit", [50.0, 300.0])
def test_logits_at_real_model_magnitudes_and_beyond(backend, dtype, max_logit):
    """Logits reaching ±50 (a real model's) and ±300 (past exp's fp32 range at ~88): each slice subtracts its
    row max before exp, so nothing overflows; without that every log-prob at ±300 comes out -inf or nan."""
    hidden, weight, targets, upstream = _problem(29, 1000, ignore_every=5)
    hidden = hidden * (max_logit / (hidden @ weight.T).abs().max())  # the largest |logit| is max_logit
    chunk_bytes = 29 * 300 * dtype.itemsize  # 4 slices: a row's max differs from slice to slice
    _check_against_ref(hidden, weight, targets, upstream, dtype, chunk_bytes, TOL[dtype])


def test_slices_respect_the_memory_cap(backend, monkeypatch):
    """No slice's logits exceed chunk_bytes, and a small cap really splits the vocabulary."""
    name, _ = backend
    slice_shapes = []
    fn_name = "_lse_target_triton_" if name == "triton" else "_lse_target_torch_"
    real = getattr(lp, fn_name)
    monkeypatch.setattr(lp, fn_name, lambda logits, *args: slice_shapes.append(logits.shape) or real(logits, *args))
    hidden, weight, targets, _ = _problem(40, 300)
    chunk_bytes = 40 * 70 * 4 + 5  # 70 fp32 columns
    got = token_logprobs(hidden.float(), weight.float(), targets, chunk_bytes=chunk_bytes)
    assert slice_shapes == [(40, 60)] * 5
    assert _rel_err(got, token_logprobs_ref(hidden, weight, targets)) < TOL[torch.float32]


def test_all_rows_ignored(backend):
    hidden, weight, targets, upstream = _problem(9, 100)
    targets[:] = -100
    h = hidden.float().requires_grad_()
    w = weight.float().requires_grad_()
    logp = token_logprobs(h, w, targets)
    (logp * upstream.float()).sum().backward()
    assert (logp == 0).all() and (h.grad == 0).all() and (w.grad == 0).all()


def test_no_grad_path_skips_backward_state(backend):
    hidden, weight, targets, _ = _problem(21, 700, ignore_every=3)
    want = token_logprobs_ref(hidden, weight, targets)
    h = hidden.float().requires_grad_()
    with torch.no_grad():
        got = token_logprobs(h, weight.float(), targets)
    assert got.grad_fn is None and not got.requires_grad
    assert _rel_err(got, want) < TOL[torch.float32]
    frozen = token_logprobs(hidden.float(), weight.float(), targets)  # nothing requires grad
    assert frozen.grad_fn is None and torch.equal(frozen, got)


def test_grad_for_hidden_only(backend):
    """A frozen output layer: only grad_hidden is formed, and it is still exact."""
    hidden, weight, targets, upstream = _problem(15, 400, ignore_every=5)
    h = hidden.float().requires_grad_()
    logp = token_logprobs(h, weight.float(), targets)
    (grad_h,) = torch.autograd.grad((logp * upstream.float()).sum(), (h,))
    h64 = hidden.clone().requires_grad_()
    (want,) = torch.autograd.grad((token_logprobs_ref(h64, weight, targets) * upstream).sum(), (h64,))
    assert _rel_err(grad_h, want) < TOL[torch.float32]


def test_bf16_autocast_on_torch_path(monkeypatch):
    """Under autocast the matmuls run in bf16 while grads keep the fp32 parameters' dtype."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # bf16 is not supported by the interpreter
    hidden, weight, targets, upstream = _problem(33, 900, ignore_every=6)
    h = hidden.float().requires_grad_()
    w = weight.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = token_logprobs(h, w, targets)
    (logp * upstream.float()).sum().backward()
    assert logp.dtype == torch.float32 and h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    h64 = hidden.clone().requires_grad_()
    w64 = weight.clone().requires_grad_()
    want = token_logprobs_ref(h64, w64, targets)
    (want * upstream).sum().backward()
    assert _rel_err(logp, want) < 3e-2
    assert _rel_err(h.grad, h64.grad) < 3e-2 and _rel_err(w.grad, w64.grad) < 3e-2


def test_out_of_range_target_is_an_error():
    hidden, weight, targets, _ = _problem(5, 50)
    targets[2] = 50
    with pytest.raises(ValueError, match="vocab_size"):
        token_logprobs(hidden, weight, targets)
