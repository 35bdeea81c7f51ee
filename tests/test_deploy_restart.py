"""`osserve serve --config` restarts a worker that dies, and gives up (exit status 1) on one that keeps
dying. Before, it logged the exit, restarted nothing and answered 503 for good."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time

import httpx
import pytest
import yaml
from disagg_util import (
    ENGINE,
    MODEL_NAME,
    endpoints,
    health,
    http_client,
    kill,
    pid_alive,
    run,
    spawn,
    stop,
    stream_events,
    wait_health,
)
from live import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _deployment(tmp_path, model: str, worker: dict) -> tuple[subprocess.Popen, str, object]:  # noqa: ANN001
    port = free_port()
    spec = {
        "model": model,
        "served_model_name": MODEL_NAME,
        **ENGINE,
        # A frontend option makes it a multi-process deployment (the launcher), with one worker.
        "frontend": {"port": port, "router_mode": "kv", "liveness_timeout": 3},
        "discovery": {"lease_ttl": 3},
        "workers": [{"role": "both", **worker}],
    }
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(spec))
    log = tmp_path / "deployment.log"
    return spawn(["serve", "--config", str(path)], log), f"http://127.0.0.1:{port}", log


def _ready_pids(body: dict) -> list[int]:
    return [e["pid"] for e in endpoints(body) if e["ready"]]


def test_a_killed_worker_is_replaced_and_serving_again_within_30_s(tiny_ckpt, tmp_path) -> None:  # noqa: ANN001
    proc, url, log = _deployment(tmp_path, str(tiny_ckpt), {})
    try:
        wait_health(
            url, lambda code, b: code == 200 and len(_ready_pids(b)) == 1, 120, "deployment up", [log]
        )
        (victim,) = _ready_pids(health(url)[1])
        kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        wait_health(
            url,
            lambda code, b: code == 200 and _ready_pids(b) and _ready_pids(b) != [victim],
            30,
            "worker replaced",
            [log],
        )
        body = {"model": MODEL_NAME, "prompt": "back again", "max_tokens": 3}
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert time.monotonic() - killed < 30
        assert "restarting it in 1 s (restart 1 of at most 5)" in log.read_text()

        # SIGTERM to the worker alone: it drains, so a stream in flight still ends with all its output
        # (before: its task was cancelled at once and the stream ended with an error event).
        (worker,) = _ready_pids(health(url)[1])
        seen = {"events": 0}

        def on_event(_event) -> None:  # noqa: ANN001
            seen["events"] += 1

        async def scenario() -> dict:
            async with http_client() as client:
                body = {"prompt": "drain me", "max_tokens": 40, "ignore_eos": True}
                task = asyncio.ensure_future(stream_events(client, url, body, on_event))
                while seen["events"] < 2 and not task.done():
                    await asyncio.sleep(0.02)
                kill(worker, signal.SIGTERM)
                return await task

        got = run(scenario())
        assert got["error"] is None and got["finish"] == "length", got
        deadline = time.monotonic() + 30
        while pid_alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(worker)
        assert "draining: 1 request(s) get 30 s to finish" in log.read_text()
    finally:
        stop(proc)


def test_a_worker_that_keeps_dying_makes_the_deployment_exit_non_zero(tmp_path) -> None:  # noqa: ANN001
    proc, _, log = _deployment(tmp_path, str(tmp_path / "no-such-checkpoint"), {"max_restarts": 1})
    try:
        code = proc.wait(timeout=120)
    finally:
        stop(proc)
    text = log.read_text()
    assert code == 1, text[-3000:]
    assert (
        "restart 1 of at most 1" in text and "giving up: worker both-0 exited 2 time(s) in a row" in text
    ), text
