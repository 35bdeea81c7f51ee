"""The NIXL KV transport on CPU (NIXL's UCX backend between processes).

First the READ itself between two NIXL agents in this process: exactly the asked-for blocks move, coalesced
into runs. Then a deployment as users start it (`osserve serve --config`): a frontend (KV-aware routing),
two prefill workers and a decode worker, all `kv_transport: nixl`, with a pause between reserving blocks and
fetching the KV (the test hook OSSERVE_DEBUG_TRANSFER_DELAY) so that a test can act mid-transfer. In file
order: greedy outputs equal aggregated serving, every prompt's KV READ over NIXL; a fetch from a stopped
prefill worker passes its deadline and the prompt is recomputed (counted in /metrics); a prefill worker killed
mid-transfer: its request completes by recompute within 5 s; and in the end no KV block stays allocated on
any worker. A test acts on the prefill worker of its request: it runs the prompt once first, so that the
KV-aware router sends it again to the worker that has it cached."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import signal
import time

import httpx
import pytest
import torch
from disagg_util import (
    ENGINE,
    MODEL_NAME,
    complete,
    completion_prompts,
    endpoints,
    health,
    http_client,
    kill,
    run,
    serve_deployment,
    stop,
    stream_events,
    wait_health,
)
from live import free_port

from osserve.disagg.kv_nixl import (
    NixlPool,
    NixlRead,
    PoolInfo,
    block_runs,
    import_nixl,
    read_descriptors,
)

NIXL = import_nixl()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NIXL is None, reason="needs NIXL (pip install nixl-cu13, or osserve[nixl])"),
    pytest.mark.timeout(300),
]
# Seconds each decode-side transfer waits after reserving its blocks (the window the tests act in), and the
# decode worker's fetch deadline. NOTE: their sum stays under 2 s, the least time in which ZeroMQ's
# heartbeats (1 s, 3 s timeout) can notice a stopped worker: the stopped source must fail by the deadline.
TRANSFER_DELAY = 0.3
TRANSFER_TIMEOUT = 1.0
HOLD_TIMEOUT = 8.0
WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "river", "stone", "ember")


def test_block_runs_coalesce_blocks_contiguous_on_both_sides():
    runs = block_runs([3, 4, 5, 9, 10, 2], [1, 2, 3, 7, 9, 10])
    assert runs.tolist() == [[3, 1, 3], [9, 7, 1], [10, 9, 1], [2, 10, 1]]
    assert block_runs([], []).shape == (0, 3)


def test_a_nixl_read_moves_exactly_the_blocks_asked_for():
    # Four K/V tensors [blocks, block_size, kv_heads, head_dim]: full-attention blocks live in all four,
    # sliding-window blocks in the first two (a model with more full than sliding layers).
    g = torch.Generator().manual_seed(0)
    src_tensors = [torch.randn(12, 4, 2, 8, generator=g).to(torch.bfloat16) for _ in range(4)]
    dst_tensors = [torch.zeros(10, 4, 2, 8, dtype=torch.bfloat16) for _ in range(4)]
    source = NixlPool(NIXL, "unit-src", src_tensors, [0, 1, 2, 3], [0, 1])
    dest = NixlPool(NIXL, "unit-dst", dst_tensors, [0, 1, 2, 3], [0, 1])
    try:
        record = source.record()
        remote = PoolInfo.from_record(record)
        assert dest.agent.add_remote_agent(base64.b64decode(record["metadata"])) == remote.agent.encode()
        full_src, full_dst = [3, 4, 5, 9], [1, 2, 3, 7]
        sliding_src, sliding_dst = [7, 8], [5, 6]
        local, theirs = read_descriptors(
            dest.info, remote, [([0, 1, 2, 3], full_src, full_dst), ([0, 1], sliding_src, sliding_dst)]
        )
        # Runs: full (3..5 -> 1..3) and (9 -> 7) in four tensors, sliding (7..8 -> 5..6) in two.
        assert len(local) == len(theirs) == 4 * 2 + 2 * 1
        read = NixlRead(dest.agent, local, "DRAM", theirs, remote)

        async def wait() -> float:
            return await read.wait(time.monotonic() + 30, lambda: False)

        assert asyncio.run(wait()) > 0 and not read.in_flight
        read.release()
        block = 4 * 2 * 8 * 2
        assert read.num_bytes == (4 * 4 + 2 * 2) * block
        for t, (s, d) in enumerate(zip(src_tensors, dst_tensors, strict=True)):
            expected = torch.zeros_like(d)
            expected[full_dst] = s[full_src]
            if t < 2:
                expected[sliding_dst] = s[sliding_src]
            assert torch.equal(d, expected), t
    finally:
        dest.close()
        source.close()


# -- a deployment with kv_transport nixl ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def deployment(tiny_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("disagg-nixl")
    port = free_port()
    spec = {
        "model": str(tiny_ckpt),
        "served_model_name": MODEL_NAME,
        **ENGINE,
        "frontend": {"port": port, "router_mode": "kv", "liveness_timeout": 10, "retry_timeout": 4},
        "workers": [
            {"role": "prefill", "replicas": 2, "kv_transport": "nixl", "kv_hold_timeout": HOLD_TIMEOUT},
            {"role": "decode", "kv_transport": "nixl", "kv_transfer_timeout": TRANSFER_TIMEOUT},
        ],
    }
    proc, url, log = serve_deployment(spec, tmp, OSSERVE_DEBUG_TRANSFER_DELAY=str(TRANSFER_DELAY))
    try:
        yield {"url": url, "proc": proc, "log": log}
    finally:
        for e in endpoints(health(url)[1]) if proc.poll() is None else []:
            with contextlib.suppress(ProcessLookupError):
                kill(e["pid"], signal.SIGCONT)
        stop(proc)


def _decode(url: str) -> dict:
    return _decode_of(health(url)[1])


def _wait_decode(url: str, ok, timeout: float = 5.0) -> dict:
    """The decode worker's health entry once ok(entry) holds (workers report their counters periodically)."""
    body = wait_health(url, lambda code, b: ok(_decode_of(b)), timeout, "decode worker counters")
    return _decode_of(body)


