"""`bench serve` against a scripted OpenAI-style server: SSE timing, usage, and every kind of failure."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from osserve.bench.load_generator import ServeConfig, arrival_offsets, run_sweep

ROOT = Path(__file__).resolve().parents[1]
TOKEN_GAP_S = 0.002


def sse(obj: object, event: str | None = None) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj)
    return (f"event: {event}\n" if event else "") + f"data: {data}\n\n"


async def chat_or_completions(request: Request):
    body = await request.json()
    mode = body.get("model") or "ok"
    chat = request.url.path.endswith("chat/completions")
    n = body.get("max_completion_tokens") or body.get("max_tokens") or 16
    messages = body.get("messages") or []
    if any(m["role"] == "assistant" and m["content"] != "tok " * n for m in messages):
        return JSONResponse({"error": {"message": "history lost the replies"}}, status_code=400)
    if mode == "http500" or (mode == "flaky" and len(messages) == 5):
        return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
    if mode == "http400":
        return JSONResponse(
            {"error": {"message": "max_tokens is too large", "type": "invalid_request_error"}},
            status_code=400,
        )
    per_chunk = 3 if mode == "multi" else 1

    async def gen():
        if chat:
            yield sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        sent = 0
        while sent < n:
            await asyncio.sleep(TOKEN_GAP_S)
            k = min(per_chunk, n - sent)
            text = "tok " * k
            if mode == "drop" and sent >= n // 2:
                raise RuntimeError("server dies mid-stream")
            if mode == "error-event" and sent >= 2:
                yield sse({"error": {"message": "the engine has stopped", "type": "server_error"}})
                yield sse("[DONE]")
                return
            choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            yield sse({"choices": [choice]})
            sent += k
        if mode == "slow":
            await asyncio.sleep(5)
        end = (
            {"index": 0, "delta": {}, "finish_reason": "length"}
            if chat
            else {"index": 0, "text": "", "finish_reason": "length"}
        )
        yield sse({"choices": [end]})
        if mode != "no-usage":
            yield sse(
                {
                    "choices": [],
                    "usage": {"prompt_tokens": 11, "completion_tokens": n, "total_tokens": n + 11},
                }
            )
        yield sse("[DONE]")

    return StreamingResponse(gen(), media_type="text/event-stream")


async def responses(request: Request):
    body = await request.json()
    n = body["max_output_tokens"]

    async def gen():
        yield sse({"type": "response.created", "response": {"status": "in_progress"}}, "response.created")
        for i in range(n):
            await asyncio.sleep(TOKEN_GAP_S)
            kind = "response.reasoning_text.delta" if i == 0 else "response.output_text.delta"
            yield sse({"type": kind, "delta": "x "}, kind)
        done = {
            "type": "response.incomplete",
            "response": {"status": "incomplete", "usage": {"input_tokens": 9, "output_tokens": n}},
        }
        yield sse(done, "response.incomplete")

    return StreamingResponse(gen(), media_type="text/event-stream")


async def models(request: Request):
    return JSONResponse({"object": "list", "data": [{"id": "ok", "object": "model"}]})


async def health(request: Request):
    return JSONResponse({"status": "ok"})


APP = Starlette(
    routes=[
        Route("/v1/chat/completions", chat_or_completions, methods=["POST"]),
        Route("/v1/completions", chat_or_completions, methods=["POST"]),
        Route("/v1/responses", responses, methods=["POST"]),
        Route("/v1/models", models),
        Route("/health", health),
    ]
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fake_url():
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(APP, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "the scripted server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def bench(url: str, tmp_path: Path, **kw) -> tuple[int, list[dict]]:
    opts = {"input_len": 8, "output_len": 6, "num_prompts": 4, **kw}
    cfg = ServeConfig(base_url=url, save_result=True, result_dir=str(tmp_path), disable_tqdm=True, **opts)
    rc = run_sweep(cfg)
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json"))]
    return rc, results


@pytest.mark.parametrize("endpoint", ["chat", "completions", "/v1/responses"])
def test_streams_are_timed_and_counted_from_usage(fake_url, tmp_path, endpoint):
    rc, [result] = bench(fake_url, tmp_path, endpoint=endpoint, model="ok", max_concurrency=(2,))
    assert rc == 0
    assert result["server"]["models"]["body"]["data"][0]["id"] == "ok"
    assert result["server"]["health"] == {"status": 200, "body": {"status": "ok"}}
    for r in result["requests"]:
        assert r["success"], r["error"]
        assert r["output_tokens"] == 6 and r["output_tokens_source"] == "usage"
        assert r["prompt_tokens"] == (9 if "responses" in endpoint else 11)
        # one output-carrying event per token: the role chunk and the finish chunk are not output
        assert len(r["itl"]) == 5
        assert 0 < r["ttft"] <= r["e2el"]
        assert r["ttft"] + sum(r["itl"]) <= r["e2el"] + 1e-9


def test_multi_token_chunks_give_one_itl_each(fake_url, tmp_path):
    rc, [result] = bench(fake_url, tmp_path, model="multi", output_len=7)
    assert rc == 0
    for r in result["requests"]:
        assert r["output_tokens"] == 7 and len(r["itl"]) == 2  # chunks of 3, 3, 1 tokens
    s = result["summary"]
    tpots = [(r["e2el"] - r["ttft"]) / 6 for r in result["requests"]]
    assert s["mean_tpot_ms"] == pytest.approx(1000 * sum(tpots) / len(tpots))


def test_no_usage_falls_back_to_counting_the_text(fake_url, tmp_path):
    rc, [result] = bench(fake_url, tmp_path, model="no-usage")
    assert rc == 0
    for r in result["requests"]:
        assert r["output_tokens_source"] == "tokenizer" and r["output_tokens"] == 7  # "tok " x 6 -> 7 tokens
        assert r["prompt_tokens"] is None
    assert result["summary"]["total_input_tokens"] == sum(r["prompt_len"] for r in result["requests"])


@pytest.mark.parametrize(
    ("mode", "expect"),
    [
        ("http500", "HTTP 500: boom"),
        ("http400", "HTTP 400: max_tokens is too large"),
        ("drop", "stream dropped"),
        ("error-event", "error event in stream: the engine has stopped"),
    ],
)
def test_failures_are_counted_and_exit_nonzero_when_all_fail(fake_url, tmp_path, mode, expect, capsys):
    rc, [result] = bench(fake_url, tmp_path, model=mode)
    assert rc == 1
    s = result["summary"]
    assert s["completed"] == 0 and s["failed"] == 4
    assert all(expect in r["error"] and not r["success"] for r in result["requests"])
    assert s["mean_ttft_ms"] is None and s["output_throughput"] == 0
    err = capsys.readouterr().err
    assert "all 4 requests failed" in err and expect in err


def test_timeout_is_a_failure(fake_url, tmp_path):
    rc, [result] = bench(fake_url, tmp_path, model="slow", request_timeout=0.5, num_prompts=2)
    assert rc == 1
    assert all(r["error"].startswith("timeout") for r in result["requests"])


def test_multi_turn_sends_history_and_skips_turns_after_a_failure(fake_url, tmp_path):
    # The server checks that every earlier reply comes back in the history, and "flaky" fails the third turn.
    rc, [result] = bench(
        fake_url,
        tmp_path,
        model="flaky",
        dataset_name="multi-turn",
        num_turns=4,
        num_prompts=3,
        max_concurrency=(2,),
    )
    assert rc == 0
    reqs = result["requests"]
    assert len(reqs) == 12
    for k in range(3):
        turns = sorted((r for r in reqs if r["session"] == k), key=lambda r: r["turn"])
        assert [r["success"] for r in turns] == [True, True, False, False]
        assert turns[2]["error"] == "HTTP 500: boom"
        assert turns[3]["error"] == "not sent: turn 2 of this session failed"
        assert turns[1]["start_time"] >= turns[0]["start_time"] + turns[0]["e2el"]  # one turn after another
    assert result["summary"]["completed"] == 6 and result["summary"]["failed"] == 6
    assert result["summary"]["errors"] == {"HTTP 500: boom": 3, "not sent: turn 2 of this session failed": 3}


def test_concurrency_cap_is_respected(fake_url, tmp_path):
    rc, [result] = bench(fake_url, tmp_path, model="ok", num_prompts=9, max_concurrency=(2,))
    assert rc == 0
    spans = [(r["start_time"], r["start_time"] + r["e2el"]) for r in result["requests"]]
    for t, _ in spans:
        assert sum(1 for a, b in spans if a <= t < b) <= 2


def test_request_rate_spaces_the_arrivals(fake_url, tmp_path):
    rc, [result] = bench(
        fake_url, tmp_path, model="ok", num_prompts=6, request_rate=20.0, burstiness=float("inf")
    )
    assert rc == 0
    starts = sorted(r["start_time"] for r in result["requests"])
    # evenly spaced at 1 / 20 req/s: request k is never sent before k / 20 s (a busy machine may send it later)
    assert all(t >= k / 20 - 1e-3 for k, t in enumerate(starts)), starts
    assert result["summary"]["duration_s"] >= 5 / 20


def test_arrival_gaps_follow_the_gamma_law():
    import numpy as np

    for burstiness in (0.5, 1.0, 4.0):
        t = arrival_offsets(20001, 10.0, burstiness, np.random.default_rng(0))
        gaps = np.diff(t)
        assert t[0] == 0.0
        assert gaps.mean() == pytest.approx(0.1, rel=0.03)
        # the coefficient of variation of Gamma(k) is 1/sqrt(k): 1 for Poisson
        assert gaps.std() / gaps.mean() == pytest.approx(1 / burstiness**0.5, rel=0.05)
    assert arrival_offsets(3, float("inf"), 1.0, np.random.default_rng(0)) == [0.0, 0.0, 0.0]


def test_stopped_server_cli_reports_and_exits_nonzero(tmp_path):
    port = free_port()  # nothing listens here
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "osserve.bench.commands",
            "serve",
            "--base-url",
            f"http://127.0.0.1:{port}",
            "--model",
            "m",
            "--num-prompts",
            "3",
            "--random-input-len",
            "4",
            "--random-output-len",
            "2",
            "--max-concurrency",
            "1,2",
            "--save-result",
            "--result-dir",
            str(tmp_path),
            "--disable-tqdm",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Failed requests:" in proc.stdout
    assert "all 3 requests failed at max concurrency 1" in proc.stderr
    assert "connection failed" in proc.stderr
    assert len(list(tmp_path.glob("*.json"))) == 2


@pytest.mark.slow  # one of the longest: pytest -m "not slow" stays under 3 minutes
def test_bad_flags_are_clear_errors(tmp_path):
    def run(*flags):
        return subprocess.run(
            [sys.executable, "-m", "osserve.bench.commands", "serve", *flags],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    p = run("--endpoint", "embeddings")
    assert p.returncode == 2 and "--endpoint must be one of chat, completions, responses" in p.stderr
    p = run("--goodput", "ttft=5")
    assert p.returncode == 2 and "--goodput takes NAME:MS" in p.stderr
    p = run("--max-concurrency", "0,4")
    assert p.returncode == 2 and "at least 1" in p.stderr
    p = run("--dataset-name", "multi-turn", "--endpoint", "completions")
    assert p.returncode == 2 and "use --endpoint chat or responses" in p.stderr


def test_jsonl_workload_over_chat_and_its_completions_limit(fake_url, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "\n".join(
            json.dumps(x)
            for x in [
                {"prompt": "Write a haiku."},
                {
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hi"},
                    ],
                    "output_len": 3,
                },
                {"turns": ["One?", "Two?"]},
            ]
        )
    )
    out = tmp_path / "out"
    rc, [result] = bench(
        fake_url, out, model="ok", dataset_name="jsonl", dataset_path=str(data), num_prompts=3, shuffle=False
    )
    assert rc == 0
    reqs = sorted(result["requests"], key=lambda r: (r["session"], r["turn"]))
    assert [(r["session"], r["turn"], r["output_tokens"]) for r in reqs] == [
        (0, 0, 6),
        (1, 0, 3),
        (2, 0, 6),
        (2, 1, 6),
    ]
    with pytest.raises(ValueError, match="need --endpoint chat or responses"):
        run_sweep(
            ServeConfig(
                base_url=fake_url,
                endpoint="completions",
                dataset_name="jsonl",
                dataset_path=str(data),
                num_prompts=3,
                disable_tqdm=True,
            )
        )


def test_sse_lines_split_only_at_cr_and_lf():
    """Model text may hold U+2028 / U+0085 raw inside a JSON string; SSE lines end only at CR/LF/CRLF."""
    import asyncio
    import json

    import httpx

    from osserve.bench.endpoints import _events

    payload = json.dumps({"text": "a\u2028b\x85c"}, ensure_ascii=False)
    body = f"data: {payload}\r\n\r\n: ping\n\ndata: [DONE]\n\n".encode()

    class Chunks(httpx.AsyncByteStream):
        async def __aiter__(self):
            for i in range(0, len(body), 3):  # boundaries fall inside characters and inside CRLF
                yield body[i : i + 3]

    async def collect():
        return [e async for e in _events(httpx.Response(200, stream=Chunks()))]

    events = asyncio.run(collect())
    assert events == [(None, payload), (None, "[DONE]")]
    assert json.loads(events[0][1])["text"] == "a\u2028b\x85c"
