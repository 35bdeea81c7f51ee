"""Parallel engines on several GPUs (NCCL, one process per GPU) against one rank on one GPU.

The CPU suite (tests/test_parallel.py, gloo) checks every layout's logic; this one checks the NCCL path:
the batch broadcast from rank 0's device tensors, the all-reduces, DEP's all-gather / reduce-scatter, and
the Triton kernels on each rank's shard (expert offsets under EP, a head slice under TP). Needs 2 GPUs
(4 for the EP4 case); skips otherwise.
"""

from __future__ import annotations

import pytest
import torch
from test_parallel import assert_same_outputs, run, workload

from osserve.bench.parity import compare, verdict
from osserve.config import EngineConfig
from osserve.distributed import launcher
from osserve.distributed.launcher import make_engine
from osserve.llm import LLM

NUM_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = pytest.mark.skipif(NUM_GPUS < 2, reason="needs 2 CUDA GPUs")

# float32 and the PyTorch kernels: a layout then changes only the order of a few sums, and greedy tokens and
# logprobs must match one rank as on the CPU.
EXACT = {
    "device": "cuda",
    "dtype": "float32",
    "attention_backend": "torch",
    "moe_config": {"backend": "torch"},
    "cuda_graph_config": {"max_batch_size": 0},
    "kv_cache_config": {"max_blocks": 2048},
}


@pytest.fixture(scope="module")
def one_gpu(tiny_ckpt):
    prompts, params = workload()
    core, _ = make_engine(EngineConfig.from_dict({"model": str(tiny_ckpt), **EXACT}), progress=False)
    return prompts, params, run(core, prompts, params)


@pytest.mark.parametrize(
    "opts",
    [
        {"tensor_parallel_size": 2},
        {"moe_expert_parallel_size": 2},
        {"tensor_parallel_size": 2, "moe_expert_parallel_size": 2, "max_num_tokens": 16},
        pytest.param(
            {"moe_expert_parallel_size": 4},
            marks=pytest.mark.skipif(NUM_GPUS < 4, reason="needs 4 CUDA GPUs"),
        ),
    ],
    ids=["tp2", "ep2", "tp2-ep2-chunked", "ep4"],
)
def test_nccl_layouts_match_one_gpu(tiny_ckpt, one_gpu, opts):
    prompts, params, ref = one_gpu
    core, _ = make_engine(EngineConfig.from_dict({"model": str(tiny_ckpt), **EXACT, **opts}), progress=False)
    try:
        devices = [i["device"] for i in launcher.current_launch().rank_info]
        assert devices == [f"cuda:{r}" for r in range(len(devices))]
        assert_same_outputs(run(core, prompts, params), ref)
        assert core.kv.usage()["in_use"] == 0
    finally:
        launcher.shutdown()


def test_nccl_attention_data_parallel_matches_one_gpu(tiny_ckpt, one_gpu, monkeypatch):
    monkeypatch.setenv("OSSERVE_DIST_TIMEOUT_S", "60")
    prompts, params, ref = one_gpu
    opts = {**EXACT, "tensor_parallel_size": 2, "moe_expert_parallel_size": 2, "enable_attention_dp": True}
    llm = LLM(model=str(tiny_ckpt), **opts)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert_same_outputs(dict(enumerate(outs)), ref)
        assert min(s["num_steps"] for s in llm.engine.rank_stats) > 0
    finally:
        launcher.shutdown()


def test_triton_kernels_under_tp2_ep2_are_within_bf16(tiny_ckpt):
    """The GPU path (bf16, Triton attention on a head slice, Triton MoE on half the experts; eager, as
    parallel engines capture no CUDA graphs) against the single-GPU PyTorch path, by the float32-anchored parity measure of the single-GPU engine test."""
    opts = {
        "tensor_parallel_size": 2,
        "moe_expert_parallel_size": 2,
        "attention_backend": "triton",
        "moe_config": {"backend": "triton"},
    }
    test, ref, _, _ = compare(str(tiny_ckpt), "cuda", opts)
    assert not verdict(test, ref), f"{verdict(test, ref)}\n{test.summary()}\n{ref.summary()}"
