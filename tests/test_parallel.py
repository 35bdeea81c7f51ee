"""Parallel engines on CPU (gloo, 2 ranks = this process + one spawned worker) against one rank.

Every layout must give the single-rank greedy outputs token for token, hold only its shard of the weights
on each rank, and turn a dead or hung rank into an error instead of a hang.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import run_requests

from osserve.config import EngineConfig
from osserve.distributed import launcher
from osserve.distributed.launcher import RankFailedError, make_engine
from osserve.engine.llm_engine import LLMEngine
from osserve.harmony.encoding import get_tokenizer
from osserve.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

# Small KV pools: allocation stays cheap, and the agreed size is checked on every rank.
BASE = {"kv_cache_config": {"max_cpu_bytes": 8 << 20}}
ROOT = Path(__file__).resolve().parents[1]


def workload(seed: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    """8 mixed requests: 1 to 70 prompt tokens (past the sliding window of 16), two sharing a 32-token
    prefix (prefix-cache hits), 1 to 24 output tokens, two with logprobs."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(199998) for _ in range(n)] for n in (1, 5, 17, 33, 48, 70, 9)]
    prompts.append(prompts[3][:32] + [rng.randrange(199998) for _ in range(6)])
    params = [
        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=2 if i % 4 == 0 else None)
        for i, n in enumerate((24, 1, 12, 20, 7, 16, 3, 10))
    ]
    return prompts, params


def run(core, prompts, params) -> dict[int, object]:
    return run_requests(core, prompts, params, check_invariant=False, check_freed=False)


@contextmanager
def one_thread():
    # NOTE: two ranks share this machine's cores; more threads per rank only make them fight.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def parallel_engine(ckpt, **opts):
    core, _ = make_engine(EngineConfig.from_dict({"model": str(ckpt), **BASE, **opts}), progress=False)
    try:
        yield LLMEngine(core, get_tokenizer())
    finally:
        launcher.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    prompts, params = workload()
    with one_thread():
        core, _ = make_engine(EngineConfig.from_dict({"model": str(tiny_ckpt), **BASE}), progress=False)
        single_params = {n: p.numel() * p.element_size() for n, p in core.runner.model.named_parameters()}
        return prompts, params, run(LLMEngine(core, get_tokenizer()), prompts, params), single_params


def assert_same_outputs(done, reference_done) -> None:
    assert sorted(done) == sorted(reference_done)
    for i, ref in reference_done.items():
        got = done[i].outputs[0]
        assert got.token_ids == ref.outputs[0].token_ids, f"request {i}"
        if ref.outputs[0].logprobs is not None:
            for a, b in zip(got.logprobs, ref.outputs[0].logprobs, strict=True):
                assert a.keys() == b.keys()
                assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)


def shard_factor(name: str, parallel) -> int:
    """Into how many pieces `parallel` cuts a parameter (1: every rank holds it whole)."""
    if ".mlp.w2_bias" in name:  # [experts, hidden]: cut by experts only
        return parallel.ep_size
    if ".mlp.w" in name:  # w13, w2, w13_bias: by experts and each expert's intermediate dimension
        return parallel.world_size
    if any(s in name for s in ("qkv_proj.", "o_proj.weight", ".sinks")):
        return parallel.tp_size
    return 1


