"""Fused attention in Triton, FlashAttention-2 style: forward, backward, grouped-query attention, and the masks
of packed rows (documents and segments, packing.py) and of a sliding window.

- fp32 online softmax over key blocks (log2 domain, exp2), never a (T, T) matrix; the forward keeps one
  log-sum-exp per row, the backward recomputes probabilities from it (dk/dv programs, then dq programs: two
  launches of one kernel).
- GQA reads kv head h // group in place; a dk/dv program owns one kv head and loops over its group.
- Masks à la varlen attention: packed rows pass per-token ids (document start and end, segment, position) that
  the kernels load; a document's id is the index of its first token, so a query block skips every key block
  before its first row's document and a key block stops at its last key's document end. A window skips the
  blocks outside it. `packing.visible_mask` is the rule; `attention_ref` with that mask is the spec.
- Each loop over blocks runs in three stages: masked blocks at the window's far edge, blocks every row sees
  whole (no mask), masked causal-diagonal and tail blocks: three calls of one @jit inner-loop helper
  (_attn_fwd_inner, _attn_bwd_dq_inner, _attn_bwd_dkdv_inner). In packed rows every visited block is masked.
- Dispatch (TRITON_INTERPRET read at call time, see spin_kernels/__init__.py): CUDA -> Triton; CPU with
  TRITON_INTERPRET=1 -> the same kernels interpreted (fp32/fp16 only: the interpreter's bf16 dot is
  wrong); otherwise, no triton, or head dim not in 16/32/64/128 -> SDPA (with the boolean mask where needed).
"""

from __future__ import annotations  # the kernels' tl.constexpr annotations stay unevaluated without triton

import functools
import math

import torch
import torch.nn.functional as F

from spin_kernels import KernelError, interpret_requested, jit, launch, tl, triton, triton_runs_on
from packing import RowLayout, sdpa_mask

TRITON_HEAD_DIMS = (16, 32, 64, 128)
LOG2_E = 1.4426950408889634


# ----------------------------------------------------------------------------- reference (the spec)

