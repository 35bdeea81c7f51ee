"""Which GPU kernel family moves the engine's logprobs away from the bf16 PyTorch reference: the GPU engine
test's 16 requests, scored by teacher forcing, with each backend swapped for its PyTorch twin in turn.
`python scripts/gpu_diag_engine.py CHECKPOINT` prints the quantiles of |logprob difference| per variant."""

from __future__ import annotations

import random
import sys

from osserve.config import EngineConfig
from osserve.engine.factory import build_engine
from osserve.sampling_params import SamplingParams


def run(ckpt, opts, prompts, params):
    core = build_engine(EngineConfig.from_dict({"model": ckpt, "device": "cuda", **opts}), progress=False)[0]
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        core.add_request(f"r{i}", p, sp)
    done = {}
    while core.has_unfinished():
        for out in core.step():
            if out.finished:
                done[int(out.request_id[1:])] = out
    return done


def main() -> None:
    ckpt = sys.argv[1]
    rng = random.Random(0)
    prompts = [[rng.randrange(199998) for _ in range(rng.randrange(1, 80))] for _ in range(16)]
    lens = [rng.randrange(1, 40) for _ in range(16)]
    torch_path = {
        "attention_backend": "torch",
        "moe_config": {"backend": "torch"},
        "cuda_graph_config": {"max_batch_size": 0},
    }
    variants = {
        "torch path, max_num_tokens 64": {**torch_path, "max_num_tokens": 64},
        "triton attn + triton moe + graphs": {
            "attention_backend": "triton",
            "moe_config": {"backend": "triton"},
            "max_num_tokens": 64,
        },
        "triton attn + triton moe, no graphs": {
            "attention_backend": "triton",
            "moe_config": {"backend": "triton"},
            "max_num_tokens": 64,
            "cuda_graph_config": {"max_batch_size": 0},
        },
        "torch attn + triton moe": {
            "attention_backend": "torch",
            "moe_config": {"backend": "triton"},
            "max_num_tokens": 64,
            "cuda_graph_config": {"max_batch_size": 0},
        },
        "triton attn + torch moe": {
            "attention_backend": "triton",
            "moe_config": {"backend": "torch"},
            "max_num_tokens": 64,
            "cuda_graph_config": {"max_batch_size": 0},
        },
    }
    for name, opts in variants.items():
        gpu = run(
            ckpt,
            opts,
            prompts,
            [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=1) for n in lens],
        )
        seqs = [prompts[i] + gpu[i].outputs[0].token_ids for i in range(16)]
        ref = run(
            ckpt, torch_path, seqs, [SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2)] * 16
        )
        diffs = []
        for i in range(16):
            out = gpu[i].outputs[0]
            for j, tok in enumerate(out.token_ids):
                entry = ref[i].prompt_logprobs[len(prompts[i]) + j]
                diffs.append((abs(out.logprobs[j][tok].logprob - entry[tok].logprob), i, j))
        diffs.sort()
        d = [x[0] for x in diffs]
        q = {f"p{p}": round(d[int(p / 100 * (len(d) - 1))], 4) for p in (50, 90, 95, 99, 100)}
        print(
            f"{name:40s} {q} worst (diff, req, tok): {[(round(a, 3), b, c) for a, b, c in diffs[-3:]]}",
            flush=True,
        )


if __name__ == "__main__":
    main()
