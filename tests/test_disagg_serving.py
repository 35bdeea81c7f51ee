"""A disaggregated deployment on CPU, started as users start it (`osserve serve --config deploy.yaml`): the
frontend (in the launcher process), one prefill worker and two decode workers (one pulling KV over ZeroMQ, one
with `kv_transport: auto`, which takes NIXL where it is installed), registered in the frontend's registry.
The tests run in file order on one deployment: outputs against single-process serving, cancels, then decode
workers killed one after the other, then SIGTERM."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import time

import httpx
import pytest
from disagg_util import (
    ENGINE,
    MODEL_NAME,
    chat,
    complete,
    completion_prompts,
    endpoints,
    health,
    http_client,
    kill,
    pid_alive,
    run,
    serve_deployment,
    stop,
    stream_events,
    wait_health,
)
from live import free_port

from osserve.disagg.kv_nixl import import_nixl

LEASE_TTL = 3.0
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def deployment(tiny_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("disagg")
    port = free_port()
    spec = {
        "model": str(tiny_ckpt),
        "served_model_name": MODEL_NAME,
        **ENGINE,
        "frontend": {"port": port, "router_mode": "kv", "liveness_timeout": 6, "retry_timeout": 4},
        "discovery": {"lease_ttl": LEASE_TTL},
        "workers": [
            # A small step budget queues prompts on the prefill worker; a small batch cap makes decode
            # workers wait for room: both widen the phases the cancel test aims at.
            {"role": "prefill", "runtime": {"max_num_tokens": 256}},
            # Killed one after the other below: no restarts (tests/test_deploy_restart.py has those). One
            # decode worker moves KV over ZeroMQ, the other picks its transport (NIXL where it is installed).
            {"role": "decode", "runtime": {"max_batch_size": 12}, "kv_transport": "zmq", "max_restarts": 0},
            {"role": "decode", "runtime": {"max_batch_size": 12}, "max_restarts": 0},
        ],
    }
    proc, url, log = serve_deployment(spec, tmp, OSSERVE_DEBUG_TRANSFER_DELAY="0.05")
    try:
        yield {"url": url, "proc": proc, "log": log}
    finally:
        stop(proc)


def test_health_lists_every_endpoint_with_its_role(deployment):
    code, body = health(deployment["url"])
    assert code == 200 and body["status"] == "ready"
    assert sorted(e["role"] for e in body["endpoints"]) == ["decode", "decode", "prefill"]
    assert all(e["ready"] and e["state"] == "ready" and e["kv_address"] for e in body["endpoints"])
    assert (
        body["deployment"]["needed_roles"] == ["prefill", "decode"]
        and not body["deployment"]["missing_roles"]
    )
    assert body["deployment"]["discovery"] == "frontend"
    # The frontend has no engine of its own: /v1/models reports the workers' limit.
    card = httpx.get(deployment["url"] + "/v1/models", timeout=5).json()["data"][0]
    assert card["max_model_len"] == 1024


def test_greedy_outputs_equal_single_process_serving(deployment, reference):
    """32 concurrent requests through the openai client: completions (streamed or not) and chat."""
    url = deployment["url"] + "/v1"
    prompts = completion_prompts(24)
    chats = [f"Question {i}: what is {w}?" for i, w in enumerate("abcdefg")]

    async def all_of(base: str) -> list:
        jobs = [complete(base, p, 8, stream=i % 2 == 0) for i, p in enumerate(prompts[:20])]
        # n > 1 (one request per sample behind the frontend) and logprobs.
        jobs += [complete(base, p, 8, stream=i % 2 == 0, n=2, logprobs=2) for i, p in enumerate(prompts[20:])]
        jobs += [chat(base, c, 8, stream=i % 2 == 0) for i, c in enumerate(chats[:7])]
        jobs.append(complete(base, prompts[0], 1, stream=True))  # done on the prefill worker alone
        return await asyncio.gather(*jobs)

    want = run(all_of(reference))
    got = run(all_of(url))
    assert all(r.get("error") is None for r in got), [r for r in got if r.get("error")]
    assert got == want
    # Every completion (ignore_eos, 8 tokens) moved its prompt's KV to a decode worker; both were used, each
    # with its own transport.
    body = wait_health(
        deployment["url"],
        lambda code, b: (
            sum(e["counters"]["kv_pulled"] for e in endpoints(b, "decode")) >= 28
            and all(e["counters"]["requests"] > 0 for e in endpoints(b, "decode"))
        ),
        5,
        "KV pulls counted",
    )
    transports = sorted(
        t for e in endpoints(body, "decode") for t, n in e["kv_transfer"]["fetches"].items() if n
    )
    assert transports == (["nixl", "zmq"] if import_nixl() is not None else ["zmq", "zmq"])
    assert all(not any(e["kv_transfer"]["fallbacks"].values()) for e in endpoints(body, "decode"))


def _blocks_back(body: dict) -> bool:
    return all(
        e["kv_cache"]["in_use"] == 0
        and e["num_held"] == 0
        and e["num_reserved"] == 0
        and e["num_running"] == 0
        and e["num_waiting"] == 0
        for e in body["endpoints"]
    )


def test_cancelled_requests_free_their_blocks_on_every_worker(deployment):
    url = deployment["url"]
    # Baseline: the earlier tests' requests are done (stats reach the frontend within about a second).
    wait_health(url, lambda code, b: code == 200 and _blocks_back(b), 5, "idle deployment")
    rng = random.Random(0)
    prompts = completion_prompts(200, seed=1)

    async def one(client, i: int) -> None:
        body = {"prompt": prompts[i], "max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
        task = asyncio.ensure_future(stream_events(client, url, body))
        # Cancel anywhere from before the prompt is computed to well into decoding.
        await asyncio.sleep(rng.uniform(0.0, 3.0))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def wave() -> None:
        async with http_client() as client:
            await asyncio.gather(*(one(client, i) for i in range(200)))

    run(wave())
    body = wait_health(url, lambda code, b: code == 200 and _blocks_back(b), 20, "every block back")
    aborted: dict[str, int] = {}
    for e in body["endpoints"]:
        for phase, n in e["aborted"].items():
            aborted[phase] = aborted.get(phase, 0) + n
    assert all(aborted[p] > 0 for p in ("queued", "prefill", "transfer", "decode")), aborted
    # Nothing was left for the hold timeout to clean up.
    assert all(e["counters"]["held_expired"] == 0 for e in body["endpoints"])


def _long_streams(url: str, n: int, max_tokens: int, on_event) -> list:
    prompts = completion_prompts(n, seed=7)

    async def go() -> list:
        async with http_client() as client:
            return await asyncio.gather(
                *(
                    stream_events(
                        client,
                        url,
                        {"prompt": p, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True},
                        on_event,
                    )
                    for p in prompts
                )
            )

    return prompts, go()


def test_killed_decode_worker_fails_over_to_the_other_one(deployment, reference):
    url = deployment["url"]
    _, body = health(url)
    victim = endpoints(body, "decode")[0]
    n, max_tokens = 8, 30
    seen = {"events": 0}

    def on_event(_event) -> None:
        seen["events"] += 1

    prompts, streams = _long_streams(url, n, max_tokens, on_event)

    async def scenario() -> list:
        task = asyncio.ensure_future(streams)
        # Kill once every stream is decoding (a few tokens each on average).
        while seen["events"] < 4 * n and not task.done():
            await asyncio.sleep(0.05)
        kill(victim["pid"])
        return await task

    got = run(scenario())

    async def reference_outputs() -> list:
        return await asyncio.gather(*(complete(reference, p, max_tokens, stream=False) for p in prompts))

    want = run(reference_outputs())
    assert [g["error"] for g in got] == [None] * n
    assert [g["text"] for g in got] == [w["text"] for w in want]
    assert all(g["finish"] == "length" for g in got)
    # The dead worker leaves the listing within its lease's TTL (plus a registry poll).
    wait_health(
        url,
        lambda code, b: victim["worker_id"] not in {e["worker_id"] for e in endpoints(b)},
        LEASE_TTL + 3,
        "killed worker deregistered",
    )
    _, body = health(url)
    assert body["deployment"]["num_failovers"] > 0


def test_with_no_decode_worker_left_streams_end_with_an_error_event(deployment):
    url = deployment["url"]
    _, body = health(url)
    (victim,) = endpoints(body, "decode")
    n = 4
    seen = {"events": 0}

    def on_event(_event) -> None:
        seen["events"] += 1

    _, streams = _long_streams(url, n, 200, on_event)

    async def scenario() -> tuple[float, list]:
        task = asyncio.ensure_future(streams)
        while seen["events"] < 3 * n and not task.done():
            await asyncio.sleep(0.05)
        killed = time.monotonic()
        kill(victim["pid"])
        return killed, await task

    killed, got = run(scenario())
    for g in got:
        assert g["error"] is not None and "decode" in g["error"]["message"], g
        # At once, not after the frontend's retry_timeout (4 s): no other decode worker can take them.
        assert g["ended"] - killed < 2, g["ended"] - killed
    # The frontend stays up and says what is missing.
    code, body = health(url)
    assert code == 503 and body["deployment"]["missing_roles"] == ["decode"]
    assert httpx.get(url + "/v1/models", timeout=5).json()["data"][0]["id"] == MODEL_NAME
    started = time.monotonic()
    r = httpx.post(
        url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}, timeout=15
    )
    assert r.status_code == 503 and time.monotonic() - started < 10
    wait_health(
        url,
        lambda code, b: victim["worker_id"] not in {e["worker_id"] for e in endpoints(b)},
        LEASE_TTL + 3,
        "killed worker deregistered",
    )


def test_sigterm_stops_the_whole_deployment(deployment):
    proc: subprocess.Popen = deployment["proc"]
    _, body = health(deployment["url"])
    pids = [e["pid"] for e in endpoints(body)]
    assert pids and all(pid_alive(p) for p in pids)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=40) == 0
    deadline = time.monotonic() + 5
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(pid_alive(p) for p in pids), "worker processes left behind"
    assert "stopped 1 worker(s)" in deployment["log"].read_text()