def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                  scale: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale [+ mask]) v with k/v repeated per query group; fp32 math (float64 if given
    float64), output in q's dtype. mask (B or 1, 1, Tq, Tk) bool, True = may attend (e.g.
    packing.visible_mask), replaces the causal mask when given."""
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q_c = q.to(compute_dtype)
    k_c = k.to(compute_dtype).repeat_interleave(group, dim=1)  # (B, Hq, T, D)
    v_c = v.to(compute_dtype).repeat_interleave(group, dim=1)  # (B, Hq, T, D)
    scores = (q_c @ k_c.transpose(-2, -1)) * scale  # (B, Hq, T, T)
    if mask is None and causal:
        T_q, T_k = scores.shape[-2:]
        mask = torch.ones(T_q, T_k, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v_c).to(q.dtype)  # (B, Hq, T, D)


# ----------------------------------------------------------------------------- kernels
# Tiles: q, o, do (BLOCK_M, HEAD_DIM); k, v (BLOCK_N, HEAD_DIM); scores in the log2 domain (qk_scale =
# scale * log2 e). Every loop over keys (or, for dk/dv, queries) runs in three stages, three calls of one
# inner-loop helper with MASKED fixed at compile time: [lo, full_lo) masked, [full_lo, full_hi) seen whole by
# every row of the tile, [full_hi, hi) masked. IDS (B, 4, T) int32 holds packed rows' per-token document start,
# document end, segment and position (read only when PACKED).

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
def _token_ids(IDS, offs, seq_len, PACKED: tl.constexpr):
    """(document, segment, position) of tokens offs: loaded from IDS in packed rows; otherwise one document,
    one segment, and positions equal to the indices."""
    if PACKED:
        inside = offs < seq_len
        doc = tl.load(IDS + offs, mask=inside, other=-1)
        segment = tl.load(IDS + 2 * seq_len + offs, mask=inside, other=0)
        position = tl.load(IDS + 3 * seq_len + offs, mask=inside, other=0)
    else:
        doc = offs * 0
        segment = doc
        position = offs
    return doc, segment, position


@jit
def _visible(q_offs, k_offs, q_doc, q_segment, q_position, k_doc, k_segment, k_position, seq_len, window,
             CAUSAL: tl.constexpr, PACKED: tl.constexpr, WINDOWED: tl.constexpr):
    """Whether query q_offs may attend to key k_offs, for tiles that broadcast to (queries, keys) or (keys,
    queries): the key is inside the sequence and, as packing.visible_mask says, not after the query, in the
    query's document and its prompt or the query's own segment, inside the window."""
    visible = k_offs < seq_len
    if CAUSAL:
        visible = visible & (k_offs <= q_offs)
    if PACKED:
        visible = visible & (k_doc == q_doc) & ((k_segment == 0) | (k_segment == q_segment))
    if WINDOWED:
        visible = visible & (q_position - k_position < window)
    return visible


@jit
def _key_ranges(start_m, seq_len, IDS, window, CAUSAL: tl.constexpr, PACKED: tl.constexpr,
                WINDOWED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key stages (lo, full_lo, full_hi, hi) of query block start_m. Causal: no key after the block's
    last row; none before the first row's document (packed rows: documents follow each other along the row,
    so later rows' documents start no earlier) or before its window."""
    first_row = start_m * BLOCK_M
    zero = first_row * 0
    if CAUSAL:
        lo = zero
        full_lo = zero
        full_hi = first_row
        hi = tl.minimum(first_row + BLOCK_M, seq_len)
        if PACKED:
            lo = tl.load(IDS + first_row) // BLOCK_N * BLOCK_N
            full_lo = first_row
        elif WINDOWED:  # rows see back to row - window + 1: the first row the furthest, the last the least
            lo = tl.maximum(first_row - window + 1, 0) // BLOCK_N * BLOCK_N
            full_lo = tl.minimum((tl.maximum(first_row + BLOCK_M - window, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N,
                                 first_row)
    else:
        lo = zero
        full_lo = zero
        full_hi = (seq_len // BLOCK_N) * BLOCK_N
        hi = seq_len + zero
    return lo, full_lo, full_hi, hi


@jit
def _query_ranges(start_n, seq_len, IDS, window, CAUSAL: tl.constexpr, PACKED: tl.constexpr,
                  WINDOWED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The query stages (lo, full_lo, full_hi, hi) of key block start_n. Causal: no query before the block's
    first key; none past its last key's document end (packed) or window."""
    first_key = start_n * BLOCK_N
    zero = first_key * 0
    if CAUSAL:
        lo = first_key
        full_lo = tl.minimum(first_key + BLOCK_N, seq_len)
        full_hi = seq_len + zero
        hi = seq_len + zero
        if PACKED:
            hi = tl.load(IDS + seq_len + full_lo - 1)
            full_hi = full_lo
        elif WINDOWED:  # whole query blocks that see even the first key: up to first_key + window
            hi = tl.minimum(first_key + BLOCK_N - 1 + window, seq_len)
            full_hi = tl.minimum(full_lo + tl.maximum(window - BLOCK_N, 0) // BLOCK_M * BLOCK_M, hi)
    else:
        lo = zero
        full_lo = zero
        full_hi = seq_len + zero
        hi = seq_len + zero
    return lo, full_lo, full_hi, hi


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
def _query_tile_visible(offs_m, q_doc, q_segment, q_position, IDS, offs_n, seq_len, window, CAUSAL: tl.constexpr,
                        PACKED: tl.constexpr, WINDOWED: tl.constexpr):
    """(BLOCK_M, BLOCK_N): _visible for a query tile against key block offs_n (whose ids it loads)."""
    k_doc, k_segment, k_position = _token_ids(IDS, offs_n, seq_len, PACKED)
    return _visible(offs_m[:, None], offs_n[None, :], q_doc[:, None], q_segment[:, None], q_position[:, None],
                    k_doc[None, :], k_segment[None, :], k_position[None, :], seq_len, window, CAUSAL, PACKED,
                    WINDOWED)


@jit
def _attn_fwd_inner(acc, l_i, m_i, q, K, V, IDS, offs_m, q_doc, q_segment, q_position, offs_d, lo, hi, stride_kt,
                    stride_vt, seq_len, window, qk_scale, CAUSAL: tl.constexpr, PACKED: tl.constexpr,
                    WINDOWED: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """Online softmax over the key blocks in [lo, hi): returns acc, l_i and m_i updated."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = _load_keys_values(K, V, offs_n, offs_d, stride_kt, stride_vt, seq_len, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        if MASKED:
            visible = _query_tile_visible(offs_m, q_doc, q_segment, q_position, IDS, offs_n, seq_len, window,
                                          CAUSAL, PACKED, WINDOWED)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = m_new
        if MASKED:  # a row that has seen no key yet keeps m = -inf; its exp2 shifts by 0, not by -inf (NaN)
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])  # (BLOCK_M, BLOCK_N)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, IDS,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    n_q_heads, seq_len, window, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PACKED: tl.constexpr,
    WINDOWED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One program: BLOCK_M query rows of one (batch, query head).
    start_m, batch_head, batch, head, kv_head = _query_block_program(n_q_heads, GROUP)
    Q += batch * stride_qb + head.to(tl.int64) * stride_qh
    K += batch * stride_kb + kv_head * stride_kh
    V += batch * stride_vb + kv_head * stride_vh
    O += batch * stride_ob + head.to(tl.int64) * stride_oh
    LSE += batch_head.to(tl.int64) * seq_len
    IDS += batch * 4 * seq_len

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    q_doc, q_segment, q_position = _token_ids(IDS, offs_m, seq_len, PACKED)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 domain)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_ranges(start_m, seq_len, IDS, window, CAUSAL, PACKED, WINDOWED, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, IDS, offs_m, q_doc, q_segment, q_position, offs_d, lo,
                                    full_lo, stride_kt, stride_vt, seq_len, window, qk_scale, CAUSAL, PACKED,
                                    WINDOWED, BLOCK_N, DOT_PRECISION, MASKED=True)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, IDS, offs_m, q_doc, q_segment, q_position, offs_d,
                                    full_lo, full_hi, stride_kt, stride_vt, seq_len, window, qk_scale, CAUSAL,
                                    PACKED, WINDOWED, BLOCK_N, DOT_PRECISION, MASKED=False)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, IDS, offs_m, q_doc, q_segment, q_position, offs_d,
                                    full_hi, hi, stride_kt, stride_vt, seq_len, window, qk_scale, CAUSAL, PACKED,
                                    WINDOWED, BLOCK_N, DOT_PRECISION, MASKED=True)

    # every row inside the sequence sees at least itself; a masked row past it may see nothing (not stored)
    l_i = tl.where(row_ok, l_i, 1.0)
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
    # delta_i = sum_d o_id * do_id: the softmax-backward row term, shared by the dq and dk/dv programs.
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
def _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, IDS, offs_n, k_doc, k_segment, k_position, offs_d, lo, hi,
                         stride_qt, stride_dot, seq_len, window, qk_scale, CAUSAL: tl.constexpr,
                         PACKED: tl.constexpr, WINDOWED: tl.constexpr, BLOCK_M: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """dv += p^T do and dk += ds^T q over the query blocks in [lo, hi) of one query head, in the transposed
    (keys x queries) layout. Returns dk, dv updated."""
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
            q_doc, q_segment, q_position = _token_ids(IDS, offs_m, seq_len, PACKED)
            visible_t = _visible(offs_m[None, :], offs_n[:, None], q_doc[None, :], q_segment[None, :],
                                 q_position[None, :], k_doc[:, None], k_segment[:, None], k_position[:, None],
                                 seq_len, window, CAUSAL, PACKED, WINDOWED)
            p_t = tl.where(visible_t, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, IDS, offs_m, q_doc, q_segment, q_position, offs_d, lo, hi,
                       stride_kt, stride_vt, seq_len, window, qk_scale, CAUSAL: tl.constexpr, PACKED: tl.constexpr,
                       WINDOWED: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       MASKED: tl.constexpr):
    """dq += ds k over the key blocks in [lo, hi), the probabilities recomputed from the forward's lse."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = _load_keys_values(K, V, offs_n, offs_d, stride_kt, stride_vt, seq_len, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            visible = _query_tile_visible(offs_m, q_doc, q_segment, q_position, IDS, offs_n, seq_len, window,
                                          CAUSAL, PACKED, WINDOWED)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@jit
def _attn_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, IDS,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    n_kv_heads, seq_len, window, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PACKED: tl.constexpr,
    WINDOWED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KEY_BLOCKS: tl.constexpr,
):
    # Launched twice, each launch compiled for one side. KEY_BLOCKS: a program owns BLOCK_N keys of one
    # (batch, kv head) and sums dk, dv over the GROUP query heads sharing it, in the transposed (keys x queries)
    # layout so both come out of plain dots; the first key blocks see the most queries (causal) and are launched
    # first. Otherwise a program owns BLOCK_M query rows of one (batch, query head): their dq, with the forward's
    # key stages and order.
    offs_d = tl.arange(0, HEAD_DIM)
    if KEY_BLOCKS:
        start_n = tl.program_id(1)
        batch_kv_head = tl.program_id(0)
        batch = (batch_kv_head // n_kv_heads).to(tl.int64)
        kv_head = (batch_kv_head % n_kv_heads).to(tl.int64)
        IDS += batch * 4 * seq_len
        offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = offs_n < seq_len
        k = tl.load(K + batch * stride_kb + kv_head * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                    mask=key_ok[:, None], other=0.0)
        v = tl.load(V + batch * stride_vb + kv_head * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                    mask=key_ok[:, None], other=0.0)
        k_doc, k_segment, k_position = _token_ids(IDS, offs_n, seq_len, PACKED)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        lo, full_lo, full_hi, hi = _query_ranges(start_n, seq_len, IDS, window, CAUSAL, PACKED, WINDOWED, BLOCK_M,
                                                 BLOCK_N)
        for g in range(GROUP):
            head = kv_head * GROUP + g
            batch_head = batch * (n_kv_heads * GROUP) + head
            Q_h = Q + batch * stride_qb + head * stride_qh
            DO_h = DO + batch * stride_dob + head * stride_doh
            LSE_h = LSE + batch_head * seq_len
            DELTA_h = DELTA + batch_head * seq_len
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q_h, DO_h, LSE_h, DELTA_h, IDS, offs_n, k_doc, k_segment,
                                          k_position, offs_d, lo, full_lo, stride_qt, stride_dot, seq_len, window,
                                          qk_scale, CAUSAL, PACKED, WINDOWED, BLOCK_M, DOT_PRECISION, MASKED=True)
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q_h, DO_h, LSE_h, DELTA_h, IDS, offs_n, k_doc, k_segment,
                                          k_position, offs_d, full_lo, full_hi, stride_qt, stride_dot, seq_len,
                                          window, qk_scale, CAUSAL, PACKED, WINDOWED, BLOCK_M, DOT_PRECISION,
                                          MASKED=False)
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q_h, DO_h, LSE_h, DELTA_h, IDS, offs_n, k_doc, k_segment,
                                          k_position, offs_d, full_hi, hi, stride_qt, stride_dot, seq_len, window,
                                          qk_scale, CAUSAL, PACKED, WINDOWED, BLOCK_M, DOT_PRECISION, MASKED=True)
        dk = dk * sm_scale
        tl.store(DK + batch * stride_dkb + kv_head * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
                 dk.to(DK.dtype.element_ty), mask=key_ok[:, None])
        tl.store(DV + batch * stride_dvb + kv_head * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=key_ok[:, None])
    else:
        start_m, batch_head, batch, head, kv_head = _query_block_program(n_kv_heads * GROUP, GROUP)
        K += batch * stride_kb + kv_head * stride_kh
        V += batch * stride_vb + kv_head * stride_vh
        IDS += batch * 4 * seq_len
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seq_len
        q = tl.load(Q + batch * stride_qb + head.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qt
                    + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + batch * stride_dob + head.to(tl.int64) * stride_doh + offs_m[:, None] * stride_dot
                     + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + batch_head.to(tl.int64) * seq_len + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + batch_head.to(tl.int64) * seq_len + offs_m, mask=row_ok, other=0.0)
        q_doc, q_segment, q_position = _token_ids(IDS, offs_m, seq_len, PACKED)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        lo, full_lo, full_hi, hi = _key_ranges(start_m, seq_len, IDS, window, CAUSAL, PACKED, WINDOWED, BLOCK_M,
                                               BLOCK_N)
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, IDS, offs_m, q_doc, q_segment, q_position, offs_d, lo,
                                full_lo, stride_kt, stride_vt, seq_len, window, qk_scale, CAUSAL, PACKED, WINDOWED,
                                BLOCK_N, DOT_PRECISION, MASKED=True)
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, IDS, offs_m, q_doc, q_segment, q_position, offs_d,
                                full_lo, full_hi, stride_kt, stride_vt, seq_len, window, qk_scale, CAUSAL, PACKED,
                                WINDOWED, BLOCK_N, DOT_PRECISION, MASKED=False)
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, IDS, offs_m, q_doc, q_segment, q_position, offs_d,
                                full_hi, hi, stride_kt, stride_vt, seq_len, window, qk_scale, CAUSAL, PACKED,
                                WINDOWED, BLOCK_N, DOT_PRECISION, MASKED=True)
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


