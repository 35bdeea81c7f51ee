"""Parsing end to end through the real engine: the request hook forces the model to emit tokens that
openai-harmony rendered for an assistant turn, and the API must return exactly its reasoning, content and
tool calls, streamed and not, through Chat Completions and the Responses API."""

from __future__ import annotations

import json

import httpx
import pytest
from live import Forcer, serve_in_thread, tiny_config
from openai_harmony import Message, Role

from osserve.harmony import get_encoding, get_tokenizer
from osserve.harmony.encoding import CALL, END, RETURN

# A live server per module: in the full run, out of pytest -m "not slow" (kept under 3 minutes).
pytestmark = pytest.mark.slow

REASONING = "Let me think about the weather."
ANSWER = "It is sunny in Paris, 22 °C."
ARGS = '{"city": "Paris", "unit": "celsius"}'
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
RESPONSES_TOOLS = [{"type": "function", **TOOLS[0]["function"]}]


def analysis(text: str) -> Message:
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel("analysis")


def final(text: str) -> Message:
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel("final")


def tool_call(name: str, args: str) -> Message:
    return (
        Message.from_role_and_content(Role.ASSISTANT, args)
        .with_channel("commentary")
        .with_recipient(f"functions.{name}")
        .with_content_type("<|constrain|>json")
    )


def assistant_turn(*messages: Message) -> list[int]:
    """The tokens the model emits after the prompt's `<|start|>assistant`: the messages as openai-harmony
    renders them, the last one ending in <|return|> (a final answer) or <|call|> (a tool call)."""
    enc = get_encoding()
    ids = [t for m in messages for t in enc.render(m)][2:]
    if ids[-1] == END:
        ids[-1] = RETURN
    assert ids[-1] in (RETURN, CALL)
    return ids


def reasoning_token_count(text: str) -> int:
    return len(get_encoding().render(analysis(text))) - len(get_encoding().render(analysis("")))


CASES = {
    "answer": ([final(ANSWER)], None, ANSWER, [], "stop"),
    "reasoning+answer": ([analysis(REASONING), final(ANSWER)], REASONING, ANSWER, [], "stop"),
    "tool_call": ([tool_call("get_weather", ARGS)], None, None, [("get_weather", ARGS)], "tool_calls"),
    "reasoning+tool_call": (
        [analysis(REASONING), tool_call("get_weather", ARGS)],
        REASONING,
        None,
        [("get_weather", ARGS)],
        "tool_calls",
    ),
}


def _chat(client, forcer, messages, stream: bool, **kwargs):  # noqa: ANN001, ANN202
    key = forcer.force(assistant_turn(*messages))
    return client.chat.completions.create(
        model="osserve-tiny-test",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=TOOLS,
        max_tokens=200,
        user=key,
        stream=stream,
        **kwargs,
    ), key


@pytest.mark.parametrize("case", list(CASES))
def test_chat_forced(forced_client, forcer, case: str) -> None:
    messages, reasoning, content, calls, finish = CASES[case]
    forced = assistant_turn(*messages)
    resp, _ = _chat(forced_client, forcer, messages, stream=False)
    choice = resp.choices[0]
    msg = choice.message
    assert choice.finish_reason == finish
    assert msg.content == content
    assert (msg.model_extra or {}).get("reasoning_content") == reasoning
    assert (msg.model_extra or {}).get("reasoning") == reasoning
    got_calls = [(c.function.name, c.function.arguments) for c in msg.tool_calls or []]
    assert got_calls == calls
    for c in msg.tool_calls or []:
        assert c.id.startswith("call_") and c.type == "function"
    assert resp.usage.completion_tokens == len(forced)
    assert resp.usage.prompt_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    expected_reasoning = reasoning_token_count(reasoning) if reasoning else 0
    assert resp.usage.completion_tokens_details.reasoning_tokens == expected_reasoning


@pytest.fixture(scope="module")
def chunky(tiny_checkpoint):  # noqa: ANN001, ANN201
    """A second in-process server whose engine sends 5 tokens per delta (stream_interval), as a consumer
    that lags the engine gets them merged: the parser must split messages across and inside deltas."""
    import openai

    from osserve.server.app import create_app

    forcer = Forcer()
    app = create_app(tiny_config(tiny_checkpoint, stream_interval=5), request_hook=forcer.hook)
    with serve_in_thread(app) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60), forcer


