"""Per-token log-probabilities log_softmax(hidden @ weight.T)[targets] without the (N, V) logits.

Design choices:
- Rows with target -100 are dropped before any matmul; the vocabulary is cut into slices so that
  one slice's logits (tokens x slice) stay under `chunk_bytes`. The forward merges each slice's
  log-sum-exp into a running (N,) fp32 one and picks up the target logit from its slice.
- Exact for any upstream gradient g (per token: SPIN weighs each sequence differently). Liger's
  trick (make the gradients in the forward, rescale them in the backward) is exact for grad_hidden
  row by row but not for grad_weight = sum_rows g_row * dlogits_row.T h_row, so the forward keeps
  only the lse and the backward recomputes each slice's logits, turns them in place into
  g * (onehot - softmax) (the lse is known, so no reduction is needed), writes that slice of
  grad_weight once and adds to an fp32 grad_hidden. 4 matmuls against the naive path's 3, paid for
  by never writing and re-reading the naive path's fp32 (N, V) tensors.
- Matmuls stay in torch (fp32 accumulation); log-sum-exp and softmax math in fp32.
- Backends (TRITON_INTERPRET read at call time, see spin_kernels/__init__.py): CUDA -> Triton kernels; CPU
  with TRITON_INTERPRET=1 -> the same kernels in the interpreter; otherwise, or without triton, the
  same sliced algorithm in plain PyTorch.
"""

from __future__ import annotations  # the kernels' tl.constexpr annotations stay unevaluated without triton

import torch
from torch import Tensor

from spin_kernels import jit, launch, tl, triton, triton_runs_on

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

