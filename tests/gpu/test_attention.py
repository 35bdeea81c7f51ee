"""Triton paged attention against reference.py, on fresh random paged caches."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from osserve.kernels import reference, triton_attention  # noqa: E402
from osserve.kernels.triton_testing import assert_close, attention_inputs, poison_cuda_allocator  # noqa: E402
from tests.gpu.conftest import INTERPRET  # noqa: E402

# (q heads, kv heads, head_dim, block_size)
if INTERPRET:
    HEADS = [(4, 2, 16, 4), (6, 3, 16, 8)]
else:
    HEADS = [(4, 2, 16, 4), (6, 3, 16, 8), (64, 8, 64, 16), (8, 1, 64, 32), (16, 2, 64, 16)]

DECODE_SEQS = {
    "one": [(1, 1)],
    "short": [(5, 1), (17, 1), (3, 1)],
    "with-empty": [(9, 1), (4, 0), (30, 1)],
    "long": [(70, 1), (33, 1)] if INTERPRET else [(3000, 1), (1, 1), (517, 1), (8191, 1)],
}
PREFILL_SEQS = {
    "prompt": [(23, 23)],
    "chunk-after-context": [(40, 9), (13, 13)],
    "mixed": [(30, 1), (21, 12), (6, 0), (9, 1), (50, 17)],
    "long": [(70, 45)] if INTERPRET else [(2048, 2048), (1500, 700), (400, 1)],
}


def _check(inp, what: str) -> None:
    out = triton_attention.paged_attention(*inp.args())
    ref = reference.paged_attention(
        *[a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in inp.args()]
    )
    n = inp.num_live_rows
    assert_close(out[:n], ref[:n], what)


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "x".join(map(str, h)))
@pytest.mark.parametrize("window", [None, 8, 128])
@pytest.mark.parametrize("case", list(DECODE_SEQS))
def test_decode(device, heads, window, case):
    hq, hk, d, bs = heads
    poison_cuda_allocator()
    inp = attention_inputs(
        DECODE_SEQS[case], hq, hk, d, bs, window, torch.bfloat16, device, seed=len(case) + 100
    )
    _check(inp, f"decode {case} window={window}")


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "x".join(map(str, h)))
@pytest.mark.parametrize("window", [None, 8, 128])
@pytest.mark.parametrize("case", list(PREFILL_SEQS))
def test_prefill(device, heads, window, case):
    hq, hk, d, bs = heads
    poison_cuda_allocator()
    inp = attention_inputs(PREFILL_SEQS[case], hq, hk, d, bs, window, torch.bfloat16, device, seed=len(case))
    _check(inp, f"prefill {case} window={window}")


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_decode_fixed_splits(device, splits):
    """Every split count merges to the same answer (empty splits included)."""
    inp = attention_inputs([(37, 1), (2, 1), (16, 1)], 4, 2, 16, 4, None, torch.bfloat16, device, seed=splits)
    cfg = triton_attention.decode_config(16, None)
    out = torch.full_like(inp.q, float("nan"))
    triton_attention._decode(*inp.args(), out, cfg, num_splits=splits)
    ref = reference.paged_attention(*inp.args())
    assert_close(out, ref, f"decode splits={splits}")


def test_padding_rows_untouched_and_bf16_vs_fp32_reference(device):
    inp = attention_inputs([(12, 3), (7, 2)], 4, 2, 16, 4, None, torch.bfloat16, device, pad_rows=3)
    out = triton_attention.paged_attention(*inp.args())
    ref = reference.paged_attention(*inp.args())
    assert_close(out[:5], ref[:5], "prefill with padding rows")
