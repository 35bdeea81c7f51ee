"""The sampler draws from softmax(logits / T) (after top-k / top-p / min-p), greedy rows take the argmax."""

from __future__ import annotations

import pytest
import torch

from osserve.layers.sampler import Sampler, SamplingBatch

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def batch(
    n: int, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> SamplingBatch:
    full = torch.full((n,), 1.0)
    return SamplingBatch(
        temperature=full * temperature,
        top_p=full * top_p,
        top_k=torch.full((n,), top_k, dtype=torch.int64),
        min_p=full * min_p,
        all_greedy=temperature == 0,
        any_top_p_or_k=top_k > 0 or top_p < 1,
        any_min_p=min_p > 0,
        any_greedy=temperature == 0,
    )


def frequencies(sb: SamplingBatch, n: int) -> torch.Tensor:
    torch.manual_seed(0)
    out = Sampler()(LOGITS.expand(n, -1).clone(), sb).sampled
    return torch.bincount(out, minlength=len(LOGITS)).float() / n


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_samples_follow_the_tempered_softmax(temperature):
    n = 200_000
    want = torch.softmax(LOGITS / temperature, -1)
    got = frequencies(batch(n, temperature), n)
    # Binomial standard error at n = 200k is under 0.0012: 5 of them.
    assert torch.allclose(got, want, atol=0.006), (got, want)


def test_min_p_drops_unlikely_tokens_and_keeps_the_rest_in_proportion():
    n = 200_000
    probs = torch.softmax(LOGITS, -1)
    keep = probs >= 0.2 * probs.max()
    want = torch.where(keep, probs, 0.0)
    want /= want.sum()
    got = frequencies(batch(n, 1.0, min_p=0.2), n)
    assert (got[~keep] == 0).all()
    assert torch.allclose(got, want, atol=0.006), (got, want)


def test_top_k_and_greedy_rows():
    n = 100_000
    got = frequencies(batch(n, 1.0, top_k=2), n)
    want = torch.softmax(LOGITS[:2], -1)
    assert (got[2:] == 0).all() and torch.allclose(got[:2], want, atol=0.006)
    mixed = batch(4, 1.0)
    mixed.temperature[1] = 0.0
    mixed.any_greedy = True
    for seed in range(20):
        torch.manual_seed(seed)
        assert Sampler()(LOGITS.expand(4, -1).clone(), mixed).sampled[1] == 0