@pytest.mark.parametrize("case", list(CASES))
def test_chat_forced_streaming_several_tokens_per_delta(chunky, case: str) -> None:
    chunks = test_chat_forced_streaming(*chunky, case)
    # Deltas of 5 tokens: a delta gives at most one chunk per message it touches (reasoning, content, a
    # call's first and later deltas), so the stream has far fewer chunks than one per token would give.
    body = [c for c in chunks if c.choices]
    tokens = chunks[-1].usage.completion_tokens
    assert len(body) <= 3 * -(-tokens // 5) + 1, (len(body), tokens)

    def text(c) -> str:  # noqa: ANN001
        d = c.choices[0].delta
        args = "".join(tc.function.arguments or "" for tc in d.tool_calls or [])
        return ((d.model_extra or {}).get("reasoning_content") or "") + (d.content or "") + args

    assert any(len(text(c)) > 1 for c in body), "no chunk carried the text of several tokens"


@pytest.mark.parametrize("case", list(CASES))
def test_chat_forced_streaming(forced_client, forcer, case: str) -> None:
    messages, reasoning, content, calls, finish = CASES[case]
    stream, _ = _chat(forced_client, forcer, messages, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    body = [c for c in chunks if c.choices]
    reasoning_text = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in body
    )
    content_text = "".join(c.choices[0].delta.content or "" for c in body)
    assert reasoning_text == (reasoning or "")
    assert content_text == (content or "")
    deltas = [tc for c in body for tc in c.choices[0].delta.tool_calls or []]
    got: dict[int, list] = {}
    for d in deltas:
        if d.index not in got:
            # The first delta of a call carries index, id, type and name.
            assert d.id.startswith("call_") and d.type == "function" and d.function.name
            got[d.index] = [d.function.name, d.function.arguments or ""]
        else:
            assert d.id is None and d.type is None and d.function.name is None
            got[d.index][1] += d.function.arguments or ""
    assert [tuple(v) for _, v in sorted(got.items())] == calls
    finishes = [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason]
    assert finishes == [finish] and body[-1].choices[0].finish_reason == finish
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens == len(assistant_turn(*messages))
    return chunks
    assert usage.completion_tokens_details.reasoning_tokens == (
        reasoning_token_count(reasoning) if reasoning else 0
    )


def _expected_items(messages: list[Message]) -> list[tuple]:
    items = []
    for m in messages:
        text = m.content[0].text
        if m.recipient:
            items.append(("function_call", m.recipient.removeprefix("functions."), text))
        elif m.channel == "analysis":
            items.append(("reasoning", text))
        else:
            items.append(("message", text))
    return items


def _items(output) -> list[tuple]:  # noqa: ANN001
    out = []
    for item in output:
        if item.type == "function_call":
            assert item.call_id.startswith("call_")
            out.append(("function_call", item.name, item.arguments))
        elif item.type == "reasoning":
            out.append(("reasoning", "".join(c.text for c in item.content)))
        else:
            assert item.role == "assistant"
            out.append(("message", "".join(c.text for c in item.content)))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_responses_forced(forced_client, forcer, case: str) -> None:
    messages, reasoning, _, _, _ = CASES[case]
    key = forcer.force(assistant_turn(*messages))
    resp = forced_client.responses.create(
        model="osserve-tiny-test",
        input="Weather in Paris?",
        tools=RESPONSES_TOOLS,
        max_output_tokens=200,
        extra_body={"user": key},
    )
    assert resp.status == "completed"
    assert _items(resp.output) == _expected_items(messages)
    assert resp.usage.output_tokens == len(assistant_turn(*messages))
    assert resp.usage.output_tokens_details.reasoning_tokens == (
        reasoning_token_count(reasoning) if reasoning else 0
    )
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens


@pytest.mark.parametrize("case", list(CASES))
def test_responses_forced_streaming(forced_client, forcer, case: str) -> None:
    messages, _, _, _, _ = CASES[case]
    key = forcer.force(assistant_turn(*messages))
    events = list(
        forced_client.responses.create(
            model="osserve-tiny-test",
            input="Weather in Paris?",
            tools=RESPONSES_TOOLS,
            max_output_tokens=200,
            extra_body={"user": key},
            stream=True,
        )
    )
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # Every item opens and closes; deltas add up to the done texts.
    added = [e for e in events if e.type == "response.output_item.added"]
    done = [e for e in events if e.type == "response.output_item.done"]
    assert [e.output_index for e in added] == [e.output_index for e in done] == list(range(len(messages)))
    for kind, delta_type, done_type, field in (
        ("reasoning", "response.reasoning_text.delta", "response.reasoning_text.done", "text"),
        ("message", "response.output_text.delta", "response.output_text.done", "text"),
        (
            "function_call",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "arguments",
        ),
    ):
        for d in (e for e in events if e.type == done_type):
            streamed = "".join(e.delta for e in events if e.type == delta_type and e.item_id == d.item_id)
            assert streamed == getattr(d, field), kind
    final_response = events[-1].response
    assert _items(final_response.output) == _expected_items(messages)
    assert _items([e.item for e in done]) == _expected_items(messages)
    assert final_response.usage.output_tokens == len(assistant_turn(*messages))


def test_chat_tool_round_trip(forced_client, forcer) -> None:
    first, _ = _chat(
        forced_client, forcer, [analysis(REASONING), tool_call("get_weather", ARGS)], stream=False
    )
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    key = forcer.force(assistant_turn(final(ANSWER)))
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": REASONING,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "sunny", "temp_c": 22})},
    ]
    second = forced_client.chat.completions.create(
        model="osserve-tiny-test",
        messages=history,
        tools=TOOLS,
        max_tokens=200,
        user=key,
    )
    assert second.choices[0].message.content == ANSWER
    assert second.choices[0].finish_reason == "stop"
    prompt = get_tokenizer().decode(forcer.prompts[key], skip_special_tokens=False)
    assert (
        f"to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{ARGS}<|call|>" in prompt
    )
    assert (
        '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"sky": "sunny"' in prompt
    )
    assert prompt.endswith("<|start|>assistant")


