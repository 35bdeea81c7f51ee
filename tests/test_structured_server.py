"""Structured outputs through the openai client, against `osserve serve` on the tiny random checkpoint with
the engine in its own process (the constraint crosses the process boundary in SamplingParams).

A random-weight model's unconstrained output is noise; under the grammar every answer must still parse
and validate against its schema (jsonschema), streamed or not, with the reasoning free text beside it, and
every forced tool call must go to an allowed function with valid arguments. The schemas are bounded
(strings with maxLength / pattern / format, arrays with maxItems, numbers with ranges) so that a model
that never chooses to stop still finishes within max_tokens; the grammar closes the reasoning when only
the answer's reserve is left."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from live import ENGINE_FLAGS, SERVED_NAME, start_cli_server, stop_cli_server
from structured_cases import CHAT_TOOLS, PARAMS, SCHEMAS, TOOLS, obj, validate

# A live server per module: in the full run, out of pytest -m "not slow" (kept under 3 minutes).
pytestmark = pytest.mark.slow

MAX_TOKENS = 120  # the reasoning gets 60 tokens, the answer 60 (osserve.structured.answer_reserve)
USER = [{"role": "user", "content": "Answer with JSON."}]


@pytest.fixture(scope="module")
def structured_server(tiny_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "structured.log"
    flags = [f for f in ENGINE_FLAGS]
    flags[flags.index("--kv-cache-config.max-blocks") + 1] = "4096"
    live = start_cli_server(
        [
            "--model",
            str(tiny_checkpoint),
            "--served-model-name",
            SERVED_NAME,
            *flags,
            "--engine-process",
            "true",
        ],
        log,
        env={"OMP_NUM_THREADS": "1"},  # a tiny model on 2 busy cores: threads only contend
    )
    yield live
    stop_cli_server(live)


@pytest.fixture(scope="module")
def oai(structured_server):
    import openai

    return openai.OpenAI(base_url=structured_server.base_url, api_key="unused", max_retries=0, timeout=600)


def chat(client, stream, **body):
    """One chat completion -> [(finish_reason, content, reasoning, [(name, arguments)])] per choice.
    Greedy unless asked: on a CPU, sampling noise over a 201k vocabulary costs more than the tiny model."""
    body = {"model": SERVED_NAME, "messages": USER, "max_tokens": MAX_TOKENS, "temperature": 0, **body}
    if not stream:
        r = client.chat.completions.create(**body)
        return [
            (
                c.finish_reason,
                c.message.content,
                c.message.model_extra.get("reasoning_content"),
                [(t.function.name, t.function.arguments) for t in c.message.tool_calls or []],
            )
            for c in r.choices
        ]
    choices: dict[int, dict] = {}
    for chunk in client.chat.completions.create(stream=True, **body):
        for c in chunk.choices:
            s = choices.setdefault(c.index, {"content": "", "reasoning": "", "calls": {}, "finish": None})
            s["content"] += c.delta.content or ""
            s["reasoning"] += (c.delta.model_extra or {}).get("reasoning_content") or ""
            for t in c.delta.tool_calls or []:
                call = s["calls"].setdefault(t.index, ["", ""])
                call[0] += t.function.name or ""
                call[1] += t.function.arguments or ""
            s["finish"] = c.finish_reason or s["finish"]
    return [
        (s["finish"], s["content"], s["reasoning"], [tuple(v) for v in s["calls"].values()])
        for _, s in sorted(choices.items())
    ]


def check_answer(result, schema):
    finish, content, reasoning, calls = result
    assert finish == "stop" and not calls, result
    validate(json.loads(content), schema)
    assert reasoning, "the analysis channel is there"
    with pytest.raises(ValueError):
        json.loads(reasoning)  # free text, not the schema's JSON


def check_call(result, allowed):
    finish, content, reasoning, calls = result
    assert finish == "tool_calls" and not content and reasoning, result
    assert len(calls) == 1 and calls[0][0] in allowed, calls
    validate(json.loads(calls[0][1]), PARAMS[calls[0][0]])


@pytest.mark.slow
def test_json_schemas_tool_calls_and_responses_under_a_random_model(oai):
    """30+ schemas streamed and not, tool_choice required and named, the Responses API's text.format and
    tool_choice: all at once, so the engine batches them."""
    jobs = []
    for schema in SCHEMAS.values():
        fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
        for stream in (False, True):
            jobs.append(("answer", schema, lambda s=stream, f=fmt: chat(oai, s, response_format=f)))
    all_names = [n for n, _ in TOOLS]
    for stream in (False, True):
        jobs.append(
            ("call", all_names, lambda s=stream: chat(oai, s, tools=CHAT_TOOLS, tool_choice="required"))
        )
        for name in all_names:
            choice = {"type": "function", "function": {"name": name}}
            jobs.append(
                ("call", [name], lambda s=stream, c=choice: chat(oai, s, tools=CHAT_TOOLS, tool_choice=c))
            )
    for name in ("tuple", "oneOf objects", "format date"):
        schema = SCHEMAS[name]
        jobs.append(("response", schema, lambda s=schema: responses_answer(oai, s)))
    jobs.append(("response call", ["add"], lambda: responses_call(oai, {"type": "function", "name": "add"})))
    jobs.append(("response call", all_names, lambda: responses_call(oai, "required")))
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [(kind, want, pool.submit(job)) for kind, want, job in jobs]
        for kind, want, future in futures:
            result = future.result()
            if kind == "answer":
                for choice in result:
                    check_answer(choice, want)
            elif kind == "call":
                check_call(result[0], want)
            else:
                check_response(result, kind, want)
    assert len(SCHEMAS) >= 30


def responses_answer(client, schema):
    fmt = {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}
    return client.responses.create(
        model=SERVED_NAME,
        input="Answer with JSON.",
        max_output_tokens=MAX_TOKENS,
        text={"format": fmt},
        temperature=0,
    )


def responses_call(client, tool_choice):
    tools = [{"type": "function", "name": n, **({"parameters": p} if p else {})} for n, p in TOOLS]
    return client.responses.create(
        model=SERVED_NAME,
        input="Use a tool.",
        max_output_tokens=MAX_TOKENS,
        tools=tools,
        tool_choice=tool_choice,
        temperature=0,
    )


def check_response(r, kind, want):
    assert r.status == "completed"
    kinds = [item.type for item in r.output]
    assert kinds[0] == "reasoning"
    if kind == "response":
        assert kinds == ["reasoning", "message"]
        validate(json.loads(r.output_text), want)
        assert r.text.format.type == "json_schema"
    else:
        assert kinds == ["reasoning", "function_call"] and r.output[1].name in want
        validate(json.loads(r.output[1].arguments), PARAMS[r.output[1].name])


def test_samples_of_one_request_each_follow_the_schema(oai):
    schema = SCHEMAS["nested object"]
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    for stream in (False, True):
        choices = chat(oai, stream, response_format=fmt, n=3, temperature=1.0)
        assert len(choices) == 3
        for choice in choices:
            check_answer(choice, schema)


def test_stop_strings_and_length_with_a_schema(oai):
    schema = SCHEMAS["many fields"]
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    for stream in (False, True):
        (finish, content, _, _), *_ = chat(oai, stream, response_format=fmt, stop=['"d"'])
        assert finish == "stop" and '"d"' not in content and content.startswith('{"a":')
    # Too few tokens for the grammar: cut by the length limit, never an error.
    (finish, content, _, _), *_ = chat(oai, False, response_format=fmt, max_tokens=8)
    assert finish == "length" and not content


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "string", "format": "color"}},
                }
            },
            "response_format.json_schema.schema",
            "Unknown format",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
                }
            },
            "response_format.json_schema.schema",
            "uniqueItems",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "json_schema"),
        ({"response_format": {"type": "json_object"}, "min_tokens": 3}, "min_tokens", "min_tokens"),
        ({"tool_choice": "required"}, "tool_choice", "at least one"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": obj({"a": {"type": "string", "pattern": "(?=x)"}}),
                        },
                    }
                ],
                "tool_choice": "required",
            },
            "tools[0].function.parameters",
            "look-around",
        ),
    ],
)
def test_refused_requests_name_the_problem(structured_server, body, param, words):
    r = httpx.post(
        structured_server.base_url + "/chat/completions", json={"messages": USER, **body}, timeout=60
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_responses_refusals_name_text_format(structured_server):
    fmt = {"type": "json_schema", "name": "x", "schema": {"type": "string", "pattern": "(?<=a)"}}
    r = httpx.post(
        structured_server.base_url + "/responses", json={"input": "x", "text": {"format": fmt}}, timeout=60
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "text.format.schema", r.text


def test_json_object_and_the_prompt_section_through_the_forced_server(forced_client, forcer):
    """In-process server whose hook forces openai-harmony-rendered tokens: a json_object answer comes back
    whole (the grammar allows every one of its tokens), and the prompt carries the schema section only
    for json_schema."""
    from openai_harmony import Message, Role

    from osserve.harmony import get_tokenizer
    from osserve.harmony.encoding import RETURN

    tok = get_tokenizer()
    answer = '{"anything": [1, {"nested": null}], "ok": true}'
    msgs = [
        Message.from_role_and_content(Role.ASSISTANT, "Thinking.").with_channel("analysis"),
        Message.from_role_and_content(Role.ASSISTANT, answer).with_channel("final"),
    ]
    ids = [t for m in msgs for t in tok.encoding.render(m)][2:]
    ids[-1] = RETURN
    key = forcer.force(ids)
    r = forced_client.chat.completions.create(
        model=SERVED_NAME, messages=USER, user=key, response_format={"type": "json_object"}, max_tokens=100
    )
    assert r.choices[0].message.content == answer and r.choices[0].finish_reason == "stop"
    assert "# Response Formats" not in tok.decode(forcer.prompts[key])
    key = forcer.force(ids)
    fmt = {"type": "json_schema", "json_schema": {"name": "shape", "schema": {"type": "object"}}}
    r = forced_client.chat.completions.create(
        model=SERVED_NAME, messages=USER, user=key, response_format=fmt, max_tokens=100
    )
    assert r.choices[0].message.content == answer
    assert '# Response Formats\n\n## shape\n\n{"type":"object"}' in tok.decode(forcer.prompts[key])
