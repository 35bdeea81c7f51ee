"""The Triton op table for CUDA: `make_ops(attention_backend, moe_backend) -> KernelOps`.

Imported only by `select_ops` where CUDA is present, so CPU installs never import triton. A backend of
"torch" keeps that op family on the PyTorch reference; "auto" and "triton" take the Triton kernels. For the
MoE, "auto" also takes the dequantize + grouped-GEMM path for large batches (measured crossover), "triton"
never does and "grouped" does for every batch past the gemv regime (triton_moe.py).
"""

from __future__ import annotations

from osserve.config import ATTENTION_BACKENDS, MOE_BACKENDS
from osserve.kernels import KernelOps, reference
from osserve.kernels.triton_attention import paged_attention
from osserve.kernels.triton_bitmask import apply_token_bitmask_
from osserve.kernels.triton_common import load_tuned_from_env
from osserve.kernels.triton_moe import make_moe_op
from osserve.kernels.triton_mxfp4 import mxfp4_dequantize
from osserve.kernels.triton_norm import add_rms_norm, rms_norm
from osserve.kernels.triton_rope import rope_write_kv
from osserve.kernels.triton_router import route


def make_ops(attention_backend: str = "auto", moe_backend: str = "auto") -> KernelOps:
    for name, value, allowed in (
        ("attention_backend", attention_backend, ATTENTION_BACKENDS),
        ("moe_config.backend", moe_backend, MOE_BACKENDS),
    ):
        if value not in allowed:
            raise ValueError(f"{name} is {value!r}; allowed: {', '.join(map(repr, allowed))}")
    load_tuned_from_env()
    attn = attention_backend != "torch"
    moe = moe_backend != "torch"
    return KernelOps(
        name=f"triton(attention={'triton' if attn else 'torch'}, moe={moe_backend if moe else 'torch'})",
        # Norms and RoPE follow the attention backend: "torch" there means the whole dense path.
        rms_norm=rms_norm if attn else reference.rms_norm,
        add_rms_norm=add_rms_norm if attn else reference.add_rms_norm,
        rope_write_kv=rope_write_kv if attn else reference.rope_write_kv,
        paged_attention=paged_attention if attn else reference.paged_attention,
        # NOTE: dense (dequantized) experts are the CPU layout; on CUDA the model keeps MXFP4 packed.
        moe_dense=reference.moe_dense,
        moe_mxfp4=make_moe_op(moe_backend) if moe else reference.moe_mxfp4,
        route=route if moe else reference.route,
        graph_safe=attn and moe,
        apply_token_bitmask=apply_token_bitmask_,
        mxfp4_dequantize=mxfp4_dequantize if moe else reference.mxfp4_dequantize,
    )
