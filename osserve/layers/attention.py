"""Self-attention of gpt-oss: fused QKV, YaRN RoPE, a learned sink logit per head, sliding or full."""

from __future__ import annotations

import torch
from torch import nn

from osserve.config import SLIDING, ModelConfig
from osserve.kernels import KernelOps
from osserve.kernels.metadata import AttentionMetadata
from osserve.parallel import ParallelConfig, all_reduce


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, parallel: ParallelConfig, dtype: torch.dtype):
        super().__init__()
        tp = parallel.tp_size
        if cfg.num_key_value_heads % tp:
            raise ValueError(
                f"tensor_parallel_size {tp} must divide num_key_value_heads ({cfg.num_key_value_heads})"
            )
        self.parallel = parallel
        self.is_sliding = cfg.layer_types[layer_idx] == SLIDING
        self.head_dim = cfg.head_dim
        self.num_heads = cfg.num_attention_heads // tp
        self.num_kv_heads = cfg.num_key_value_heads // tp
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        # Column-parallel: this rank's heads of q, k and v, stacked.
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=True, dtype=dtype)
        # Row-parallel: partial sums are all-reduced; the bias lives on tp rank 0 only.
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=True, dtype=dtype)
        self.sinks = nn.Parameter(torch.zeros(self.num_heads, dtype=torch.float32), requires_grad=False)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        rope: tuple[torch.Tensor, float],
        ops: KernelOps,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = ops.rope_write_kv(q, k, v, positions, rope, kv_cache, meta.slot_mapping)
        o = ops.paged_attention(q, *kv_cache, meta, self.sinks, self.scale)
        out = self.o_proj(o.view(-1, self.q_size))
        if self.parallel.attention_replicated:
            return out
        return all_reduce(out, self.parallel)
