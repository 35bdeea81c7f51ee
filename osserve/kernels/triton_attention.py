"""Paged attention with per-head sinks and an optional sliding window, reading the KV cache in place.

Twin: reference.paged_attention.

- Decode (every query_len <= 1): split-KV (flash-decoding). Grid (num_seqs, kv_heads, num_splits); a program
  takes all q heads of one kv head (GQA: K/V read once for the group) over one slice of the keys, and a
  reduce kernel merges the slices with the sink joining the softmax denominator. The grid depends only on
  num_seqs and constants, lengths are read from device tensors: CUDA-graph capturable. With one split
  the first kernel applies the sink itself and no reduce runs.
- Prefill / mixed batches: varlen flash attention. Grid (query tiles, num_seqs, kv_heads); a tile is
  BLOCK_Q query tokens x all q heads of one kv head (rows = token-major, head-minor), causal within the
  chunk, the cached context before it, and the window. The sink starts the online softmax (m = sink, l = 1).
Sliding window: key tiles start at the first key the earliest query of the program can see, so blocks out
of the window (possibly the null block 0) are never read.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from osserve.kernels.metadata import AttentionMetadata
from osserve.kernels.triton_common import config_for, dot_f32, interpreting, next_pow2

LOG2E = 1.4426950408889634

DECODE_DEFAULT = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "MAX_SPLITS": 32, "PROGRAMS_PER_SM": 2}
PREFILL_DEFAULT = {"ROWS": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
_INTERPRET_DECODE = {"BLOCK_N": 16, "num_warps": 1, "num_stages": 1, "MAX_SPLITS": 4, "PROGRAMS_PER_SM": 4}
_INTERPRET_PREFILL = {"ROWS": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    # NOTE: the attention kernels derive the cache strides from its shape.
    if k_cache.shape != v_cache.shape or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(
            f"paged KV cache: K {tuple(k_cache.shape)}/{k_cache.stride()} and V {tuple(v_cache.shape)}/"
            f"{v_cache.stride()} must be contiguous and of one shape"
        )


# ---------------------------------------------------------------------------------------------------------
# Shared pieces


@triton.jit
def _load_kv_tile(
    cache_ptr,
    bt_row_ptr,
    offs,
    kmask,
    dmask,
    d,
    kvh,
    stride_cb,
    stride_ct,
    stride_ch,
    BLOCK_SIZE: tl.constexpr,
):
    """Keys (or values) at logical positions `offs` of one sequence, one kv head: [BLOCK_N, D]."""
    blk = tl.load(bt_row_ptr + offs // BLOCK_SIZE, mask=kmask, other=0).to(tl.int64)
    base = blk * stride_cb + (offs % BLOCK_SIZE) * stride_ct + kvh * stride_ch
    return tl.load(cache_ptr + base[:, None] + d[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)


@triton.jit
def _strides(num_kv_heads, group, head_dim, BLOCK_SIZE: tl.constexpr):
    """Row strides of q / out [T, Hq, D] and of the cache [blocks, BLOCK_SIZE, Hk, D], all contiguous (the
    host checks): (token stride of q and out, token stride of the cache, block stride of the cache)."""
    return num_kv_heads * group * head_dim, num_kv_heads * head_dim, BLOCK_SIZE * num_kv_heads * head_dim


@triton.jit
def _attend_tile(q, k, v, s_mask, m, l_i, acc, qk_scale, F32_DOT: tl.constexpr):
    """One online-softmax step (log2 domain) of rows q [R, D] over keys k, v [BLOCK_N, D]."""
    if F32_DOT:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(s_mask, s * qk_scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if F32_DOT:
        pv = tl.dot(p, v.to(tl.float32))
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


# ---------------------------------------------------------------------------------------------------------
# Decode: split-KV + reduce


@triton.jit
def _decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    qsl_ptr,
    lens_ptr,
    sinks_ptr,
    out_ptr,
    part_o_ptr,
    part_ml_ptr,
    stride_bt,
    qk_scale,
    window,
    num_kv_heads,
    group,
    head_dim,
    SLIDING: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    F32_DOT: tl.constexpr,
):
    """Program (sequence, kv head, split): the sequence's one query, all q heads of the kv head, over its
    split of the visible keys; with one split the output, else partial (acc, m, l) for the reduce."""
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    stride_qt, stride_ct, stride_cb = _strides(num_kv_heads, group, head_dim, BLOCK_SIZE)
    num_q_heads = num_kv_heads * group
    q_end = tl.load(qsl_ptr + seq + 1)
    if q_end > tl.load(qsl_ptr + seq):
        row = (q_end - 1).to(tl.int64)
        seq_len = tl.load(lens_ptr + seq)
        k_lo = 0
        if SLIDING:
            k_lo = tl.maximum(seq_len - window, 0)
        per_split = tl.cdiv(tl.cdiv(seq_len - k_lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
        s_lo = k_lo + split * per_split
        s_hi = tl.minimum(s_lo + per_split, seq_len)

        g = tl.arange(0, G)
        d = tl.arange(0, D)
        gmask = g < group
        dmask = d < head_dim
        head = kvh * group + g
        q = tl.load(
            q_ptr + row * stride_qt + head[:, None] * head_dim + d[None, :],
            mask=gmask[:, None] & dmask[None, :],
            other=0.0,
        )
        if NUM_SPLITS == 1:
            m = tl.load(sinks_ptr + head, mask=gmask, other=0.0).to(tl.float32) * 1.4426950408889634
            l_i = tl.full([G], 1.0, tl.float32)
        else:
            m = tl.full([G], float("-inf"), tl.float32)
            l_i = tl.zeros([G], tl.float32)
        acc = tl.zeros([G, D], tl.float32)
        bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
        for start in range(s_lo, s_hi, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            kmask = offs < s_hi
            k = _load_kv_tile(
                k_ptr, bt_row, offs, kmask, dmask, d, kvh, stride_cb, stride_ct, head_dim, BLOCK_SIZE
            )
            v = _load_kv_tile(
                v_ptr, bt_row, offs, kmask, dmask, d, kvh, stride_cb, stride_ct, head_dim, BLOCK_SIZE
            )
            m, l_i, acc = _attend_tile(q, k, v, kmask[None, :], m, l_i, acc, qk_scale, F32_DOT)
        omask = gmask[:, None] & dmask[None, :]
        if NUM_SPLITS == 1:
            o = acc / l_i[:, None]
            tl.store(
                out_ptr + row * stride_qt + head[:, None] * head_dim + d[None, :],
                o.to(out_ptr.dtype.element_ty),
                mask=omask,
            )
        else:
            part = (seq * num_q_heads + head).to(tl.int64) * NUM_SPLITS + split
            tl.store(part_o_ptr + part[:, None] * head_dim + d[None, :], acc, mask=omask)
            tl.store(part_ml_ptr + part * 2, m, mask=gmask)
            tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=gmask)


@triton.jit
def _decode_reduce_kernel(
    qsl_ptr,
    sinks_ptr,
    out_ptr,
    part_o_ptr,
    part_ml_ptr,
    stride_ot,
    stride_oh,
    group,
    head_dim,
    num_q_heads,
    NUM_SPLITS: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    q_end = tl.load(qsl_ptr + seq + 1)
    if q_end > tl.load(qsl_ptr + seq):
        row = (q_end - 1).to(tl.int64)
        g = tl.arange(0, G)
        s = tl.arange(0, NUM_SPLITS)
        d = tl.arange(0, D)
        gmask = g < group
        head = kvh * group + g
        part = (seq * num_q_heads + head).to(tl.int64)[:, None] * NUM_SPLITS + s[None, :]  # [G, S]
        m = tl.load(part_ml_ptr + part * 2, mask=gmask[:, None], other=float("-inf"))
        l_i = tl.load(part_ml_ptr + part * 2 + 1, mask=gmask[:, None], other=0.0)
        sink = tl.load(sinks_ptr + head, mask=gmask, other=0.0).to(tl.float32) * 1.4426950408889634
        m_all = tl.maximum(tl.max(m, 1), sink)
        w = tl.exp2(m - m_all[:, None])
        denom = tl.sum(l_i * w, 1) + tl.exp2(sink - m_all)
        dmask = d < head_dim
        o_mask = gmask[:, None, None] & dmask[None, None, :]
        acc = tl.load(part_o_ptr + part[:, :, None] * head_dim + d[None, None, :], mask=o_mask, other=0.0)
        o = tl.sum(acc * w[:, :, None], 1) / denom[:, None]
        tl.store(
            out_ptr + row * stride_ot + head[:, None] * stride_oh + d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=gmask[:, None] & dmask[None, :],
        )


def _kernel_args(q, k_cache, v_cache, meta, sinks, scale, out) -> tuple[tuple, tuple, dict]:
    """What both attention kernels take, in their order: (pointers, scalars, shared constexprs)."""
    num_kv_heads = k_cache.shape[2]
    pointers = (q, k_cache, v_cache, meta.block_table, meta.query_start_loc, meta.seq_lens, sinks, out)
    window = meta.sliding_window
    scalars = (
        meta.block_table.stride(0),
        scale * LOG2E,
        window or 0,
        num_kv_heads,
        q.shape[1] // num_kv_heads,
    )
    flags = {"SLIDING": window is not None, "BLOCK_SIZE": k_cache.shape[1], "F32_DOT": dot_f32(q)}
    return pointers, (*scalars, q.shape[2]), flags


@functools.cache
def _num_sms() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 4


def decode_num_splits(num_seqs: int, num_kv_heads: int, window: int | None, cfg: dict) -> int:
    """Key slices per (sequence, kv head): enough programs to fill the GPU, a power of two, fixed per batch
    size (so a captured graph keeps its launch shape whatever the context lengths)."""
    want = max(1, (cfg["PROGRAMS_PER_SM"] * _num_sms()) // max(1, num_seqs * num_kv_heads))
    splits = min(1 << (want.bit_length() - 1), cfg["MAX_SPLITS"])
    if window is not None:
        splits = min(splits, next_pow2(triton.cdiv(window, cfg["BLOCK_N"])))
    return max(1, splits)


def _decode(q, k_cache, v_cache, meta, sinks, scale, out, cfg, num_splits=None):
    num_seqs = meta.seq_lens.shape[0]
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    window = meta.sliding_window
    splits = num_splits or decode_num_splits(num_seqs, num_kv_heads, window, cfg)
    G, D = max(16, next_pow2(group)), max(16, next_pow2(head_dim))
    if splits > 1:
        part_o = torch.empty((num_seqs, num_q_heads, splits, head_dim), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((num_seqs, num_q_heads, splits, 2), dtype=torch.float32, device=q.device)
    else:
        part_o = part_ml = out
    pointers, scalars, flags = _kernel_args(q, k_cache, v_cache, meta, sinks, scale, out)
    _decode_kernel[(num_seqs, num_kv_heads, splits)](
        *pointers,
        part_o,
        part_ml,
        *scalars,
        NUM_SPLITS=splits,
        G=G,
        D=D,
        BLOCK_N=cfg["BLOCK_N"],
        **flags,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    if splits > 1:
        _decode_reduce_kernel[(num_seqs, num_kv_heads)](
            meta.query_start_loc,
            sinks,
            out,
            part_o,
            part_ml,
            out.stride(0),
            out.stride(1),
            group,
            head_dim,
            num_q_heads,
            NUM_SPLITS=splits,
            G=next_pow2(group),
            D=next_pow2(head_dim),
            num_warps=1 if interpreting() else 4 if next_pow2(group) * splits * head_dim <= 8192 else 8,
        )
    return out


# ---------------------------------------------------------------------------------------------------------
# Prefill / mixed: varlen flash attention


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    qsl_ptr,
    lens_ptr,
    sinks_ptr,
    out_ptr,
    stride_bt,
    qk_scale,
    window,
    num_kv_heads,
    group,
    head_dim,
    SLIDING: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    F32_DOT: tl.constexpr,
):
    """Program (query tile, sequence, kv head): BLOCK_Q queries x the group's q heads as one block of rows,
    online softmax over the keys the tile can see (from the window's start or 0 to its last query), the
    sink in every row's denominator."""
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    kvh = tl.program_id(2)
    stride_qt, stride_ct, stride_cb = _strides(num_kv_heads, group, head_dim, BLOCK_SIZE)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if tile * BLOCK_Q < q_len:
        seq_len = tl.load(lens_ptr + seq)
        ctx0 = seq_len - q_len  # position of the chunk's first query
        r = tl.arange(0, BLOCK_Q * G)
        t = tile * BLOCK_Q + r // G
        g = r % G
        rmask = (t < q_len) & (g < group)
        d = tl.arange(0, D)
        dmask = d < head_dim
        head = kvh * group + g
        q_pos = ctx0 + t
        q_rows = (q_start + t).to(tl.int64) * stride_qt + head * head_dim
        q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        m = tl.load(sinks_ptr + head, mask=g < group, other=0.0).to(tl.float32) * 1.4426950408889634
        l_i = tl.full([BLOCK_Q * G], 1.0, tl.float32)
        acc = tl.zeros([BLOCK_Q * G, D], tl.float32)

        first_q = ctx0 + tile * BLOCK_Q
        k_hi = tl.minimum(seq_len, first_q + BLOCK_Q)
        k_lo = 0
        if SLIDING:
            k_lo = tl.maximum(first_q - window + 1, 0)
        bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
        for start in range(k_lo, k_hi, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            kmask = offs < k_hi
            k = _load_kv_tile(
                k_ptr, bt_row, offs, kmask, dmask, d, kvh, stride_cb, stride_ct, head_dim, BLOCK_SIZE
            )
            v = _load_kv_tile(
                v_ptr, bt_row, offs, kmask, dmask, d, kvh, stride_cb, stride_ct, head_dim, BLOCK_SIZE
            )
            s_mask = kmask[None, :] & (offs[None, :] <= q_pos[:, None])
            if SLIDING:
                s_mask = s_mask & (offs[None, :] > q_pos[:, None] - window)
            m, l_i, acc = _attend_tile(q, k, v, s_mask, m, l_i, acc, qk_scale, F32_DOT)
        o = acc / l_i[:, None]
        o_rows = (q_start + t).to(tl.int64) * stride_qt + head * head_dim
        tl.store(
            out_ptr + o_rows[:, None] + d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=rmask[:, None] & dmask[None, :],
        )


def _prefill(q, k_cache, v_cache, meta, sinks, scale, out, cfg):
    num_seqs = meta.seq_lens.shape[0]
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    G = next_pow2(group)
    block_q = max(1, cfg["ROWS"] // G)
    block_q = max(block_q, triton.cdiv(16, G))  # tl.dot needs >= 16 rows
    grid = (triton.cdiv(meta.max_query_len, block_q), num_seqs, num_kv_heads)
    pointers, scalars, flags = _kernel_args(q, k_cache, v_cache, meta, sinks, scale, out)
    _prefill_kernel[grid](
        *pointers,
        *scalars,
        BLOCK_Q=block_q,
        G=G,
        D=max(16, next_pow2(head_dim)),
        BLOCK_N=cfg["BLOCK_N"],
        **flags,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


def decode_config(head_dim: int, window: int | None) -> dict:
    default = _INTERPRET_DECODE if interpreting() else DECODE_DEFAULT
    return config_for("attention_decode", f"d{head_dim}-{'sliding' if window else 'full'}", default)


def prefill_config(head_dim: int, group: int) -> dict:
    default = _INTERPRET_PREFILL if interpreting() else PREFILL_DEFAULT
    return config_for("attention_prefill", f"d{head_dim}-g{group}", default)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    sinks: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention with per-head sink logits over the paged cache (new K/V already written).

    q [T, Hq, D]; returns [T, Hq, D] in q's dtype. Only meta.max_query_len and the number of sequences
    shape the launch; everything per sequence is read on the device.
    """
    q = q.contiguous()  # NOTE: the kernels derive q's (and the output's) strides from its shape
    _check_cache(k_cache, v_cache)
    num_q_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"paged_attention: {num_q_heads} q heads are not a multiple of {num_kv_heads} kv heads"
        )
    if meta.sliding_window is not None and meta.sliding_window < 1:
        raise ValueError(f"paged_attention: sliding_window must be None or >= 1, got {meta.sliding_window}")
    out = torch.empty_like(q)
    if q.shape[0] == 0 or meta.seq_lens.shape[0] == 0 or meta.max_query_len == 0:
        return out
    head_dim = q.shape[2]
    if meta.max_query_len == 1:
        return _decode(
            q, k_cache, v_cache, meta, sinks, scale, out, decode_config(head_dim, meta.sliding_window)
        )
    group = num_q_heads // num_kv_heads
    return _prefill(q, k_cache, v_cache, meta, sinks, scale, out, prefill_config(head_dim, group))
