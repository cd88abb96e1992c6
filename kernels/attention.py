"""Fused attention in Triton, FlashAttention-2 style: forward, backward, grouped-query attention.

- fp32 online softmax over key blocks (log2 domain, exp2), never a (T, T) matrix; the forward keeps one
  log-sum-exp per row, the backward recomputes probabilities from it (a dk/dv kernel, then a dq kernel).
- GQA reads kv head h // group in place; a dk/dv program owns one kv head and loops over its group.
- Each loop over blocks runs in two stages, unmasked blocks then causal-diagonal/tail blocks: two calls
  of one @jit inner-loop helper (_attn_fwd_inner, _attn_bwd_dq_inner, _attn_bwd_dkdv_inner).
- Dispatch (TRITON_INTERPRET read at call time, see kernels/__init__.py): CUDA -> Triton; CPU with
  TRITON_INTERPRET=1 -> the same kernels interpreted (fp32/fp16 only: the interpreter's bf16 dot is
  wrong); otherwise, no triton, or head dim not in 16/32/64/128 -> SDPA.
"""

from __future__ import annotations  # the kernels' tl.constexpr annotations stay unevaluated without triton

import math

import torch
import torch.nn.functional as F

from configurator import UserError
from kernels import interpret_requested, jit, launch, tl, triton, triton_runs_on

TRITON_HEAD_DIMS = (16, 32, 64, 128)
LOG2_E = 1.4426950408889634


# ----------------------------------------------------------------------------- reference (the spec)

def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                  scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale [+ causal mask]) v with k/v repeated per query group; fp32 math
    (float64 if given float64), output in q's dtype."""
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q_c = q.to(compute_dtype)
    k_c = k.to(compute_dtype).repeat_interleave(group, dim=1)  # (B, Hq, T, D)
    v_c = v.to(compute_dtype).repeat_interleave(group, dim=1)  # (B, Hq, T, D)
    scores = (q_c @ k_c.transpose(-2, -1)) * scale  # (B, Hq, T, T)
    if causal:
        T_q, T_k = scores.shape[-2:]
        allowed = torch.ones(T_q, T_k, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v_c).to(q.dtype)  # (B, Hq, T, D)


# ----------------------------------------------------------------------------- kernels
# Tiles: q, o, do (BLOCK_M, HEAD_DIM); k, v (BLOCK_N, HEAD_DIM); scores in the log2 domain (qk_scale =
# scale * log2 e). Every loop over keys (or, for dk/dv, queries) runs in two stages, two calls of one
# inner-loop helper with MASKED fixed at compile time: blocks that need no mask, and the causal-diagonal
# and sequence-tail blocks that do.

