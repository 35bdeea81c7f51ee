"""/health and the API while the model loads, once it is ready, and after the engine failed."""

from __future__ import annotations

import threading
import time

import httpx
from live import SERVED_NAME, serve_in_thread, tiny_config, wait_healthy

CHAT = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_loading_then_ready(tiny_checkpoint) -> None:  # noqa: ANN001
    from osserve.engine.factory import build_engine
    from osserve.server.app import create_app

    release = threading.Event()
    config = tiny_config(tiny_checkpoint)

    def slow_load():  # noqa: ANN202
        release.wait(60)
        return build_engine(config, progress=False)

    app = create_app(config, core_factory=slow_load)
    with serve_in_thread(app, wait=False) as url:
        r = httpx.get(url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert r.json()["error"]["code"] == "model_loading" and r.headers["retry-after"]
        busy = httpx.post(url + "/v1/chat/completions", json=CHAT)
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "model_loading"
        assert httpx.get(url + "/metrics").status_code == 200
        release.set()
        wait_healthy(url, timeout=60)
        body = httpx.get(url + "/health").json()
        assert body["status"] == "ready" and body["model"] == SERVED_NAME
        assert httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=60).status_code == 200


def test_dead_engine(tiny_checkpoint) -> None:  # noqa: ANN001
    from osserve.server.app import create_app

    def broken_load():  # noqa: ANN202
        raise RuntimeError("out of device memory (simulated)")

    app = create_app(tiny_config(tiny_checkpoint), core_factory=broken_load)
    with serve_in_thread(app, wait=False) as url:
        for _ in range(100):
            r = httpx.get(url + "/health")
            if r.json()["status"] != "loading":
                break
            time.sleep(0.05)
        assert r.status_code == 503 and r.json()["status"] == "dead"
        assert "simulated" in r.json()["error"]["message"] and r.json()["error"]["code"] == "engine_dead"
        dead = httpx.post(url + "/v1/chat/completions", json=CHAT)
        assert dead.status_code == 503 and dead.json()["error"]["code"] == "engine_dead"


def test_request_larger_than_the_kv_cache_is_a_400(tiny_checkpoint) -> None:  # noqa: ANN001
    """The whole KV cache (7 blocks of 16 tokens) holds less than the configured max_seq_len: the engine
    lowers max_seq_len to what it can hold, so a request that could never fit is refused up front, as a
    400 context_length_exceeded in OpenAI's shape, streamed or not (never a 200 that fails later)."""
    from osserve.server.app import create_app

    app = create_app(tiny_config(tiny_checkpoint, kv_cache_config={"max_blocks": 8}))
    with serve_in_thread(app) as url:
        body = {**CHAT, "max_tokens": 400}
        for stream in (False, True):
            r = httpx.post(url + "/v1/chat/completions", json={**body, "stream": stream}, timeout=60)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["code"] == "context_length_exceeded" and "max_seq_len" in err["message"], err
        assert httpx.get(url + "/health").json()["server"]["num_in_flight"] == 0
