"""MXFP4 mixture of experts: bf16 activations times packed E2M1 weights. Twin: reference.moe_mxfp4.

One op, `moe_mxfp4(x, topk_weights, topk_ids, experts)`, and one entry point with an explicit regime and
config, `moe_mxfp4_launch` (the benchmark sweeps those). The regime is chosen from the number of (token,
expert) pairs, the pairs per local expert and the backend (shapes only, so CUDA-graph safe):
- gemv (pairs <= MAX_PAIRS, decode): triton_moe_gemv.py, the weights streamed once per routed pair with
  CUDA-core FMAs; routing needs no permutation.
- gemm (in between): triton_moe_gemm.py, pairs put in expert order by one deterministic launch
  (triton_moe_pairs.py), then tensor-core tiles per (block of BLOCK_M pairs of one expert, N tile) with the
  weights decoded in registers. BLOCK_M follows the pairs per expert (buckets m16 / m32 / m64 / m128), so
  an active expert's weights are streamed once per projection.
- grouped (pairs >= MIN_PAIRS, prefill; bf16 only): triton_moe_grouped.py, the layer's experts dequantized
  to bf16 once, then torch._grouped_mm (CUTLASS) for both projections. With bf16 copies of the experts
  (moe_config.bf16_experts) nothing is dequantized and it takes over from BF16_MIN_PAIRS.
Backends: "auto" uses all three with the measured crossovers; "triton" never takes the grouped path;
"grouped" takes it for every batch past the gemv regime.
"""

from __future__ import annotations

import functools

import torch

from osserve.kernels.moe_weights import MoEWeights
from osserve.kernels.triton_common import config_for, interpreting
from osserve.kernels.triton_moe_gemm import gemm_launch
from osserve.kernels.triton_moe_gemv import gemv_launch
from osserve.kernels.triton_moe_grouped import (
    _INTERPRET_GROUPED,
    GROUPED_DEFAULT,
    grouped_launch,
    grouped_supported,
)

# gemv: BLOCK_N weight rows per stage-1 program, DOWN_BLOCK_N rows of each of the top-k experts per stage-2
# program; DEQUANT_ASM converts the fp16 halves with inline PTX. PERM: stage 1 writes the activations in
# fp32, code-index major, which stage 2 reads as 16-byte vectors. Registers (ptxas, sm_90a) at the
# default: 64 (stage 1), 52 (stage 2): 8-9 programs per SM, so a batch-1 layer's 720 + 720 programs each
# run in a single wave.
GEMV_DEFAULT = {
    "MAX_PAIRS": 16,
    "BLOCK_N": 32,
    "BLOCK_K": 256,
    "DOWN_BLOCK_N": 4,
    "PREFETCH": True,
    "PERM": True,
    "DEQUANT_ASM": True,
    "num_warps": 4,
    "num_stages": 1,
}
# gemm buckets by the average pairs per local expert: BLOCK_M covers an expert's pairs in one block (the
# weights then stream once) up to m64. Every bucket runs the byte decode in the first kernel's block shapes
# ("small" for m16 / m32, "mid" for m64, "large" for m128): on the H200 (run 16) the word decode did not
# compile at BLOCK_M 16 / 32 (its swapped dot's accumulator shape), and at m64 it made gpt-oss-20b's
# 512-stream decode step ~3x slower (98 ms against ~30 ms). It stays a config (WORD) for the sweep.
GEMM_BUCKETS = (("m16", 6), ("m32", 20), ("m64", 96), ("m128", None))
GEMM_DEFAULTS = {
    "m16": {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "SWAP": False, "WORD": False},
    "m32": {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 128, "SWAP": False, "WORD": False},
    "m64": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "SWAP": True, "WORD": False},
    "m128": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "SWAP": False, "WORD": False, "num_warps": 8},
}
GEMM_COMMON = {"DOT_SCALED": False, "DEQUANT_ASM": False, "num_warps": 4, "num_stages": 3}
_INTERPRET_GEMV = {
    "MAX_PAIRS": 8,
    "BLOCK_N": 16,
    "BLOCK_K": 64,
    "DOWN_BLOCK_N": 8,
    "PREFETCH": True,
    "DEQUANT_ASM": False,
    "num_warps": 1,
    "num_stages": 1,
}
_INTERPRET_GEMM = {
    "BLOCK_M": 16,
    "BLOCK_N": 32,
    "BLOCK_K": 128,
    "SWAP": True,
    "WORD": True,
    "PERM": True,
    "num_warps": 1,
    "num_stages": 1,
}
MOE_MODES = ("gemv", "gemm", "grouped")


