"""Grammar-constrained generation in the engine on the tiny random checkpoint: the output follows the
grammar whatever the model (random weights, n > 1, greedy or not), a grammar that cannot finish ends with
"length", a broken one never crashes, and requests without a grammar stay on the overlapped path."""

from __future__ import annotations

import json

import jsonschema
import pytest
from helpers import run_requests as run

from osserve.config import EngineConfig
from osserve.engine.factory import build_engine
from osserve.engine.llm_engine import LLMEngine
from osserve.engine.staging import to_device
from osserve.harmony.encoding import CALL, RETURN, get_tokenizer
from osserve.harmony.formats import ResponseFormat
from osserve.harmony.parse import parse_completion
from osserve.harmony.render import render_chat
from osserve.sampling_params import SamplingParams
from osserve.structured import build_structured

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "ok": {"type": "boolean"},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
STOPS = [RETURN, CALL]


@pytest.fixture(scope="module")
def core(tiny_ckpt):
    config = EngineConfig.from_dict(
        {"model": str(tiny_ckpt), "max_seq_len": 512, "kv_cache_config": {"max_blocks": 256}}
    )
    return LLMEngine(build_engine(config, progress=False)[0], get_tokenizer())


def prompt(text="Plan a trip as JSON."):
    return render_chat([{"role": "user", "content": text}])


def params(max_tokens=80, **kw):
    structured = build_structured(ResponseFormat("trip", SCHEMA), [], None, max_tokens)
    return SamplingParams(max_tokens=max_tokens, structured=structured, stop_token_ids=STOPS, **kw)


@pytest.mark.parametrize(
    "sampling", [{"temperature": 1.0, "n": 3}, {"temperature": 0.0}, {"top_p": 0.5, "seed": 7}]
)
def test_every_sample_follows_the_schema(core, sampling):
    tok = get_tokenizer()
    prompts = [prompt(), prompt("Another trip, JSON please.")]
    done = run(core, prompts, params(**sampling))
    assert len(done) == len(prompts)
    for out in done.values():
        assert len(out.outputs) == sampling.get("n", 1)
        for sample in out.outputs:
            assert sample.finish_reason == "stop" and sample.token_ids[-1] == RETURN
            parsed = parse_completion(sample.token_ids, tok)
            assert parsed.error is None and parsed.reasoning
            jsonschema.validate(json.loads(parsed.content), SCHEMA)


def test_a_grammar_that_cannot_finish_ends_with_length(core):
    done = run(core, [prompt()], params(max_tokens=12))
    sample = done[0].outputs[0]
    assert sample.finish_reason == "length" and len(sample.token_ids) == 12


def test_a_broken_grammar_never_crashes_the_engine(core):
    """A logits processor forces a token the grammar forbids (no token is left): the sample ends ("stop")
    with what it had, and the other requests of the batch are untouched."""
    tok = get_tokenizer()

    def force_bang(output_ids, logits):
        logits.fill_(float("-inf"))
        logits[tok.encode("!")[0]] = 0.0
        return logits

    broken = [params(), params(temperature=0.0)]
    for p in broken:
        p.logits_processors.append(force_bang)
    done = run(core, [prompt(), prompt(), prompt()], [*broken, params()])
    for i in (0, 1):
        sample = done[i].outputs[0]
        assert sample.finish_reason == "stop" and len(sample.token_ids) == 1
    assert done[2].outputs[0].finish_reason == "stop"
    jsonschema.validate(json.loads(parse_completion(done[2].outputs[0].token_ids, tok).content), SCHEMA)


def test_stop_strings_end_a_constrained_request(core):
    tok = get_tokenizer()
    done = run(core, [prompt()], params(stop=['"days"']))
    sample = done[0].outputs[0]
    assert sample.finish_reason == "stop" and sample.stop_reason == '"days"'
    assert '"days"' in tok.decode(sample.token_ids) and sample.text.rstrip().endswith(",")  # cut before it


def _sampling_of_running(eng: LLMEngine):
    b = eng.core.batch
    rows = b.order()
    (rows_t,) = to_device([rows], eng.runner.device)
    b.flush()
    return rows, eng.runner.prepare_sampling(b, rows, rows_t)


def test_grammar_rows_keep_the_overlap_and_mask_only_their_rows(core):
    """A grammar request does not make steps synchronous: the step's forward is queued before the previous
    step is read back, and only its sampling waits for the grammar to see that token."""
    core.add_request("plain", prompt(), SamplingParams(max_tokens=4))
    core.step()
    _, batch = _sampling_of_running(core)
    assert not batch.grammars
    core.add_request("json", prompt(), params())
    while core.core.batch.num_grammar == 0:
        core.step()
    assert core.core.batch.num_sync == 0
    core.step()
    assert core.core.inflight is not None  # the overlap held
    rows, batch = _sampling_of_running(core)
    core.runner._fill_grammar_masks(batch)
    assert batch.token_bitmask is not None and batch.bitmask_rows.tolist() == [
        i for i, r in enumerate(rows.tolist()) if core.core.batch.reqs[r].grammar is not None
    ]
    core.abort(["plain", "json"])
    while core.has_unfinished():
        core.step()
