"""Kernel selection: every op has a pure-PyTorch twin (reference.py) and, on CUDA, may have a Triton one.

The model calls ops through a `KernelOps` table, chosen once by the runner from the device and the
backend options; CPU always takes the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from osserve.kernels import reference


@dataclass(frozen=True)
class KernelOps:
    name: str
    rms_norm: Callable
    add_rms_norm: Callable
    rope_write_kv: Callable
    paged_attention: Callable
    route: Callable
    moe_dense: Callable
    moe_mxfp4: Callable
    # The grammar bitmask (structured outputs); the reference by default, so tables built without it work.
    apply_token_bitmask: Callable = reference.apply_token_bitmask_
    # MXFP4 blocks + scales -> dense (moe_config.bf16_experts keeps such a copy of the experts).
    mxfp4_dequantize: Callable = reference.mxfp4_dequantize
    # Safe to capture in a CUDA graph: no host syncs, launch shapes that depend only on tensor shapes.
    graph_safe: bool = False


REFERENCE_OPS = KernelOps(
    name="torch",
    rms_norm=reference.rms_norm,
    add_rms_norm=reference.add_rms_norm,
    rope_write_kv=reference.rope_write_kv,
    paged_attention=reference.paged_attention,
    route=reference.route,
    moe_dense=reference.moe_dense,
    moe_mxfp4=reference.moe_mxfp4,
)


def select_ops(device_type: str, attention_backend: str = "auto", moe_backend: str = "auto") -> KernelOps:
    """The op table for a device: Triton where asked or where `auto` finds CUDA, else the reference."""
    if device_type != "cuda":
        for name, value in (("attention_backend", attention_backend), ("moe_config.backend", moe_backend)):
            if value in ("triton", "grouped"):
                raise ValueError(f"{name} {value!r} needs a CUDA device; this one is {device_type!r}")
        return REFERENCE_OPS
    try:
        from osserve.kernels import triton_ops  # noqa: F401  (only importable where Triton is)
    except ImportError:
        if "triton" in (attention_backend, moe_backend) or moe_backend == "grouped":
            raise
        return REFERENCE_OPS
    return triton_ops.make_ops(attention_backend, moe_backend)
