"""Engine-side KV handoff (osserve/engine/handoff.py), in one process: a prefill engine computes the prompt
and its first token, its KV blocks move to a decode engine, which continues. Greedy outputs must equal one
engine doing it all, and every block must come back."""

from __future__ import annotations

import random

import pytest
import torch

from osserve.config import EngineConfig
from osserve.engine.factory import build_engine
from osserve.engine.handoff import HandoffState, KVHandoff
from osserve.engine.llm_engine import LLMEngine
from osserve.harmony.encoding import get_tokenizer
from osserve.sampling_params import OutputKind, SamplingParams

OPTS = {
    "max_seq_len": 512,
    "kv_cache_config": {"max_blocks": 128},
    "cuda_graph_config": {"max_batch_size": 0},
}


@pytest.fixture(scope="module")
def engines(tiny_ckpt):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = EngineConfig.from_dict({"model": str(tiny_ckpt), **OPTS})
    tok = get_tokenizer()
    yield [LLMEngine(build_engine(config, progress=False)[0], tok) for _ in range(3)]
    torch.set_num_threads(threads)


def _workload(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # Lengths around the sliding window (16) and block size (16) edges, and longer.
    lengths = [1, 15, 16, 17, 31, 33, 47, 70] + [rng.randint(2, 90) for _ in range(n - 8)]
    return [[rng.randrange(1000, 190000) for _ in range(k)] for k in lengths[:n]]


def _greedy(max_tokens: int = 6) -> SamplingParams:
    return SamplingParams(
        temperature=0.0, max_tokens=max_tokens, output_kind=OutputKind.DELTA, ignore_eos=True
    )


def _reference(eng: LLMEngine, prompts, params) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        eng.add_request(f"ref{i}", p, params)
    while eng.has_unfinished():
        for o in eng.step():
            out.setdefault(o.request_id, []).extend(o.outputs[0].token_ids)
    return {k.removeprefix("ref"): v for k, v in out.items()}


def _prefill_only(eng: LLMEngine, hp: KVHandoff, rid: str, prompt: list[int], params: SamplingParams) -> None:
    eng.adopt(rid, lambda core, h: hp.add_prefill_only(rid, prompt, params, h), params, prompt)


def _continue(eng: LLMEngine, hd: KVHandoff, rid: str, prompt, params, state: HandoffState) -> None:
    restore = (state.output_token_ids, state.num_sent_chars, state.cumulative_logprob)
    eng.adopt(rid, lambda core, h: hd.start_continued(rid, state, h), params, prompt, restore)


def test_prefill_export_import_continue_equals_one_engine(engines):
    ref, pre, dec = engines
    prompts = _workload(12)
    params = _greedy()
    want = _reference(ref, prompts, params)

    hp, hd = KVHandoff(pre.core), KVHandoff(dec.core)
    pre.after_step = hp.after_step
    base_p, base_d = pre.kv.usage()["in_use"], dec.kv.usage()["in_use"]
    for i, p in enumerate(prompts):
        _prefill_only(pre, hp, str(i), p, params)
    firsts: dict[str, HandoffState] = {}
    got: dict[str, list[int]] = {}
    while pre.has_unfinished():
        for o in pre.step():
            got.setdefault(o.request_id, []).extend(o.outputs[0].token_ids)
            if "handoff" in o.extra:
                assert o.finished and o.outputs[0].finish_reason is None
                firsts[o.request_id] = o.extra["handoff"]
    pre.after_step = None
    assert set(firsts) == {str(i) for i in range(len(prompts))}
    assert all(len(s.output_token_ids) == 1 for s in firsts.values())
    assert len(hp.held) == len(prompts)
    for rid, state in firsts.items():
        kv = hp.export(rid)
        assert kv.num_tokens == len(prompts[int(rid)])
        assert hd.reserve(rid, prompts[int(rid)], params)
        hd.write(rid, kv.full, kv.sliding)
        assert hp.release(rid)
        _continue(dec, hd, rid, prompts[int(rid)], params, state)
    assert pre.kv.usage()["in_use"] == base_p and not hp.held
    while dec.has_unfinished():
        for o in dec.step():
            got[o.request_id].extend(o.outputs[0].token_ids)
    assert got == want
    assert dec.kv.usage()["in_use"] == base_d and not hd.reserved


def test_resume_without_kv_replays_generated_tokens(engines):
    ref, _, dec = engines
    prompts = _workload(6, seed=1)
    params = _greedy(8)
    want = _reference(ref, prompts, params)
    hd = KVHandoff(dec.core)
    got = {}
    for i, p in enumerate(prompts):
        k = i % 5 + 1  # tokens the dead decode worker had already sent
        got[str(i)] = list(want[str(i)][:k])
        state = HandoffState(list(want[str(i)][:k]))
        dec.adopt(
            str(i),
            lambda core, h, i=i, p=p, state=state: hd.start_resumed(str(i), p, params, state, h),
            params,
            p,
            (state.output_token_ids, 0, 0.0),
        )
    while dec.has_unfinished():
        for o in dec.step():
            got[o.request_id].extend(o.outputs[0].token_ids)
    assert got == want


def test_resume_replays_the_grammar_of_a_structured_request(engines):
    """The decode side rebuilds the grammar and feeds it the tokens already generated: the continuation
    equals one engine doing it all (without the replay the grammar would be lost, or stand at its start)."""
    from osserve.harmony.formats import ResponseFormat
    from osserve.harmony.render import render_chat
    from osserve.structured import build_structured

    ref, _, dec = engines
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}}}
    structured = build_structured(ResponseFormat("r", {**schema, "required": ["n"]}), [], None, 24)
    params = SamplingParams(
        temperature=0.0, max_tokens=24, output_kind=OutputKind.DELTA, structured=structured
    )
    prompts = [render_chat([{"role": "user", "content": f"JSON {i}"}]) for i in range(3)]
    want = _reference(ref, prompts, params)
    hd = KVHandoff(dec.core)
    got = {}
    for i, p in enumerate(prompts):
        k = 3 + 5 * i  # in the analysis header, the analysis text, the answer
        got[str(i)] = list(want[str(i)][:k])
        state = HandoffState(list(want[str(i)][:k]))
        dec.adopt(
            str(i),
            lambda core, h, i=i, p=p, state=state: hd.start_resumed(str(i), p, params, state, h),
            params,
            p,
            (state.output_token_ids, 0, 0.0),
        )
    while dec.has_unfinished():
        for o in dec.step():
            got[o.request_id].extend(o.outputs[0].token_ids)
    assert got == want