def gemm_bucket(num_pairs: int, num_local: int) -> str:
    per_expert = num_pairs / max(1, num_local)
    return next(name for name, below in GEMM_BUCKETS if below is None or per_expert < below)


def gemm_default(bucket: str) -> dict:
    return {**GEMM_COMMON, **GEMM_DEFAULTS[bucket]}


def choose_config(
    num_pairs: int,
    num_local: int,
    hidden: int,
    inter: int,
    backend: str = "auto",
    grouped_ok: bool = True,
    bf16_copies: bool = False,
) -> tuple[str, dict]:
    """(mode, config) for a batch of num_pairs (token, expert) pairs; depends on shapes only.

    backend: "auto" / "triton" / "grouped" (see the module docstring); grouped_ok: whether the grouped path
    can run these activations (bf16); bf16_copies: the experts carry bf16 copies (the grouped path then
    needs no dequantize and takes over from BF16_MIN_PAIRS)."""
    shape = f"h{hidden}-i{inter}-e{num_local}"
    interp = interpreting()
    gemv = config_for("moe_gemv", shape, _INTERPRET_GEMV if interp else GEMV_DEFAULT)
    if num_pairs <= gemv["MAX_PAIRS"]:
        return "gemv", gemv
    grouped = config_for("moe_grouped", shape, _INTERPRET_GROUPED if interp else GROUPED_DEFAULT)
    min_pairs = grouped["BF16_MIN_PAIRS" if bf16_copies else "MIN_PAIRS"]
    if grouped_ok and (backend == "grouped" or (backend == "auto" and num_pairs >= min_pairs)):
        return "grouped", grouped
    if interp:
        return "gemm", config_for("moe_gemm", shape, _INTERPRET_GEMM)
    bucket = gemm_bucket(num_pairs, num_local)
    return "gemm", config_for("moe_gemm", f"{shape}-{bucket}", gemm_default(bucket))


LAUNCH = {"gemv": gemv_launch, "gemm": gemm_launch, "grouped": grouped_launch}


def moe_mxfp4_launch(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    experts: MoEWeights,
    mode: str,
    cfg: dict,
) -> torch.Tensor:
    """moe_mxfp4 with an explicit regime ("gemv" / "gemm" / "grouped") and config."""
    if mode not in LAUNCH:
        raise ValueError(f"moe_mxfp4: mode {mode!r}; allowed: {', '.join(map(repr, MOE_MODES))}")
    if not experts.packed:
        raise ValueError("moe_mxfp4: the experts are dense; the Triton MoE takes packed MXFP4 weights")
    if x.shape[-1] != experts.hidden:
        raise ValueError(f"moe_mxfp4: x {tuple(x.shape)} does not match hidden size {experts.hidden}")
    if topk_ids.shape[0] == 0:
        return torch.empty_like(x)
    # NOTE: the kernels derive row strides from the shapes.
    return LAUNCH[mode](x.contiguous(), topk_weights.contiguous(), topk_ids.contiguous(), experts, cfg)


def moe_mxfp4(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    experts: MoEWeights,
    backend: str = "auto",
) -> torch.Tensor:
    """Mixture of experts over packed MXFP4 weights (see MoEWeights); same contract as the twin."""
    mode, cfg = choose_config(
        topk_ids.numel(),
        experts.num_local,
        experts.hidden,
        experts.inter,
        backend,
        grouped_supported(x),
        experts.has_bf16,
    )
    return moe_mxfp4_launch(x, topk_weights, topk_ids, experts, mode, cfg)


def make_moe_op(backend: str):
    """moe_mxfp4 bound to a backend, with the twin's signature (for the KernelOps table)."""
    return functools.partial(moe_mxfp4, backend=backend)
