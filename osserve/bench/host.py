"""`osserve bench host`: the engine's host cost per sequence per step, without a GPU.

It runs the engine as `osserve serve` does on a GPU: the engine loop in its own process (ProcessEngine), its
per-step outputs over the real ZeroMQ transport to this process, where the real output processor turns them
into streams that consumers read (detokenized, as the completions endpoint does). Only the model is a
stand-in (`standin:PRESET`, osserve/model/standin.py): its forward and sampling cost nothing, so a step's
time is all host work. With N requests running, it reports steps per second and the engine's wall time per
step divided by N (host µs per sequence per step), and the part of it spent inside EngineCore.step().
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

from osserve.config import EngineConfig
from osserve.sampling_params import OutputKind, SamplingParams

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "host",
        help="measure the engine's host cost per sequence per step (stand-in model, CPU)",
        description="Run N decoding requests through the engine with a stand-in model that costs nothing, "
        "engine in its own process and outputs through the real transport and output processor, and "
        "print steps/s and host microseconds per sequence per step for each N.",
    )
    p.add_argument("--sizes", default="64,512,1024", help="numbers of running requests, comma-separated")
    p.add_argument("--preset", default="gpt-oss-20b", help="layer layout of the stand-in model")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--window", type=float, default=3.0, help="seconds measured at each size (after warm-up)")
    p.add_argument("--warmup-steps", type=int, default=20, help="decode steps before measuring")
    p.add_argument(
        "--engine-process",
        default="true",
        choices=["true", "false"],
        help="engine loop in its own process (as served on a GPU), or on a thread of this one",
    )
    p.add_argument("--save-result", default=None, help="write the figures as JSON to this file")
    p.set_defaults(func=lambda args: 0 if run(args) else 1)
    return p


def _engine(args: argparse.Namespace, n: int, max_tokens: int) -> Any:
    from osserve.engine.async_engine import AsyncEngine
    from osserve.engine.engine_process import ProcessEngine
    from osserve.harmony.encoding import get_tokenizer

    per_request = -(-(args.prompt_len + max_tokens) // 16) + 2
    config = EngineConfig.from_dict(
        {
            "model": f"standin:{args.preset}",
            "device": "cpu",
            "max_batch_size": n,
            "max_num_tokens": max(8192, n),
            "max_seq_len": args.prompt_len + max_tokens + 16,
            "kv_cache_config": {"max_blocks": n * per_request + 16},
            "cuda_graph_config": {"max_batch_size": 0},
        }
    )
    if args.engine_process == "true":
        return ProcessEngine(config, get_tokenizer())
    return AsyncEngine(config, get_tokenizer())


async def _measure(args: argparse.Namespace, n: int) -> dict[str, Any]:
    # Enough tokens that no request ends inside the window, at a generous steps/s bound.
    max_tokens = args.warmup_steps + int(args.window * 2000) + 64
    engine = _engine(args, n, max_tokens)
    engine.start()
    await engine.wait_ready_async(300)
    params = SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True, output_kind=OutputKind.DELTA
    )
    received = [0]

    async def consume(i: int) -> None:
        prompt = [1000 + (i * 31 + j) % 5000 for j in range(args.prompt_len)]
        async for out in engine.add_request(f"h{i}", prompt, params):
            received[0] += len(out.outputs[0].token_ids)

    tasks = [asyncio.ensure_future(consume(i)) for i in range(n)]
    try:
        # Warm-up: every request admitted, its prompt computed, some decode steps behind it.
        deadline = time.monotonic() + 600
        while True:
            s = engine.stats
            if (
                s.get("num_running", 0) == n
                and s.get("num_waiting", 0) == 0
                and received[0] >= n * args.warmup_steps
            ):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} requests did not reach steady decoding within 600 s: {s}")
            await asyncio.sleep(0.01)
        s0, t0, r0 = dict(engine.stats), time.perf_counter(), received[0]
        await asyncio.sleep(args.window)
        s1, t1, r1 = dict(engine.stats), time.perf_counter(), received[0]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
    steps = s1["num_steps"] - s0["num_steps"]
    if steps <= 0:
        raise RuntimeError(f"no engine step finished in {args.window} s at {n} running")
    wall = t1 - t0
    return {
        "running": n,
        "steps": steps,
        "steps_per_s": steps / wall,
        "host_us_per_seq_step": wall / steps / n * 1e6,
        "in_step_us_per_seq_step": (s1["step_seconds"] - s0["step_seconds"]) / steps / n * 1e6,
        "generated_tok_per_s": (s1["num_generated_tokens"] - s0["num_generated_tokens"]) / wall,
        "delivered_tok_per_s": (r1 - r0) / wall,
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    sizes = [int(x) for x in str(args.sizes).split(",") if x.strip()]
    if not sizes or any(n < 1 for n in sizes):
        raise SystemExit(f"--sizes takes positive integers separated by commas, got {args.sizes!r}")
    where = "engine process" if args.engine_process == "true" else "engine thread"
    print(f"stand-in {args.preset}, {where}, prompt {args.prompt_len} tokens, window {args.window:g} s")
    print(
        f"{'running':>8} {'steps/s':>9} {'host us/seq/step':>17} {'in step()':>10} {'tok/s':>10} {'delivered':>10}"
    )
    results = []
    for n in sizes:
        r = asyncio.run(_measure(args, n))
        results.append(r)
        print(
            f"{n:>8} {r['steps_per_s']:>9.1f} {r['host_us_per_seq_step']:>17.2f} "
            f"{r['in_step_us_per_seq_step']:>10.2f} {r['generated_tok_per_s']:>10.0f} {r['delivered_tok_per_s']:>10.0f}",
            flush=True,
        )
    if args.save_result:
        meta = {"preset": args.preset, "prompt_len": args.prompt_len, "engine_process": args.engine_process}
        Path(args.save_result).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return results
