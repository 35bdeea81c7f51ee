"""Rotary embedding (half-split, YaRN frequencies and scaling given): one program per token, all heads.

Twin: reference.rope_write_kv. cos / sin are computed once per token in float32 and applied to every q and k
head; q, k and v may be strided views of the fused qkv projection. The same launch stores the rotated keys
and the values in their paged-cache slots.
Memory-bound: floor = (read + write of q and k, + the cache writes) / 3.0 TB/s.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from osserve.kernels.triton_attention import _check_cache
from osserve.kernels.triton_common import interpreting, next_pow2


@triton.jit
def _rotate(
    x_ptr,
    o_ptr,
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    tok,
    n_heads,
    half,
    cos,
    sin,
    HEADS: tl.constexpr,
    HALF: tl.constexpr,
):
    """Rotates one token's heads, stores them at o_ptr and returns the two rotated halves (fp32)."""
    h = tl.arange(0, HEADS)
    d = tl.arange(0, HALF)
    mask = (h[:, None] < n_heads) & (d[None, :] < half)
    src = x_ptr + tok * stride_xt + h[:, None] * stride_xh + d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * cos[None, :] - x2 * sin[None, :]
    y2 = x2 * cos[None, :] + x1 * sin[None, :]
    dst = o_ptr + tok * stride_ot + h[:, None] * stride_oh + d[None, :]
    tl.store(dst, y1.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + half, y2.to(o_ptr.dtype.element_ty), mask=mask)
    return y1, y2


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    qo_ptr,
    ko_ptr,
    pos_ptr,
    inv_freq_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    stride_cb,
    stride_ct,
    stride_ch,
    n_q_heads,
    n_k_heads,
    half,
    scaling,
    Q_HEADS: tl.constexpr,
    K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, HALF)
    pos = tl.load(pos_ptr + tok).to(tl.float32)
    freq = pos * tl.load(inv_freq_ptr + d, mask=d < half, other=0.0).to(tl.float32)
    cos = tl.cos(freq) * scaling
    sin = tl.sin(freq) * scaling
    _rotate(
        q_ptr,
        qo_ptr,
        stride_qt,
        stride_qh,
        stride_qot,
        stride_qoh,
        tok,
        n_q_heads,
        half,
        cos,
        sin,
        Q_HEADS,
        HALF,
    )
    k1, k2 = _rotate(
        k_ptr,
        ko_ptr,
        stride_kt,
        stride_kh,
        stride_kot,
        stride_koh,
        tok,
        n_k_heads,
        half,
        cos,
        sin,
        K_HEADS,
        HALF,
    )
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    # Padding tokens (CUDA-graph buckets) may carry slot -1: nothing to store.
    if slot >= 0:
        h = tl.arange(0, K_HEADS)
        mask = (h[:, None] < n_k_heads) & (d[None, :] < half)
        dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct + h[:, None] * stride_ch
        dst = dst + d[None, :]
        ty = kc_ptr.dtype.element_ty
        tl.store(kc_ptr + dst, k1.to(ty), mask=mask)
        tl.store(kc_ptr + dst + half, k2.to(ty), mask=mask)
        src = v_ptr + tok * stride_vt + h[:, None] * stride_vh + d[None, :]
        tl.store(vc_ptr + dst, tl.load(src, mask=mask).to(ty), mask=mask)
        tl.store(vc_ptr + dst + half, tl.load(src + half, mask=mask).to(ty), mask=mask)


def rope_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    rope: tuple[torch.Tensor, float],
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [T, Hq, D] and k [T, Hk, D] at `positions` (rope = (inv_freq, scaling)), and the
    rotated keys and the values stored at their slots of the paged cache, in one launch; returns the rotated
    (q, k) as new tensors."""
    (inv_freq, scaling), (k_cache, v_cache) = rope, kv_cache
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    _check_cache(k_cache, v_cache)
    q_out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((num_tokens, num_k_heads, head_dim), dtype=k.dtype, device=k.device)
    if num_tokens:
        half = head_dim // 2
        _rope_kernel[(num_tokens,)](
            q,
            k,
            v,
            q_out,
            k_out,
            positions,
            inv_freq,
            k_cache,
            v_cache,
            slot_mapping,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            q_out.stride(0),
            q_out.stride(1),
            k_out.stride(0),
            k_out.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            num_q_heads,
            num_k_heads,
            half,
            float(scaling),
            Q_HEADS=next_pow2(num_q_heads),
            K_HEADS=next_pow2(num_k_heads),
            HALF=next_pow2(half),
            BLOCK_SIZE=k_cache.shape[1],
            num_warps=1 if interpreting() else 4,
        )
    return q_out, k_out