def assert_holds_only_its_shard(launch, single_params) -> None:
    """Each rank holds the replicated weights whole and its piece of every sharded one, nothing more."""
    par = launch.parallel
    assert [i["rank"] for i in launch.rank_info] == list(range(par.world_size))
    assert len({i["num_kv_blocks"] for i in launch.rank_info}) == 1
    want = {n: b // shard_factor(n, par) for n, b in single_params.items()}
    # Which parameters are cut depends on the layout; experts always are (the embedding and unembedding,
    # replicated, dominate this tiny model's bytes).
    assert any(".mlp.w13" in n and want[n] < single_params[n] for n in want)
    for info in launch.rank_info:
        assert info["params"] == want, info["rank"]
        assert info["param_bytes"] == sum(want.values())
    assert {i["pid"] for i in launch.rank_info[1:]} == {p.pid for p in launch.procs.values()}


@pytest.mark.parametrize(
    "opts",
    [
        {"tensor_parallel_size": 2},
        {"moe_expert_parallel_size": 2},
        # Chunked prefill: 16-token steps cut every longer prompt, mixing chunks and decodes.
        {"tensor_parallel_size": 2, "moe_expert_parallel_size": 2, "max_num_tokens": 16},
    ],
    ids=["tp2", "ep2", "tp2-ep2-chunked"],
)
def test_tensor_and_expert_parallel_match_one_rank(tiny_ckpt, reference, opts):
    prompts, params, ref_done, single_params = reference
    with parallel_engine(tiny_ckpt, **opts) as core:
        assert_holds_only_its_shard(launcher.current_launch(), single_params)
        assert_same_outputs(run(core, prompts, params), ref_done)
        # A second round on the same engine: prefix-cache hits from the first, blocks reused.
        again = run(core, prompts[:3], params[:3])
        assert_same_outputs(again, {i: ref_done[i] for i in range(3)})
        assert core.kv.usage()["in_use"] == 0


def test_attention_data_parallel_matches_one_rank(tiny_ckpt, reference, monkeypatch, caplog):
    """DEP2 through the offline LLM API: requests spread over both ranks' schedulers, MoE shared."""
    from osserve.llm import LLM

    # Ranks whose collectives stopped lining up fail in a minute rather than hang.
    monkeypatch.setenv("OSSERVE_DIST_TIMEOUT_S", "60")

    prompts, params, ref_done, single_params = reference
    opts = {
        "tensor_parallel_size": 2,
        "moe_expert_parallel_size": 2,
        "enable_attention_dp": True,
        "max_num_tokens": 16,
        **BASE,
    }
    llm = LLM(model=str(tiny_ckpt), **opts)
    try:
        assert_holds_only_its_shard(launcher.current_launch(), single_params)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert_same_outputs(dict(enumerate(outs)), ref_done)
        stats = llm.engine.stats()
        assert stats["num_steps"] > 0 and stats["step_seconds"] > 0
        assert stats["num_generated_tokens"] == sum(len(o.outputs[0].token_ids) for o in outs)
        # The engine's periodic log line reads these counters (a served DEP engine crashed without them).
        from osserve.engine.async_engine import ProgressLog

        caplog.set_level("INFO", logger="osserve.engine.async_engine")
        ProgressLog({**stats, "num_steps": 0}, interval=0.0).maybe_log(stats)
        assert "generated tok/s" in caplog.text
        # Both ranks served requests (balanced by count), and every block came back.
        assert llm.engine.stats()["kv"]["in_use"] == 0
        # Text comes from each rank's own detokenizer: same as decoding the tokens here.
        for out in outs:
            assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids)
        # Abort of a request placed on the worker rank, then more work on the same engine.
        for i in range(2):
            llm.engine.add_request(
                f"a{i}", prompts[5], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
            )
        assert llm.engine.core.load == [1, 1]
        llm.engine.step()
        aborted = llm.engine.abort(["a1"])
        assert aborted and aborted[0].finished and aborted[0].outputs[0].finish_reason == "abort"
        # Rank 1 has nothing left: it joins these steps' MoE exchanges with idle forwards. (Steps that only
        # compute a prompt chunk have no output.)
        got: list[str] = []
        while len(got) < 3:
            got += [o.request_id for o in llm.engine.step()]
        assert got == ["a0"] * len(got)
        assert llm.engine.stats()["num_running"] == 1
        # One forward per rank per global step, idle ones included (rank 1 sat out at least the last 3).
        dp = llm.engine.core
        assert dp.sync.num_forwards == dp.num_steps
        assert dp.rank_stats[1]["num_steps"] < dp.num_steps - 3
        llm.engine.abort(["a0"])
        assert not llm.engine.has_unfinished()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:4]], params[:4], use_tqdm=False)
        assert_same_outputs(dict(enumerate(outs)), {i: ref_done[i] for i in range(4)})
    finally:
        launcher.shutdown()


def test_dead_or_hung_rank_fails_with_a_clear_error(tiny_ckpt, monkeypatch):
    prompts, params = workload()
    # A hung rank: collectives give up after 3 s instead of waiting forever.
    monkeypatch.setenv("OSSERVE_DIST_TIMEOUT_S", "3")
    with parallel_engine(tiny_ckpt, tensor_parallel_size=2) as core:
        run(core, prompts[:1], params[:1])
        # Idle for longer than the timeout: the heartbeat keeps the waiting worker alive.
        time.sleep(5)
        run(core, prompts[1:2], params[1:2])
        (worker,) = launcher.current_launch().procs.values()
        os.kill(worker.pid, signal.SIGSTOP)
        core.add_request("hung", prompts[2], params[2])
        start = time.monotonic()
        with pytest.raises(RankFailedError, match="did not answer"):
            while core.has_unfinished():
                core.step()
        assert time.monotonic() - start < 30
        # A dead rank: named, with how it ended, at once.
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
        time.sleep(0.5)
        with pytest.raises(RankFailedError, match=r"rank 1 \(pid \d+\) was killed by SIGKILL"):
            core.step()
        core.abort(["hung"])
        core.add_request("after", prompts[0], params[0])
        with pytest.raises(RankFailedError, match="rank 1"):
            core.step()