def _token_ids_tensor(layout: RowLayout | None, device: torch.device) -> torch.Tensor:
    """(B, 4, T) int32 ids the kernels read for packed rows (RowLayout.kernel_ids, made once per layout), or for
    unpacked rows a one-element placeholder, never read."""
    return _unpacked_placeholder(device) if layout is None else layout.kernel_ids


@functools.cache
def _unpacked_placeholder(device: torch.device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int32, device=device)


def _mask_flags(causal: bool, ids: torch.Tensor, window: int | None) -> dict:
    return dict(CAUSAL=causal, PACKED=ids.dim() == 3, WINDOWED=window is not None)


def _forward(q, k, v, causal: bool, scale: float, ids: torch.Tensor,
             window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    o = torch.empty_like(q)  # (B, Hq, T, D), keeps q's memory layout
    lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)  # log2-sum-exp2 per row
    cfg = _block_sizes(D, q.dtype)["fwd"]
    grid = (B * Hq, triton.cdiv(T, cfg["BLOCK_M"]))
    launch(_attn_fwd_kernel, grid,
           q, k, v, o, lse, ids, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
           Hq, T, window or 0, scale * LOG2_E,
           GROUP=Hq // Hkv, HEAD_DIM=D, DOT_PRECISION=_dot_precision(q.dtype), **_mask_flags(causal, ids, window),
           **cfg)
    return o, lse


