"""`osserve bench offline`: engine throughput in-process on a synthetic workload (no HTTP)."""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

from osserve.sampling_params import SamplingParams


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "offline",
        help="measure engine throughput in-process on random prompts",
        description="Run N random prompts of exact token counts through the engine (no HTTP) and print "
        "requests/s and tokens/s. Engine options are given as JSON with --engine-options.",
    )
    p.add_argument("--model", default="", help="checkpoint folder or HF repo id ('' = the embedded default)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=128, help="output tokens per request (ignore_eos)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--engine-options", default="{}", help="JSON engine options, e.g. '{\"max_batch_size\": 64}'"
    )
    p.add_argument("--save-result", default=None, help="write the figures as JSON to this file")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    from osserve.llm import LLM

    options = json.loads(args.engine_options)
    llm = LLM(model=args.model, **options)
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(199998) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    # Warm-up on other prompts of the same length (the prefix cache must not serve the measured ones):
    # first-call costs (kernel compiles, allocator growth) stay out of the figures.
    warm = [[rng.randrange(199998) for _ in range(args.input_len)] for _ in range(2)]
    llm.generate(warm, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, sp)
    elapsed = time.perf_counter() - start
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_in = sum(len(o.prompt_token_ids) for o in outs)
    # Per request: time to first token and decode speed after it (from the engine's own timestamps).
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs]
    decode = [
        (len(o.outputs[0].token_ids) - 1) / (o.metrics.finished_time - o.metrics.first_token_time)
        for o in outs
        if len(o.outputs[0].token_ids) > 1 and o.metrics.finished_time > o.metrics.first_token_time
    ]
    result = {
        "model": llm.model_name,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "engine_options": options,
        "device": str(llm.engine.runner.device),
        "elapsed_s": elapsed,
        "requests_per_s": args.num_prompts / elapsed,
        "output_tokens_per_s": n_out / elapsed,
        "total_tokens_per_s": (n_in + n_out) / elapsed,
        "num_steps": llm.engine.stats()["num_steps"],
        "mean_ttft_ms": 1000 * sum(ttft) / len(ttft),
        "mean_decode_tokens_per_s_per_request": sum(decode) / len(decode) if decode else None,
    }
    print(
        f"{args.num_prompts} requests ({args.input_len} in / {args.output_len} out) on {result['device']} "
        f"in {elapsed:.2f} s\n"
        f"  requests/s:        {result['requests_per_s']:.2f}\n"
        f"  output tokens/s:   {result['output_tokens_per_s']:.1f}\n"
        f"  total tokens/s:    {result['total_tokens_per_s']:.1f}\n"
        f"  mean TTFT:         {result['mean_ttft_ms']:.1f} ms\n"
        f"  decode tok/s/req:  {result['mean_decode_tokens_per_s_per_request'] or 0:.1f}"
    )
    if args.save_result:
        Path(args.save_result).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m osserve.bench.offline")
    add_parser(_parser.add_subparsers())
    _args = _parser.parse_args(["offline", *__import__("sys").argv[1:]])
    _args.func(_args)
