"""StandInModel: the model's interface without its compute, for measuring the engine's host path.

`--model standin:PRESET` gives an engine whose forward costs nothing: it keeps the preset's layer layout
(so the KV bookkeeping, the sliding window and the block tables behave as for the real model) with one
number of KV per token, and it "samples" a token that depends on the position, from a small vocabulary of
single-byte tokens, so a whole step is the engine's own Python and array work (`osserve bench host`).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from osserve.config import ModelConfig, get_preset
from osserve.kernels import REFERENCE_OPS
from osserve.model.batch import ForwardBatch
from osserve.parallel import ParallelConfig

STANDIN_PREFIX = "standin:"
# Tokens the stand-in emits: ids 32..95 are printable single-byte tokens of o200k.
_FIRST, _COUNT = 32, 64


def parse_standin_spec(model: str) -> str | None:
    """`standin:PRESET` -> PRESET; None for anything else."""
    return model[len(STANDIN_PREFIX) :] if model.startswith(STANDIN_PREFIX) else None


class StandInModel(torch.nn.Module):
    def __init__(self, preset: str, dtype: torch.dtype):
        super().__init__()
        # NOTE: nothing here computes; torch's thread pool would only add its wake-ups to the host path
        # being measured (this model lives in an engine process of its own, or a benchmark's).
        torch.set_num_threads(1)
        cfg = get_preset(preset)
        self.config: ModelConfig = cfg
        self.dtype = dtype
        self.parallel = ParallelConfig()
        self.packed_experts = False
        self.ops = REFERENCE_OPS
        # What the runner reads of the attention layers: the KV shape per token (kept at one number).
        attn = SimpleNamespace(num_kv_heads=1, head_dim=1, is_sliding=False)
        self.layers = [SimpleNamespace(self_attn=attn) for _ in range(cfg.num_hidden_layers)]

    def forward(self, batch: ForwardBatch, kv_caches: list) -> torch.Tensor:
        return batch.positions[: batch.num_tokens, None].to(torch.float32)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary, all but one at -inf: the token the position picks."""
        tokens = _FIRST + (hidden[:, 0].long() * 7 + 3) % _COUNT
        logits = torch.full(
            (hidden.shape[0], _FIRST + _COUNT), -1e9, dtype=torch.float32, device=hidden.device
        )
        logits.scatter_(1, tokens[:, None], 0.0)
        return logits
