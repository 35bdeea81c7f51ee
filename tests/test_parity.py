"""osserve.bench.parity: the float32-anchored comparison behind the GPU engine test, checked on the CPU."""

from __future__ import annotations

import pytest

from osserve.bench.parity import Parity, compare, measure, verdict


def test_measure_counts_errors_and_choices_off_the_argmax():
    gen = [([5, 7], [-0.5, -2.0]), ([9], [-1.0])]
    view = [[{5: -0.4, 6: -1.5}, {7: -2.5, 8: -0.1}], [{9: -1.0}]]
    p = measure(gen, view)
    assert sorted(round(e[0], 6) for e in p.errors) == [0.0, 0.1, 0.5]
    assert [(round(m[0], 6), m[1], m[2]) for m in p.misses] == [(2.4, 0, 1)]


def _parity(errors: list[float], misses: list[float] = ()) -> Parity:
    return Parity([(e, 0, i) for i, e in enumerate(errors)], [(m, 0, i) for i, m in enumerate(misses)])


def test_verdict_allows_bf16_sized_errors_and_names_larger_ones():
    ref = _parity([0.01] * 90 + [0.1] * 9 + [0.7], [0.3])
    assert verdict(_parity([0.02] * 90 + [0.15] * 9 + [1.2], [0.5, 0.2]), ref) == []
    fails = verdict(_parity([0.5] * 100, [2.0] * 5), ref)
    assert [f.split()[0] for f in fails] == ["p50", "p90", "p99", "a", "5"], fails


@pytest.mark.slow
def test_chunked_bf16_engine_is_within_bf16_of_the_reference(tiny_ckpt):
    """A differently batched bf16 engine (prefill in chunks of 8 tokens) passes; so does the reference path
    itself; a float32 engine lands on the float32 scoring."""
    test, ref, gen, _ = compare(str(tiny_ckpt), "cpu", {"max_num_tokens": 8})
    assert not verdict(test, ref), (test.summary(), ref.summary())
    assert sum(len(t) for t, _ in gen) == len(test.errors)
    f32, _, _, _ = compare(str(tiny_ckpt), "cpu", {}, dtype="float32", n=4)
    assert f32.max_error < 1e-3 and not f32.misses, f32.summary()
