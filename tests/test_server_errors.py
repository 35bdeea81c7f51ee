"""Every error in OpenAI's shape, with the right status, param and code; never a 5xx for bad input."""

from __future__ import annotations

import httpx
import openai
import pytest
from live import SERVED_NAME

CHAT = "/chat/completions"
USER = [{"role": "user", "content": "hi"}]


def post(server, path: str, **kwargs) -> httpx.Response:  # noqa: ANN001
    return httpx.post(server.base_url + path, timeout=60, **kwargs)


def assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def test_malformed_json(server) -> None:
    r = post(server, CHAT, content=b'{"messages": [', headers={"content-type": "application/json"})
    err = assert_error(r, 400)
    assert "JSON" in err["message"]


@pytest.mark.parametrize("body", [b"[]", b'"text"', b"3", b"null"])
def test_non_object_body(server, body: bytes) -> None:
    r = post(server, CHAT, content=body, headers={"content-type": "application/json"})
    assert_error(r, 400)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": "hi"}, "messages"),
        ({"messages": USER, "max_tokens": "5"}, "max_tokens"),
        ({"messages": USER, "temperature": "hot"}, "temperature"),
        ({"messages": USER, "temperature": 7}, "temperature"),
        ({"messages": USER, "n": 0}, "n"),
        ({"messages": USER, "stream": "yes"}, "stream"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": []}, "messages"),
        ({}, "messages"),
        ({"messages": USER, "top_logprobs": 3}, "top_logprobs"),
        ({"messages": USER, "reasoning_effort": "extreme"}, "reasoning_effort"),
        (
            {"messages": USER, "chat_template_args": {"reasoning_effort": "max"}},
            "chat_template_args.reasoning_effort",
        ),
        ({"messages": USER, "stop": [""]}, "stop[0]"),
        ({"messages": USER, "max_tokens": 4, "min_tokens": 9}, "min_tokens"),
        ({"messages": USER, "tool_choice": "sometimes"}, "tool_choice"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": USER, "response_format": {"type": "xml"}}, "response_format.type"),
    ],
)
def test_chat_bad_fields(server, body: dict, param: str) -> None:
    assert_error(post(server, CHAT, json=body), 400, param)


@pytest.mark.parametrize(
    ("tools", "param"),
    [
        ([{"type": "function", "function": {"name": "bad name!"}}], "tools[0].function.name"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
            "tools[0].function.parameters",
        ),
        ([{"type": "code_interpreter"}], "tools[0].type"),
        (
            [
                {"type": "function", "function": {"name": "f"}},
                {"type": "function", "function": {"name": "f"}},
            ],
            "tools[1].function.name",
        ),
    ],
)
def test_invalid_tool_schema(server, tools: list, param: str) -> None:
    assert_error(post(server, CHAT, json={"messages": USER, "tools": tools}), 400, param)


def test_unknown_model(server, client) -> None:
    for path, body in (
        (CHAT, {"messages": USER}),
        ("/completions", {"prompt": "x"}),
        ("/responses", {"input": "x"}),
    ):
        assert_error(post(server, path, json={"model": "gpt-9", **body}), 404, "model", "model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


def test_context_length_exceeded(server, client) -> None:
    err = assert_error(
        post(server, CHAT, json={"messages": USER, "max_tokens": 2000}),
        400,
        "messages",
        "context_length_exceeded",
    )
    assert "1024" in err["message"]
    assert_error(
        post(server, "/completions", json={"prompt": "hello " * 1100, "max_tokens": 1}),
        400,
        "prompt",
        "context_length_exceeded",
    )
    assert_error(
        post(server, "/responses", json={"input": "x", "max_output_tokens": 5000}),
        400,
        "input",
        "context_length_exceeded",
    )
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=SERVED_NAME, messages=USER, max_tokens=5000)
    assert e.value.code == "context_length_exceeded"


def test_completions_errors(server) -> None:
    assert_error(post(server, "/completions", json={"prompt": [], "max_tokens": 1}), 400, "prompt")
    assert_error(post(server, "/completions", json={"prompt": [10**9], "max_tokens": 1}), 400, "prompt")
    assert_error(post(server, "/completions", json={"prompt": "", "max_tokens": 1}), 400, "prompt")
    assert_error(post(server, "/completions", json={"prompt": "x", "suffix": "y"}), 400, "suffix")
    assert_error(post(server, "/completions", json={"prompt": "x", "logprobs": 50}), 400, "logprobs")
    assert_error(post(server, "/completions", json={"prompt": 5}), 400, "prompt")


def test_responses_errors(server) -> None:
    assert_error(post(server, "/responses", json={"input": []}), 400, "input")
    assert_error(post(server, "/responses", json={"input": [{"type": "bogus"}]}), 400, "input[0].type")
    assert_error(
        post(server, "/responses", json={"input": "x", "previous_response_id": "resp_1"}),
        400,
        "previous_response_id",
    )
    assert_error(
        post(server, "/responses", json={"input": "x", "reasoning": {"effort": "max"}}),
        400,
        "reasoning.effort",
    )
    assert_error(
        post(server, "/responses", json={"input": "x", "tools": [{"type": "function", "name": "a b"}]}),
        400,
        "tools[0].name",
    )


def test_unknown_route_and_method(server) -> None:
    assert_error(httpx.get(server.url + "/v1/nothing"), 404, None, "not_found")
    assert_error(httpx.get(server.base_url + CHAT), 405, None, "method_not_allowed")


def test_openai_client_raises_typed_errors(client) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=SERVED_NAME, messages=[{"role": "user", "content": "x"}], n=0)
    assert e.value.param == "n"
