"""ForwardBatch: the one contract between the scheduler side (host) and the model (device).

The model never sees requests. It sees a flat run of tokens from many sequences, each with its position,
where each sequence's tokens start in that run, how long each sequence's context is after this step, and
where its KV lives (two block tables: one for the full-attention layers, one for the sliding-window ones,
both indexing one shared block pool).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from osserve.kernels.metadata import AttentionMetadata


@dataclass
class ForwardBatch:
    # [num_tokens] int64: every scheduled token of every sequence, sequence after sequence.
    input_ids: torch.Tensor
    # [num_tokens] int64: each token's position in its own sequence.
    positions: torch.Tensor
    # [num_seqs + 1] int32 and its host copy: where each sequence's tokens start in input_ids.
    query_start_loc: torch.Tensor
    query_start_loc_cpu: list[int]
    # [num_seqs] int32 and its host copy: context length after this step (cached + new tokens).
    seq_lens: torch.Tensor
    seq_lens_cpu: list[int]
    # [num_seqs, max_blocks] int32: block tables of the full-attention and of the sliding-window layers.
    full_block_table: torch.Tensor
    sliding_block_table: torch.Tensor
    # [num_tokens] int64: KV slot of each new token in the full and in the sliding-window block tables.
    full_slot_mapping: torch.Tensor
    sliding_slot_mapping: torch.Tensor
    # [num_logits] int64: rows of the final hidden states to unembed (the sampled positions, and every
    # prompt position of requests that asked for prompt logprobs).
    logits_indices: torch.Tensor
    # Sliding window of the model's sliding layers (tokens).
    sliding_window: int
    # Number of real tokens; input rows beyond it are padding (CUDA-graph buckets) and are never sampled.
    num_tokens: int
    # Most new tokens of any one sequence (-1: computed here from query_start_loc_cpu).
    max_query_len: int = -1

    def __post_init__(self) -> None:
        if self.max_query_len < 0:
            q = self.query_start_loc_cpu
            self.max_query_len = max((q[i + 1] - q[i] for i in range(len(q) - 1)), default=0)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode(self) -> bool:
        """Every sequence computes exactly one new token (the CUDA-graph case)."""
        return self.max_query_len == 1

    def attention_metadata(self, sliding: bool) -> AttentionMetadata:
        return AttentionMetadata(
            block_table=self.sliding_block_table if sliding else self.full_block_table,
            slot_mapping=self.sliding_slot_mapping if sliding else self.full_slot_mapping,
            query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens,
            query_start_loc_cpu=self.query_start_loc_cpu,
            seq_lens_cpu=self.seq_lens_cpu,
            max_query_len=self.max_query_len,
            max_seq_len=max(self.seq_lens_cpu, default=0),
            sliding_window=self.sliding_window if sliding else None,
        )


def null_block_batch(
    num_tokens: int, block_size: int, sliding_window: int, device: torch.device | str, real: bool = True
) -> ForwardBatch:
    """One sequence of `num_tokens` tokens (ids 0, positions from 0) whose K/V all go to the null block 0,
    which no live sequence reads: the startup warm-up forwards, and an attention-DP rank's idle forward
    (`real` False: no row is sampled and the batch counts as no tokens)."""

    def t(values: list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    positions = torch.arange(num_tokens, dtype=torch.int64, device=device)
    slots = positions % block_size
    table = torch.zeros((1, -(-num_tokens // block_size)), dtype=torch.int32, device=device)
    return ForwardBatch(
        input_ids=torch.zeros(num_tokens, dtype=torch.int64, device=device),
        positions=positions,
        query_start_loc=t([0, num_tokens], torch.int32),
        query_start_loc_cpu=[0, num_tokens],
        seq_lens=t([num_tokens], torch.int32),
        seq_lens_cpu=[num_tokens],
        full_block_table=table,
        sliding_block_table=table,
        full_slot_mapping=slots,
        sliding_slot_mapping=slots,
        logits_indices=t([num_tokens - 1] if real else [], torch.int64),
        sliding_window=sliding_window,
        num_tokens=num_tokens if real else 0,
        max_query_len=num_tokens,
    )
