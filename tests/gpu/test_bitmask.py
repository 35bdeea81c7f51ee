"""Triton grammar bitmask application against reference.apply_token_bitmask_ (and both against the bits)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from osserve.kernels import reference, triton_bitmask  # noqa: E402
from tests.gpu.conftest import INTERPRET  # noqa: E402

VOCABS = [33, 1000, 4099] if INTERPRET else [33, 1000, 201088]


def _case(rows, vocab, words, device, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g).to(device)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (rows, words), generator=g, dtype=torch.int64)
    return logits, bitmask.to(torch.int32).to(device)


def _expected(logits, bitmask, indices):
    """Bit by bit, in Python terms: token t of bitmask row m is allowed iff bit t % 32 of word t // 32."""
    out = logits.clone().cpu()
    bits = bitmask.cpu().tolist()
    rows = indices.tolist() if indices is not None else range(len(bits))
    for m, r in enumerate(rows):
        for t in range(out.shape[1]):
            word = bits[m][t // 32] if t // 32 < len(bits[m]) else 0
            if not (word >> (t % 32)) & 1:
                out[r, t] = float("-inf")
    return out


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("words", ["exact", "short", "long"])
def test_bitmask_matches_reference(device, vocab, rows, words):
    n_words = {"exact": -(-vocab // 32), "short": max(1, vocab // 32 - 1), "long": -(-vocab // 32) + 2}[words]
    logits, bitmask = _case(rows, vocab, n_words, device, seed=vocab * 10 + rows)
    ref, tri = logits.clone(), logits.clone()
    reference.apply_token_bitmask_(ref, bitmask)
    triton_bitmask.apply_token_bitmask_(tri, bitmask)
    assert torch.equal(ref, tri)
    if vocab <= 4099:
        assert torch.equal(ref.cpu(), _expected(logits, bitmask, None))
    kept = torch.isfinite(ref)
    assert torch.equal(ref[kept], logits[kept]), "allowed logits must not change"


@pytest.mark.parametrize("vocab", VOCABS)
def test_bitmask_rows_by_index(device, vocab):
    logits, bitmask = _case(6, vocab, -(-vocab // 32), device, seed=vocab)
    bitmask = bitmask[:3].contiguous()
    indices = torch.tensor([4, 0, 2], dtype=torch.int64, device=device)
    ref, tri = logits.clone(), logits.clone()
    reference.apply_token_bitmask_(ref, bitmask, indices)
    triton_bitmask.apply_token_bitmask_(tri, bitmask, indices)
    assert torch.equal(ref, tri)
    assert torch.equal(ref[[1, 3, 5]], logits[[1, 3, 5]]), "rows without a bitmask row must not change"
    if vocab <= 4099:
        assert torch.equal(ref.cpu(), _expected(logits, bitmask, indices))


def test_all_allowed_and_all_forbidden(device):
    logits = torch.randn(2, 1000, device=device)
    bitmask = torch.tensor([[-1] * 32, [0] * 32], dtype=torch.int32, device=device)
    out = logits.clone()
    triton_bitmask.apply_token_bitmask_(out, bitmask)
    assert torch.equal(out[0], logits[0]) and torch.isinf(out[1]).all()
