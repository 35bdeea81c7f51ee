"""The server process's life: a graceful drain on SIGTERM (every stream ends with its output or with an error
event and [DONE]; new requests get 503 meanwhile), and a non-zero exit when the model cannot load."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from live import ENGINE_FLAGS, ROOT, SERVED_NAME, start_cli_server, stop_cli_server

GRACE_S = 6.0
NUM_STREAMS = 20


async def _read_stream(client: httpx.AsyncClient, url: str, max_tokens: int, started: asyncio.Event) -> list:
    body = {
        "model": SERVED_NAME,
        "messages": [{"role": "user", "content": "count"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    events: list = []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
                started.set()
    return events


@pytest.mark.slow
def test_sigterm_drains_then_ends_what_is_left(tiny_checkpoint, tmp_path) -> None:  # noqa: ANN001
    """Before: a hard-coded 5 s grace, after which streams were cut (incomplete chunked read, no [DONE])."""
    live = start_cli_server(
        [
            "--model",
            str(tiny_checkpoint),
            "--served-model-name",
            SERVED_NAME,
            *ENGINE_FLAGS,
            "--kv-cache-config.max-blocks",
            "1500",
            "--shutdown-timeout",
            str(GRACE_S),
        ],
        tmp_path / "server.log",
        # One OpenMP thread: on a busy machine, spinning OpenMP threads make CPU steps take seconds.
        env={"OMP_NUM_THREADS": "1"},
    )
    url = live.url
    try:

        async def scenario() -> tuple[list[list], float, float]:
            limits = httpx.Limits(max_connections=NUM_STREAMS + 4)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                started = [asyncio.Event() for _ in range(NUM_STREAMS)]
                # Half finish within the grace period, half cannot.
                lengths = [3 if i % 2 else 900 for i in range(NUM_STREAMS)]
                tasks = [
                    asyncio.ensure_future(_read_stream(client, url, n, s))
                    for n, s in zip(lengths, started, strict=True)
                ]
                await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 60)
                signalled = time.monotonic()
                live.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
                health = await client.get(url + "/health")
                assert health.status_code == 503 and health.json()["status"] == "draining", health.text
                refused = await client.post(
                    url + "/v1/completions", json={"model": SERVED_NAME, "prompt": "x", "max_tokens": 1}
                )
                assert refused.status_code == 503 and refused.headers["retry-after"], refused.text
                assert refused.json()["error"]["code"] == "server_draining"
                streams = await asyncio.gather(*tasks)
                return streams, signalled, time.monotonic()

        streams, signalled, ended = asyncio.run(scenario())
        code = live.proc.wait(timeout=GRACE_S + 10)
        exited = time.monotonic()
        assert code == 0, live.log()
        assert exited - signalled < GRACE_S + 2, f"exit {exited - signalled:.2f} s after SIGTERM"
        assert GRACE_S - 0.5 < ended - signalled < GRACE_S + 2
        finished = cut = 0
        for events in streams:
            assert events[-1] == "[DONE]", events[-3:]
            last = events[-2]
            if "error" in last:
                assert last["error"]["code"] == "server_shutdown", last
                cut += 1
            else:
                assert any(c.get("finish_reason") for e in events[:-1] for c in e.get("choices", [])), events
                finished += 1
        assert finished == cut == NUM_STREAMS // 2, (finished, cut)
    finally:
        stop_cli_server(live)


@pytest.mark.slow  # one of the longest: pytest -m "not slow" stays under 3 minutes
@pytest.mark.parametrize("model", ["/nonexistent/checkpoint", "openai/gpt-oss-20b"])
def test_a_model_that_cannot_load_exits_non_zero(model: str, tmp_path) -> None:  # noqa: ANN001
    """Before: a traceback, then /health 503 "dead" forever. (conftest sets HF_HUB_OFFLINE=1.)"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "osserve", "serve", "--model", model, "--port", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert elapsed < 10, f"{elapsed:.1f} s"
    errors = [line for line in out.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "could not load the model" in errors[0], out
    assert "Traceback" not in out, out
