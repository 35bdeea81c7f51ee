"""gpt-oss mixture of experts: a router (top-k, softmax over the chosen logits) and MXFP4 experts.

The experts are held either packed (MXFP4 blocks + E8M0 scales, as in the checkpoint: the GPU path) or
dequantized once at load (the CPU reference path). Under expert parallelism a rank holds a contiguous
range of experts; under MoE tensor parallelism each expert's intermediate dimension is split.
"""

from __future__ import annotations

import torch
from torch import nn

from osserve.config import ModelConfig
from osserve.kernels import KernelOps
from osserve.kernels.moe_weights import MoEWeights
from osserve.parallel import ParallelConfig, combine_tokens, gather_tokens, split_range


def expert_range(cfg: ModelConfig, parallel: ParallelConfig) -> tuple[int, int]:
    return split_range(cfg.num_local_experts, parallel.ep_size, parallel.ep_rank)


def intermediate_range(cfg: ModelConfig, parallel: ParallelConfig) -> tuple[int, int]:
    """This rank's slice of the intermediate dimension, in whole MXFP4 blocks of 32."""
    return split_range(cfg.intermediate_size, parallel.moe_tp_size, parallel.moe_tp_rank, unit=32)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype, packed: bool):
        super().__init__()
        self.parallel = parallel
        self.packed = packed
        self.top_k = cfg.num_experts_per_tok
        self.limit = cfg.swiglu_limit
        self.alpha = cfg.swiglu_alpha
        e0, e1 = expert_range(cfg, parallel)
        i0, i1 = intermediate_range(cfg, parallel)
        self.expert_offset = e0
        # bf16 copies of the packed experts (keep_bf16_copy); plain attributes, not part of the state dict.
        self.w13_bf16: torch.Tensor | None = None
        self.w2_bf16: torch.Tensor | None = None
        num_local, inter, hidden = e1 - e0, i1 - i0, cfg.hidden_size
        self.router = nn.Linear(hidden, cfg.num_local_experts, bias=True, dtype=dtype)

        def buf(*shape: int, dt: torch.dtype) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape, dtype=dt), requires_grad=False)

        # Rows are outputs, as in the checkpoint: w13 interleaves gate (even rows) and linear (odd rows).
        if packed:
            self.w13_blocks = buf(num_local, 2 * inter, hidden // 32, 16, dt=torch.uint8)
            self.w13_scales = buf(num_local, 2 * inter, hidden // 32, dt=torch.uint8)
            self.w2_blocks = buf(num_local, hidden, inter // 32, 16, dt=torch.uint8)
            self.w2_scales = buf(num_local, hidden, inter // 32, dt=torch.uint8)
        else:
            self.w13 = buf(num_local, 2 * inter, hidden, dt=dtype)
            self.w2 = buf(num_local, hidden, inter, dt=dtype)
        self.w13_bias = buf(num_local, 2 * inter, dt=torch.float32)
        # Added once: on moe-tp rank 0 only (the loader zeroes it elsewhere).
        self.w2_bias = buf(num_local, hidden, dt=torch.float32)

    def experts(self) -> MoEWeights:
        """The experts as the MoE ops take them (built per call: loading may replace the parameters)."""
        if self.packed:
            w13, w13_scales, w2, w2_scales = self.w13_blocks, self.w13_scales, self.w2_blocks, self.w2_scales
        else:
            w13, w13_scales, w2, w2_scales = self.w13, None, self.w2, None
        return MoEWeights(
            w13,
            w13_scales,
            self.w13_bias,
            w2,
            w2_scales,
            self.w2_bias,
            self.limit,
            self.alpha,
            self.expert_offset,
            self.w13_bf16,
            self.w2_bf16,
        )

    def bf16_copy_bytes(self) -> int:
        if not self.packed:
            return 0
        return 2 * 32 * (self.w13_blocks.shape[:3].numel() + self.w2_blocks.shape[:3].numel())

    def keep_bf16_copy(self, dequantize) -> None:
        """Dequantize the packed experts once and keep the bf16 copy (moe_config.bf16_experts)."""
        self.w13_bf16 = dequantize(self.w13_blocks, self.w13_scales, torch.bfloat16)
        self.w2_bf16 = dequantize(self.w2_blocks, self.w2_scales, torch.bfloat16)

    def forward(self, x_local: torch.Tensor, ops: KernelOps) -> torch.Tensor:
        # Under attention data parallelism the experts serve the tokens of every rank.
        x = gather_tokens(x_local, self.parallel)
        weights, ids = ops.route(self.router(x), self.top_k)
        moe = ops.moe_mxfp4 if self.packed else ops.moe_dense
        return combine_tokens(moe(x, weights, ids, self.experts()), x_local, self.parallel)