def _decode_of(body: dict) -> dict:
    (decode,) = endpoints(body, "decode")
    return decode


def _metric(url: str, name: str, label: str) -> float:
    """A sample of the frontend's /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and label in sample.labels.values():
                return sample.value
    return 0.0


def test_greedy_outputs_equal_aggregated_serving_with_kv_read_over_nixl(deployment, reference):
    url = deployment["url"]
    prompts = completion_prompts(12, seed=5)

    async def all_of(base: str) -> list:
        return await asyncio.gather(*(complete(base, p, 8, stream=i % 2 == 0) for i, p in enumerate(prompts)))

    want = run(all_of(reference))
    got = run(all_of(url + "/v1"))
    assert all(g["error"] is None for g in got), got
    assert got == want
    body = wait_health(
        url,
        lambda code, b: sum(e["kv_transfer"].get("fetches", {}).get("nixl", 0) for e in endpoints(b)) >= 12,
        5,
        "NIXL fetches counted",
    )
    decode = _decode(url)
    assert decode["counters"]["kv_recomputed"] == 0 and not any(decode["kv_transfer"]["fallbacks"].values())
    # Both prefill workers served READs (their agents came from the registry), and only NIXL moved KV.
    assert all(e["kv_pulls_served"] > 0 for e in endpoints(body, "prefill"))
    assert _metric(url, "osserve_kv_transfer_bytes_total", "nixl") > 0
    assert _metric(url, "osserve_kv_transfers_total", "zmq") == 0


def _prompt(seed: int) -> str:
    """A prompt of some 80 tokens (five or more full KV blocks) that no other test sends."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(80))


def _prefill_of(url: str, prompt: str) -> dict:
    """Run `prompt` once; its prefill worker, once the frontend knows that worker caches the prompt."""
    before = {e["worker_id"]: e for e in endpoints(health(url)[1], "prefill")}
    assert run(complete(url + "/v1", prompt, 2, stream=False))["error"] is None

    def grown(body: dict) -> list[dict]:
        return [
            e
            for e in endpoints(body, "prefill")
            if e["worker_id"] in before
            and e["kv_pulls_served"] > before[e["worker_id"]]["kv_pulls_served"]
            and e["num_cached_block_hashes"] >= before[e["worker_id"]]["num_cached_block_hashes"] + 4
        ]

    body = wait_health(url, lambda code, b: len(grown(b)) == 1, 10, "the prompt cached on one prefill worker")
    return grown(body)[0]


