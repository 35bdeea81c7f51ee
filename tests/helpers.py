"""Test helpers: run GptOssModel on whole sequences without the engine (a trivial block allocator), and run
requests through an EngineCore to completion."""

from __future__ import annotations

import torch

from osserve.model.batch import ForwardBatch
from osserve.model.gpt_oss import GptOssModel


def make_kv_caches(
    model: GptOssModel, num_blocks: int, block_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    a = model.layers[0].self_attn
    shape = (num_blocks, block_size, a.num_kv_heads, a.head_dim)
    dev = model.embed_tokens.weight.device
    return [
        (torch.zeros(shape, dtype=model.dtype, device=dev), torch.zeros(shape, dtype=model.dtype, device=dev))
        for _ in model.layers
    ]


def prefill_batch(
    seqs: list[list[int]],
    block_size: int,
    sliding_window: int,
    device: torch.device | str = "cpu",
    start_block: int = 1,
) -> ForwardBatch:
    """One step computing every token of each sequence, each in fresh consecutive blocks; logits at every row."""
    ids, pos, slots, tables, qsl, lens = [], [], [], [], [0], []
    nxt = start_block
    max_blocks = max(-(-len(s) // block_size) for s in seqs)
    for s in seqs:
        nb = -(-len(s) // block_size)
        blocks = list(range(nxt, nxt + nb))
        nxt += nb
        ids += s
        pos += list(range(len(s)))
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(len(s))]
        tables.append(blocks + [0] * (max_blocks - nb))
        qsl.append(qsl[-1] + len(s))
        lens.append(len(s))
    t = lambda x, dt: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
    table = t(tables, torch.int32)
    slot = t(slots, torch.int64)
    return ForwardBatch(
        input_ids=t(ids, torch.int64),
        positions=t(pos, torch.int64),
        query_start_loc=t(qsl, torch.int32),
        query_start_loc_cpu=qsl,
        seq_lens=t(lens, torch.int32),
        seq_lens_cpu=lens,
        full_block_table=table,
        sliding_block_table=table,
        full_slot_mapping=slot,
        sliding_slot_mapping=slot,
        logits_indices=torch.arange(len(ids), device=device),
        sliding_window=sliding_window,
        num_tokens=len(ids),
    )


def run_requests(core, prompts, params, check_invariant=True, check_freed=True):  # noqa: ANN001, ANN201
    """Run requests to completion on an LLMEngine; returns {index: RequestOutput}. `check_invariant`: the
    block accounting adds up after every step; `check_freed`: no block is held at the end."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        core.add_request(f"r{i}", p, sp)
    done = {}
    while core.has_unfinished():
        for out in core.step():
            if out.finished:
                done[int(out.request_id[1:])] = out
        if check_invariant:
            u = core.kv.usage()
            assert u["in_use"] + u["cached"] + u["free"] == u["total"], u
    if check_freed:
        assert core.kv.usage()["in_use"] == 0
    return done
