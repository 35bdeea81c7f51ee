"""Parity of an engine configuration with the PyTorch reference path, anchored to float32.

Two engines in bf16 never agree bit for bit: a batched decode GEMM sums in another order than a prefill
GEMM, and on a random-weight model a router near-tie can then flip an expert and move a logprob by most of
a nat. So "within bf16 tolerance" is measured here, not guessed: the engine under test and the PyTorch path
(same dtype, same batching) each generate greedily for the same mixed requests, then the PyTorch path in
float32 scores both token streams by teacher forcing (prompt logprobs of one prefill). The engine under test
passes when its distance from float32 is of the size of the PyTorch path's own, and its greedy choices are
the float32 argmax up to near-ties of that size.

`python -m osserve.bench.parity CHECKPOINT --device cuda --engine-options '{"moe_config": {"backend":
"triton"}}'` prints both distances.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

from osserve.distributed import launcher
from osserve.llm import LLM
from osserve.sampling_params import SamplingParams

# The PyTorch reference path: PyTorch attention and MoE, no CUDA graphs.
TORCH_PATH: dict[str, Any] = {
    "attention_backend": "torch",
    "moe_config": {"backend": "torch"},
    "cuda_graph_config": {"max_batch_size": 0},
}

Generation = list[tuple[list[int], list[float]]]  # per request: greedy tokens and their logprobs


@dataclass
class Parity:
    """One engine's greedy tokens measured against the float32 reference's view of the same positions."""

    errors: list[tuple[float, int, int]] = field(default_factory=list)  # (|logprob - fp32|, request, pos)
    misses: list[tuple[float, int, int]] = field(default_factory=list)  # (fp32 margin to the argmax, ...)

    def quantile(self, p: float) -> float:
        v = sorted(e[0] for e in self.errors)
        return v[int(p / 100 * (len(v) - 1))]

    @property
    def max_error(self) -> float:
        return max(e[0] for e in self.errors)

    @property
    def max_miss(self) -> float:
        return max((m[0] for m in self.misses), default=0.0)

    def summary(self) -> str:
        q = " ".join(f"p{p} {self.quantile(p):.4f}" for p in (50, 90, 95, 99, 100))
        worst = ", ".join(f"{a:.3f}@({b},{c})" for a, b, c in sorted(self.errors)[-3:][::-1])
        return (
            f"{len(self.errors)} tokens; |logprob - fp32| {q} (worst {worst}); "
            f"{len(self.misses)} not the fp32 argmax (largest margin {self.max_miss:.3f})"
        )


def mixed_workload(n: int = 16, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """`n` prompts of 1-79 random tokens and a greedy length of 1-39 tokens each."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(199998) for _ in range(rng.randrange(1, 80))] for _ in range(n)]
    return prompts, [rng.randrange(1, 40) for _ in range(n)]


# A KV pool of this many blocks holds the workload many times over; sizing it from free memory would build
# a block table of millions for a small model.
KV_BLOCKS = 4096


def _run(checkpoint: str, device: str, opts: dict[str, Any], prompts: list[list[int]], params: list) -> list:
    opts = {**opts, "kv_cache_config": {"max_blocks": KV_BLOCKS, **opts.get("kv_cache_config", {})}}
    llm = LLM(model=str(checkpoint), device=device, **opts)
    try:
        return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    finally:
        del llm
        launcher.shutdown()  # the ranks of a parallel engine, if `opts` made one
        gc.collect()


def generate(
    checkpoint: str, device: str, opts: dict[str, Any], prompts: list[list[int]], lens: list[int]
) -> Generation:
    """Greedy generation of `lens[i]` tokens for each prompt (EOS ignored), all requests at once."""
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=1) for n in lens]
    gen = []
    for o in _run(checkpoint, device, opts, prompts, params):
        c = o.outputs[0]
        gen.append((list(c.token_ids), [c.logprobs[j][t].logprob for j, t in enumerate(c.token_ids)]))
    return gen