def test_release_and_cancel_free_every_block(engines):
    _, pre, dec = engines
    hp, hd = KVHandoff(pre.core), KVHandoff(dec.core)
    pre.after_step = hp.after_step
    base_p, base_d = pre.kv.usage()["in_use"], dec.kv.usage()["in_use"]
    prompts = _workload(8, seed=2)
    for i, p in enumerate(prompts):
        _prefill_only(pre, hp, str(i), p, _greedy())
    pre.step()
    pre.step()
    pre.after_step = None
    # Some held, some still prefilling: abort all, release all.
    pre.abort([str(i) for i in range(len(prompts))])
    for i in range(len(prompts)):
        hp.release(str(i))
    assert pre.kv.usage()["in_use"] == base_p and not hp.held and not hp.prefill_only
    assert hd.reserve("x", prompts[-1], _greedy())
    assert dec.kv.usage()["in_use"] > base_d
    assert hd.release("x") and not hd.release("x")
    assert dec.kv.usage()["in_use"] == base_d
    while pre.has_unfinished():  # the step in flight when the requests were aborted
        pre.step()


def test_a_pinned_reservation_is_freed_only_once_its_transfer_has_ended(engines):
    """A transport writing reserved blocks off the engine thread pins them: a release (an abort) meanwhile
    must not hand them to another request; end_import frees them then."""
    _, _, dec = engines
    hd = KVHandoff(dec.core)
    base = dec.kv.usage()["in_use"]
    prompt = list(range(3000, 3040))
    reserved = hd.reserve("pinned", prompt, _greedy(), pin=True)
    assert reserved is not None and reserved.full and len(reserved.full) == 3
    assert hd.release("pinned")
    assert dec.kv.usage()["in_use"] == base + len(reserved.full) + len(reserved.sliding)
    hd.end_import("pinned")
    assert dec.kv.usage()["in_use"] == base and not hd.reserved and not hd.importing
    # Not released meanwhile: end_import only unpins, and the request can start.
    assert hd.reserve("kept", prompt, _greedy(), pin=True) is not None
    with pytest.raises(ValueError, match="has not ended"):
        hd.start_continued("kept", HandoffState([5]), 10_000)
    hd.end_import("kept")
    assert "kept" in hd.reserved and dec.kv.usage()["in_use"] > base
    assert hd.release("kept") and dec.kv.usage()["in_use"] == base


