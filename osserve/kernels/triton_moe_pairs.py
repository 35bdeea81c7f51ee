"""(token, expert) pairs into expert order (`align_pairs`, one launch) and back (`combine_pairs`).

The GEMM paths of the MoE (triton_moe_gemm.py, triton_moe_grouped.py) need the pairs routed to each local
expert side by side. `align_pairs` gives, for a block size BLOCK_M, each expert's pairs in token order in
consecutive slots, every expert's run padded to a multiple of BLOCK_M (BLOCK_M = 1: no padding, the grouped
GEMM's layout). Programs split the pairs; each one histograms all pairs (expert totals, and the counts before
its own range), then places its own pairs by their rank among equal experts (a cumulative sum over a one-hot
tile): no atomics, so the order and everything computed from it is the same on every run. Sizes come from
shapes only (CUDA-graph safe): `max_blocks = cdiv(pairs, BLOCK_M) + min(pairs, experts)` bounds the padded
total; slots past it hold the sentinel `num_pairs`, blocks past it the expert id `num_local`.
`combine_pairs` sums each token's top-k rows of the second projection (+ bias, x routing weight) in a fixed
order, skipping experts not held here. Twins: reference.align_pairs, reference.combine_pairs (the Triton
align leaves the pair -> slot entries of pairs not held here unset).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from osserve.kernels.moe_weights import MoEWeights, PairLayout
from osserve.kernels.triton_common import interpreting, next_pow2


@triton.jit
def _moe_align_kernel(
    ids_ptr,
    slot_pair_ptr,
    pair_slot_ptr,
    block_expert_ptr,
    expert_end_ptr,
    num_padded_ptr,
    num_pairs,
    expert_offset,
    num_local,
    max_blocks,
    pairs_per_prog,
    BLOCK_M: tl.constexpr,
    E_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    RANK_CHUNK: tl.constexpr,
    CHUNK_B: tl.constexpr,
    PAD_CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lo = pid * pairs_per_prog
    hi = tl.minimum(lo + pairs_per_prog, num_pairs)
    bins = tl.arange(0, E_PAD)
    held = bins < num_local
    total = tl.zeros([E_PAD], tl.int32)
    before = tl.zeros([E_PAD], tl.int32)
    # NOTE: pairs_per_prog is a multiple of CHUNK, so a chunk is wholly before this program's range or not.
    for start in range(0, num_pairs, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        e = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32) - expert_offset
        local = (offs < num_pairs) & (e >= 0) & (e < num_local)
        counts = tl.histogram(tl.where(local, e, 0), E_PAD, mask=local).to(tl.int32)
        total += counts
        before += tl.where(start < lo, counts, 0)
    padded = tl.cdiv(total, BLOCK_M) * BLOCK_M
    ends = tl.cumsum(padded, 0)
    starts = ends - padded
    num_padded = tl.sum(padded, 0)
    if pid == 0:
        tl.store(num_padded_ptr, num_padded)
        tl.store(expert_end_ptr + bins, ends, mask=held)
    for b0 in range(pid * CHUNK_B, max_blocks, nprog * CHUNK_B):
        b = b0 + tl.arange(0, CHUNK_B)
        expert = tl.sum(((ends[None, :] <= b[:, None] * BLOCK_M) & held[None, :]).to(tl.int32), 1)
        tl.store(block_expert_ptr + b, expert, mask=b < max_blocks)
    # Sentinels: the padding after each expert's pairs (expert e's by program e % nprog), then the tail.
    mine = held & (bins % nprog == pid)
    for j0 in range(0, BLOCK_M, PAD_CHUNK):
        slot = (starts + total)[:, None] + j0 + tl.arange(0, PAD_CHUNK)[None, :]
        pad = mine[:, None] & (slot < (starts + padded)[:, None])
        tl.store(slot_pair_ptr + slot, tl.zeros_like(slot) + num_pairs, mask=pad)
    for s0 in range(num_padded + pid * CHUNK, max_blocks * BLOCK_M, nprog * CHUNK):
        s = s0 + tl.arange(0, CHUNK)
        tl.store(slot_pair_ptr + s, tl.zeros_like(s) + num_pairs, mask=s < max_blocks * BLOCK_M)
    # This program's pairs: slot = expert start + pairs of that expert before it (earlier programs, earlier
    # chunks of this one, earlier rows of this chunk).
    cursor = starts + before
    for r0 in range(lo, hi, RANK_CHUNK):
        offs = r0 + tl.arange(0, RANK_CHUNK)
        e = tl.load(ids_ptr + offs, mask=offs < hi, other=-1).to(tl.int32) - expert_offset
        local = (offs < hi) & (e >= 0) & (e < num_local)
        onehot = ((e[:, None] == bins[None, :]) & local[:, None]).to(tl.int32)
        rank = tl.sum(onehot * (tl.cumsum(onehot, 0) - 1 + cursor[None, :]), 1)
        tl.store(slot_pair_ptr + rank, offs, mask=local)
        tl.store(pair_slot_ptr + offs, rank, mask=local)
        cursor += tl.sum(onehot, 0)


def align_pairs(topk_ids: torch.Tensor, expert_offset: int, num_local: int, block_m: int) -> PairLayout:
    """(token, expert) pairs in expert order (see PairLayout and the module docstring)."""
    ids = topk_ids.reshape(-1)
    num_pairs = ids.numel()
    dev = ids.device
    max_blocks = triton.cdiv(num_pairs, block_m) + min(num_pairs, num_local)
    lay = PairLayout(
        slot_pair=torch.empty(max_blocks * block_m, dtype=torch.int32, device=dev),
        pair_slot=torch.empty(num_pairs, dtype=torch.int32, device=dev),
        block_expert=torch.empty(max_blocks, dtype=torch.int32, device=dev),
        expert_end=torch.empty(num_local, dtype=torch.int32, device=dev),
        num_padded=torch.empty(1, dtype=torch.int32, device=dev),
        block_m=block_m,
        max_blocks=max_blocks,
    )
    interp = interpreting()
    e_pad = next_pow2(num_local)
    chunk = 64 if interp else 1024
    # At most 64 programs: each one reads every pair's id once (its histogram), so more would cost more.
    pairs_per_prog = chunk * max(1, triton.cdiv(triton.cdiv(num_pairs, chunk), 8 if interp else 64))
    _moe_align_kernel[(triton.cdiv(num_pairs, pairs_per_prog),)](
        ids,
        lay.slot_pair,
        lay.pair_slot,
        lay.block_expert,
        lay.expert_end,
        lay.num_padded,
        num_pairs,
        expert_offset,
        num_local,
        max_blocks,
        pairs_per_prog,
        BLOCK_M=block_m,
        E_PAD=e_pad,
        CHUNK=chunk,
        RANK_CHUNK=max(16, min(128, 4096 // e_pad)),
        CHUNK_B=max(16, min(256, 8192 // e_pad)),
        PAD_CHUNK=min(next_pow2(block_m), max(1, 2048 // e_pad)),
        num_warps=1 if interp else 4,
    )
    return lay


@triton.jit
def _moe_combine_kernel(
    y_ptr,
    pair_slot_ptr,
    ids_ptr,
    topw_ptr,
    b_ptr,
    out_ptr,
    stride_y,
    stride_be,
    stride_o,
    H,
    expert_offset,
    num_local,
    TOP_K: tl.constexpr,
    BY_SLOT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < H
    acc = tl.zeros([BLOCK], tl.float32)
    for k in tl.static_range(TOP_K):
        pair = tok * TOP_K + k
        e = tl.load(ids_ptr + pair).to(tl.int32) - expert_offset
        if (e >= 0) & (e < num_local):
            row = pair
            if BY_SLOT:
                row = tl.load(pair_slot_ptr + pair).to(tl.int64)
            v = tl.load(y_ptr + row * stride_y + cols, mask=cmask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                v += tl.load(b_ptr + e.to(tl.int64) * stride_be + cols, mask=cmask, other=0.0).to(tl.float32)
            acc += v * tl.load(topw_ptr + pair).to(tl.float32)
    tl.store(out_ptr + tok * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


def combine_pairs(
    y: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    experts: MoEWeights,
    pair_slot: torch.Tensor | None = None,
    block: int = 1024,
) -> torch.Tensor:
    """out[t] = sum over t's top-k pairs p held here of (y[row p] + b2[e_p]) * w_p, where row p is p itself
    or, with `pair_slot`, its slot in expert order."""
    num_tokens, top_k = topk_ids.shape
    out = torch.empty((num_tokens, experts.hidden), dtype=y.dtype, device=y.device)
    bias = experts.w2_bias
    block = min(block, next_pow2(experts.hidden))
    _moe_combine_kernel[(num_tokens, triton.cdiv(experts.hidden, block))](
        y,
        topk_ids if pair_slot is None else pair_slot,
        topk_ids,
        topk_weights,
        y if bias is None else bias,
        out,
        y.stride(0),
        0 if bias is None else bias.stride(0),
        out.stride(0),
        experts.hidden,
        experts.expert_offset,
        experts.num_local,
        TOP_K=top_k,
        BY_SLOT=pair_slot is not None,
        HAS_BIAS=bias is not None,
        BLOCK=block,
        num_warps=1 if interpreting() else 4,
    )
    return out