def _backward(q, k, v, o, lse, do, causal: bool, scale: float, ids: torch.Tensor,
              window: int | None) -> tuple[torch.Tensor, ...]:
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    cfgs = _block_sizes(D, q.dtype)
    delta = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)  # rowsum(o * do)
    cfg = cfgs["delta"]
    launch(_attn_bwd_delta_kernel, (triton.cdiv(T, cfg["BLOCK_M"]), B * Hq),
           o, do, delta, *_strides(o), *_strides(do), Hq, T, HEAD_DIM=D, **cfg)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    args = (q, k, v, do, lse, delta, dq, dk, dv, ids, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
            *_strides(dq), *_strides(dk), *_strides(dv), Hkv, T, window or 0, scale * LOG2_E, scale)
    meta = dict(GROUP=Hq // Hkv, HEAD_DIM=D, DOT_PRECISION=_dot_precision(q.dtype), **_mask_flags(causal, ids, window))
    cfg = cfgs["dkdv"]
    launch(_attn_bwd_kernel, (B * Hkv, triton.cdiv(T, cfg["BLOCK_N"])), *args, KEY_BLOCKS=True, **meta, **cfg)
    cfg = cfgs["dq"]
    launch(_attn_bwd_kernel, (B * Hq, triton.cdiv(T, cfg["BLOCK_M"])), *args, KEY_BLOCKS=False, **meta, **cfg)
    return dq, dk, dv


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, ids: torch.Tensor, window: int | None):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        o, lse = _forward(q, k, v, causal, scale, ids, window)
        ctx.save_for_backward(q, k, v, o, lse, ids)
        ctx.causal, ctx.scale, ctx.window = causal, scale, window
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, ids = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, _last_dim_contiguous(do), ctx.causal, ctx.scale, ids, ctx.window)
        return dq, dk, dv, None, None, None, None


