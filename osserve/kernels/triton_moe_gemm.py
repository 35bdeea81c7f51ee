"""MXFP4 MoE, gemm regime (a few to a few hundred pairs per expert): tensor-core tiles per expert.

Pairs are put in expert order first (triton_moe_pairs.align_pairs: each expert's pairs padded to BLOCK_M, so
a block holds pairs of one expert). Program (block, N tile) multiplies BLOCK_M activation rows by BLOCK_N
weight rows of that expert over all of K, the weights decoded in registers: each weight tile is read and
decoded once per block, so with BLOCK_M at least the pairs per expert every active expert's packed weights
are streamed once per projection. Stage 1 writes act = swiglu(x W13^T + b13) per pair (rows 2c / 2c + 1 of
the tile are gate / linear of column c); stage 2 writes act W2^T per pair; combine_pairs adds b2, weighs and
sums each token's top-k rows.

Two decodes (config WORD):
- byte (the first kernel; measured ~1 TB/s of weights at 16 tokens on the H200, decode-bound): the tile
  [BLOCK_N, BLOCK_K] decoded in natural order by the byte path (~10 integer / conversion ops per value),
  then one tl.dot (or tl.dot_scaled with DOT_SCALED).
- word: 32-bit words of 8 codes, decoded by one shift / mask pair per two values (triton_mxfp4._e2m1_pair)
  into eight [BLOCK_N, BLOCK_K / 8] tiles, code i of every word; each is scaled (one multiply per value,
  the group factor loaded per word) and goes into its own tl.dot against the activations of the same
  positions (8w + i). About half the instructions per weight value of the byte path, and every op between
  the load of the words and the dot is elementwise, so Triton may hoist the dot-operand layout conversion
  up to the packed words (4 bytes per 8 values) instead of the decoded tile. PERM: stage 1 writes act code-
  index major (value 8w + i at i * I / 8 + w), so stage 2's activation loads are contiguous.
SWAP computes W x A^T (the weight rows on the MMA's M side), the better orientation when few pairs share an
expert: a wgmma's N can be 16 while its M is 64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from osserve.kernels.moe_weights import MoEWeights
from osserve.kernels.triton_common import dot_f32, interpreting
from osserve.kernels.triton_moe_gemv import _strides, _swiglu
from osserve.kernels.triton_moe_pairs import align_pairs, combine_pairs
from osserve.kernels.triton_mxfp4 import _dequant_mxfp4, _e2m1_pair, _scale_factor, experts_stage, use_asm


@triton.jit
def _byte_dot(
    acc,
    a,
    w_e,
    s_e,
    rows,
    rmask,
    k0,
    KG,
    stride_wn,
    stride_sn,
    BLOCK_K: tl.constexpr,
    SWAP: tl.constexpr,
    DOT_SCALED: tl.constexpr,
    ASM: tl.constexpr,
):
    """acc += a [BM, BK] x W[rows, k0:k0+BK]^T (or its transpose with SWAP), byte decode."""
    if DOT_SCALED:
        # Triton's own e2m1 path: packed bytes and E8M0 scales straight into tl.dot_scaled (on Hopper it
        # upcasts to bf16 in registers and runs wgmma).
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(
            w_e + rows[:, None] * stride_wn + kb[None, :],
            mask=rmask[:, None] & (kb[None, :] < KG * 16),
            other=0,
        )
        kg = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        sc = tl.load(
            s_e + rows[:, None] * stride_sn + kg[None, :], mask=rmask[:, None] & (kg[None, :] < KG), other=0
        )
        if SWAP:
            acc = tl.dot_scaled(packed, sc, "e2m1", tl.trans(a), None, "bf16", acc)
        else:
            acc = tl.dot_scaled(a, None, "bf16", tl.trans(packed), sc, "e2m1", acc)
    else:
        w = _dequant_mxfp4(w_e, s_e, rows, rmask, k0, KG, stride_wn, stride_sn, BLOCK_K, ASM).to(a.dtype)
        if SWAP:
            acc = tl.dot(w, tl.trans(a), acc)
        else:
            acc = tl.dot(a, tl.trans(w), acc)
    return acc


@triton.jit
def _code_dot(acc, v, f, a_ptrs, amask, SWAP: tl.constexpr, F32_DOT: tl.constexpr):
    """acc += (activations at code i of each word) x (decoded code i of each weight word x its scale)."""
    a = tl.load(a_ptrs, mask=amask, other=0.0)
    w = v * f
    if F32_DOT:
        a = a.to(tl.float32)
    else:
        w = w.to(a.dtype)
    if SWAP:
        return tl.dot(w, tl.trans(a), acc)
    return tl.dot(a, tl.trans(w), acc)


@triton.jit
def _word_dot(
    acc,
    a_base,
    pmask,
    words,
    s_rows,
    rmask,
    kg0,
    KG,
    BLOCK_K: tl.constexpr,
    SWAP: tl.constexpr,
    PERM: tl.constexpr,
    F32_DOT: tl.constexpr,
    ASM: tl.constexpr,
):
    """acc += the K step of groups kg0 .. kg0 + BLOCK_K / 32 with the word decode; a_base [BM] row pointers."""
    W: tl.constexpr = BLOCK_K // 8
    wk = kg0 * 4 + tl.arange(0, W)
    wmask = rmask[:, None] & (wk < KG * 4)[None, :]
    t = tl.load(words[:, None] + wk[None, :], mask=wmask, other=0)
    # The group factor of every word (four words share one scale byte; the repeats hit L1).
    f = _scale_factor(tl.load(s_rows[:, None] + (wk // 4)[None, :], mask=wmask, other=0))
    amask = pmask[:, None] & (wk < KG * 4)[None, :]
    if PERM:
        a_ptrs = a_base[:, None] + wk[None, :]
        step = KG * 4
    else:
        a_ptrs = a_base[:, None] + wk[None, :] * 8
        step = 1
    for i in tl.static_range(4):
        lo, hi = _e2m1_pair(t, i, ASM)
        acc = _code_dot(acc, lo, f, a_ptrs + i * step, amask, SWAP, F32_DOT)
        acc = _code_dot(acc, hi, f, a_ptrs + (i + 4) * step, amask, SWAP, F32_DOT)
    return acc


@triton.jit
def _moe_gemm_kernel(
    a_ptr,
    slot_pair_ptr,
    block_expert_ptr,
    num_padded_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    out_ptr,
    KG,
    N,
    num_pairs,
    top_k,
    limit,
    alpha,
    STAGE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PERM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP: tl.constexpr,
    WORD: tl.constexpr,
    F32_DOT: tl.constexpr,
    DOT_SCALED: tl.constexpr,
    ASM: tl.constexpr,
):
    pid_m = tl.program_id(0)
    stride_a, stride_o, stride_wn, stride_sn = _strides(KG, N, STAGE)
    if pid_m * BLOCK_M < tl.load(num_padded_ptr):
        e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        pairs = tl.load(slot_pair_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        pmask = pairs < num_pairs
        if STAGE == 1:
            a_rows = (pairs // top_k).to(tl.int64) * stride_a
        else:
            a_rows = pairs.to(tl.int64) * stride_a
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        if SWAP:
            acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if WORD:
            # NOTE: packed rows are whole 16-byte groups, so word offsets are multiples of 4 and Triton
            # issues 16-byte loads.
            w_off = e * (N * stride_wn // 4) + rows.to(tl.int64) * (stride_wn // 4)
            words = w_ptr.to(tl.pointer_type(tl.uint32)) + tl.multiple_of(w_off, 4)
            s_rows = s_ptr + e * (N * stride_sn) + rows.to(tl.int64) * stride_sn
            for kg0 in range(0, KG, BLOCK_K // 32):
                a_perm: tl.constexpr = (
                    PERM and STAGE == 2
                )  # stage 1 reads x in natural order, writes act permuted
                acc = _word_dot(
                    acc,
                    a_ptr + a_rows,
                    pmask,
                    words,
                    s_rows,
                    rmask,
                    kg0,
                    KG,
                    BLOCK_K,
                    SWAP,
                    a_perm,
                    F32_DOT,
                    ASM,
                )
        else:
            w_e = w_ptr + e * (N * stride_wn)
            s_e = s_ptr + e * (N * stride_sn)
            for k0 in range(0, KG * 32, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                a = tl.load(
                    a_ptr + a_rows[:, None] + kk[None, :],
                    mask=pmask[:, None] & (kk[None, :] < KG * 32),
                    other=0.0,
                )
                if F32_DOT:
                    a = a.to(tl.float32)
                acc = _byte_dot(
                    acc,
                    a,
                    w_e,
                    s_e,
                    rows,
                    rmask,
                    k0,
                    KG,
                    stride_wn,
                    stride_sn,
                    BLOCK_K,
                    SWAP,
                    DOT_SCALED,
                    ASM,
                )
        if SWAP:
            acc = tl.trans(acc)
        if STAGE == 1:
            if HAS_BIAS:
                acc += tl.load(b_ptr + e * N + rows, mask=rmask, other=0.0).to(tl.float32)[None, :]
            # Rows 2c (gate) and 2c + 1 (linear) of the interleaved w13 give output column c.
            gate, lin = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N // 2, 2]))
            cols = tl.program_id(1) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            if PERM:
                dst = (cols % 8) * (N // 16) + cols // 8
            else:
                dst = cols
            tl.store(
                out_ptr + pairs.to(tl.int64)[:, None] * stride_o + dst[None, :],
                _swiglu(gate, lin, limit, alpha).to(out_ptr.dtype.element_ty),
                mask=pmask[:, None] & (cols < N // 2)[None, :],
            )
        else:
            tl.store(
                out_ptr + pairs.to(tl.int64)[:, None] * stride_o + rows[None, :],
                acc.to(out_ptr.dtype.element_ty),
                mask=pmask[:, None] & rmask[None, :],
            )


def gemm_launch(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, experts: MoEWeights, cfg: dict
) -> torch.Tensor:
    num_tokens, top_k = topk_ids.shape
    num_pairs = num_tokens * top_k
    word = bool(cfg.get("WORD", False))
    # NOTE: the interpreter has no tl.dot_scaled; there the explicit decode always runs.
    scaled = (
        bool(cfg.get("DOT_SCALED", False)) and not word and not interpreting() and x.dtype == torch.bfloat16
    )
    lay = align_pairs(topk_ids, experts.expert_offset, experts.num_local, cfg["BLOCK_M"])
    act = torch.empty((num_pairs, experts.inter), dtype=x.dtype, device=x.device)
    y = torch.empty((num_pairs, experts.hidden), dtype=x.dtype, device=x.device)
    routing = (num_pairs, top_k, float(experts.swiglu_limit), float(experts.swiglu_alpha))
    for stage, a, dst in ((1, x, act), (2, act, y)):
        weights, k_groups, n, has_bias = experts_stage(experts, stage, x)
        _moe_gemm_kernel[(lay.max_blocks, triton.cdiv(n, cfg["BLOCK_N"]))](
            a,
            lay.slot_pair,
            lay.block_expert,
            lay.num_padded,
            *weights,
            dst,
            k_groups,
            n,
            *routing,
            STAGE=stage,
            # The second projection's bias is added by the combine, with the routing weight.
            HAS_BIAS=has_bias and stage == 1,
            PERM=word and bool(cfg.get("PERM", True)),
            BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_K=cfg["BLOCK_K"],
            SWAP=cfg["SWAP"],
            WORD=word,
            F32_DOT=dot_f32(x),
            DOT_SCALED=scaled,
            ASM=use_asm(cfg),
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
    return combine_pairs(y, topk_weights, topk_ids, experts)
