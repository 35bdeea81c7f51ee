"""Structured outputs below the engine: the grammar over whole Harmony completions (checked against
openai-harmony's renderings, token by token through the bitmask), schema errors, the tokenizer, the bitmask
op and the `# Response Formats` prompt section."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from openai_harmony import Message, Role, ToolDescription

from osserve.harmony.encoding import CALL, CHANNEL, END, RETURN, START, VOCAB_SIZE, get_tokenizer
from osserve.harmony.errors import InvalidRequest
from osserve.harmony.formats import (
    ResponseFormat,
    forced_tool_names,
    parse_response_format,
    parse_text_format,
)
from osserve.kernels.reference import apply_token_bitmask_
from osserve.sampling_params import SamplingParams
from osserve.structured import (
    GrammarMatcher,
    StructuredOutput,
    allocate_bitmask,
    answer_reserve,
    build_structured,
    fill_bitmasks,
)
from osserve.structured.vocabulary import grammar_tokenizer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = ToolDescription.new(
    "get_weather",
    "Weather for a city",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
)
LONG = ToolDescription.new("mcp__atlassian__jira_get_issue_transitions_v2", "", None)
THINKING = "The user wants JSON 🦩; think — then answer."


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def assistant(text, channel, recipient=None):
    m = Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)
    return m.with_recipient(recipient).with_content_type("<|constrain|>json") if recipient else m


def rendered(tok, messages):
    """A completion as openai-harmony renders it after the prompt's `<|start|>assistant`."""
    ids = [t for m in messages for t in tok.encoding.render(m)][2:]
    if ids[-1] == END:
        ids[-1] = RETURN
    return ids


def allowed(bitmask, row=0):
    bits = np.unpackbits(bitmask[row].view(np.uint8), bitorder="little")[:VOCAB_SIZE]
    return set(np.nonzero(bits)[0].tolist())


