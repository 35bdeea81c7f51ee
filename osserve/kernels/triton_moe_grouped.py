"""MXFP4 MoE for many tokens (prefill): dequantize the layer's experts to bf16, then two grouped GEMMs.

Steps (all on the device, no host sync, shapes from tensor shapes only, so CUDA-graph safe):
1. pairs (token, expert) in expert order (triton_moe_pairs.align_pairs with BLOCK_M = 1: no padding; pairs
   routed to experts not held here are left out, the slots after the last expert's end hold a sentinel),
   group ends `offs`, the inverse permutation;
2. the layer's w13 dequantized into a bf16 scratch buffer (triton_mxfp4, twin reference.mxfp4_dequantize),
   or, with moe_config.bf16_experts, the bf16 copy kept since load (no dequantize traffic at all);
3. `torch._grouped_mm(x[sorted tokens], w13^T, offs)` (CUTLASS grouped GEMM on sm90) -> h [P, 2I];
4. bias + clamped SwiGLU (even rows gate, odd rows linear) in one Triton kernel -> act [P, I];
5. w2 dequantized (reusing the freed w13 memory) and the second grouped GEMM -> y [P, H];
6. per token, the sum over its top-k of (y + b2) * routing weight (triton_moe_pairs.combine_pairs, fixed
   order: deterministic); pairs not held here contribute zero. Rows past the last group end are never computed by the GEMMs (garbage), so
   the combine selects, never multiplies by zero.
Costs at 8192 tokens, 32 experts: ~2 GB of dequant traffic (~0.7 ms) + 1.6 TFLOP of bf16 GEMMs, against the
fused Triton gemm that decodes every weight tile once per block of tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from osserve.kernels.moe_weights import MoEWeights
from osserve.kernels.triton_moe_gemv import _swiglu
from osserve.kernels.triton_moe_pairs import align_pairs, combine_pairs
from osserve.kernels.triton_mxfp4 import mxfp4_dequantize


@triton.jit
def _bias_swiglu_kernel(
    h_ptr,
    key_ptr,
    b_ptr,
    act_ptr,
    P,
    inter,
    stride_h,
    stride_be,
    stride_act,
    num_local,
    limit,
    alpha,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    e = tl.load(key_ptr + rows, mask=rows < P, other=num_local).to(tl.int32)
    live = (rows < P) & (e < num_local)
    rows = rows.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    c2 = tl.program_id(1) * 2 * BLOCK_I + tl.arange(0, 2 * BLOCK_I)
    m2 = live[:, None] & (c2 < 2 * inter)[None, :]
    h = tl.load(h_ptr + rows[:, None] * stride_h + c2[None, :], mask=m2, other=0.0).to(tl.float32)
    if HAS_BIAS:
        e64 = tl.where(live, e, 0).to(tl.int64)
        h += tl.load(b_ptr + e64[:, None] * stride_be + c2[None, :], mask=m2, other=0.0).to(tl.float32)
    gate, lin = tl.split(tl.reshape(h, [BLOCK_M, BLOCK_I, 2]))
    y = _swiglu(gate, lin, limit, alpha)
    tl.store(
        act_ptr + rows[:, None] * stride_act + cols[None, :],
        y.to(act_ptr.dtype.element_ty),
        mask=live[:, None] & (cols < inter)[None, :],
    )


# MIN_PAIRS: the crossover from the gemm regime; BF16_MIN_PAIRS: the same with bf16 copies of the experts
# (no dequantize per call, so the grouped GEMMs win from smaller batches).
GROUPED_DEFAULT = {
    "MIN_PAIRS": 8192,
    "BF16_MIN_PAIRS": 1024,
    "SWIGLU_BLOCK_M": 16,
    "SWIGLU_BLOCK_I": 128,
    "COMBINE_BLOCK": 1024,
    "num_warps": 4,
}
_INTERPRET_GROUPED = {
    "MIN_PAIRS": 32,
    "BF16_MIN_PAIRS": 16,
    "SWIGLU_BLOCK_M": 8,
    "SWIGLU_BLOCK_I": 32,
    "COMBINE_BLOCK": 64,
    "num_warps": 1,
}


def grouped_supported(x: torch.Tensor) -> bool:
    """torch._grouped_mm takes bf16 (CUTLASS on sm90; a loop elsewhere, e.g. the CPU under the interpreter)."""
    return x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


def grouped_launch(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, experts: MoEWeights, cfg: dict
) -> torch.Tensor:
    num_tokens, top_k = topk_ids.shape
    num_pairs = num_tokens * top_k
    if not grouped_supported(x):
        raise ValueError(f"moe grouped: needs bf16 activations and torch._grouped_mm (got {x.dtype})")
    lay = align_pairs(topk_ids, experts.expert_offset, experts.num_local, 1)
    # NOTE: slots past the last group hold the sentinel num_pairs; clamped, they gather some row that the
    # grouped GEMMs never reach.
    tokens = torch.clamp(lay.slot_pair[:num_pairs] // top_k, max=num_tokens - 1)
    # With bf16 copies of the experts (moe_config.bf16_experts) there is nothing to dequantize.
    w = (
        experts.w13_bf16
        if experts.has_bf16
        else mxfp4_dequantize(experts.w13, experts.w13_scales, torch.bfloat16)
    )
    h = torch._grouped_mm(x[tokens], w.transpose(1, 2), offs=lay.expert_end)
    del w  # NOTE: frees the w13 scratch before the w2 one is made (the allocator reuses it)
    act = torch.empty((num_pairs, experts.inter), dtype=x.dtype, device=x.device)
    bm, bi = cfg["SWIGLU_BLOCK_M"], cfg["SWIGLU_BLOCK_I"]
    b13 = experts.w13_bias
    _bias_swiglu_kernel[(triton.cdiv(num_pairs, bm), triton.cdiv(experts.inter, bi))](
        h,
        lay.block_expert,
        h if b13 is None else b13,
        act,
        num_pairs,
        experts.inter,
        h.stride(0),
        0 if b13 is None else b13.stride(0),
        act.stride(0),
        experts.num_local,
        float(experts.swiglu_limit),
        float(experts.swiglu_alpha),
        HAS_BIAS=b13 is not None,
        BLOCK_M=bm,
        BLOCK_I=bi,
        num_warps=cfg["num_warps"],
    )
    del h
    w = (
        experts.w2_bf16
        if experts.has_bf16
        else mxfp4_dequantize(experts.w2, experts.w2_scales, torch.bfloat16)
    )
    y = torch._grouped_mm(act, w.transpose(1, 2), offs=lay.expert_end)
    del w, act
    return combine_pairs(y, topk_weights, topk_ids, experts, lay.pair_slot, cfg["COMBINE_BLOCK"])
