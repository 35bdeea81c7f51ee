"""What a hostile or unlucky client can send: prompts of a million characters, text that is not Unicode, a
library that panics. Each gets OpenAI's error object quickly, and the server keeps streaming to everyone
else meanwhile (docs/RELIABILITY.md has the figures)."""

from __future__ import annotations

import random
import string
import threading
import time

import httpx
import pytest
from live import SERVED_NAME, serve_in_thread, tiny_config

MILLION = 1_000_000


def _random_text(n: int) -> str:
    rng = random.Random(0)
    return "".join(rng.choices(string.ascii_letters + string.digits + string.punctuation + " \n", k=n))


PROMPTS = {
    "one character": "a" * MILLION,
    "emoji": "\U0001f600" * MILLION,
    "random text": _random_text(MILLION),
}
BODIES = {
    "chat/completions": lambda text: {"messages": [{"role": "user", "content": text}], "max_tokens": 4},
    "completions": lambda text: {"prompt": text, "max_tokens": 4},
    "responses": lambda text: {"input": text, "max_output_tokens": 4},
}
PARAMS = {"chat/completions": "messages", "completions": "prompt", "responses": "input"}


@pytest.mark.parametrize("kind", PROMPTS)
@pytest.mark.parametrize("endpoint", BODIES)
def test_million_character_prompts_are_a_fast_400(server, endpoint: str, kind: str) -> None:  # noqa: ANN001
    """openai-harmony panicked on these (a plain-text 500) or took minutes; now the prompt is counted only
    up to the context length, on a worker thread."""
    t0 = time.monotonic()
    r = httpx.post(
        f"{server.base_url}/{endpoint}",
        json={"model": SERVED_NAME, **BODIES[endpoint](PROMPTS[kind])},
        timeout=60,
    )
    elapsed = time.monotonic() - t0
    assert r.status_code == 400, r.text[:500]
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == PARAMS[endpoint], err
    assert "max_seq_len (1024)" in err["message"], err
    assert elapsed < 2.0, f"{endpoint} {kind}: {elapsed:.2f} s"


def _stream_gaps(url: str, ready: threading.Event, gaps: list[float], stop: threading.Event) -> None:
    body = {"model": SERVED_NAME, "prompt": "tick", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/completions", json=body, timeout=120) as r:
        last = None
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            now = time.monotonic()
            if last is not None:
                gaps.append(now - last)
            last = now
            if len(gaps) == 5:
                ready.set()
            if stop.is_set():
                return


def test_a_stream_keeps_flowing_while_huge_prompts_are_handled(server) -> None:  # noqa: ANN001
    """Prompt work runs off the event loop: before, rendering 200,000 characters of one letter held the
    loop (and every stream) for about 10 s."""
    ready, stop = threading.Event(), threading.Event()
    gaps: list[float] = []
    streamer = threading.Thread(target=_stream_gaps, args=(server.base_url, ready, gaps, stop))
    streamer.start()
    try:
        assert ready.wait(60), "the stream did not start"
        start = len(gaps)
        for text in ("a" * 200_000, *PROMPTS.values()):
            for endpoint in BODIES:
                r = httpx.post(
                    f"{server.base_url}/{endpoint}",
                    json={"model": SERVED_NAME, **BODIES[endpoint](text)},
                    timeout=60,
                )
                assert r.status_code == 400, r.text[:300]
        during = gaps[start:]
    finally:
        stop.set()
        streamer.join(timeout=120)
    assert during, "no token arrived while the prompts were handled"
    # NOTE: the bound is loose for a shared CI machine; docs/RELIABILITY.md records the measured figure.
    assert max(during) < 1.0, f"largest gap between tokens {max(during):.3f} s"


@pytest.mark.parametrize(
    ("endpoint", "body", "param"),
    [
        ("chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
        ("completions", {"prompt": ["ok", "\udfff"]}, "prompt[1]"),
        ("responses", {"input": "x", "instructions": "\ud800"}, "instructions"),
        (
            "chat/completions",
            {
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "function", "function": {"name": "f", "description": "\ud800"}}],
            },
            "tools[0].function.description",
        ),
    ],
)
def test_a_lone_surrogate_is_a_clear_400(server, endpoint: str, body: dict, param: str) -> None:  # noqa: ANN001
    # httpx would refuse to encode the surrogate: the JSON is written with \u escapes by hand.
    import json

    r = httpx.post(
        f"{server.base_url}/{endpoint}",
        content=json.dumps({"model": SERVED_NAME, "max_tokens": 2, **body}).encode(),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "lone UTF-16 surrogate" in err["message"], err


def test_a_panic_in_a_native_library_is_an_openai_error(tiny_checkpoint) -> None:  # noqa: ANN001
    """pyo3's PanicException is a BaseException: before, it escaped every handler as a plain-text 500."""
    from osserve.harmony.encoding import get_encoding
    from osserve.server.app import create_app

    def hook(endpoint, request, prompt_ids, params) -> None:  # noqa: ANN001
        # openai-harmony's own encoder on a million-character run: its regex overflows and it panics.
        get_encoding().encode("a" * MILLION, disallowed_special=())

    app = create_app(tiny_config(tiny_checkpoint), request_hook=hook)
    with serve_in_thread(app) as url:
        for stream in (False, True):
            body = {"model": SERVED_NAME, "prompt": "hi", "max_tokens": 2, "stream": stream}
            r = httpx.post(url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 500 and r.headers["content-type"] == "application/json", r.text
            err = r.json()["error"]
            assert err["code"] == "internal_error" and "PanicException" in err["message"], err
        assert httpx.get(url + "/health").status_code == 200


def test_openapi_schema_refuses_what_the_server_refuses_and_lists_event_streams(server) -> None:  # noqa: ANN001
    schema = httpx.get(server.url + "/openapi.json").json()
    defs = schema["components"]["schemas"]
    chat = defs["ChatCompletionRequest"]
    assert chat["then"]["properties"]["logprobs"] == {"const": True}, "top_logprobs needs logprobs"
    forms = defs["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert all(f.get("minLength") == 1 or f.get("minItems") == 1 for f in forms), forms
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
        content = schema["paths"][path]["post"]["responses"]["200"]["content"]
        assert "text/event-stream" in content, path
    # And the server agrees with the schema.
    r = httpx.post(server.base_url + "/completions", json={"prompt": "", "max_tokens": 1}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_a_million_token_ids_validate_without_holding_the_loop() -> None:
    """Request bodies are validated on the event loop: a list of token ids must not cost a Python call per
    id (0.5 s for a million before), and integral floats (3.0) still count as ids."""
    from osserve.server.protocol import CompletionRequest

    ids = list(range(1000, 1000 + MILLION))
    t0 = time.perf_counter()
    assert CompletionRequest.model_validate({"prompt": ids}).prompt == ids
    assert time.perf_counter() - t0 < 0.3  # about 0.04 s on a 2-core machine
    assert CompletionRequest.model_validate({"prompt": [[3.0, 4], [5]]}).prompt == [[3, 4], [5]]