def test_write_rejects_a_mismatched_layout(engines):
    _, _, dec = engines
    hd = KVHandoff(dec.core)
    assert hd.reserve("bad", list(range(1000, 1040)), _greedy())
    with pytest.raises(ValueError, match="expected"):
        hd.write("bad", torch.zeros(1, 2, 1, 16, 2, 16), None)
    hd.release("bad")


def _move(hp: KVHandoff, hd: KVHandoff, dec: LLMEngine, rid: str, prompt, params, state) -> None:
    kv = hp.export(rid)
    assert hd.reserve(rid, prompt, params)
    hd.write(rid, kv.full, kv.sliding)
    hp.release(rid)
    _continue(dec, hd, rid, prompt, params, state)


def test_seeded_sampling_continues_its_random_stream(engines):
    ref, pre, dec = engines
    prompts = _workload(4, seed=3)
    params = SamplingParams(
        temperature=1.0, seed=7, max_tokens=6, output_kind=OutputKind.DELTA, ignore_eos=True
    )
    want = _reference(ref, prompts, params)
    hp, hd = KVHandoff(pre.core), KVHandoff(dec.core)
    pre.after_step = hp.after_step
    got: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        _prefill_only(pre, hp, f"s{i}", p, params)
    while pre.has_unfinished():
        for o in pre.step():
            got.setdefault(o.request_id.removeprefix("s"), []).extend(o.outputs[0].token_ids)
            if "handoff" in o.extra:
                rid = o.request_id
                _move(hp, hd, dec, rid, prompts[int(rid[1:])], params, o.extra["handoff"])
    pre.after_step = None
    while dec.has_unfinished():
        for o in dec.step():
            got[o.request_id.removeprefix("s")].extend(o.outputs[0].token_ids)
    assert got == want


def _text_run(eng, rid, prompt, params, handoff_to=None):
    """Run one request to the end; with `handoff_to` ((pre, hp), (dec, hd)) it moves after its first token.
    Returns (text deltas joined, finish reason, stop reason)."""
    text, finish, stop = "", None, None
    if handoff_to is None:
        eng.add_request(rid, prompt, params)
        engines = [eng]
    else:
        (pre, hp), (dec, hd) = handoff_to
        pre.after_step = hp.after_step
        _prefill_only(pre, hp, rid, prompt, params)
        engines = [pre, dec]
    for e in engines:
        while e.has_unfinished():
            for o in e.step():
                text += o.outputs[0].text
                finish, stop = o.outputs[0].finish_reason or finish, o.outputs[0].stop_reason or stop
                if "handoff" in o.extra:
                    _move(hp, hd, dec, rid, prompt, params, o.extra["handoff"])
                    finish = None
        e.after_step = None
        if finish is not None:
            break
    return text, finish, stop


def test_stop_string_across_the_handoff_is_held_back_and_cut_alike(engines):
    """Text held back on the prefill side (a possible stop-string start) is sent by the decode side."""
    ref, pre, dec = engines
    tok = get_tokenizer()
    prompt = list(range(3000, 3030))
    free = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, output_kind=OutputKind.DELTA)
    full, _, _ = _text_run(ref, "free", prompt, free)
    ids = _reference(ref, [prompt], free)["0"]
    first = tok.decode(ids[:1])
    assert len(first) >= 1 and len(full) > len(first) + 1
    # A stop string that starts inside the first token's text and ends in a later token's.
    stop = full[len(first) - 1 : len(first) + 2]
    params = SamplingParams(
        temperature=0.0, max_tokens=6, ignore_eos=True, output_kind=OutputKind.DELTA, stop=[stop]
    )
    want = _text_run(ref, "one", prompt, params)
    assert want[1] == "stop" and want[2] == stop
    got = _text_run(
        None, "moved", prompt, params, handoff_to=((pre, KVHandoff(pre.core)), (dec, KVHandoff(dec.core)))
    )
    assert got == want