def _one_stream(url: str, prompt: str, max_tokens: int, on_first_token, then=None) -> dict:
    """One streamed greedy completion. `on_first_token()` runs as soon as its first token arrives (the
    decode worker is then reserving blocks or in the transfer delay); `then()`, a coroutine, right after,
    beside the rest of the stream."""

    async def go() -> dict:
        first = asyncio.Event()
        extra: dict = {}

        def on_event(event: dict) -> None:
            if not first.is_set() and event.get("choices") and event["choices"][0]["text"]:
                first.set()
                extra.update(on_first_token())

        async def follow() -> None:
            await first.wait()
            if then is not None:
                await then()

        async with http_client() as client:
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
            following = asyncio.ensure_future(follow())
            try:
                out = await stream_events(client, url, body, on_event)
                await following
            finally:
                following.cancel()
        return {**out, **extra}

    return run(go())


async def _wait_for_fallback(url: str, reason: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with httpx.AsyncClient() as client:
            body = (await client.get(url + "/health", timeout=5)).json()
        (decode,) = endpoints(body, "decode")
        if decode["kv_transfer"]["fallbacks"][reason] > 0:
            return
        await asyncio.sleep(0.05)


def test_a_fetch_past_its_deadline_falls_back_to_recomputing(deployment, reference):
    url = deployment["url"]
    prompt = _prompt(21)
    victim = _prefill_of(url, prompt)
    before = _metric(url, "osserve_kv_transfer_fallbacks_total", "timeout")

    def stall_the_source() -> dict:
        kill(victim["pid"], signal.SIGSTOP)  # hung: it answers nothing, its connections stay up a while
        return {}

    async def resume_after_the_fallback() -> None:
        try:
            await _wait_for_fallback(url, "timeout", TRANSFER_DELAY + TRANSFER_TIMEOUT + 10)
        finally:
            kill(victim["pid"], signal.SIGCONT)

    try:
        got = _one_stream(url, prompt, 12, stall_the_source, resume_after_the_fallback)
    finally:
        kill(victim["pid"], signal.SIGCONT)
    want = run(complete(reference, prompt, 12, stream=False))
    assert got["error"] is None and got["text"] == want["text"]
    _wait_decode(
        url, lambda d: d["kv_transfer"]["fallbacks"]["timeout"] == 1 and d["counters"]["kv_recomputed"] == 1
    )
    wait_health(
        url,
        lambda code, b: _metric(url, "osserve_kv_transfer_fallbacks_total", "timeout") == before + 1,
        5,
        "the fallback counted in /metrics",
    )


def _idle(code: int, body: dict) -> bool:
    return all(
        e["ready"]
        and e["kv_cache"]["in_use"] == 0
        and e["num_held"] == 0
        and e["num_reserved"] == 0
        and e["num_running"] == 0
        and e["num_waiting"] == 0
        for e in endpoints(body)
    )


def test_a_prefill_worker_killed_mid_transfer(deployment, reference):
    url = deployment["url"]
    # The stopped worker of the test before answers again, and the KV it held is freed (at worst by its
    # hold timeout).
    wait_health(
        url,
        lambda code, b: len(endpoints(b)) == 3 and _idle(code, b),
        HOLD_TIMEOUT + 5,
        "idle deployment",
        [deployment["log"]],
    )
    prompt = _prompt(22)
    victim = _prefill_of(url, prompt)

    def kill_the_source() -> dict:
        kill(victim["pid"])
        return {"killed": time.monotonic()}

    got = _one_stream(url, prompt, 12, kill_the_source)
    want = run(complete(reference, prompt, 12, stream=False))
    assert got["ended"] - got["killed"] < 5.0
    if got["error"] is None:
        assert got["text"] == want["text"]
    _wait_decode(url, lambda d: d["kv_transfer"]["fallbacks"]["source_lost"] == 1)
    # The frontend stops routing to the dead worker; the other one serves on.
    wait_health(
        url,
        lambda code, b: all(not e["alive"] for e in endpoints(b) if e["worker_id"] == victim["worker_id"]),
        10,
        "killed prefill worker out of routing",
    )
    again = run(complete(url + "/v1", prompt, 12, stream=True))
    assert again["error"] is None and again["text"] == want["text"]


def test_no_kv_block_stays_allocated_on_the_workers_left(deployment):
    def idle_without_the_dead(code: int, body: dict) -> bool:
        alive = {**body, "endpoints": [e for e in endpoints(body) if e["alive"]]}
        return _idle(code, alive)

    body = wait_health(deployment["url"], idle_without_the_dead, 15, "every block back")
    assert sorted(e["role"] for e in endpoints(body) if e["alive"]) == ["decode", "prefill"]
