"""Streaming parse of model output: assistant turns rendered by openai-harmony, fed back one token at a time."""

from __future__ import annotations

import random
import re
import statistics
import time

import pytest
from openai_harmony import Message, Role

from osserve.harmony.encoding import (
    CALL,
    CHANNEL,
    END,
    ENDOFTEXT,
    MESSAGE,
    NUM_TEXT_TOKENS,
    RETURN,
    START,
    get_tokenizer,
)
from osserve.harmony.parse import MAX_HEADER_TOKENS, OutputParser, parse_completion

REASONING = "The user wants the weather 🌦 in Zürich; call get_weather."
ANSWER = "Il fait 21 °C à Zürich 🦩 — 中文 too."
PREAMBLE = "Let me look that up."
ARGS = '{"location": "Zürich", "unit": "c"}'


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def msg(text, channel, recipient=None):
    m = Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)
    return m.with_recipient(recipient).with_content_type("<|constrain|>json") if recipient else m


def completion(tok, messages, feed_stop=True):
    """What the model samples after the prompt's `<|start|>assistant`, as openai-harmony renders it."""
    ids = [t for m in messages for t in tok.encoding.render(m)][2:]  # the prompt holds <|start|>assistant
    if ids[-1] == END:
        ids[-1] = RETURN  # a finished turn ends in <|return|>
    if not feed_stop:
        assert ids[-1] in (RETURN, CALL)
        ids = ids[:-1]
    return ids


def stream(tok, ids):
    parser = OutputParser(tok)
    deltas = [d for t in ids for d in parser.process(t)]
    return parser, deltas


def comparable(result):
    """A parse result without its random tool-call ids."""
    calls = [(c.name, c.arguments) for c in result.tool_calls]
    return result.reasoning, result.content, calls, result.num_reasoning_tokens, result.error


def joined(deltas, kind):
    return "".join(d.text for d in deltas if d.kind == kind)


CASES = {
    "analysis+final": ([msg(REASONING, "analysis"), msg(ANSWER, "final")], REASONING, ANSWER, None),
    "analysis+tool_call": (
        [msg(REASONING, "analysis"), msg(ARGS, "commentary", "functions.get_weather")],
        REASONING,
        None,
        ARGS,
    ),
    "final only": ([msg(ANSWER, "final")], None, ANSWER, None),
    "preamble+tool_call": (
        [msg(PREAMBLE, "commentary"), msg(ARGS, "commentary", "functions.get_weather")],
        None,
        PREAMBLE,
        ARGS,
    ),
}


