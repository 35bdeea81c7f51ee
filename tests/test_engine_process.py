"""`engine_process: true`: the engine loop in a child process behind the same server. Greedy outputs equal
the in-process server's, through the openai client, streamed and not; a killed engine process turns the
server's health dead and ends open streams with an error event (no hang, the server stays up); aborted
streams free every KV block; logits processors are refused with a clear error."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import httpx
import pytest
from live import ENGINE_FLAGS, SERVED_NAME, start_cli_server, stop_cli_server

from osserve.config import EngineConfig
from osserve.engine.engine_process import ProcessEngine
from osserve.sampling_params import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
PROMPTS = ["The capital of France is", "1, 2, 3,", "Tell me a story about a robot", "Harmony"]


@pytest.fixture(scope="module")
def proc_server(tiny_checkpoint, tmp_path_factory):  # noqa: ANN001, ANN201
    log = tmp_path_factory.mktemp("engine-process") / "server.log"
    flags = ["--model", str(tiny_checkpoint), "--served-model-name", SERVED_NAME, *ENGINE_FLAGS]
    live = start_cli_server([*flags, "--engine-process"], log)
    yield live
    stop_cli_server(live)


def _client(url: str):  # noqa: ANN202
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _completions(url: str, stream: bool) -> list[str]:
    client, texts = _client(url), []
    for p in PROMPTS:
        kw = dict(
            model=SERVED_NAME, prompt=p, max_tokens=24, temperature=0.0, extra_body={"ignore_eos": True}
        )
        if stream:
            texts.append("".join(c.choices[0].text for c in client.completions.create(stream=True, **kw)))
        else:
            texts.append(client.completions.create(**kw).choices[0].text)
    return texts


def test_outputs_equal_the_in_process_server(server, proc_server) -> None:  # noqa: ANN001
    want = _completions(server.url, stream=False)
    assert _completions(proc_server.url, stream=False) == want
    assert _completions(proc_server.url, stream=True) == want
    health = httpx.get(proc_server.url + "/health").json()
    assert health["status"] == "ready" and health["engine"]["num_steps"] > 0
    chat = _client(proc_server.url).chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=8
    )
    assert chat.usage.completion_tokens > 0


def test_aborted_streams_free_every_block(proc_server) -> None:  # noqa: ANN001
    async def main() -> None:
        async with httpx.AsyncClient(base_url=proc_server.url, timeout=60) as http:

            async def one(i: int) -> None:
                body = {"model": SERVED_NAME, "prompt": f"{i} " * 50, "max_tokens": 200, "stream": True}
                body["ignore_eos"] = True
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    n = 0
                    async for _ in r.aiter_lines():
                        n += 1
                        if n > 3 + i % 5:
                            return  # disconnect mid-stream

            await asyncio.gather(*(one(i) for i in range(12)))

    asyncio.run(main())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        engine = httpx.get(proc_server.url + "/health").json()["engine"]
        if engine["kv_cache"]["in_use"] == 0 and engine["num_running"] == 0:
            break
        time.sleep(0.2)
    assert engine["kv_cache"]["in_use"] == 0 and engine["num_running"] == 0 and engine["num_waiting"] == 0


def test_logits_processors_are_refused(tiny_checkpoint) -> None:  # noqa: ANN001
    eng = ProcessEngine(EngineConfig.from_dict({"model": str(tiny_checkpoint), "max_seq_len": 256}))
    params = SamplingParams(logits_processors=[lambda ids, logits: logits])
    with pytest.raises(ValueError, match="logits processors"):
        eng.validate([1, 2, 3], params)


def test_a_killed_engine_process_ends_streams_and_the_server_exits_non_zero(
    tiny_checkpoint, tmp_path
) -> None:  # noqa: ANN001
    """Streams end with an error event at once; then the process exits with status 1 (rather than answering
    503 for good), so that whatever supervises it starts it again."""
    flags = ["--model", str(tiny_checkpoint), "--served-model-name", SERVED_NAME, *ENGINE_FLAGS]
    live = start_cli_server([*flags, "--engine-process", "true"], tmp_path / "server.log")
    try:
        events: list[str] = []

        def stream() -> None:
            body = {
                "model": SERVED_NAME,
                "prompt": "Hi",
                "max_tokens": 1000,
                "stream": True,
                "ignore_eos": True,
            }
            with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=60) as r:
                events.extend(r.iter_lines())

        t = threading.Thread(target=stream)
        t.start()
        time.sleep(1.0)
        child = int(live.log_path.read_text().split("engine process started (pid ")[1].split(")")[0])
        os.kill(child, signal.SIGKILL)
        t.join(timeout=10)
        assert not t.is_alive(), "the stream did not end within 10 s of the engine process dying"
        assert any('"error"' in e for e in events), events[-3:]
        assert events[-2:] == ["data: [DONE]", ""] or "data: [DONE]" in events, events[-3:]
        assert live.proc.wait(timeout=15) == 1, live.log()[-2000:]
        assert "the engine died" in live.log() and "exiting with status 1" in live.log()
    finally:
        stop_cli_server(live)


def test_the_default_runs_the_engine_in_process_off_cuda_and_for_several_ranks(tiny_checkpoint) -> None:  # noqa: ANN001
    from osserve.server.app import _engine_in_own_process, create_app

    def cfg(**kw):  # noqa: ANN202
        return EngineConfig.from_dict({"model": str(tiny_checkpoint), **kw})

    assert _engine_in_own_process(cfg()) is False  # CPU here
    assert _engine_in_own_process(cfg(engine_process=True)) is True
    assert _engine_in_own_process(cfg(tensor_parallel_size=2)) is False  # CPU here
    assert _engine_in_own_process(cfg(engine_process=False, tensor_parallel_size=2)) is False
    app = create_app(cfg(engine_process=True))
    assert type(app.state.server.engine).__name__ == "ProcessEngine"
    with pytest.raises(ValueError, match="engine_process must be true or false"):
        cfg(engine_process="yes")