def test_worker_exits_when_rank0_dies(tiny_ckpt, tmp_path):
    """Rank 0 killed outright (no cleanup): its worker must not be left running."""
    script = (
        "import sys, time; from osserve.config import EngineConfig; from osserve.distributed import launcher\n"
        "from osserve.distributed.launcher import make_engine\n"
        f"make_engine(EngineConfig.from_dict({{'model': {str(tiny_ckpt)!r}, 'moe_expert_parallel_size': 2, "
        f"**{BASE!r}}}), progress=False)\n"
        "print(*[p.pid for p in launcher.current_launch().procs.values()], flush=True)\n"
        "time.sleep(600)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    rank0 = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        worker_pid = int(rank0.stdout.readline())
        rank0.kill()
        rank0.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _alive(worker_pid):
            time.sleep(0.2)
        assert not _alive(worker_pid), "the worker outlived rank 0"
    finally:
        rank0.kill()


def test_torchrun_ranks_match_one_rank(tiny_ckpt, reference, tmp_path):
    """Ranks started by torchrun (env:// rendezvous, as across hosts): rank 0 builds the engine, rank 1 runs
    the worker, exactly as `torchrun -m osserve.distributed.run` dispatches them."""
    prompts, params, ref_done, _ = reference
    out = tmp_path / "tokens.json"
    script = tmp_path / "rank.py"
    script.write_text(
        "import json, os, sys\n"
        "if os.environ['RANK'] != '0':\n"
        "    from osserve.distributed.rank_worker import main; sys.exit(main())\n"
        "from osserve.config import EngineConfig; from osserve.distributed import launcher\n"
        "from osserve.distributed.launcher import make_engine; from osserve.sampling_params import SamplingParams\n"
        "from osserve.engine.llm_engine import LLMEngine\n"
        f"core, _ = make_engine(EngineConfig.from_dict({{'model': {str(tiny_ckpt)!r}, 'tensor_parallel_size': 2, "
        f"'moe_expert_parallel_size': 2, **{BASE!r}}}), progress=False)\n"
        "core = LLMEngine(core)\n"
        f"prompts = {prompts!r}\n"
        f"lens = {[p.max_tokens for p in params]!r}\n"
        "for i, (p, n) in enumerate(zip(prompts, lens)):\n"
        "    core.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))\n"
        "done = {}\n"
        "while core.has_unfinished():\n"
        "    done.update({o.request_id: o.outputs[0].token_ids for o in core.step() if o.finished})\n"
        f"open({str(out)!r}, 'w').write(json.dumps(done))\n"
        "launcher.shutdown()\n"
    )
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", str(script)],
        env=env,
        check=True,
        timeout=120,
    )
    import json

    done = json.loads(out.read_text())
    assert {int(k): v for k, v in done.items()} == {i: o.outputs[0].token_ids for i, o in ref_done.items()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_bad_layouts_fail_before_any_process_starts(tiny_ckpt):
    with pytest.raises(
        ValueError, match=r"tensor_parallel_size \(4\) must divide num_key_value_heads \(2\); allowed: 1, 2"
    ):
        make_engine(
            EngineConfig.from_dict({"model": str(tiny_ckpt), "tensor_parallel_size": 4}), progress=False
        )
    with pytest.raises(ValueError, match="must be 1 or the world size"):
        make_engine(
            EngineConfig.from_dict(
                {"model": str(tiny_ckpt), "tensor_parallel_size": 2, "moe_expert_parallel_size": 4}
            ),
            progress=False,
        )
    with pytest.raises(ValueError, match="more than the model's experts"):
        make_engine(
            EngineConfig.from_dict({"model": str(tiny_ckpt), "moe_expert_parallel_size": 16}), progress=False
        )
    assert launcher.current_launch() is None


def test_idle_async_engine_turns_dead_when_a_rank_dies(tiny_ckpt):
    """/health must not say "ready" for a parallel engine whose rank died while no request was running."""
    from osserve.engine.async_engine import AsyncEngine

    config = EngineConfig.from_dict({"model": str(tiny_ckpt), **BASE, "tensor_parallel_size": 2})
    # As the server builds it: the engine client gets make_engine, which starts the other rank.
    eng = AsyncEngine(config, None, lambda: make_engine(config, progress=False))
    eng.start()
    try:
        eng.wait_ready(120)
        (worker,) = launcher.current_launch().procs.values()
        os.kill(worker.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while eng.state != "dead" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert eng.state == "dead" and "rank 1" in (eng.error or "")
    finally:
        eng.shutdown()
        launcher.shutdown()


def test_random_model_spec_runs_parallel(reference):
    """`random:PRESET` (no files: every rank draws the weights make-checkpoint would write) is checked against
    the preset's shape and runs under TP2 with the tiny checkpoint's greedy tokens."""
    prompts, params, ref_done, _ = reference
    with one_thread(), parallel_engine("random:tiny", tensor_parallel_size=2) as core:
        assert_same_outputs(run(core, prompts, params), ref_done)
    with pytest.raises(ValueError, match="must divide num_key_value_heads"):
        make_engine(
            EngineConfig.from_dict({"model": "random:tiny", "tensor_parallel_size": 4}), progress=False
        )
