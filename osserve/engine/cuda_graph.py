"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed with static input buffers.

A decode step of gpt-oss launches a few hundred small kernels; replaying them as one graph removes the
launch gaps that otherwise dominate batch-1 decode. A batch of n decodes runs in the smallest captured
bucket b >= n; rows n..b-1 are padding: token 0 at position 0 with a context of one token whose K/V go to
slot 0 of the null block 0, which no live sequence ever reads.
"""

from __future__ import annotations

import logging
import time

import torch

from osserve.model.batch import ForwardBatch
from osserve.model.gpt_oss import GptOssModel

logger = logging.getLogger(__name__)


class DecodeGraphs:
    def __init__(
        self,
        model: GptOssModel,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        sizes: list[int],
        max_blocks_per_seq: int,
        device: torch.device,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = sorted(sizes)
        self.max_size = self.sizes[-1]
        self.width = max_blocks_per_seq
        n, w = self.max_size, self.width
        i32, i64 = torch.int32, torch.int64
        self.input_ids = torch.zeros(n, dtype=i64, device=device)
        self.positions = torch.zeros(n, dtype=i64, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=i32, device=device)
        self.seq_lens = torch.ones(n, dtype=i32, device=device)
        self.full_table = torch.zeros(n, w, dtype=i32, device=device)
        self.sliding_table = torch.zeros(n, w, dtype=i32, device=device)
        self.full_slots = torch.zeros(n, dtype=i64, device=device)
        self.sliding_slots = torch.zeros(n, dtype=i64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _batch(self, b: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:b],
            positions=self.positions[:b],
            query_start_loc=self.query_start_loc[: b + 1],
            query_start_loc_cpu=list(range(b + 1)),
            seq_lens=self.seq_lens[:b],
            seq_lens_cpu=[1] * b,
            full_block_table=self.full_table[:b],
            sliding_block_table=self.sliding_table[:b],
            full_slot_mapping=self.full_slots[:b],
            sliding_slot_mapping=self.sliding_slots[:b],
            logits_indices=self.query_start_loc[:b].long(),
            sliding_window=self.model.config.sliding_window,
            num_tokens=b,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = None
        for b in reversed(self.sizes):
            batch = self._batch(b)
            # Warm up outside the graph: Triton compiles and autotunes here, never during capture.
            for _ in range(2):
                self.model(batch, self.kv_caches)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[b] = self.model(batch, self.kv_caches)
            pool = graph.pool() if pool is None else pool
            self.graphs[b] = graph
        torch.cuda.synchronize()
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %s) in %.1f s",
            len(self.graphs),
            self.sizes,
            time.perf_counter() - start,
        )

    def can_run(self, batch: ForwardBatch) -> bool:
        return (
            bool(self.graphs)
            and batch.is_decode
            and batch.num_seqs <= self.max_size
            and batch.full_block_table.shape[1] <= self.width
        )

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Hidden states [n, hidden] of a decode batch of n sequences (a view into the graph's output)."""
        n = batch.num_seqs
        b = next(s for s in self.sizes if s >= n)
        w = batch.full_block_table.shape[1]
        self.input_ids[:n].copy_(batch.input_ids, non_blocking=True)
        self.positions[:n].copy_(batch.positions, non_blocking=True)
        self.seq_lens[:n].copy_(batch.seq_lens, non_blocking=True)
        self.full_table[:n, :w].copy_(batch.full_block_table, non_blocking=True)
        self.sliding_table[:n, :w].copy_(batch.sliding_block_table, non_blocking=True)
        self.full_slots[:n].copy_(batch.full_slot_mapping, non_blocking=True)
        self.sliding_slots[:n].copy_(batch.sliding_slot_mapping, non_blocking=True)
        if b > n:
            self.input_ids[n:b] = 0
            self.positions[n:b] = 0
            self.seq_lens[n:b] = 1
            self.full_table[n:b, 0] = 0
            self.sliding_table[n:b, 0] = 0
            self.full_slots[n:b] = 0
            self.sliding_slots[n:b] = 0
        self.graphs[b].replay()
        return self.outputs[b][:n]