@jit
def _lse_target_kernel(logits_ptr, targets_ptr, lse_ptr, target_logit_ptr, vocab_offset, n_cols, stride_row,
                       BLOCK_V: tl.constexpr):
    """One program per row of a vocabulary slice: merge the slice's log-sum-exp into lse[row] and
    store the target logit if the target falls in this slice."""
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride_row can pass 2**31
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    running_max = float("-inf")
    running_sum = 0.0
    for start in range(0, n_cols, BLOCK_V):
        x = tl.load(row_ptr + start + cols, mask=start + cols < n_cols, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    # lse[row] starts at -inf; exp(-inf) = 0 makes the first merge a copy
    prev_lse = tl.load(lse_ptr + row)
    new_max = tl.maximum(prev_lse, running_max)
    merged_sum = tl.exp(prev_lse - new_max) + running_sum * tl.exp(running_max - new_max)
    tl.store(lse_ptr + row, new_max + tl.log(merged_sum))
    target_col = tl.load(targets_ptr + row) - vocab_offset
    in_slice = (target_col >= 0) & (target_col < n_cols)
    target_logit = tl.load(row_ptr + target_col, mask=in_slice)
    tl.store(target_logit_ptr + row, target_logit.to(tl.float32), mask=in_slice)


@jit
def _dlogits_kernel(logits_ptr, targets_ptr, lse_ptr, grad_ptr, vocab_offset, n_cols, stride_row,
                    BLOCK_V: tl.constexpr):
    """One program per row of a vocabulary slice: overwrite the logits with g * (onehot(target) - softmax)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    upstream = tl.load(grad_ptr + row)
    target_col = tl.load(targets_ptr + row) - vocab_offset
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        mask = offs < n_cols
        x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        onehot = tl.where(offs == target_col, 1.0, 0.0)
        dlogits = upstream * (onehot - tl.exp(x - lse))
        tl.store(row_ptr + offs, dlogits.to(logits_ptr.dtype.element_ty), mask=mask)


def _launch(kernel, logits: Tensor, *row_args: Tensor, vocab_offset: int) -> None:
    rows, n_cols = logits.shape
    if rows == 0:  # every target was -100
        return
    block_v = min(4096, triton.next_power_of_2(n_cols))
    launch(kernel, (rows,), logits, *row_args, vocab_offset, n_cols, logits.stride(0),
           BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4)


def uses_triton(hidden: Tensor) -> bool:
    """Whether token_logprobs takes the Triton path for tensors on hidden's device."""
    return triton_runs_on(hidden)


# ----------------------------------------------------------------------------- per-slice math
# logits (M, S): all kept tokens x one vocabulary slice starting at vocab_offset; lse, target_logit,
# targets and upstream are (M,). lse is fp32 and -inf before the first slice.

def _lse_target_triton_(logits: Tensor, targets: Tensor, vocab_offset: int, lse: Tensor, target_logit: Tensor) -> None:
    _launch(_lse_target_kernel, logits, targets, lse, target_logit, vocab_offset=vocab_offset)


def _lse_target_torch_(logits: Tensor, targets: Tensor, vocab_offset: int, lse: Tensor, target_logit: Tensor) -> None:
    """Same as _lse_target_triton_; clobbers fp32 logits so one slice-sized buffer suffices."""
    x = logits.float()  # (M, S); the same tensor when logits are fp32, so the ops below are in place
    target_col = targets - vocab_offset
    in_slice = (target_col >= 0) & (target_col < x.shape[1])
    picked = x.gather(1, target_col.clamp(0, x.shape[1] - 1)[:, None]).squeeze(1)
    target_logit.copy_(torch.where(in_slice, picked, target_logit))
    row_max = x.amax(dim=1, keepdim=True)
    slice_lse = row_max.squeeze(1) + x.sub_(row_max).exp_().sum(dim=1).log()
    torch.logaddexp(lse, slice_lse, out=lse)


def _dlogits_triton_(logits: Tensor, targets: Tensor, vocab_offset: int, lse: Tensor, upstream: Tensor) -> Tensor:
    """Overwrite the logits with upstream * (onehot(target) - softmax), in the logits' dtype."""
    _launch(_dlogits_kernel, logits, targets, lse, upstream, vocab_offset=vocab_offset)
    return logits


def _dlogits_torch_(logits: Tensor, targets: Tensor, vocab_offset: int, lse: Tensor, upstream: Tensor) -> Tensor:
    """Same as _dlogits_triton_, with one fp32 temporary when the logits are half precision."""
    x = logits.float()  # (M, S)
    x.sub_(lse[:, None]).exp_().mul_(-upstream[:, None])
    target_col = targets - vocab_offset
    in_slice = (target_col >= 0) & (target_col < x.shape[1])
    x.scatter_add_(1, target_col.clamp(0, x.shape[1] - 1)[:, None], torch.where(in_slice, upstream, 0.0)[:, None])
    return logits if x is logits else logits.copy_(x)


def _mm_into(out: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> None:
    """out (+)= a @ b; out may be in a wider dtype than a and b (then via one temporary of out's shape)."""
    if out.dtype != a.dtype:
        product = a @ b
        out.add_(product) if accumulate else out.copy_(product)
    elif accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


def default_slice_bytes(n_rows: int, vocab: int, logit_bytes: int) -> int:
    """The logits slice's size when not given: an eighth of the full logits keeps memory far below the naive
    path's; the 1 GiB cap and 32 MiB floor keep the slices few and their matmuls large (memory_plan.py counts it)."""
    return min(max(n_rows * vocab * logit_bytes // 8, 32 << 20), 1 << 30)


def _cols_per_slice(n_rows: int, vocab: int, logit_bytes: int, chunk_bytes: int | None) -> int:
    if chunk_bytes is None:
        chunk_bytes = default_slice_bytes(n_rows, vocab, logit_bytes)
    max_cols = max(1, chunk_bytes // max(1, n_rows * logit_bytes))
    if max_cols >= 128:
        max_cols -= max_cols % 128  # slice widths that keep the logits' rows aligned for the matmuls
    n_slices = -(-vocab // max_cols)
    cols = -(-vocab // n_slices)  # equal slices: no narrow last slice with an inefficient matmul
    return min(max_cols, -(-cols // 128) * 128) if max_cols >= 128 else cols


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


# ----------------------------------------------------------------------------- sliced forward / backward

def _forward(hidden: Tensor, weight: Tensor, targets: Tensor, dtype: torch.dtype, cols: int,
             use_triton: bool) -> tuple[Tensor, Tensor]:
    """hidden (M, C), weight (V, C), targets (M,) all valid -> logp, lse (M,) fp32."""
    lse_target_ = _lse_target_triton_ if use_triton else _lse_target_torch_
    lse = torch.full((hidden.shape[0],), float("-inf"), device=hidden.device, dtype=torch.float32)
    target_logit = torch.empty_like(lse)
    for start in range(0, weight.shape[0], cols):
        weight_slice = weight[start:start + cols].to(dtype)  # (S, C); cast per slice, never all of weight
        lse_target_(hidden @ weight_slice.T, targets, start, lse, target_logit)  # logits (M, S)
    return target_logit - lse, lse


def _backward(hidden: Tensor, weight: Tensor, targets: Tensor, lse: Tensor, upstream: Tensor, dtype: torch.dtype,
              cols: int, use_triton: bool, need_hidden: bool, need_weight: bool) -> tuple[Tensor | None, Tensor | None]:
    """Recompute each slice's logits, make dlogits in place, write that slice of grad_weight, add to grad_hidden."""
    dlogits_ = _dlogits_triton_ if use_triton else _dlogits_torch_
    grad_hidden = (torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32)  # (M, C)
                   if need_hidden else None)
    grad_weight = torch.empty_like(weight) if need_weight else None  # (V, C)
    for start in range(0, weight.shape[0], cols):
        weight_slice = weight[start:start + cols].to(dtype)  # (S, C)
        dlogits = dlogits_(hidden @ weight_slice.T, targets, start, lse, upstream)  # (M, S)
        if need_hidden:
            _mm_into(grad_hidden, dlogits, weight_slice, accumulate=True)
        if need_weight:
            _mm_into(grad_weight[start:start + cols], dlogits.T, hidden, accumulate=False)
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
        cols = _cols_per_slice(valid.numel(), weight.shape[0], dtype.itemsize, chunk_bytes)
        use_triton = uses_triton(hidden)
        logp_valid, lse = _forward(hidden.index_select(0, valid).to(dtype), weight, targets[valid], dtype, cols,
                                   use_triton)
        ctx.save_for_backward(hidden, weight, targets, valid, lse)
        ctx.dtype, ctx.cols, ctx.use_triton = dtype, cols, use_triton
        return torch.zeros(hidden.shape[0], device=hidden.device, dtype=torch.float32).index_copy_(0, valid, logp_valid)

    @staticmethod
    def backward(ctx, grad_logp: Tensor):
        hidden, weight, targets, valid, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        upstream = grad_logp.float().index_select(0, valid)  # (M,)
        grad_hidden_valid, grad_weight = _backward(hidden.index_select(0, valid).to(ctx.dtype), weight,
                                                   targets[valid], lse, upstream, ctx.dtype, ctx.cols,
                                                   ctx.use_triton, need_hidden, need_weight)
        grad_hidden = None
        if need_hidden:
            grad_hidden = torch.zeros_like(hidden).index_copy_(0, valid, grad_hidden_valid.to(hidden.dtype))
        return grad_hidden, grad_weight, None, None


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_bytes: int | None = None) -> Tensor:
    """hidden (N, C), weight (V, C), targets (N,) int64 with -100 = ignore -> log-probs (N,) float32.

    log_softmax(hidden @ weight.T)[targets], 0 (and no gradient) where targets == -100; differentiable
    with respect to hidden and weight. chunk_bytes caps the logits of one vocabulary slice
    (default: an eighth of the full logits, between 32 MiB and 1 GiB).
    """
    if (hidden.dim() != 2 or weight.dim() != 2 or targets.shape != hidden.shape[:1]
            or hidden.shape[1] != weight.shape[1]):
        raise ValueError(f"token_logprobs: expected hidden (N, C), weight (V, C), targets (N,); got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    # without grad (e.g. opponent log-probs at rollout) autograd records nothing: the forward does no
    # gradient work in any case, and the saved (N,) lse is dropped with the unrecorded ctx
    return _TokenLogprobs.apply(hidden, weight, targets, chunk_bytes)
