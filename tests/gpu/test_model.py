"""A tiny random gpt-oss (bf16, packed MXFP4 experts) with the Triton ops equals the reference ops:
prefill in chunks, a mixed step, then decode steps, over a paged cache with sliding and full layers."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from osserve.config import get_preset  # noqa: E402
from osserve.kernels import REFERENCE_OPS  # noqa: E402
from osserve.kernels.triton_ops import make_ops  # noqa: E402
from osserve.kernels.triton_testing import assert_close  # noqa: E402
from osserve.model.batch import ForwardBatch  # noqa: E402
from osserve.model.gpt_oss import GptOssModel  # noqa: E402
from tests.gpu.conftest import INTERPRET  # noqa: E402
from tests.helpers import make_kv_caches  # noqa: E402

BLOCK_SIZE = 4 if INTERPRET else 16


def _random_model(preset: str, device: str) -> GptOssModel:
    cfg = get_preset(preset)
    model = GptOssModel(cfg, dtype=torch.bfloat16, packed_experts=True)
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if p.dtype == torch.uint8:
            if name.endswith("scales"):
                p.copy_(torch.randint(118, 124, p.shape, generator=g, dtype=torch.uint8))
            else:
                p.copy_(torch.randint(0, 256, p.shape, generator=g, dtype=torch.uint8))
        elif "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif "router" in name:
            # NOTE: the router bias sets well separated logits (gaps of 2) and the weights move them only a
            # little, so bf16-level differences between the two op tables never flip a top-k choice; routing
            # diversity is covered by test_moe.
            if name.endswith("bias"):
                p.copy_(2.0 * torch.randperm(p.shape[0], generator=g).float())
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        elif "sinks" in name:
            p.copy_(torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model.to(device)


def _step(seqs: list[tuple[int, int]], tokens: list[list[int]], window: int, device: str) -> ForwardBatch:
    """seqs: (num_computed, num_new) per sequence; sequence i owns blocks 1 + i * 32 ... (never shared)."""
    ids, pos, slots, qsl, lens, table = [], [], [], [0], [], []
    for i, (done, new) in enumerate(seqs):
        blocks = [1 + i * 32 + b for b in range(32)]
        ids += tokens[i][done : done + new]
        pos += list(range(done, done + new))
        slots += [blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(done, done + new)]
        qsl.append(qsl[-1] + new)
        lens.append(done + new)
        table.append(blocks)
    t = lambda x, dt: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
    last = [qsl[i + 1] - 1 for i in range(len(seqs)) if qsl[i + 1] > qsl[i]]
    return ForwardBatch(
        input_ids=t(ids, torch.int64),
        positions=t(pos, torch.int64),
        query_start_loc=t(qsl, torch.int32),
        query_start_loc_cpu=qsl,
        seq_lens=t(lens, torch.int32),
        seq_lens_cpu=lens,
        full_block_table=t(table, torch.int32),
        sliding_block_table=t(table, torch.int32),
        full_slot_mapping=t(slots, torch.int64),
        sliding_slot_mapping=t(slots, torch.int64),
        logits_indices=t(last, torch.int64),
        sliding_window=window,
        num_tokens=len(ids),
    )


@pytest.mark.parametrize("preset", ["tiny"] if INTERPRET else ["tiny", "tiny-odd", "gpt-oss-mini"])
def test_model_triton_equals_reference(device, preset):
    model = _random_model(preset, device)
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    lens = [23, 9, 30] if INTERPRET else [300, 41, 150]
    tokens = [torch.randint(0, cfg.vocab_size, (n + 8,), generator=g).tolist() for n in lens]
    half = [n // 2 for n in lens]
    steps = [
        [(0, half[0]), (0, lens[1]), (0, 0)],  # first chunks; seq 2 not started
        [(half[0], lens[0] - half[0]), (lens[1], 1), (0, lens[2])],  # chunk after context + decode + prompt
    ] + [[(lens[0] + j, 1), (lens[1] + 1 + j, 1), (lens[2] + j, 1)] for j in range(3)]  # decode steps
    num_blocks = 1 + 32 * len(lens)
    results = {}
    for name, ops in (("reference", REFERENCE_OPS), ("triton", make_ops())):
        model.ops = ops
        caches = make_kv_caches(model, num_blocks, BLOCK_SIZE)
        outs = []
        for seqs in steps:
            batch = _step(seqs, tokens, cfg.sliding_window, device)
            hidden = model(batch, caches)
            outs.append(model.compute_logits(hidden[batch.logits_indices]))
        results[name] = outs
    for i, (got, want) in enumerate(zip(results["triton"], results["reference"], strict=True)):
        assert_close(got, want, f"{preset} logits at step {i}", tol=5e-2)