@pytest.mark.parametrize("feed_stop", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_stream_reassembles_rendered_turns(tok, case, feed_stop):
    messages, reasoning, content, args = CASES[case]
    ids = completion(tok, messages, feed_stop)
    parser, deltas = stream(tok, ids)
    result = parser.finish()
    assert result.error is None
    assert (result.reasoning, result.content) == (reasoning, content)
    assert joined(deltas, "reasoning") == (reasoning or "") and joined(deltas, "content") == (content or "")
    assert result.num_reasoning_tokens == (len(tok.encode(reasoning)) if reasoning else 0)
    assert all("\ufffd" not in d.text for d in deltas)
    calls = [d for d in deltas if d.kind == "tool_call"]
    if args is None:
        assert calls == [] and result.tool_calls == []
        assert parser.finish_reason("stop") == "stop" and parser.finish_reason("length") == "length"
    else:
        first, rest = calls[0], calls[1:]
        assert (first.tool_call_index, first.tool_name) == (0, "get_weather")
        assert re.fullmatch(r"call_[A-Za-z0-9]{24}", first.tool_call_id)
        assert all(d.tool_call_id is None and d.tool_name is None and d.tool_call_index == 0 for d in rest)
        assert joined(deltas, "tool_call") == args
        assert [(c.id, c.name, c.arguments) for c in result.tool_calls] == [
            (first.tool_call_id, "get_weather", args)
        ]
        assert parser.finish_reason("stop") == "tool_calls"
    # Non-streaming goes through the same machinery and gives the same message (ids are random).
    assert comparable(parse_completion(ids, tok)) == comparable(result)


def test_messages_are_numbered_and_process_many_coalesces(tok):
    ids = completion(tok, CASES["preamble+tool_call"][0])
    merged = OutputParser(tok).process_many(ids)
    assert [(d.kind, d.message_index, d.text) for d in merged] == [
        ("content", 0, PREAMBLE),
        ("tool_call", 1, ARGS),
    ]
    assert merged[1].tool_name == "get_weather" and merged[1].tool_call_id.startswith("call_")


def test_recipient_before_channel_and_length_cut_inside_a_call(tok):
    ids = tok.encode(
        "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>" + ARGS,
        allow_special=True,
    )
    parser, _ = stream(tok, ids)
    assert [(c.name, c.arguments) for c in parser.finish().tool_calls] == [("get_weather", ARGS)]
    assert parser.finish_reason("length") == "length"  # arguments cut short
    assert parser.finish_reason("stop") == "tool_calls"


def test_malformed_output_keeps_what_was_parsed(tok):
    good = completion(tok, [msg(REASONING, "analysis")], feed_stop=True)[:-1] + [END]
    garbage = [START] + tok.encode(" hello") + [START, MESSAGE] + tok.encode(" world")
    parser, deltas = stream(tok, good + garbage)
    result = parser.finish()
    assert result.reasoning == REASONING and result.error and "malformed" in result.error
    assert result.content == joined(deltas, "content") and result.content.endswith(" world")


@pytest.mark.parametrize("seed", range(6))
def test_random_garbage_never_raises(tok, seed):
    rng = random.Random(seed)
    specials = [
        START,
        END,
        MESSAGE,
        CHANNEL,
        RETURN,
        CALL,
        200003,
        199999,
        200000,
        201087,
        201088,
        300000,
        -1,
    ]
    ids = [
        rng.choice(specials) if rng.random() < 0.25 else rng.randrange(NUM_TEXT_TOKENS) for _ in range(200)
    ]
    if seed % 2:
        ids = (
            completion(tok, [msg(REASONING, "analysis")])[:-1] + [END, START] + ids
        )  # valid start, then junk
    parser, deltas = stream(tok, ids)
    result = parser.finish()
    assert result.error is not None
    assert comparable(result) == comparable(parse_completion(ids, tok))
    assert (result.content or "") == joined(deltas, "content")
    assert (result.reasoning or "") == joined(deltas, "reasoning")
    assert parser.finish_reason("length") in ("length", "tool_calls")


def test_output_without_any_header_becomes_content_with_an_error():
    """A random-weight model emits plain text tokens, never a header: after MAX_HEADER_TOKENS the parser
    gives up on Harmony and streams everything (from the first token) as content, recording the error."""
    from osserve.harmony.encoding import get_tokenizer
    from osserve.harmony.parse import MAX_HEADER_TOKENS, OutputParser

    tok = get_tokenizer()
    ids = tok.encode(" the quick brown fox jumps over the lazy dog" * 12)
    assert len(ids) > MAX_HEADER_TOKENS
    parser = OutputParser(tok)
    streamed = "".join(d.text for t in ids for d in parser.process(t) if d.kind == "content")
    done = parser.finish()
    assert done.error is not None and "header" in done.error
    assert streamed == done.content == tok.decode(ids)


LONG_NAME = "mcp__atlassian__jira_get_issue_transitions_v2"
# 64 characters (the longest name tools.py accepts) that tokenize into many pieces.
LONGEST_NAME = "x9_" * 21 + "q"


@pytest.mark.parametrize("name", [LONG_NAME, LONGEST_NAME])
@pytest.mark.parametrize("first", ["analysis", "preamble", "none"])
def test_long_tool_names_parse_after_another_message(tok, name, first):
    assert len(tok.encode(name)) >= 14
    before = {
        "analysis": [msg(REASONING, "analysis")],
        "preamble": [msg(PREAMBLE, "commentary")],
        "none": [],
    }[first]
    ids = completion(tok, [*before, msg(ARGS, "commentary", f"functions.{name}")])
    parser, deltas = stream(tok, ids)
    result = parser.finish()
    assert result.error is None
    assert [(c.name, c.arguments) for c in result.tool_calls] == [(name, ARGS)]
    assert result.content == (PREAMBLE if first == "preamble" else None)
    assert joined(deltas, "tool_call") == ARGS and parser.finish_reason("stop") == "tool_calls"
    assert comparable(parse_completion(ids, tok)) == comparable(result)


def test_long_tool_name_with_the_recipient_in_the_channel(tok):
    header = f"<|channel|>commentary to=functions.{LONGEST_NAME} <|constrain|>json<|message|>"
    ids = completion(tok, [msg(REASONING, "analysis")])[:-1] + [END, START] + tok.encode("assistant")
    ids += tok.encode(header, allow_special=True) + tok.encode(ARGS) + [CALL]
    result = parse_completion(ids, tok)
    assert result.error is None and result.content is None
    assert [(c.name, c.arguments) for c in result.tool_calls] == [(LONGEST_NAME, ARGS)]


@pytest.mark.parametrize("case", ["final", "analysis+final", "garbage"])
def test_endoftext_is_never_text(tok, case):
    if case == "garbage":
        ids = tok.encode(" the quick brown fox" * 10) + [ENDOFTEXT]
    else:
        messages = (
            [msg(ANSWER, "final")] if case == "final" else [msg(REASONING, "analysis"), msg(ANSWER, "final")]
        )
        ids = completion(tok, messages)[:-1] + [ENDOFTEXT]
    parser, deltas = stream(tok, ids)
    deltas += parser.end()
    result = parser.finish()
    assert "<|endoftext|>" not in (result.content or "") + (result.reasoning or "")
    assert all("endoftext" not in d.text for d in deltas)
    if case != "garbage":
        assert result.content == ANSWER and result.error is None


@pytest.mark.parametrize("stop", [[], [RETURN], [ENDOFTEXT]])
def test_short_output_that_never_reaches_a_message_is_content(tok, stop):
    """Fewer than MAX_HEADER_TOKENS tokens and no Harmony header: the text comes out as content with the
    parser's error recorded, streamed (through `end()`) and not."""
    ids = tok.encode("Hello there, general") + stop
    assert len(ids) < MAX_HEADER_TOKENS
    parser, deltas = stream(tok, ids)
    assert deltas == []  # nothing is known to be content until the output ends
    deltas = parser.end()
    result = parser.finish()
    assert joined(deltas, "content") == result.content == "Hello there, general"
    assert result.error is not None and "before any message" in result.error
    assert comparable(parse_completion(ids, tok)) == comparable(result)


def test_a_real_header_cut_by_the_length_limit_shows_nothing(tok):
    ids = completion(tok, [msg(REASONING, "analysis")])[:-1] + [END, START] + tok.encode("assistant")
    ids += [CHANNEL] + tok.encode("final")
    parser, _ = stream(tok, ids)
    assert parser.end() == []
    result = parser.finish()
    assert (result.reasoning, result.content, result.error) == (REASONING, None, None)


def test_cost_per_token_is_constant(tok):
    """32k analysis tokens: the time per token at the end is within 2x of the time at the start (the state
    of openai-harmony's parser, which serialises the whole message, is read on special tokens only)."""
    parser = OutputParser(tok)
    parser.process_many(tok.encode("<|channel|>analysis<|message|>", allow_special=True))
    text = tok.encode(" the quick brown fox jumps over the lazy dog" * 4000)[:32768]
    batch = 512

    def per_token(ids):
        t0 = time.perf_counter()
        for t in ids:
            parser.process(t)
        return (time.perf_counter() - t0) / len(ids)

    batches = [text[i : i + batch] for i in range(0, len(text), batch)]
    start = [per_token(b) for b in batches[:5]]
    for b in batches[5:-5]:
        per_token(b)
    end = [per_token(b) for b in batches[-5:]]
    assert statistics.median(end) < 2 * statistics.median(start), (start, end)
    assert parser.finish().num_reasoning_tokens == len(text)