def replay(structured, ids):
    """Feed `ids` through a matcher, checking the bitmask allows each one first; returns the matcher."""
    m = GrammarMatcher(structured)
    bitmask = allocate_bitmask(1)
    for i, t in enumerate(ids):
        m.fill_bitmask(bitmask, 0)
        assert (bitmask[0, t // 32] >> (t % 32)) & 1, f"token {i} ({t}) masked out"
        assert m.accept(t), m.error
    return m


def json_output(schema=PERSON, max_tokens=None):
    return build_structured(ResponseFormat("person", schema), [], None, max_tokens)


@pytest.mark.parametrize(
    "answer",
    ['{"name":"Ann","age":7}', '{"name": "Bob", "age": 42, "tags": ["a", "b"]}', '{"name":"","age":0}'],
)
def test_json_completion_rendered_by_openai_harmony_is_accepted(tok, answer):
    ids = rendered(tok, [assistant(THINKING, "analysis"), assistant(answer, "final")])
    m = replay(json_output(), ids)
    assert m.terminated and m.done and m.error is None
    bitmask = allocate_bitmask(1)
    m.fill_bitmask(bitmask, 0)
    assert allowed(bitmask) == {RETURN, CALL}, "a finished grammar allows only the stop tokens"


@pytest.mark.parametrize(
    "answer",
    [
        '{"name":"Ann"}',  # a required field missing
        '{"name":"Ann","age":200}',  # out of range
        '{"name":"Ann","age":7,"x":1}',  # additionalProperties false
        '{"age":7,"name":"Ann"}',  # llguidance keeps the schema's property order
        '{\n"name":"Ann","age":7}',  # one-line JSON
    ],
)
def test_json_that_breaks_the_schema_is_masked_out(tok, answer):
    ids = rendered(tok, [assistant(THINKING, "analysis"), assistant(answer, "final")])
    m = GrammarMatcher(json_output())
    bitmask = allocate_bitmask(1)
    for t in ids:
        m.fill_bitmask(bitmask, 0)
        if not (bitmask[0, t // 32] >> (t % 32)) & 1:
            break
        assert m.accept(t)
    else:
        pytest.fail("every token was allowed")


def test_the_analysis_is_required_and_free_and_specials_are_tokens(tok):
    m = GrammarMatcher(json_output())
    assert not m.accept(CHANNEL) or not m.accept(tok.encode("final")[0])  # final right away: refused
    m = GrammarMatcher(json_output())
    for t in [CHANNEL, *tok.encode("analysis"), 200008]:
        assert m.accept(t)
    bitmask = allocate_bitmask(1)
    m.fill_bitmask(bitmask, 0)
    free = allowed(bitmask)
    assert len(free) > 199_000 and END in free  # any text, or the end of the message
    assert not free & {START, CHANNEL, RETURN, CALL, 200003, 200008, 199999}
    # The text "<|end|>" is text: it does not end the analysis.
    for t in tok.encode("<|end|>"):
        assert m.accept(t)
    m.fill_bitmask(bitmask, 0)
    assert END in allowed(bitmask) and len(allowed(bitmask)) > 199_000


def test_reasoning_budget_closes_the_analysis(tok):
    max_tokens = 40
    budget = max_tokens - answer_reserve(max_tokens)
    m = GrammarMatcher(json_output(max_tokens=max_tokens))
    for t in [CHANNEL, *tok.encode("analysis"), 200008]:
        assert m.accept(t)
    bitmask = allocate_bitmask(1)
    word = tok.encode(" word")[0]
    for _ in range(budget):
        m.fill_bitmask(bitmask, 0)
        assert word in allowed(bitmask)
        assert m.accept(word)
    m.fill_bitmask(bitmask, 0)
    assert allowed(bitmask) == {END}


@pytest.mark.parametrize("tool", [WEATHER, LONG])
@pytest.mark.parametrize("placement", ["openai-harmony", "channel"])
def test_forced_tool_call_rendered_by_openai_harmony_is_accepted(tok, tool, placement):
    args = '{"city":"Zürich","unit":"c"}' if tool is WEATHER else "{}"
    analysis = rendered(tok, [assistant(THINKING, "analysis")])[:-1] + [END]
    if (
        placement == "openai-harmony"
    ):  # <|start|>assistant to=functions.X<|channel|>commentary <|constrain|>json
        call = tok.encoding.render(assistant(args, "commentary", f"functions.{tool.name}"))
    else:  # <|start|>assistant<|channel|>commentary to=functions.X <|constrain|>json, as the spec's examples
        header = f"<|channel|>commentary to=functions.{tool.name} <|constrain|>json<|message|>"
        call = [
            START,
            *tok.encode("assistant"),
            *tok.encode(header, allow_special=True),
            *tok.encode(args),
            CALL,
        ]
    assert call[-1] == CALL
    tools = [WEATHER, LONG]
    structured = build_structured(None, tools, forced_tool_names(tools, "required"), None)
    assert structured.kind == "tool_call"
    assert replay(structured, analysis + call).terminated
    # Named: only that function.
    other = LONG if tool is WEATHER else WEATHER
    named = build_structured(
        None, tools, forced_tool_names(tools, {"type": "function", "name": other.name}), None
    )
    m = GrammarMatcher(named)
    assert not all(m.accept(t) for t in analysis + call)


def test_tool_arguments_follow_the_parameters(tok):
    structured = build_structured(None, [WEATHER], ["get_weather"], None)
    analysis = rendered(tok, [assistant(THINKING, "analysis")])[:-1] + [END]
    bad = tok.encoding.render(assistant('{"unit":"c"}', "commentary", "functions.get_weather"))
    m = GrammarMatcher(structured)
    assert not all(m.accept(t) for t in analysis + bad)
    assert m.error is not None and m.done


def test_response_format_with_auto_tools_allows_json_or_a_call(tok):
    structured = build_structured(ResponseFormat("person", PERSON), [WEATHER], None, None)
    analysis = [assistant(THINKING, "analysis")]
    assert replay(
        structured, rendered(tok, [*analysis, assistant('{"name":"A","age":1}', "final")])
    ).terminated
    call = rendered(tok, analysis)[:-1] + [END]
    call += tok.encoding.render(assistant('{"city":"Paris"}', "commentary", "functions.get_weather"))
    assert replay(structured, call).terminated


def test_json_object_accepts_any_object(tok):
    structured = build_structured(ResponseFormat("json_object", None), [], None, None)
    assert structured.kind == "json_object"
    answer = '{"anything": [1, {"nested": null}], "b": "x"}'
    ids = rendered(tok, [assistant(THINKING, "analysis"), assistant(answer, "final")])
    assert replay(structured, ids).terminated
    m = GrammarMatcher(structured)
    ids = rendered(tok, [assistant(THINKING, "analysis"), assistant("[1, 2]", "final")])
    assert not all(m.accept(t) for t in ids)


def test_no_constraint_without_a_format_or_a_forced_call():
    assert build_structured(None, [WEATHER], None, 100) is None


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"type": "string", "format": "color"}, "Unknown format"),
        ({"type": "string", "pattern": "(?=a)b"}, "look-around"),
        ({"type": "integer", "minimum": 5, "maximum": 2}, "nsatisfiable"),
        ({"$ref": "#/$defs/missing"}, "does not exist"),
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"type": "bogus"}, "bogus"),
    ],
)
def test_unenforceable_schemas_name_the_problem(schema, words):
    with pytest.raises(InvalidRequest) as e:
        build_structured(
            ResponseFormat("x", schema, param="response_format.json_schema.schema"), [], None, None
        )
    assert e.value.param == "response_format.json_schema.schema"
    assert words in e.value.message and "grammar" not in e.value.message.lower()
    tool = ToolDescription.new("f", "", {"type": "object", "properties": {"a": schema}, "required": ["a"]})
    with pytest.raises(InvalidRequest) as e:
        build_structured(None, [WEATHER, tool], ["f"], None, "tools[{}].parameters")
    assert e.value.param == "tools[1].parameters" and words in e.value.message


