"""The gpt-oss transformer over a flat ForwardBatch and a paged KV cache."""

from __future__ import annotations

import torch
from torch import nn

from osserve.config import ModelConfig
from osserve.kernels import REFERENCE_OPS, KernelOps
from osserve.layers.attention import Attention
from osserve.layers.moe import MoE
from osserve.layers.rope import yarn_inv_freq
from osserve.model.batch import ForwardBatch
from osserve.parallel import ParallelConfig

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        # NOTE: norms stay float32 whatever the model dtype, as in the reference implementation.
        self.weight = nn.Parameter(torch.ones(size, dtype=torch.float32), requires_grad=False)
        self.eps = eps


class DecoderLayer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, idx: int, parallel: ParallelConfig, dtype: torch.dtype, packed: bool
    ):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, idx, parallel, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg, parallel, dtype, packed)


class GptOssModel(nn.Module):
    """gpt-oss for causal LM. `forward` returns final hidden states; `compute_logits` unembeds rows."""

    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype = torch.float32,
        parallel: ParallelConfig | None = None,
        packed_experts: bool = False,
    ):
        super().__init__()
        self.config = cfg
        self.dtype = dtype
        self.parallel = parallel or ParallelConfig()
        self.packed_experts = packed_experts
        self.ops: KernelOps = REFERENCE_OPS
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, self.parallel, dtype, packed_experts) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)
        inv_freq, self.rope_scaling = yarn_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.requires_grad_(False)

    def reset_rope(self, device: torch.device) -> None:
        """Recompute the RoPE frequencies (after building on the meta device and `to_empty`)."""
        self.inv_freq = yarn_inv_freq(self.config)[0].to(device)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_caches: KVCaches) -> torch.Tensor:
        ops, eps = self.ops, self.config.rms_norm_eps
        rope = (self.inv_freq, self.rope_scaling)
        metas = {s: batch.attention_metadata(sliding=s) for s in (False, True)}
        hidden = self.embed_tokens(batch.input_ids)
        residual = hidden
        h = ops.rms_norm(hidden, self.layers[0].input_layernorm.weight, eps)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = attn(h, batch.positions, metas[attn.is_sliding], kv_caches[i], rope, ops)
            h, residual = ops.add_rms_norm(h, residual, layer.post_attention_layernorm.weight, eps)
            h = layer.mlp(h, ops)
            next_norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            h, residual = ops.add_rms_norm(h, residual, next_norm.weight, eps)
        return h

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] in float32 for the given rows of final hidden states."""
        return self.lm_head(hidden).float()
