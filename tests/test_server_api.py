"""The API as a client sees it, against `osserve serve` in a subprocess (random weights: shapes and counts,
not meaning)."""

from __future__ import annotations

import json

import httpx
from live import SERVED_NAME

from osserve.harmony import get_tokenizer


def test_models(client, server) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [SERVED_NAME]
    assert models.data[0].owned_by == "osserve"
    assert client.models.retrieve(SERVED_NAME).id == SERVED_NAME
    assert models.data[0].model_extra["max_model_len"] == 1024


def test_health(server) -> None:
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ready" and body["model"] == SERVED_NAME
    assert {"num_running", "num_waiting", "kv_cache"} <= set(body["engine"])


def test_chat_completion(client) -> None:
    resp = client.chat.completions.create(
        model=SERVED_NAME,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=6,
        temperature=0.0,
        seed=1,
    )
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-") and resp.model == SERVED_NAME
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    u = resp.usage
    assert 0 < u.completion_tokens <= 6 and u.prompt_tokens > 10
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.completion_tokens_details.reasoning_tokens <= u.completion_tokens


def test_chat_greedy_is_deterministic_and_streaming_matches(client) -> None:
    kwargs = dict(
        model=SERVED_NAME, messages=[{"role": "user", "content": "Count"}], max_tokens=8, temperature=0.0
    )
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert a.choices[0].message == b.choices[0].message
    chunks = list(
        client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == a.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == (a.choices[0].message.content or "")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == a.choices[0].finish_reason


def test_chat_stream_ends_with_done(server) -> None:
    body = {
        "model": SERVED_NAME,
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 3,
        "stream": True,
    }
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert "usage" not in chunks[0]  # only with stream_options.include_usage


def test_chat_sampling_options_accepted(client) -> None:
    resp = client.chat.completions.create(
        model=SERVED_NAME,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_completion_tokens=4,
        temperature=0.7,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        seed=7,
        n=2,
        stop=["\n\n"],
        logprobs=True,
        top_logprobs=3,
        extra_body={
            "top_k": 20,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "min_tokens": 1,
            "ignore_eos": True,
        },
    )
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.usage.completion_tokens == 8  # min_tokens / ignore_eos: both run to max_completion_tokens


def test_chat_seed_reproducible(client) -> None:
    kwargs = dict(
        model=SERVED_NAME,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=6,
        seed=1234,
        temperature=1.0,
    )
    assert (
        client.chat.completions.create(**kwargs).choices[0].message
        == client.chat.completions.create(**kwargs).choices[0].message
    )


def test_completions(client) -> None:
    resp = client.completions.create(
        model=SERVED_NAME,
        prompt="The capital of France is",
        max_tokens=5,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 5 and resp.usage.prompt_tokens == 5
    stream = list(
        client.completions.create(
            model=SERVED_NAME,
            prompt="The capital of France is",
            max_tokens=5,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == resp.choices[0].text
    assert stream[-1].usage.completion_tokens == 5


def test_completions_batch_echo_logprobs(client) -> None:
    hello_world = get_tokenizer().encode("Hello world")
    resp = client.completions.create(
        model=SERVED_NAME,
        prompt=[[13225], hello_world],
        max_tokens=3,
        n=2,
        echo=True,
        logprobs=2,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in resp.choices) == [0, 1, 2, 3]
    by_index = {c.index: c for c in resp.choices}
    assert get_tokenizer().decode([13225]) == "Hello"
    assert by_index[0].text.startswith("Hello") and by_index[2].text.startswith("Hello world")
    lp = by_index[1].logprobs
    assert len(lp.tokens) == 3 and len(lp.token_logprobs) == 3 and all(len(t) <= 2 for t in lp.top_logprobs)
    assert resp.usage.completion_tokens == 12 and resp.usage.prompt_tokens == 1 + len(hello_world)


def test_completions_stop_string(client) -> None:
    first = (
        client.completions.create(
            model=SERVED_NAME, prompt="a b c", max_tokens=8, temperature=0.0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = first[2:5] if len(first) >= 5 and first[2:5].strip() else None
    if stop is None:
        return  # the random model's text has no usable stop string here
    cut = client.completions.create(
        model=SERVED_NAME,
        prompt="a b c",
        max_tokens=8,
        temperature=0.0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    ).choices[0]
    assert cut.finish_reason == "stop" and cut.text == first[: first.index(stop)]


def test_responses(client) -> None:
    resp = client.responses.create(
        model=SERVED_NAME, input="Hello", max_output_tokens=6, instructions="Be brief."
    )
    assert resp.object == "response" and resp.id.startswith("resp_")
    assert resp.status in ("completed", "incomplete")
    if resp.status == "incomplete":
        assert resp.incomplete_details.reason == "max_output_tokens"
    u = resp.usage
    assert 0 < u.output_tokens <= 6 and u.total_tokens == u.input_tokens + u.output_tokens
    events = list(client.responses.create(model=SERVED_NAME, input="Hello", max_output_tokens=6, stream=True))
    assert events[0].type == "response.created" and events[-1].type in (
        "response.completed",
        "response.incomplete",
    )
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.usage.output_tokens <= 6


def test_prefix_cache_reported_in_usage(client) -> None:
    messages = [{"role": "user", "content": "A long shared prefix " * 20}]
    client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=2)
    again = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=2)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16


def test_metrics(server, client) -> None:
    client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )
    text = httpx.get(server.url + "/metrics").text
    for name in (
        'osserve_requests_total{endpoint="/v1/chat/completions",status="200"}',
        "osserve_prompt_tokens_total",
        "osserve_generation_tokens_total",
        "osserve_reasoning_tokens_total",
        "osserve_time_to_first_token_seconds_bucket",
        "osserve_time_per_output_token_seconds_bucket",
        "osserve_e2e_request_latency_seconds_bucket",
        "osserve_num_requests_running",
        "osserve_num_requests_waiting",
        "osserve_kv_blocks_in_use",
        "osserve_prefix_cache_hit_rate",
        "osserve_harmony_parse_errors_total",
    ):
        assert name in text, name
    gen = next(ln for ln in text.splitlines() if ln.startswith("osserve_generation_tokens_total"))
    assert float(gen.split()[-1]) >= 3

    def value(name: str) -> float:
        return float(next(ln for ln in text.splitlines() if ln.startswith(name + " ")).split()[-1])

    assert value("osserve_engine_generated_tokens") >= 3
    assert value("osserve_engine_step_seconds") > 0.0 and value("osserve_engine_device_wait_seconds") >= 0.0