@pytest.mark.parametrize(
    ("value", "param"),
    [
        ({"type": "yaml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
        (
            {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}},
            "response_format.json_schema.name",
        ),
        (
            {"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}},
            "response_format.json_schema.strict",
        ),
    ],
)
def test_bad_response_formats(value, param):
    with pytest.raises(InvalidRequest) as e:
        parse_response_format(value)
    assert e.value.param == param


def test_format_shapes():
    assert parse_response_format(None) is None and parse_response_format({"type": "text"}) is None
    chat = parse_response_format({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    responses = parse_text_format({"type": "json_schema", "name": "p", "schema": PERSON, "strict": True})
    assert (chat.name, chat.schema) == (responses.name, responses.schema) == ("p", PERSON)
    assert chat.param == "response_format.json_schema.schema" and responses.param == "text.format.schema"
    assert parse_text_format({"type": "json_object"}).schema is None
    with pytest.raises(InvalidRequest, match="at least one"):
        forced_tool_names([], "required")
    assert forced_tool_names([WEATHER], "auto") is None and forced_tool_names([WEATHER], "none") is None
    assert forced_tool_names([WEATHER, LONG], {"type": "function", "function": {"name": "get_weather"}}) == [
        "get_weather"
    ]


def test_samples_copy_the_grammar_state(tok):
    ids = rendered(tok, [assistant(THINKING, "analysis"), assistant('{"name":"A","age":1}', "final")])
    first = GrammarMatcher(json_output())
    second = first.copy()
    for t in ids:
        assert first.accept(t)
    assert first.terminated and not second.terminated
    assert replay(json_output(), ids).terminated and all(second.accept(t) for t in ids)


def test_fill_bitmasks_in_parallel_matches_one_by_one(tok):
    ids = rendered(tok, [assistant(THINKING, "analysis"), assistant('{"name":"Ann","age":7}', "final")])
    matchers = []
    for k in range(6):  # six matchers at six places of the completion
        m = GrammarMatcher(json_output())
        for t in ids[: k * 4]:
            m.accept(t)
        matchers.append(m)
    together = fill_bitmasks(matchers)
    for i, m in enumerate(matchers):
        alone = allocate_bitmask(1)
        m.fill_bitmask(alone, 0)
        assert np.array_equal(together[i], alone[0])


def test_constraint_is_plain_data():
    structured = json_output(max_tokens=64)
    params = SamplingParams(max_tokens=64, structured=structured)
    copy = pickle.loads(pickle.dumps(params))
    assert copy.structured == structured
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=1, structured=structured)
    with pytest.raises(ValueError, match="structured"):
        SamplingParams(structured="start: x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="vocabulary"):
        params.check_request(5, 1000, 1024)
    assert isinstance(structured, StructuredOutput) and "max_tokens=" in structured.grammar


def test_grammar_tokenizer_agrees_with_the_model_tokenizer(tok):
    lt = grammar_tokenizer()
    text = "Hello wörld 🦩 — 12345 it's   \n\n\tx = {\"a\": [1, 2]} 中文 'll"
    assert lt.tokenize_str(text) == tok.encode(text)
    assert lt.vocab_size == VOCAB_SIZE


def test_bitmask_op_applies_a_matcher_row(tok):
    m = GrammarMatcher(json_output())
    bitmask = allocate_bitmask(2)
    m.fill_bitmask(bitmask, 1)  # row 1: only <|channel|> may start the completion
    logits = torch.randn(3, VOCAB_SIZE)
    out = logits.clone()
    apply_token_bitmask_(out, torch.from_numpy(bitmask[1:]), torch.tensor([2]))
    assert torch.equal(out[:2], logits[:2])
    assert torch.isfinite(out[2]).nonzero().flatten().tolist() == [CHANNEL]
