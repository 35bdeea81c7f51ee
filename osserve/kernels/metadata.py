"""AttentionMetadata: what one attention layer's kernels read of a step (built from osserve.model.batch's
ForwardBatch, once per layer type)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """What one attention layer needs; the runner builds one per layer type from a ForwardBatch."""

    # [num_seqs, max_blocks] int32: physical block of each logical block of each sequence. Entries a layer
    # can no longer see (out of the sliding window) may point at the null block 0 and must not be read.
    block_table: torch.Tensor
    # [num_tokens] int64: flat KV slot (block * block_size + offset) where each new token's K/V goes.
    slot_mapping: torch.Tensor
    # [num_seqs + 1] int32: sequence i's new tokens are rows query_start_loc[i]:query_start_loc[i+1].
    query_start_loc: torch.Tensor
    # [num_seqs] int32: context length of each sequence after this step (cached + new tokens).
    seq_lens: torch.Tensor
    # Host copies of the two above, so reference code and launch-shape decisions need no device sync.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int
    # Sliding window in tokens for this layer type (a query sees itself and window - 1 keys back), or None.
    sliding_window: int | None
