"""Per-token log-probabilities log_softmax(hidden @ weight.T)[targets] without the (N, V) logits.

Design choices:
- Tokens are processed in chunks whose logits stay under `chunk_bytes`; rows with target -100 are
  dropped before any matmul, so they cost nothing and get exactly zero gradient.
- Exact for any upstream gradient: the forward keeps only the log-sum-exp (N,) fp32; the backward
  recomputes each chunk's logits and turns them in place into dlogits = g * (onehot - softmax),
  then grad_hidden = dlogits @ W and grad_weight += dlogits.T @ h. Liger's trick (gradients made in
  the forward, rescaled in the backward) is exact for grad_hidden row by row but not for
  grad_weight = sum_rows g_row * d_row.T h_row when g varies per row, as it does in SPIN (one
  weight per sequence); so we pay one extra matmul (4 instead of the naive path's 3) and win it
  back by never writing or re-reading the naive path's fp32 (N, V) tensors.
- Matmuls stay in torch (bf16/fp16 inputs, fp32 accumulation); log-sum-exp and softmax math in fp32.
- Backends: CUDA -> Triton kernels; CPU with TRITON_INTERPRET=1 (read at call time) -> the same
  kernels in the interpreter; otherwise the same chunked algorithm in plain PyTorch.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # torch without triton (e.g. some CPU installs): the PyTorch path still works
    triton = None

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- reference (the spec)

def token_logprobs_ref(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """Naive spec: full logits, log_softmax, gather. Output is float64 for float64 inputs, else float32."""
    logits = hidden @ weight.T  # (N, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logp_all = torch.log_softmax(logits, dim=-1)  # (N, V)
    keep = targets != IGNORE_INDEX
    logp = logp_all.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)  # (N,)
    return torch.where(keep, logp, torch.zeros_like(logp))


# ----------------------------------------------------------------------------- Triton kernels
# Plain functions jitted on first use by _jitted(), so that importing this file never needs a GPU
# and the kernels are compiled or interpreted the same way as triton's own library (tl.max, tl.sum).

def _lse_target_kernel(logits_ptr, targets_ptr, lse_ptr, logp_ptr, vocab, stride_row, BLOCK_V: tl.constexpr):
    """One program per row: online log-sum-exp over V in blocks, and the target's log-prob."""
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride_row can pass 2**31
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    running_max = float("-inf")
    running_sum = 0.0
    for start in range(0, vocab, BLOCK_V):
        x = tl.load(row_ptr + start + cols, mask=start + cols < vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    target_logit = tl.load(row_ptr + tl.load(targets_ptr + row)).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, target_logit - lse)


def _dlogits_kernel(logits_ptr, targets_ptr, lse_ptr, grad_ptr, vocab, stride_row, BLOCK_V: tl.constexpr):
    """One program per row: overwrite the row's logits with g * (onehot(target) - softmax)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    upstream = tl.load(grad_ptr + row)
    target = tl.load(targets_ptr + row)
    for start in range(0, vocab, BLOCK_V):
        offs = start + cols
        mask = offs < vocab
        x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        onehot = tl.where(offs == target, 1.0, 0.0)
        dlogits = upstream * (onehot - tl.exp(x - lse))
        tl.store(row_ptr + offs, dlogits.to(logits_ptr.dtype.element_ty), mask=mask)


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_interprets() -> bool:
    # triton's library functions are jitted when triton is imported, with TRITON_INTERPRET as it was then
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(tl.max, InterpretedFunction)


@functools.cache
def _jitted(kernel):
    with triton.knobs.runtime.scope():  # the scope restores the knob and env var afterwards
        triton.knobs.runtime.interpret = _triton_interprets()
        return triton.jit(kernel)


def _launch(kernel, logits: Tensor, *row_args: Tensor) -> None:
    if not logits.is_cuda and not _triton_interprets():
        raise RuntimeError("kernels/logprob.py: TRITON_INTERPRET=1 was set after triton was imported, so its kernels "
                           "cannot be interpreted; set it before the first `import triton` (top of the test module, "
                           "or the environment of the command)")
    rows, vocab = logits.shape
    block_v = min(4096, triton.next_power_of_2(vocab))
    _jitted(kernel)[(rows,)](
        logits, *row_args, vocab, logits.stride(0), BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4)


def uses_triton(hidden: Tensor) -> bool:
    """Whether token_logprobs takes the Triton path for tensors on hidden's device."""
    if triton is None:
        return False
    return hidden.is_cuda or (hidden.device.type == "cpu" and _interpret_requested())