# ----------------------------------------------------------------------------- public API

def uses_triton(q: torch.Tensor) -> bool:
    """Whether attention() takes the Triton path for a query tensor like q."""
    if q.shape[-1] not in TRITON_HEAD_DIMS or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if q.numel() == 0:  # nothing to launch
        return False
    return triton_runs_on(q) and not (q.dtype == torch.bfloat16 and interpret_requested())


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, layout: RowLayout | None,
                  window: int | None) -> None:
    where = "spin_kernels/attention.py:attention"
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise KernelError(f"attention wants q (B, Hq, T, D) and k, v (B, Hkv, T, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)} ({where}); check the caller's reshapes")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise KernelError(f"attention: q {tuple(q.shape)} and k/v {tuple(k.shape)} differ in batch, length or "
                         f"head dim ({where}); self-attention over aligned q/k is all it supports")
    if q.shape[1] % k.shape[1] != 0:
        raise KernelError(f"attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads "
                         f"({where}); set n_head to a multiple of n_kv_head")
    if not q.dtype == k.dtype == v.dtype:
        raise KernelError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}) ({where}); "
                         f"cast them to one dtype first")
    if (layout is not None or window is not None) and not causal:
        raise KernelError(f"attention: packed rows and sliding windows are causal; pass causal=True ({where})")
    if layout is not None and layout.doc_starts.shape != (q.shape[0], q.shape[2]):
        raise KernelError(f"attention: the packed layout is {tuple(layout.doc_starts.shape)} but q has batch "
                         f"{q.shape[0]} and length {q.shape[2]} ({where}); pack the batch the model reads")
    if window is not None and window < 1:
        raise KernelError(f"attention: window={window} must be >= 1 ({where}); check sliding_window")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None,
              layout: RowLayout | None = None, window: int | None = None) -> torch.Tensor:
    """q (B, Hq, T, D), k/v (B, Hkv, T, D) with Hq % Hkv == 0 -> (B, Hq, T, D); differentiable.
    layout: packed rows (packing.py), each query sees its document's prompt and its own segment; window: each
    query sees keys less than `window` positions back. Both need causal=True."""
    _check_inputs(q, k, v, causal, layout, window)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if window is not None and window >= q.shape[2]:
        window = None  # positions are never further apart than the row is long
    if uses_triton(q):
        return _TritonAttention.apply(q, k, v, causal, scale, _token_ids_tensor(layout, q.device), window)
    gqa = q.shape[1] != k.shape[1]
    mask = sdpa_mask(layout, q.shape[2], window, q.device)  # (B or 1, 1, T, T) or None
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