def score(
    checkpoint: str, device: str, prompts: list[list[int]], gen: Generation, dtype: str = "float32"
) -> list[list[dict[int, float]]]:
    """The PyTorch path's view of every generated position (one prefill of prompt + tokens, `dtype`):
    {token: logprob} holding the generated token and the argmax."""
    seqs = [p + toks for p, (toks, _) in zip(prompts, gen, strict=True)]
    params = [SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)] * len(seqs)
    outs = _run(checkpoint, device, {**TORCH_PATH, "dtype": dtype}, seqs, params)
    return [
        [{t: lp.logprob for t, lp in o.prompt_logprobs[len(p) + j].items()} for j in range(len(toks))]
        for p, (toks, _), o in zip(prompts, gen, outs, strict=True)
    ]


def measure(gen: Generation, view: list[list[dict[int, float]]]) -> Parity:
    res = Parity()
    for i, (toks, lps) in enumerate(gen):
        for j, (t, lp) in enumerate(zip(toks, lps, strict=True)):
            ref = view[i][j]
            res.errors.append((abs(lp - ref[t]), i, j))
            best = max(ref.values())
            if ref[t] < best:
                res.misses.append((best - ref[t], i, j))
    return res


def verdict(test: Parity, ref: Parity) -> list[str]:
    """What keeps `test` from being within bf16 tolerance of the reference path `ref` (empty: it is). Both
    were measured against float32 on the same requests; the bounds allow twice the reference's own error,
    since two bf16 engines that sum in different orders err independently of each other."""
    fails = []
    # Typical tokens: bf16 rounding, the same size on both paths (a wrong kernel is off by whole nats).
    for p in (50, 90, 99):
        if test.quantile(p) > 2 * ref.quantile(p) + 0.01:
            fails.append(f"p{p} error {test.quantile(p):.4f} > 2 x {ref.quantile(p):.4f} + 0.01")
    # The worst token: a routing near-tie flipped, which bf16 on either path can do.
    if test.max_error > 2 * ref.max_error + 0.05:
        fails.append(f"max error {test.max_error:.4f} > 2 x {ref.max_error:.4f} + 0.05")
    # Greedy choices: the float32 argmax, or a near-tie no wider than the reference's error allows.
    bound = max(2 * ref.max_miss, ref.max_error) + 0.05
    if test.max_miss > bound:
        fails.append(f"a choice {test.max_miss:.4f} below the fp32 argmax (allowed {bound:.4f})")
    if len(test.misses) > 2 * len(ref.misses) + 2:
        fails.append(f"{len(test.misses)} choices not the fp32 argmax > 2 x {len(ref.misses)} + 2")
    return fails


def compare(
    checkpoint: str, device: str, opts: dict[str, Any], dtype: str = "bfloat16", n: int = 16
) -> tuple[Parity, Parity, Generation, Generation]:
    """(engine under test, PyTorch path) against float32, and both generations. Both engines run in `dtype`
    with the same token budget, so they batch alike."""
    prompts, lens = mixed_workload(n)
    budget = {"max_num_tokens": opts.get("max_num_tokens", 64)}
    test = generate(checkpoint, device, {**budget, **opts, "dtype": dtype}, prompts, lens)
    ref = generate(checkpoint, device, {**TORCH_PATH, **budget, "dtype": dtype}, prompts, lens)
    views = score(checkpoint, device, prompts + prompts, test + ref)  # one float32 engine scores both
    return measure(test, views[:n]), measure(ref, views[n:]), test, ref


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m osserve.bench.parity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("checkpoint", help="a checkpoint folder (make-checkpoint writes small random ones)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", help="both engines' dtype (default bfloat16)")
    ap.add_argument(
        "--engine-options",
        action="append",
        default=[],
        help="JSON engine options of the engine under test; repeat to compare several (default: the "
        "Triton kernels with CUDA graphs)",
    )
    ap.add_argument("--num-requests", type=int, default=16)
    args = ap.parse_args(argv)
    variants = [json.loads(o) for o in args.engine_options] or [
        {"attention_backend": "triton", "moe_config": {"backend": "triton"}}
    ]
    failed = 0
    for opts in variants:
        t0 = time.perf_counter()
        test, ref, _, _ = compare(args.checkpoint, args.device, opts, args.dtype, args.num_requests)
        fails = verdict(test, ref)
        failed += bool(fails)
        print(
            f"== {json.dumps(opts)} ({time.perf_counter() - t0:.1f} s): {'; '.join(fails) or 'within bf16'}"
        )
        print(f"   engine:       {test.summary()}")
        print(f"   PyTorch path: {ref.summary()}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