@jit
def _query_block_program(n_q_heads, GROUP: tl.constexpr):
    """What a forward or dq program owns: query block start_m of one (batch, query head), read from kv head
    head // GROUP. Causal work grows with start_m, so the last query blocks of every head are launched
    first (no long tail of heavy programs)."""
    start_m = tl.num_programs(1) - 1 - tl.program_id(1)
    batch_head = tl.program_id(0)
    batch = (batch_head // n_q_heads).to(tl.int64)
    head = batch_head % n_q_heads
    kv_head = (head // GROUP).to(tl.int64)
    return start_m, batch_head, batch, head, kv_head


@jit
def _key_stage_ends(start_m, seq_len, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For query block start_m: keys below the first end are visible to every row of the block and inside
    the sequence (no mask); keys up to the second end need the causal or sequence-end mask."""
    if CAUSAL:
        unmasked_end = start_m * BLOCK_M
        masked_end = tl.minimum(unmasked_end + BLOCK_M, seq_len)
    else:
        unmasked_end = (seq_len // BLOCK_N) * BLOCK_N
        masked_end = seq_len
    return unmasked_end, masked_end


@jit
def _load_keys_values(K, V, offs_n, offs_d, stride_kt, stride_vt, seq_len, MASKED: tl.constexpr):
    """The key and value tiles of rows offs_n; only a MASKED block may run past the sequence."""
    k_ptrs = K + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + offs_n[:, None] * stride_vt + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=offs_n[:, None] < seq_len, other=0.0)
        v = tl.load(v_ptrs, mask=offs_n[:, None] < seq_len, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    return k, v


@jit
def _visible(offs_m, offs_n, seq_len, CAUSAL: tl.constexpr):
    """(BLOCK_M, BLOCK_N): whether query offs_m may attend to key offs_n, i.e. the key is inside the
    sequence and, causal, not after the query."""
    visible = offs_n[None, :] < seq_len
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None])
    return visible


@jit
def _attn_fwd_inner(acc, l_i, m_i, q, K, V, offs_m, offs_d, lo, hi, stride_kt, stride_vt, seq_len, qk_scale,
                    CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """Online softmax over the key blocks in [lo, hi): returns acc, l_i and m_i updated."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = _load_keys_values(K, V, offs_n, offs_d, stride_kt, stride_vt, seq_len, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        if MASKED:
            s = tl.where(_visible(offs_m, offs_n, seq_len, CAUSAL), s, float("-inf"))
        # Every row sees key 0 in its first block, so m_new is finite and alpha never NaN.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    n_q_heads, seq_len, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program: BLOCK_M query rows of one (batch, query head).
    start_m, batch_head, batch, head, kv_head = _query_block_program(n_q_heads, GROUP)
    Q += batch * stride_qb + head.to(tl.int64) * stride_qh
    K += batch * stride_kb + kv_head * stride_kh
    V += batch * stride_vb + kv_head * stride_vh
    O += batch * stride_ob + head.to(tl.int64) * stride_oh
    LSE += batch_head.to(tl.int64) * seq_len

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 domain)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    unmasked_end, masked_end = _key_stage_ends(start_m, seq_len, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, offs_m, offs_d, 0, unmasked_end, stride_kt, stride_vt,
                                    seq_len, qk_scale, CAUSAL, BLOCK_N, DOT_PRECISION, MASKED=False)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, offs_m, offs_d, unmasked_end, masked_end, stride_kt,
                                    stride_vt, seq_len, qk_scale, CAUSAL, BLOCK_N, DOT_PRECISION, MASKED=True)

    o = acc / l_i[:, None]
    tl.store(O + offs_m[:, None] * stride_ot + offs_d[None, :], o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + offs_m, m_i + tl.log2(l_i), mask=row_ok)


@jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_ot,
    stride_dob, stride_doh, stride_dot,
    n_q_heads, seq_len,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # delta_i = sum_d o_id * do_id: the softmax-backward row term, shared by the dq and dk/dv kernels.
    start_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // n_q_heads).to(tl.int64)
    head = (batch_head % n_q_heads).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len
    o = tl.load(O + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + batch * stride_dob + head * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,)
    tl.store(DELTA + batch_head.to(tl.int64) * seq_len + offs_m, delta, mask=row_ok)


@jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, offs_n, offs_d, lo, hi, stride_qt, stride_dot, seq_len,
                         qk_scale, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """dv += p^T do and dk += ds^T q over the query blocks in [lo, hi) of one query head, in the transposed
    (keys x queries) layout; a MASKED block is on the causal diagonal. Returns dk, dv updated."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seq_len
        q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        # lse = +inf past the end makes those rows' probabilities exactly 0.
        lse = tl.load(LSE + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.exp2(s_t - lse[None, :])
        if MASKED:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    n_kv_heads, seq_len, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program: BLOCK_N keys of one (batch, kv head), summed over the GROUP query heads sharing it.
    # Works in the transposed layout (keys x queries) so dk and dv come out of plain dots. The first
    # key blocks see the most queries (causal) and are launched first.
    start_n = tl.program_id(1)
    batch_kv_head = tl.program_id(0)
    batch = (batch_kv_head // n_kv_heads).to(tl.int64)
    kv_head = batch_kv_head % n_kv_heads
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < seq_len
    kv_off = batch * stride_kb + kv_head.to(tl.int64) * stride_kh
    k = tl.load(K + kv_off + offs_n[:, None] * stride_kt + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    v = tl.load(V + batch * stride_vb + kv_head.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vt
                + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # Causal: queries on the diagonal block need the mask, later ones see every key of this block.
    if CAUSAL:
        masked_lo = start_n * BLOCK_N
        masked_hi = tl.minimum(masked_lo + BLOCK_N, seq_len)
    else:
        masked_lo = 0
        masked_hi = 0
    for g in range(GROUP):
        head = (kv_head * GROUP + g).to(tl.int64)
        batch_head = batch * (n_kv_heads * GROUP) + head
        Q_h = Q + batch * stride_qb + head * stride_qh
        DO_h = DO + batch * stride_dob + head * stride_doh
        LSE_h = LSE + batch_head * seq_len
        DELTA_h = DELTA + batch_head * seq_len
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q_h, DO_h, LSE_h, DELTA_h, offs_n, offs_d, masked_lo, masked_hi,
                                      stride_qt, stride_dot, seq_len, qk_scale, BLOCK_M, DOT_PRECISION, MASKED=True)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q_h, DO_h, LSE_h, DELTA_h, offs_n, offs_d, masked_hi, seq_len,
                                      stride_qt, stride_dot, seq_len, qk_scale, BLOCK_M, DOT_PRECISION, MASKED=False)
    dk = dk * sm_scale
    tl.store(DK + batch * stride_dkb + kv_head.to(tl.int64) * stride_dkh + offs_n[:, None] * stride_dkt
             + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(DV + batch * stride_dvb + kv_head.to(tl.int64) * stride_dvh + offs_n[:, None] * stride_dvt
             + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


@jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, offs_m, offs_d, lo, hi, stride_kt, stride_vt, seq_len, qk_scale,
                       CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """dq += ds k over the key blocks in [lo, hi), the probabilities recomputed from the forward's lse."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = _load_keys_values(K, V, offs_n, offs_d, stride_kt, stride_vt, seq_len, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(_visible(offs_m, offs_n, seq_len, CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    n_q_heads, seq_len, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program: BLOCK_M query rows of one (batch, query head); same key stages and order as the forward.
    start_m, batch_head, batch, head, kv_head = _query_block_program(n_q_heads, GROUP)
    K += batch * stride_kb + kv_head * stride_kh
    V += batch * stride_vb + kv_head * stride_vh
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len
    q = tl.load(Q + batch * stride_qb + head.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qt
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + batch * stride_dob + head.to(tl.int64) * stride_doh + offs_m[:, None] * stride_dot
                 + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + batch_head.to(tl.int64) * seq_len + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + batch_head.to(tl.int64) * seq_len + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    unmasked_end, masked_end = _key_stage_ends(start_m, seq_len, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, offs_m, offs_d, 0, unmasked_end, stride_kt, stride_vt,
                            seq_len, qk_scale, CAUSAL, BLOCK_N, DOT_PRECISION, MASKED=False)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, offs_m, offs_d, unmasked_end, masked_end, stride_kt,
                            stride_vt, seq_len, qk_scale, CAUSAL, BLOCK_N, DOT_PRECISION, MASKED=True)
    dq = dq * sm_scale
    tl.store(DQ + batch * stride_dqb + head.to(tl.int64) * stride_dqh + offs_m[:, None] * stride_dqt
             + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------- launch

def _block_sizes(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch settings for an H100 (the interpreter runs the very same tiles).
    Each masked stage must cover whole inner blocks, hence fwd/dq BLOCK_M % BLOCK_N == 0 and
    dkdv BLOCK_N % BLOCK_M == 0. fp32 is a correctness path: one stage keeps its fp32 tiles
    inside shared memory (three would need ~225 KB at head dim 128)."""
    big, fp32 = head_dim == 128, dtype == torch.float32
    warps = 8 if big else 4
    bwd_stages = 1 if fp32 else (2 if big else 3)
    return dict(
        fwd=dict(BLOCK_M=128, BLOCK_N=64, num_warps=warps, num_stages=1 if fp32 else 3),
        dkdv=dict(BLOCK_M=32, BLOCK_N=64 if big else 128, num_warps=warps, num_stages=bwd_stages),
        dq=dict(BLOCK_M=64 if big else 128, BLOCK_N=32, num_warps=warps, num_stages=bwd_stages),
        delta=dict(BLOCK_M=32, num_warps=4),
    )


def _strides(t: torch.Tensor) -> tuple:
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 dots would run as TF32 on the GPU by default; "ieee" keeps fp32 exact to ~1e-6.
    return "ieee" if dtype == torch.float32 else "tf32"


def _forward(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    o = torch.empty_like(q)  # (B, Hq, T, D), keeps q's memory layout
    lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)  # log2-sum-exp2 per row
    cfg = _block_sizes(D, q.dtype)["fwd"]
    grid = (B * Hq, triton.cdiv(T, cfg["BLOCK_M"]))
    launch(_attn_fwd_kernel, grid,
           q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
           Hq, T, scale * LOG2_E,
           GROUP=Hq // Hkv, HEAD_DIM=D, CAUSAL=causal, DOT_PRECISION=_dot_precision(q.dtype), **cfg)
    return o, lse


def _backward(q, k, v, o, lse, do, causal: bool, scale: float) -> tuple[torch.Tensor, ...]:
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    cfgs = _block_sizes(D, q.dtype)
    precision = _dot_precision(q.dtype)
    delta = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)  # rowsum(o * do)
    cfg = cfgs["delta"]
    launch(_attn_bwd_delta_kernel, (triton.cdiv(T, cfg["BLOCK_M"]), B * Hq),
           o, do, delta, *_strides(o), *_strides(do), Hq, T, HEAD_DIM=D, **cfg)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    cfg = cfgs["dkdv"]
    launch(_attn_bwd_dkdv_kernel, (B * Hkv, triton.cdiv(T, cfg["BLOCK_N"])),
           q, k, v, do, lse, delta, dk, dv,
           *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
           Hkv, T, scale * LOG2_E, scale,
           GROUP=Hq // Hkv, HEAD_DIM=D, CAUSAL=causal, DOT_PRECISION=precision, **cfg)
    cfg = cfgs["dq"]
    launch(_attn_bwd_dq_kernel, (B * Hq, triton.cdiv(T, cfg["BLOCK_M"])),
           q, k, v, do, lse, delta, dq,
           *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
           Hq, T, scale * LOG2_E, scale,
           GROUP=Hq // Hkv, HEAD_DIM=D, CAUSAL=causal, DOT_PRECISION=precision, **cfg)
    return dq, dk, dv


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        o, lse = _forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, _last_dim_contiguous(do), ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


# ----------------------------------------------------------------------------- public API

def uses_triton(q: torch.Tensor) -> bool:
    """Whether attention() takes the Triton path for a query tensor like q."""
    if q.shape[-1] not in TRITON_HEAD_DIMS or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if q.numel() == 0:  # nothing to launch
        return False
    return triton_runs_on(q) and not (q.dtype == torch.bfloat16 and interpret_requested())


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    where = "kernels/attention.py:attention"
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise UserError(f"attention wants q (B, Hq, T, D) and k, v (B, Hkv, T, D); got q {tuple(q.shape)}, "
                        f"k {tuple(k.shape)}, v {tuple(v.shape)} ({where}); check the caller's reshapes")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise UserError(f"attention: q {tuple(q.shape)} and k/v {tuple(k.shape)} differ in batch, length or "
                        f"head dim ({where}); self-attention over aligned q/k is all it supports")
    if q.shape[1] % k.shape[1] != 0:
        raise UserError(f"attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads "
                        f"({where}); set n_head to a multiple of n_kv_head")
    if not q.dtype == k.dtype == v.dtype:
        raise UserError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}) ({where}); "
                        f"cast them to one dtype first")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              scale: float | None = None) -> torch.Tensor:
    """q (B, Hq, T, D), k/v (B, Hkv, T, D) with Hq % Hkv == 0 -> (B, Hq, T, D); differentiable."""
    _check_shapes(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if uses_triton(q):
        return _TritonAttention.apply(q, k, v, causal, scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])