def test_responses_tool_round_trip(forced_client, forcer) -> None:
    key = forcer.force(assistant_turn(analysis(REASONING), tool_call("get_weather", ARGS)))
    first = forced_client.responses.create(
        model="osserve-tiny-test",
        input="Weather in Paris?",
        tools=RESPONSES_TOOLS,
        max_output_tokens=200,
        extra_body={"user": key},
    )
    call = next(i for i in first.output if i.type == "function_call")
    key = forcer.force(assistant_turn(final(ANSWER)))
    history = [{"role": "user", "content": "Weather in Paris?"}]
    history += [item.model_dump(exclude_none=True) for item in first.output]
    history.append({"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny"}'})
    second = forced_client.responses.create(
        model="osserve-tiny-test",
        input=history,
        tools=RESPONSES_TOOLS,
        max_output_tokens=200,
        extra_body={"user": key},
    )
    assert second.output_text == ANSWER
    prompt = get_tokenizer().decode(forcer.prompts[key], skip_special_tokens=False)
    assert f"<|message|>{ARGS}<|call|>" in prompt
    assert (
        '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"sky": "sunny"}'
        in prompt
    )


@pytest.mark.parametrize(
    ("extra", "effort"),
    [
        ({"reasoning_effort": "high"}, "high"),
        ({"chat_template_args": {"reasoning_effort": "low"}}, "low"),
        ({}, "medium"),
    ],
)
def test_chat_reasoning_effort(forced_server, forcer, extra: dict, effort: str) -> None:
    key = forcer.force(assistant_turn(final("ok")))
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "user": key, **extra}
    r = httpx.post(forced_server.base_url + "/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    prompt = get_tokenizer().decode(forcer.prompts[key], skip_special_tokens=False)
    assert f"Reasoning: {effort}" in prompt


def test_responses_reasoning_effort(forced_client, forcer) -> None:
    key = forcer.force(assistant_turn(final("ok")))
    forced_client.responses.create(
        model="osserve-tiny-test",
        input="hi",
        reasoning={"effort": "high"},
        max_output_tokens=5,
        extra_body={"user": key},
    )
    assert "Reasoning: high" in get_tokenizer().decode(forcer.prompts[key], skip_special_tokens=False)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_stop_string_cuts_the_answer(forced_client, forcer, stream: bool) -> None:
    resp, _ = _chat(
        forced_client, forcer, [analysis(REASONING), final(ANSWER)], stream=stream, stop=["Paris"]
    )
    if stream:
        body = [c for c in resp if c.choices]
        content = "".join(c.choices[0].delta.content or "" for c in body)
        finish = body[-1].choices[0].finish_reason
    else:
        content, finish = resp.choices[0].message.content, resp.choices[0].finish_reason
    assert content == ANSWER[: ANSWER.index("Paris")]
    assert finish == "stop"


def test_chat_logprobs_cover_the_answer(forced_client, forcer) -> None:
    resp, _ = _chat(
        forced_client,
        forcer,
        [analysis(REASONING), final(ANSWER)],
        stream=False,
        logprobs=True,
        top_logprobs=2,
    )
    content = resp.choices[0].logprobs.content
    assert "".join(t.token for t in content) == ANSWER
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_chat_n_choices_each_parsed(forced_client, forcer) -> None:
    resp, _ = _chat(forced_client, forcer, [analysis(REASONING), final(ANSWER)], stream=False, n=2)
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(c.message.content == ANSWER for c in resp.choices)
    assert resp.usage.completion_tokens == 2 * len(assistant_turn(analysis(REASONING), final(ANSWER)))


def test_malformed_output_is_returned_and_counted(forced_server, forced_client, forcer) -> None:
    def parse_errors() -> float:
        text = httpx.get(forced_server.url + "/metrics").text
        line = next(ln for ln in text.splitlines() if ln.startswith("osserve_harmony_parse_errors_total"))
        return float(line.split()[-1])

    before = parse_errors()
    # A final message, then text where a new message's <|start|> must come.
    garbage = assistant_turn(final("Hello."))[:-1] + [
        END,
        *get_encoding().encode("stray text", allowed_special=set()),
        RETURN,
    ]
    key = forcer.force(garbage)
    resp = forced_client.chat.completions.create(
        model="osserve-tiny-test",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=50,
        user=key,
    )
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].message.content == "Hello.stray text"
    assert parse_errors() == before + 1
