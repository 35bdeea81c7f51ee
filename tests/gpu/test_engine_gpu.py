"""The GPU path (Triton kernels, packed MXFP4, CUDA graphs) against the PyTorch reference path."""

from __future__ import annotations

import random

import pytest
import torch

from osserve.config import EngineConfig
from osserve.engine.factory import build_engine
from osserve.sampling_params import SamplingParams
from tests.helpers import run_requests

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# Both paths run in bf16, so the router sees the same rounding; teacher forcing keeps them on the same
# tokens so differences cannot compound. Random-weight routers have near-ties that bf16 kernel differences
# can still flip now and then, hence a tolerance on the typical error and a looser bound on the worst.
# (On the CPU, bf16 against float32 with the same code differs by up to 0.74 nats on this model: that is
# the scale of MoE routing flips, and why the reference here is bf16 too.)
LOGPROB_TOL = 0.1
# A GPU choice that is not the reference's argmax must be within this of it: two tokens whose logprobs each
# err by up to ~LOGPROB_TOL (bf16 kernels against bf16 PyTorch) can swap when they are this close.
NEAR_TIE = 2.5 * LOGPROB_TOL


def _engine(ckpt, **opts):
    return build_engine(
        EngineConfig.from_dict({"model": str(ckpt), "device": "cuda", **opts}), progress=False
    )[0]


def _run(core, prompts, params):
    return run_requests(core, prompts, params, check_invariant=False)


def test_gpu_path_equals_reference_path(tiny_ckpt):
    """16 mixed requests, greedy, on the GPU path; then the PyTorch path (bf16 too) scores the very same token
    sequences (prompt logprobs, teacher forcing): every GPU choice is the reference's argmax up to a
    near-tie, and the GPU's logprobs agree within bf16 tolerance."""
    rng = random.Random(0)
    prompts = [[rng.randrange(199998) for _ in range(rng.randrange(1, 80))] for _ in range(16)]
    lens = [rng.randrange(1, 40) for _ in range(16)]
    gpu_core = _engine(
        tiny_ckpt, attention_backend="triton", moe_config={"backend": "triton"}, max_num_tokens=64
    )
    assert gpu_core.runner.model.ops.graph_safe and gpu_core.runner.graphs is not None
    gpu = _run(
        gpu_core,
        prompts,
        [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=1) for n in lens],
    )
    ref_core = _engine(
        tiny_ckpt,
        attention_backend="torch",
        moe_config={"backend": "torch"},
        cuda_graph_config={"max_batch_size": 0},
    )
    seqs = [prompts[i] + gpu[i].outputs[0].token_ids for i in range(16)]
    ref = _run(ref_core, seqs, [SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2)] * 16)
    near_ties, diffs = 0, []
    for i in range(16):
        out = gpu[i].outputs[0]
        assert len(out.token_ids) == lens[i]
        for j, tok in enumerate(out.token_ids):
            entry = ref[i].prompt_logprobs[len(prompts[i]) + j]  # the reference's view of position j
            best = max(entry.values(), key=lambda lp: lp.logprob)
            diffs.append(abs(out.logprobs[j][tok].logprob - entry[tok].logprob))
            if entry[tok].rank != 1:
                assert best.logprob - entry[tok].logprob < NEAR_TIE, (i, j, best.logprob - entry[tok].logprob)
                near_ties += 1
    diffs.sort()
    q = {f"p{p}": round(diffs[int(p / 100 * (len(diffs) - 1))], 4) for p in (50, 90, 95, 99, 100)}
    # The typical token agrees to bf16 rounding; the tail is routing near-ties flipped (H100, 2026-11-23:
    # p50 0.005, p95 0.12, max 0.37 nats over 16 requests).
    assert (
        q["p50"] <= 0.02 and q["p90"] <= LOGPROB_TOL and q["p95"] <= 2 * LOGPROB_TOL and q["p100"] <= 0.5
    ), q
    assert near_ties <= 3, f"{near_ties} near-tie choices in {sum(lens)} tokens"
