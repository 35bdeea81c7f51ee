"""Discovery through a real etcd on loopback, with the standalone commands (`osserve frontend --etcd`,
`osserve worker --etcd`): registration under leases, a worker that lets its lease lapse, and requests that
keep going when etcd stops."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time

import httpx
import pytest
from disagg_util import (
    MODEL_NAME,
    complete,
    completion_prompts,
    endpoints,
    health,
    http_client,
    run,
    spawn,
    stop,
    stream_events,
    wait_health,
)
from live import free_port

from osserve.disagg.discovery import EtcdRegistry, Registration, RegistryError, workers_prefix
from osserve.disagg.kv_nixl import import_nixl

ETCD = shutil.which("etcd")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(ETCD is None, reason="etcd binary not found (Debian: apt-get install etcd-server)"),
    pytest.mark.timeout(300),
]
LEASE_TTL = 3
FLAGS = [
    "--max-seq-len",
    "1024",
    "--kv-cache-config.max-blocks",
    "256",
    "--cuda-graph-config.max-batch-size",
    "0",
]


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("etcd")
    client, peer = free_port(), free_port()
    url = f"http://127.0.0.1:{client}"
    log = open(tmp / "etcd.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            ETCD,
            "--name",
            "osserve-test",
            "--data-dir",
            str(tmp / "data"),
            "--listen-client-urls",
            url,
            "--advertise-client-urls",
            url,
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-cluster",
            f"osserve-test=http://127.0.0.1:{peer}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).json().get("health") == "true":
                break
        except (httpx.HTTPError, ValueError):
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            stop(proc)
            pytest.fail(f"etcd did not start:\n{(tmp / 'etcd.log').read_text()[-2000:]}")
        time.sleep(0.2)
    yield {"url": url, "proc": proc}
    stop(proc)
    log.close()


@pytest.fixture(scope="module")
def cluster(etcd, tiny_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("etcd-deploy")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    model = ["--model", str(tiny_ckpt), "--served-model-name", MODEL_NAME]
    logs = [tmp / "frontend.log", tmp / "prefill.log", tmp / "decode.log"]
    procs = {
        "frontend": spawn(
            [
                "frontend",
                *model,
                "--port",
                str(port),
                "--etcd",
                etcd["url"],
                "--router-mode",
                "least-loaded",
                "--liveness-timeout",
                "6",
            ],
            logs[0],
        ),
        "prefill": spawn(
            [
                "worker",
                "--role",
                "prefill",
                "--etcd",
                etcd["url"],
                "--lease-ttl",
                str(LEASE_TTL),
                *model,
                *FLAGS,
            ],
            logs[1],
        ),
        "decode": spawn(
            [
                "worker",
                "--role",
                "decode",
                "--etcd",
                etcd["url"],
                "--lease-ttl",
                str(LEASE_TTL),
                *model,
                *FLAGS,
            ],
            logs[2],
        ),
    }
    try:
        wait_health(url, lambda code, b: code == 200 and len(endpoints(b)) == 2, 120, "etcd deployment", logs)
        yield {"url": url, "procs": procs, "logs": logs}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
        for p in procs.values():
            stop(p)


def test_etcd_registry_leases(etcd):
    async def scenario() -> None:
        reg = EtcdRegistry(etcd["url"])
        try:
            prefix = workers_prefix("unit")
            lease = await reg.grant(2)
            await reg.put(prefix + "a", {"worker_id": "a", "role": "decode"}, lease)
            assert await reg.list(prefix) == {prefix + "a": {"worker_id": "a", "role": "decode"}}
            assert await reg.keepalive(lease)
            await reg.revoke(lease)
            assert await reg.list(prefix) == {}
            assert not await reg.keepalive(lease)
            # A kept-alive registration stays; one whose keepalives stop is gone after its TTL.
            kept = Registration(reg, prefix + "kept", ttl_s=2)
            await kept.start({"worker_id": "kept"})
            lapsing = await reg.grant(2)
            await reg.put(prefix + "lapsing", {"worker_id": "lapsing"}, lapsing)
            await asyncio.sleep(3.5)
            assert set(await reg.list(prefix)) == {prefix + "kept"}
            await kept.close()
            assert await reg.list(prefix) == {}
        finally:
            await reg.close()

    run(scenario())
    with pytest.raises(RegistryError, match="unreachable"):
        run(EtcdRegistry(f"http://127.0.0.1:{free_port()}", timeout_s=1).list("x"))


def test_health_lists_both_endpoints_registered_in_etcd(cluster, etcd):
    code, body = health(cluster["url"])
    assert code == 200
    assert sorted(e["role"] for e in endpoints(body)) == ["decode", "prefill"]
    assert all(e["ready"] for e in endpoints(body))
    assert body["deployment"]["discovery"] == f"etcd {etcd['url']}"

    async def records() -> list[dict]:
        reg = EtcdRegistry(etcd["url"])
        try:
            return list((await reg.list(workers_prefix("default"))).values())
        finally:
            await reg.close()

    recs = run(records())
    assert sorted(r["role"] for r in recs) == ["decode", "prefill"]
    if import_nixl() is not None:
        # kv_transport auto: each worker's NIXL agent (its metadata and KV pool) is published through etcd.
        assert all(r["nixl"]["agent"].startswith(r["worker_id"]) and r["nixl"]["metadata"] for r in recs)


def test_a_worker_whose_lease_lapses_leaves_routing_and_comes_back(cluster):
    url = cluster["url"]
    decode: subprocess.Popen = cluster["procs"]["decode"]
    decode.send_signal(signal.SIGSTOP)  # hung: no keepalives, no answers
    stopped = time.monotonic()
    try:
        body = wait_health(
            url,
            lambda code, b: code == 503 and not endpoints(b, "decode"),
            LEASE_TTL + 4,
            "lapsed decode worker gone",
            cluster["logs"],
        )
        assert body["deployment"]["missing_roles"] == ["decode"]
        assert time.monotonic() - stopped < LEASE_TTL + 4
    finally:
        decode.send_signal(signal.SIGCONT)
    # Its keepalive finds the lease gone and it registers again.
    wait_health(
        url, lambda code, b: code == 200 and len(endpoints(b)) == 2, 20, "decode worker back", cluster["logs"]
    )


def test_requests_already_routed_survive_etcd_stopping(cluster, etcd, reference):
    url = cluster["url"]
    n, max_tokens = 6, 30
    prompts = completion_prompts(n, seed=11)
    seen = {"events": 0}

    def on_event(_event) -> None:
        seen["events"] += 1

    async def scenario() -> list:
        async with http_client() as client:
            task = asyncio.ensure_future(
                asyncio.gather(
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
            )
            while seen["events"] < 2 * n and not task.done():
                await asyncio.sleep(0.05)
            etcd["proc"].terminate()
            return await task

    got = run(scenario())
    assert etcd["proc"].wait(10) is not None

    async def reference_outputs() -> list:
        return await asyncio.gather(*(complete(reference, p, max_tokens, stream=False) for p in prompts))

    want = run(reference_outputs())
    assert [g["error"] for g in got] == [None] * n
    assert [g["text"] for g in got] == [w["text"] for w in want]
    # The frontend knows etcd is gone, keeps the workers it knew, and still serves new requests.
    body = wait_health(
        url, lambda code, b: b["deployment"]["registry_error"] is not None, 10, "registry error shown"
    )
    assert [e["ready"] for e in endpoints(body)] == [True, True]
    (decode,) = endpoints(body, "decode")
    transport = "nixl" if import_nixl() is not None else "zmq"
    assert decode["kv_transfer"]["fetches"].get(transport, 0) > 0
    r = httpx.post(
        url + "/v1/completions",
        json={"model": MODEL_NAME, "prompt": prompts[0], "max_tokens": 4, "temperature": 0.0},
        timeout=30,
    )
    assert r.status_code == 200, r.text
