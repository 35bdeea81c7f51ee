"""The GPU path (Triton kernels, packed MXFP4, CUDA graphs) against the PyTorch reference path."""

from __future__ import annotations

import pytest
import torch

from osserve.bench.parity import compare, verdict
from osserve.config import EngineConfig
from osserve.engine.factory import build_engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

GPU_PATH = {"attention_backend": "triton", "moe_config": {"backend": "triton"}, "max_num_tokens": 64}


def test_gpu_path_uses_the_kernels_and_graphs(tiny_ckpt):
    core = build_engine(EngineConfig.from_dict({"model": str(tiny_ckpt), "device": "cuda", **GPU_PATH}))[0]
    assert core.runner.model.ops.graph_safe and core.runner.graphs is not None


def test_gpu_path_equals_reference_path_within_bf16(tiny_ckpt):
    """16 mixed greedy requests on the GPU path and on the PyTorch path, both bf16 and batched alike; the
    float32 PyTorch path scores both token streams (osserve.bench.parity). The GPU path must be as close to
    float32 as the bf16 PyTorch path is: logprob errors of the same size at every quantile, and greedy
    choices that are the float32 argmax except at near-ties no wider than the reference's own."""
    gpu, ref, gpu_gen, ref_gen = compare(str(tiny_ckpt), "cuda", GPU_PATH)
    info = f"\nGPU path:     {gpu.summary()}\nPyTorch path: {ref.summary()}"
    assert [len(t) for t, _ in gpu_gen] == [len(t) for t, _ in ref_gen]
    assert not verdict(gpu, ref), f"{verdict(gpu, ref)}{info}"
    same = sum(a == b for (a, _), (b, _) in zip(gpu_gen, ref_gen, strict=True))
    print(f"{info}\n{same}/16 requests gave the same greedy tokens on both paths")