# ----------------------------------------------------------------------------- per-chunk math

def _lse_target_triton(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, V) logits -> lse (rows,) fp32 and the targets' log-probs (rows,) fp32."""
    lse = torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32)
    logp = torch.empty_like(lse)
    _launch(_lse_target_kernel, logits, targets, lse, logp)
    return lse, logp


def _lse_target_torch(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Same as _lse_target_triton; clobbers fp32 logits to stay at one chunk-sized buffer."""
    x = logits.float()  # (rows, V); the same tensor when logits are fp32, so the ops below are in place
    target_logit = x.gather(1, targets[:, None]).squeeze(1)
    row_max = x.amax(dim=1, keepdim=True)
    lse = row_max.squeeze(1) + x.sub_(row_max).exp_().sum(dim=1).log()
    return lse, target_logit - lse


def _dlogits_triton_(logits: Tensor, targets: Tensor, lse: Tensor, upstream: Tensor) -> Tensor:
    """Overwrite (rows, V) logits with upstream * (onehot - softmax), in the logits' dtype."""
    _launch(_dlogits_kernel, logits, targets, lse, upstream)
    return logits


def _dlogits_torch_(logits: Tensor, targets: Tensor, lse: Tensor, upstream: Tensor) -> Tensor:
    """Same as _dlogits_triton_, with one fp32 temporary when the logits are half precision."""
    x = logits.float()  # (rows, V)
    x.sub_(lse[:, None]).exp_().mul_(-upstream[:, None])
    x.scatter_add_(1, targets[:, None], upstream[:, None])
    return logits if x is logits else logits.copy_(x)


def _accumulate_mm_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b, where acc is fp32 and a, b may be half precision (one temporary of acc's shape)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(a @ b)


def _rows_per_chunk(n_rows: int, vocab: int, logit_bytes: int, chunk_bytes: int | None) -> int:
    if chunk_bytes is None:
        # an eighth of the full logits keeps memory far below the naive path's; the 1 GiB cap and
        # 32 MiB floor keep chunks few (each one re-reads grad_weight) and matmuls large
        chunk_bytes = min(max(n_rows * vocab * logit_bytes // 8, 32 << 20), 1 << 30)
    return max(1, min(n_rows, chunk_bytes // (vocab * logit_bytes)))


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


# ----------------------------------------------------------------------------- chunked forward / backward

def _forward(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int, use_triton: bool) -> tuple[Tensor, Tensor]:
    """hidden (M, C), weight (V, C) in the compute dtype, targets (M,) all valid -> logp, lse (M,) fp32."""
    lse_target = _lse_target_triton if use_triton else _lse_target_torch
    logp = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        logits = hidden[rows] @ weight.T  # (rows, V)
        lse[rows], logp[rows] = lse_target(logits, targets[rows])
    return logp, lse


def _backward(hidden: Tensor, weight: Tensor, targets: Tensor, lse: Tensor, upstream: Tensor, chunk_rows: int,
              use_triton: bool, need_hidden: bool, need_weight: bool) -> tuple[Tensor | None, Tensor | None]:
    """Recompute each chunk's logits, make dlogits in place, then the two gradient matmuls."""
    dlogits_ = _dlogits_triton_ if use_triton else _dlogits_torch_
    grad_hidden = torch.empty_like(hidden) if need_hidden else None  # (M, C)
    grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_weight else None  # (V, C)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        dlogits = dlogits_(hidden[rows] @ weight.T, targets[rows], lse[rows], upstream[rows])  # (rows, V)
        if need_hidden:
            torch.mm(dlogits, weight, out=grad_hidden[rows])
        if need_weight:
            _accumulate_mm_(grad_weight, dlogits.T, hidden[rows])
    return grad_hidden, grad_weight


def _valid_rows(targets: Tensor, vocab: int) -> Tensor:
    bad = ((targets < 0) & (targets != IGNORE_INDEX)) | (targets >= vocab)
    if bad.any():
        raise ValueError(f"token_logprobs: targets must be in [0, {vocab}) or {IGNORE_INDEX}; got "
                         f"{targets[bad][:4].tolist()}; check the tokenizer's vocab against the model's vocab_size")
    return (targets != IGNORE_INDEX).nonzero().squeeze(1)  # (M,) indices into N


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_bytes: int | None) -> Tensor:
        dtype = _compute_dtype(hidden, weight)
        valid = _valid_rows(targets, weight.shape[0])
        hidden_valid = hidden.index_select(0, valid).to(dtype)  # (M, C)
        chunk_rows = _rows_per_chunk(valid.numel(), weight.shape[0], dtype.itemsize, chunk_bytes)
        use_triton = uses_triton(hidden)
        logp_valid, lse = _forward(hidden_valid, weight.to(dtype), targets[valid], chunk_rows, use_triton)
        ctx.save_for_backward(hidden, weight, targets, valid, lse)
        ctx.dtype, ctx.chunk_rows, ctx.use_triton = dtype, chunk_rows, use_triton
        logp = torch.zeros(hidden.shape[0], device=hidden.device, dtype=torch.float32)
        return logp.index_copy_(0, valid, logp_valid)

    @staticmethod
    def backward(ctx, grad_logp: Tensor):
        hidden, weight, targets, valid, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        upstream = grad_logp.float().index_select(0, valid)  # (M,)
        grad_hidden_valid, grad_weight = _backward(
            hidden.index_select(0, valid).to(ctx.dtype), weight.to(ctx.dtype), targets[valid], lse, upstream,
            ctx.chunk_rows, ctx.use_triton, need_hidden, need_weight)
        grad_hidden = None
        if need_hidden:
            grad_hidden = torch.zeros_like(hidden).index_copy_(0, valid, grad_hidden_valid.to(hidden.dtype))
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_bytes: int | None = None) -> Tensor:
    """hidden (N, C), weight (V, C), targets (N,) int64 with -100 = ignore -> log-probs (N,) float32.

    log_softmax(hidden @ weight.T)[targets], 0 (and no gradient) where targets == -100; differentiable
    with respect to hidden and weight. chunk_bytes caps one chunk's logits (default: an eighth of
    the full logits, between 32 MiB and 1 GiB).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or targets.shape != hidden.shape[:1] or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"token_logprobs: expected hidden (N, C), weight (V, C), targets (N,); got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _TokenLogprobs.apply(hidden, weight, targets, chunk_bytes)
    # no gradient wanted (e.g. opponent log-probs at rollout): forward only, nothing saved
    dtype = _compute_dtype(hidden, weight)
    valid = _valid_rows(targets, weight.shape[0])
    chunk_rows = _rows_per_chunk(valid.numel(), weight.shape[0], dtype.itemsize, chunk_bytes)
    logp_valid, _ = _forward(hidden.index_select(0, valid).to(dtype), weight.to(dtype), targets[valid],
                             chunk_rows, uses_triton(hidden))
    logp = torch.zeros(hidden.shape[0], device=hidden.device, dtype=torch.float32)
    return logp.index_copy_(0, valid, logp_valid)
