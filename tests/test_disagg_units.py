"""Pieces of the disaggregated deployment in one process: routing, leases, wire messages, and the frontend's
RemoteEngine over an in-process `both` worker (n > 1, output kinds, logprobs, abort)."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch
import zmq.asyncio

from osserve.disagg.discovery import (
    MemoryRegistry,
    Registration,
    RegistryServer,
    RemoteRegistry,
    workers_prefix,
)
from osserve.disagg.messages import (
    Generate,
    Output,
    decode,
    encode,
    params_from_wire,
    params_to_wire,
)
from osserve.disagg.router import Router, overlap
from osserve.engine.kv_cache import block_hashes
from osserve.engine.outputs import CompletionOutput, RequestOutput
from osserve.sampling_params import OutputKind, SamplingParams
from osserve.structured import StructuredOutput


@dataclass
class FakeWorker:
    worker_id: str
    load: float = 0
    cached_hashes: set[int] = field(default_factory=set)
    block_size: int = 4


def test_round_robin_and_least_loaded():
    ws = [FakeWorker("a"), FakeWorker("b"), FakeWorker("c")]
    rr = Router("round-robin")
    assert [rr.pick(ws, [1]).worker_id for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    ll = Router("least-loaded")
    ws[0].load, ws[1].load, ws[2].load = 3, 1, 2
    assert ll.pick(ws, [1]).worker_id == "b"
    ws[1].load = 3
    assert ll.pick(ws, [1]).worker_id == "c"
    # Equal loads share the work.
    for w in ws:
        w.load = 0
    assert {ll.pick(ws, [1]).worker_id for _ in range(3)} == {"a", "b", "c"}
    with pytest.raises(ValueError, match="router_mode"):
        Router("random")


def test_kv_router_prefers_the_longest_cached_prefix_unless_it_is_overloaded():
    prompt = list(range(100, 124))  # 6 blocks of 4
    hashes = block_hashes(prompt, 4)
    a = FakeWorker("a", cached_hashes=set(hashes[:2]))
    b = FakeWorker("b", cached_hashes=set(hashes[:5]))
    c = FakeWorker("c", cached_hashes={hashes[3], hashes[4]})  # no leading match: worth nothing
    assert overlap(hashes, c.cached_hashes) == 0 and overlap(hashes, b.cached_hashes) == 5
    kv = Router("kv", load_weight=1.0)
    assert kv.pick([a, b, c], prompt).worker_id == "b"
    b.load = 4  # 1 uncached block + 4 queued > 4 uncached blocks + 0 queued
    assert kv.pick([a, b, c], prompt).worker_id == "a"
    # Decode workers are picked by load alone.
    assert kv.pick([a, b, c], prompt, use_kv=False).worker_id in ("a", "c")


def test_memory_registry_leases_expire_unless_kept_alive():
    async def scenario() -> None:
        reg = MemoryRegistry()
        kept, lapsing = await reg.grant(0.3), await reg.grant(0.3)
        await reg.put("w/kept", {"id": 1}, kept)
        await reg.put("w/lapsing", {"id": 2}, lapsing)
        for _ in range(4):
            await asyncio.sleep(0.1)
            assert await reg.keepalive(kept)
        assert await reg.list("w/") == {"w/kept": {"id": 1}}
        assert not await reg.keepalive(lapsing)
        await reg.revoke(kept)
        assert await reg.list("w/") == {}

    asyncio.run(scenario())


def test_registration_over_the_frontend_registry_and_again_after_a_lapse():
    async def scenario() -> None:
        ctx = zmq.asyncio.Context()
        memory = MemoryRegistry()
        server = RegistryServer(memory, ctx, "tcp://127.0.0.1:0")
        server.start()
        remote = RemoteRegistry(server.address, ctx)
        key = workers_prefix("unit") + "w1"
        reg = Registration(remote, key, ttl_s=2.0)
        try:
            await reg.start({"worker_id": "w1", "state": "loading"})
            await reg.update({"worker_id": "w1", "state": "ready"})
            assert await memory.list(workers_prefix("unit")) == {key: {"worker_id": "w1", "state": "ready"}}
            # The frontend restarted (its registry forgot everything): the worker registers again.
            await memory.revoke(reg.lease)
            assert await memory.list(workers_prefix("unit")) == {}
            for _ in range(40):
                await asyncio.sleep(0.1)
                if await memory.list(workers_prefix("unit")):
                    break
            assert (await memory.list(workers_prefix("unit")))[key]["state"] == "ready"
            await reg.close()
            assert await memory.list(workers_prefix("unit")) == {}
        finally:
            await remote.close()
            await server.close()
            ctx.term()

    asyncio.run(scenario())
    with pytest.raises(ValueError, match="lease_ttl"):
        Registration(MemoryRegistry(), "k", ttl_s=0.5)


def test_wire_messages_round_trip():
    params = SamplingParams(
        temperature=0.5, top_k=3, seed=4, stop=["x"], max_tokens=7, logprobs=2, output_kind=OutputKind.DELTA
    )
    msg = Generate("r#1", "prefill", [1, 2, 3], params_to_wire(params))
    back, frames = decode(encode(msg, b"raw"))
    assert back == msg and frames == [b"raw"]
    assert params_from_wire(back.params) == params
    out = RequestOutput("r", None, [], None, [CompletionOutput(0, "hi", [5], -0.5, None, "stop", "x")], True)
    assert decode(encode(Output("r", out)))[0].output == out
    with pytest.raises(ValueError, match="logits processors"):
        params_to_wire(SamplingParams(logits_processors=[lambda ids, logits: logits]))
    with pytest.raises(ValueError, match="unknown message kind"):
        decode([b"nope", b""])
    with pytest.raises(ValueError, match="unknown sampling parameter"):
        params_from_wire({"temperature": 1.0, "bogus": 1})
    # A structured output's grammar travels as plain data.
    structured = StructuredOutput("json_object", "start: x")
    msg = Generate("r#2", "both", [1], params_to_wire(SamplingParams(max_tokens=5, structured=structured)))
    assert params_from_wire(decode(encode(msg))[0].params).structured == structured


# -- the RemoteEngine over an in-process worker -------------------------------------------------------------
def test_remote_engine_over_a_both_worker(tiny_ckpt, monkeypatch):
    """Aggregated serving through the frontend's engine: n > 1, every output kind, logprobs, and an abort
    that frees the worker's blocks, all equal to the engine in this process. NIXL is made unimportable: the
    worker serves all the same, its KV over ZeroMQ only."""
    from osserve.disagg.kv_nixl import NIXL_MODULES, import_nixl

    for name in NIXL_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    assert import_nixl() is None
    from osserve.config import EngineConfig
    from osserve.disagg.remote_engine import FrontendSettings, RemoteEngine
    from osserve.disagg.worker import Worker, WorkerOptions
    from osserve.engine.factory import build_engine
    from osserve.engine.llm_engine import LLMEngine
    from osserve.harmony.encoding import get_tokenizer

    tok = get_tokenizer()
    config = EngineConfig.from_dict(
        {
            "model": str(tiny_ckpt),
            "served_model_name": "m",
            "max_seq_len": 256,
            "kv_cache_config": {"max_blocks": 64},
            "cuda_graph_config": {"max_batch_size": 0},
        }
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    prompt = list(range(2000, 2040))
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1)
    core = LLMEngine(build_engine(config, progress=False)[0], tok)
    core.add_request("ref", prompt, greedy)
    while core.has_unfinished():
        for o in core.step():
            if o.finished:
                want = o.outputs[0]

    async def scenario() -> None:
        engine = RemoteEngine(
            FrontendSettings(registry_address="tcp://127.0.0.1:0", liveness_timeout=10), "m", tok
        )
        engine.start()
        worker = Worker(
            config,
            WorkerOptions(role="both", registry=engine.registry_server.address, lease_ttl=2),
            tokenizer=tok,
        )
        stop = asyncio.Event()
        running = asyncio.ensure_future(worker.run(stop))
        try:
            await engine.wait_ready_async(60)
            assert engine.needs()[0][0] == "both"
            assert worker.kv_server.transports == ["zmq"] and "nixl" not in worker.record()
            assert [t.name for t in worker.importer.transports] == ["zmq"]

            async def collect(rid: str, params: SamplingParams) -> list[RequestOutput]:
                return [o async for o in engine.add_request(rid, prompt, params)]

            kinds = {}
            for kind in OutputKind:
                kinds[kind] = await collect(
                    f"n2-{kind.value}", dataclasses.replace(greedy, n=2, output_kind=kind)
                )
            delta = kinds[OutputKind.DELTA]
            assert delta[-1].finished and not any(o.finished for o in delta[:-1])
            for index in (0, 1):
                toks = [t for o in delta for c in o.outputs if c.index == index for t in c.token_ids]
                assert toks == want.token_ids
            final = kinds[OutputKind.FINAL_ONLY]
            assert len(final) == 1 and [c.token_ids for c in final[0].outputs] == [want.token_ids] * 2
            assert final[0].outputs[0].text == want.text
            cumulative = [c for o in kinds[OutputKind.CUMULATIVE] for c in o.outputs if c.finish_reason]
            assert [c.token_ids for c in cumulative] == [want.token_ids] * 2
            assert cumulative[0].cumulative_logprob == pytest.approx(want.cumulative_logprob, abs=1e-4)
            assert len(cumulative[0].logprobs) == len(want.token_ids)

            # Closing a stream early aborts the request on the worker and frees its blocks.
            stream = engine.add_request(
                "gone",
                prompt,
                SamplingParams(
                    temperature=0.0, max_tokens=200, ignore_eos=True, output_kind=OutputKind.DELTA
                ),
            )
            async for _ in stream:
                break
            await stream.aclose()
            for _ in range(100):
                await asyncio.sleep(0.1)
                s = worker._engine_stats
                if s.get("num_running") == 0 and s["kv"]["in_use"] == 0:
                    break
            assert worker._engine_stats["kv"]["in_use"] == 0 and worker.aborted["decode"] == 1
        finally:
            stop.set()
            await running
            await engine.aclose()

    try:
        asyncio.run(scenario())
        # Asked for by name, a missing NIXL stops the worker before it loads its model.
        nixl_worker = Worker(
            config, WorkerOptions(role="decode", registry="tcp://127.0.0.1:1", kv_transport="nixl"), tok
        )
        assert asyncio.run(nixl_worker.run(asyncio.Event())) == 1 and nixl_worker.engine is None
    finally:
        torch.set_num_threads(threads)


def test_deployment_file(tmp_path):
    from osserve.disagg.deployment import Deployment, is_multi_process, parse_deployment
    from osserve.disagg.remote_engine import FrontendSettings

    single = tmp_path / "single.yaml"
    single.write_text("model: m\nworkers: [{role: both, runtime: {max_batch_size: 8}}]\n")
    multi = tmp_path / "multi.yaml"
    multi.write_text("model: m\nworkers: [{role: prefill}, {role: decode}]\n")
    assert not is_multi_process(single) and is_multi_process(multi)
    spec = parse_deployment(
        {
            "model": "m",
            "max_seq_len": 512,
            "frontend": {"port": 9000, "router_mode": "kv"},
            "workers": [
                {"role": "prefill", "devices": [0, 1], "runtime": {"max_num_tokens": 4096}},
                {"role": "decode", "replicas": 2, "runtime": {"max_seq_len": 256}},
            ],
        }
    )
    assert [(w.role, w.replicas) for w in spec.workers] == [("prefill", 1), ("decode", 2)]
    assert spec.workers[0].engine == {
        "model": "m",
        "max_seq_len": 512,
        "max_num_tokens": 4096,
        "device": "cuda:0",
    }
    assert spec.workers[1].engine["max_seq_len"] == 256  # a worker's runtime overrides the top level
    cmds = Deployment(spec, FrontendSettings(registry_address="tcp://0.0.0.0:7001"), "info", 10.0).commands()
    assert [wid for wid, _, _ in cmds] == ["prefill-0", "decode-0", "decode-1"]
    assert cmds[0][2]["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert cmds[1][1][cmds[1][1].index("--registry") + 1] == "tcp://127.0.0.1:7001"
    for bad, match in [
        ({"workers": [{"role": "prefill"}]}, "need a decode"),
        ({"workers": [{"role": "decode"}, {"role": "both"}]}, "need a prefill"),
        ({"workers": [{"role": "mixer"}]}, "allowed: prefill, decode, both"),
        ({"workers": [{"role": "both", "runtime": {"max_batch_size": 0}}]}, "max_batch_size"),
        ({"workers": [{"role": "both", "gpus": [0]}]}, "unknown key"),
        ({"frontend": {"router_mode": "random"}, "workers": [{"role": "both"}]}, "router_mode"),
        (
            {"workers": [{"role": "prefill", "runtime": {"tensor_parallel_size": 2}}, {"role": "decode"}]},
            "multi-rank",
        ),
        (
            {"workers": [{"role": "prefill"}, {"role": "decode", "kv_transport": "cuda_ipc"}]},
            r"workers\[1\]\.kv_transport is 'cuda_ipc' \(cuda_ipc was removed.*allowed: auto, zmq, nixl",
        ),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_deployment(bad)


def test_an_unknown_kv_transport_is_refused_naming_the_valid_ones():
    from osserve.disagg.worker import WorkerOptions

    with pytest.raises(ValueError, match="kv_transport is 'ucx'; allowed: auto, zmq, nixl"):
        WorkerOptions(role="decode", registry="tcp://127.0.0.1:1", kv_transport="ucx")
    with pytest.raises(ValueError, match="kv_transfer_timeout"):
        WorkerOptions(role="decode", registry="tcp://127.0.0.1:1", kv_transfer_timeout=0)
    r = subprocess.run(
        [sys.executable, "-m", "osserve", "worker", "--role", "decode", "--registry", "tcp://127.0.0.1:1"]
        + ["--kv-transport", "cuda_ipc"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "kv_transport is 'cuda_ipc' (cuda_ipc was removed" in r.stderr
    assert "allowed: auto, zmq, nixl" in r.stderr
