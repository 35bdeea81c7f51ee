"""MXFP4 MoE, gemv regime (few (token, expert) pairs: decode): weights streamed once per routed pair.

The word decode (two integer ops per code pair, fp32 FMAs) and tiles sized for bytes in flight. Stage 1 grid
(pairs, 2I / BLOCK_N): act = swiglu(x W13^T + b13), written in fp32, code-index major (PERM) so that stage 2
reads it as 16-byte vectors in the weights' layout. Stage 2 grid (tokens, H / DOWN_BLOCK_N): each program owns
DOWN_BLOCK_N rows of *all* top-k experts as one [top-k, rows, words] tile, so the experts' loads go out
together and the combine (bias, routing weight, sum over k) happens in registers: two launches, no combine
kernel. PREFETCH loads the next K step's words before decoding the current one (register double buffering),
so a warp always has a load in flight. Pairs are on grid axis 0, so programs reading the same weight tile for
different pairs run together (L2). Scales are applied once per 32-value group.
(The first kernels of this regime, measured on the H100 in run 1 and superseded since, are gone.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from osserve.kernels.moe_weights import MoEWeights
from osserve.kernels.triton_mxfp4 import _e2m1_pair, _scale_factor, experts_stage, use_asm


@triton.jit
def _swiglu(gate, lin, limit, alpha):
    gate = tl.minimum(gate, limit)
    lin = tl.minimum(tl.maximum(lin, -limit), limit)
    return (lin + 1.0) * (gate * tl.sigmoid(gate * alpha))


@triton.jit
def _strides(KG, N, STAGE: tl.constexpr):
    """Row strides of a stage's activations in / out and of the packed weights and scales (every MoE tensor
    is contiguous: MoEWeights and the launchers check it): (stride_a, stride_o, stride_wn, stride_sn)."""
    if STAGE == 1:
        return KG * 32, N // 2, KG * 16, KG
    return KG * 32, N, KG * 16, KG


@triton.jit
def _load_words(w_rows, s_rows, rmask, kg0, KG, W: tl.constexpr, G: tl.constexpr):
    """Packed words [J, R, W] (8 codes each) and scale bytes [J, R, G] of groups kg0 .. kg0 + G."""
    wk = kg0 * 4 + tl.arange(0, W)
    t = tl.load(
        w_rows[:, :, None] + wk[None, None, :], mask=rmask[:, :, None] & (wk < KG * 4)[None, None, :], other=0
    )
    gk = kg0 + tl.arange(0, G)
    sc = tl.load(
        s_rows[:, :, None] + gk[None, None, :], mask=rmask[:, :, None] & (gk < KG)[None, None, :], other=0
    )
    return t, sc


@triton.jit
def _gemv_dot(
    t,
    sc,
    a_rows,
    amask_j,
    kg0,
    KG,
    J: tl.constexpr,
    R: tl.constexpr,
    W: tl.constexpr,
    G: tl.constexpr,
    PERM: tl.constexpr,
    ASM: tl.constexpr,
):
    """Per-group dot products [J, R, G] of decoded words t [J, R, W] with activation rows a_rows [J].

    PERM: the activation rows are stored code-index major (value 8w + i at i * words + w, as stage 1 writes
    them, in fp32), so the loads below are contiguous like the weight words: 16-byte vectors, no layout
    shuffle, no conversion.
    """
    wk = kg0 * 4 + tl.arange(0, W)
    amask = amask_j[:, None, None] & (wk < KG * 4)[None, None, :]
    # NOTE: with PERM the pointers get the weight tile's full [J, R, W] shape (zero stride over R): loaded as
    # [J, W] and broadcast, Triton picks a layout of their own and shuffles each load through shared memory
    # (two barriers each) to match the weights. Stage 1 (J = 1, [1, W] strided loads) keeps the broadcast.
    if PERM:
        a_ptrs = a_rows[:, None, None] + (wk[None, None, :] + tl.zeros([1, R, 1], tl.int32))
        step = KG * 4
    else:
        a_ptrs = (a_rows[:, None] + wk[None, :] * 8)[:, None, :]
        amask = amask_j[:, None] & (wk < KG * 4)[None, :]
        amask = amask[:, None, :]
        step = 1
    part = tl.zeros([J, R, W], tl.float32)
    for i in tl.static_range(4):
        lo, hi = _e2m1_pair(t, i, ASM)
        a_lo = tl.load(a_ptrs + i * step, mask=amask, other=0.0).to(tl.float32)
        a_hi = tl.load(a_ptrs + (i + 4) * step, mask=amask, other=0.0).to(tl.float32)
        part = tl.fma(lo, a_lo, part)
        part = tl.fma(hi, a_hi, part)
    return tl.sum(tl.reshape(part, [J, R, G, 4]), 3) * _scale_factor(sc)


@triton.jit
def _moe_gemv_kernel(
    a_ptr,
    ids_ptr,
    topw_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    out_ptr,
    KG,
    N,
    top_k,
    limit,
    alpha,
    expert_offset,
    num_local,
    STAGE: tl.constexpr,
    J: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr,
    PERM: tl.constexpr,
    ASM: tl.constexpr,
):
    """STAGE 1 (J = 1): program (pair, tile) writes act = swiglu(x W13^T + b13) for BLOCK_N / 2 columns.
    STAGE 2 (J = top-k padded): program (token, tile) writes out = sum_j w_j (act_j W2_j^T + b2_j)."""
    W: tl.constexpr = BLOCK_K // 8
    G: tl.constexpr = BLOCK_K // 32
    stride_a, stride_o, stride_wn, stride_sn = _strides(KG, N, STAGE)
    pid = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    j = tl.arange(0, J)
    if STAGE == 1:
        pair = pid + j
        jmask = j < 1
        a_rows = a_ptr + (pair // top_k).to(tl.int64) * stride_a
    else:
        pair = pid * top_k + j
        jmask = j < top_k
        a_rows = a_ptr + pair.to(tl.int64) * stride_a
    e = tl.load(ids_ptr + pair, mask=jmask, other=0).to(tl.int32) - expert_offset
    live = jmask & (e >= 0) & (e < num_local)
    e64 = tl.where(live, e, 0).to(tl.int64)
    rmask = live[:, None] & nmask[None, :]
    # NOTE: packed rows are whole 16-byte groups, so row and expert offsets in words are multiples of 4;
    # with it Triton issues 16-byte loads.
    w_off = e64[:, None] * (N * stride_wn // 4) + n.to(tl.int64)[None, :] * (stride_wn // 4)
    w_rows = w_ptr.to(tl.pointer_type(tl.uint32)) + tl.multiple_of(w_off, [4, 4])
    s_rows = s_ptr + e64[:, None] * (N * stride_sn) + n.to(tl.int64)[None, :] * stride_sn
    acc = tl.zeros([J, BLOCK_N, G], tl.float32)
    if tl.max(live.to(tl.int32), 0) > 0:
        if PREFETCH:
            t, sc = _load_words(w_rows, s_rows, rmask, 0, KG, W, G)
        for kg0 in range(0, KG, G):
            if PREFETCH:
                t_cur, sc_cur = t, sc
                t, sc = _load_words(w_rows, s_rows, rmask, kg0 + G, KG, W, G)
            else:
                t_cur, sc_cur = _load_words(w_rows, s_rows, rmask, kg0, KG, W, G)
            acc += _gemv_dot(t_cur, sc_cur, a_rows, live, kg0, KG, J, BLOCK_N, W, G, PERM and STAGE == 2, ASM)
    h = tl.sum(acc, 2)
    if HAS_BIAS:
        h += tl.load(b_ptr + e64[:, None] * N + n[None, :], mask=rmask, other=0.0).to(tl.float32)
    if STAGE == 1:
        # Rows 2c (gate) and 2c + 1 (linear) of the interleaved w13 give output column c.
        gate, lin = tl.split(tl.reshape(h, [BLOCK_N // 2, 2]))
        cols = tl.program_id(1) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        y = _swiglu(gate, lin, limit, alpha)
        any_live = tl.max(live.to(tl.int32), 0) > 0
        if PERM:
            dst = (cols % 8) * (N // 16) + cols // 8
        else:
            dst = cols
        tl.store(
            out_ptr + pid.to(tl.int64) * stride_o + dst,
            y.to(out_ptr.dtype.element_ty),
            mask=(cols < N // 2) & any_live,
        )
    else:
        wts = tl.load(topw_ptr + pair, mask=live, other=0.0).to(tl.float32)
        y = tl.sum(tl.where(rmask, h * wts[:, None], 0.0), 0)
        tl.store(out_ptr + pid.to(tl.int64) * stride_o + n, y.to(out_ptr.dtype.element_ty), mask=nmask)


def gemv_launch(x: torch.Tensor, topk_weights, topk_ids, experts: MoEWeights, cfg: dict) -> torch.Tensor:
    """Both stages of the gemv regime; returns out [tokens, H]."""
    num_tokens, top_k = topk_ids.shape
    num_pairs = num_tokens * top_k
    perm = cfg.get("PERM", True)
    # PERM: code-index-major fp32 rows, which stage 2 loads as 16-byte vectors with no conversion.
    act = torch.empty((num_pairs, experts.inter), dtype=torch.float32 if perm else x.dtype, device=x.device)
    out = torch.empty((num_tokens, experts.hidden), dtype=x.dtype, device=x.device)
    ids, topw = topk_ids.reshape(-1), topk_weights.reshape(-1)
    swiglu = (float(experts.swiglu_limit), float(experts.swiglu_alpha))
    common = dict(
        BLOCK_K=cfg["BLOCK_K"],
        PREFETCH=cfg.get("PREFETCH", True),
        PERM=perm,
        ASM=use_asm(cfg),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    stages = [
        (1, x, act, (num_pairs, triton.cdiv(2 * experts.inter, cfg["BLOCK_N"])), 1, cfg["BLOCK_N"]),
        (
            2,
            act,
            out,
            (num_tokens, triton.cdiv(experts.hidden, cfg["DOWN_BLOCK_N"])),
            top_k,
            cfg["DOWN_BLOCK_N"],
        ),
    ]
    for stage, a, dst, grid, j, rows in stages:
        weights, k_groups, n, has_bias = experts_stage(experts, stage, x)
        _moe_gemv_kernel[grid](
            a,
            ids,
            topw,
            *weights,
            dst,
            k_groups,
            n,
            top_k,
            *swiglu,
            experts.expert_offset,
            experts.num_local,
            STAGE=stage,
            J=triton.next_power_of_2(j),
            HAS_BIAS=has_bias,
            BLOCK_N=rows,
            **common,
        )
    return out
