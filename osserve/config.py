"""Model and engine configuration.

`ModelConfig` mirrors a Hugging Face `config.json` of GptOssForCausalLM; `EngineConfig` holds the runtime
knobs under the names gpt-oss users already write for TensorRT-LLM and Truss. Both are frozen dataclasses
validated in `__post_init__`; errors name the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters, as in the checkpoint's `rope_scaling`."""

    factor: float = 32.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    original_max_position_embeddings: int = 4096
    truncate: bool = False
    rope_type: str = "yarn"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    num_hidden_layers: int = 24
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    sliding_window: int = 128
    layer_types: tuple[str, ...] = ()
    rope_theta: float = 150000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    eos_token_id: int = 200002
    pad_token_id: int = 199999
    attention_bias: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if not self.layer_types:
            types = tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", types)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "num_local_experts",
            "num_experts_per_tok",
            "sliding_window",
            "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model config: {name} must be a positive integer, got {value!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"model config: layer_types has {len(self.layer_types)} entries, "
                f"num_hidden_layers is {self.num_hidden_layers}"
            )
        for i, t in enumerate(self.layer_types):
            if t not in (SLIDING, FULL):
                raise ValueError(f"model config: layer_types[{i}] is {t!r}; allowed: {SLIDING!r}, {FULL!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"model config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"model config: num_experts_per_tok ({self.num_experts_per_tok}) must be <= "
                f"num_local_experts ({self.num_local_experts})"
            )
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % 32:
                raise ValueError(
                    f"model config: {name} must be a multiple of 32 (MXFP4 blocks), got {getattr(self, name)}"
                )
        if self.head_dim % 2:
            raise ValueError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.tie_word_embeddings:
            raise ValueError("model config: tie_word_embeddings must be false for gpt-oss")

    # Derived values.
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def sliding_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == SLIDING]

    @property
    def full_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == FULL]

    # Hugging Face config.json round trip.
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if d.get("model_type", "gpt_oss") != "gpt_oss":
            raise ValueError(f"config.json: model_type is {d.get('model_type')!r}, osserve serves 'gpt_oss'")
        rs = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
        rope_theta = d.get("rope_theta", rs.get("rope_theta", 150000.0))
        known = {f.name for f in dataclasses.fields(RopeScaling)}
        rope = RopeScaling(**{k: v for k, v in rs.items() if k in known})
        if rope.rope_type != "yarn":
            raise ValueError(
                f"config.json: rope_scaling.rope_type is {rope.rope_type!r}; osserve implements 'yarn'"
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_scaling", "rope_theta"}
        kwargs = {k: d[k] for k in names if k in d}
        if "experts_per_token" in d and "num_experts_per_tok" not in d:
            kwargs["num_experts_per_tok"] = d["experts_per_token"]
        if "layer_types" in kwargs:
            kwargs["layer_types"] = tuple(kwargs["layer_types"])
        return cls(rope_scaling=rope, rope_theta=float(rope_theta), **kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        with open(path) as f:
            return cls.from_hf_dict(json.load(f))

    def to_hf_dict(self) -> dict[str, Any]:
        rope = dataclasses.asdict(self.rope_scaling)
        return {
            "architectures": ["GptOssForCausalLM"],
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "eos_token_id": self.eos_token_id,
            "experts_per_token": self.num_experts_per_tok,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initial_context_length": self.rope_scaling.original_max_position_embeddings,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_types": list(self.layer_types),
            "max_position_embeddings": self.max_position_embeddings,
            "model_type": "gpt_oss",
            "num_attention_heads": self.num_attention_heads,
            "num_experts_per_tok": self.num_experts_per_tok,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "num_local_experts": self.num_local_experts,
            "output_router_logits": False,
            "pad_token_id": self.pad_token_id,
            "quantization_config": {
                "modules_to_not_convert": [
                    "model.layers.*.self_attn",
                    "model.layers.*.mlp.router",
                    "model.embed_tokens",
                    "lm_head",
                ],
                "quant_method": "mxfp4",
            },
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": rope,
            "rope_theta": self.rope_theta,
            "router_aux_loss_coef": 0.9,
            "sliding_window": self.sliding_window,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": False,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }


def _layer_types(n: int) -> tuple[str, ...]:
    return tuple(SLIDING if i % 2 == 0 else FULL for i in range(n))


# The two released models (../shared/reference/*.config.json) and small ones for tests and the embedded
# default. Every preset keeps gpt-oss's shape rules: top-4 routing where experts allow, GQA, alternating
# sliding / full layers, YaRN RoPE, MXFP4 experts.
PRESETS: dict[str, ModelConfig] = {
    "gpt-oss-20b": ModelConfig(num_hidden_layers=24, num_local_experts=32, layer_types=_layer_types(24)),
    "gpt-oss-120b": ModelConfig(num_hidden_layers=36, num_local_experts=128, layer_types=_layer_types(36)),
    # Small enough for CPU tests, full Harmony vocabulary so the server can run on it.
    "tiny": ModelConfig(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=8,
        num_experts_per_tok=4,
        sliding_window=16,
        layer_types=_layer_types(4),
    ),
    # Odd sizes: 3 layers (two sliding, one full), 6 experts, window 5, a small vocabulary.
    "tiny-odd": ModelConfig(
        vocab_size=1000,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=16,
        num_local_experts=6,
        num_experts_per_tok=4,
        sliding_window=5,
        layer_types=_layer_types(3),
        eos_token_id=999,
        pad_token_id=998,
    ),
    # The embedded default of `osserve serve`: gpt-oss's head layout (head_dim 64, 8:1 GQA, window 128).
    "gpt-oss-mini": ModelConfig(
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=64,
        num_local_experts=8,
        num_experts_per_tok=4,
        sliding_window=128,
        layer_types=_layer_types(4),
    ),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    return PRESETS[name]


# ---------------------------------------------------------------------------------------------------------
# Engine options


def _check_choice(owner: str, name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}: {name} is {value!r}; allowed: {', '.join(map(repr, allowed))}")


def _check_int(owner: str, name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{owner}: {name} must be an integer {rng}, got {value!r}")


@dataclass(frozen=True)
class KvCacheConfig:
    # Fraction of the GPU memory left free after the weights load that the KV pool takes.
    free_gpu_memory_fraction: float = 0.9
    # Prefix caching: full blocks are hashed and reused across requests.
    enable_block_reuse: bool = True
    # Tokens per KV block (TensorRT-LLM's name).
    tokens_per_block: int = 16
    # On CPU the pool is sized from this byte budget.
    max_cpu_bytes: int = 1 << 30
    # An explicit block count overrides both sizings (tests use it to force preemption).
    max_blocks: int | None = None

    def __post_init__(self) -> None:
        f = self.free_gpu_memory_fraction
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0.0 < f <= 1.0:
            raise ValueError(f"kv_cache_config: free_gpu_memory_fraction must be in (0, 1], got {f!r}")
        _check_int("kv_cache_config", "tokens_per_block", self.tokens_per_block, 1, 1024)
        _check_int("kv_cache_config", "max_cpu_bytes", self.max_cpu_bytes, 1)
        if self.max_blocks is not None:
            _check_int("kv_cache_config", "max_blocks", self.max_blocks, 2)
        if not isinstance(self.enable_block_reuse, bool):
            raise ValueError(
                f"kv_cache_config: enable_block_reuse must be true or false, got {self.enable_block_reuse!r}"
            )


@dataclass(frozen=True)
class CudaGraphConfig:
    # Capture decode steps of up to this many requests; 0 turns CUDA graphs off.
    max_batch_size: int = 512
    # Pad a decode batch up to the next captured size instead of running it eagerly.
    enable_padding: bool = True

    def __post_init__(self) -> None:
        _check_int("cuda_graph_config", "max_batch_size", self.max_batch_size, 0, 4096)

    @property
    def batch_sizes(self) -> list[int]:
        if self.max_batch_size == 0:
            return []
        # Dense where batches are small (padding there costs most, relatively), coarser above.
        sizes = [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128]
        sizes += list(range(160, 257, 32)) + list(range(320, 4097, 64))
        return sorted({s for s in sizes if s <= self.max_batch_size} | {self.max_batch_size})


MOE_BACKENDS = ("auto", "triton", "grouped", "torch")
ATTENTION_BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class MoeConfig:
    # auto: Triton MXFP4 kernels on CUDA (plus dequantize + grouped bf16 GEMMs for large batches), the
    # PyTorch reference elsewhere; triton: Triton kernels only; grouped: the grouped GEMMs for every batch
    # past the decode (gemv) sizes; torch: the reference.
    backend: str = "auto"
    # Keep a bf16 copy of the packed experts beside them, so that large batches run the grouped bf16 GEMMs
    # with no per-step dequantize (memory for speed: gpt-oss-20b's copy is 38 GB). None (default): on for
    # packed experts on CUDA when the copy takes at most a third of the GPU's memory (20b on an H200, not
    # on an 80 GB H100, never 120b).
    bf16_experts: bool | None = None

    def __post_init__(self) -> None:
        _check_choice("moe_config", "backend", self.backend, MOE_BACKENDS)
        if self.bf16_experts is not None and not isinstance(self.bf16_experts, bool):
            raise ValueError(
                f"moe_config: bf16_experts must be true, false or null, got {self.bf16_experts!r}"
            )
        if self.bf16_experts and self.backend in ("torch", "triton"):
            raise ValueError(
                f"moe_config: bf16_experts feeds the grouped GEMMs, which backend {self.backend!r} never runs; "
                "use backend 'auto' or 'grouped', or leave bf16_experts unset"
            )


@dataclass(frozen=True)
class EngineConfig:
    # A checkpoint folder or a Hugging Face repo id; "" is the embedded default model.
    model: str = ""
    served_model_name: str | None = None
    tensor_parallel_size: int = 1
    moe_expert_parallel_size: int = 1
    enable_attention_dp: bool = False
    # Running requests at once.
    max_batch_size: int = 256
    # Tokens computed in one step (prefill chunks + decodes).
    max_num_tokens: int = 8192
    # Prompt + output tokens of one request; None: the model's max_position_embeddings.
    max_seq_len: int | None = None
    enable_chunked_prefill: bool = True
    # Stream an output every this many tokens.
    stream_interval: int = 1
    # Overlap scheduling: the host schedules and prepares step n+1 while the device runs step n
    # (TensorRT-LLM's name; set true to run every step synchronously).
    disable_overlap_scheduler: bool = False
    # Run the engine loop (scheduling, batch preparation, read-back, detokenization) in a process of its own,
    # so that the server's per-token HTTP work does not take the GIL from it. `osserve serve` only; requests
    # with Python logits processors are refused then. None (default): on for an engine on CUDA.
    engine_process: bool | None = None
    kv_cache_config: KvCacheConfig = field(default_factory=KvCacheConfig)
    cuda_graph_config: CudaGraphConfig = field(default_factory=CudaGraphConfig)
    moe_config: MoeConfig = field(default_factory=MoeConfig)
    attention_backend: str = "auto"
    # auto: cuda when available, else cpu.
    device: str = "auto"
    # auto: bfloat16 on cuda, float32 on cpu.
    dtype: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        o = "engine config"
        _check_int(o, "tensor_parallel_size", self.tensor_parallel_size, 1, 64)
        _check_int(o, "moe_expert_parallel_size", self.moe_expert_parallel_size, 1, 256)
        _check_int(o, "max_batch_size", self.max_batch_size, 1, 65536)
        _check_int(o, "max_num_tokens", self.max_num_tokens, 1)
        if self.max_seq_len is not None:
            _check_int(o, "max_seq_len", self.max_seq_len, 2)
        _check_int(o, "stream_interval", self.stream_interval, 1)
        _check_int(o, "seed", self.seed, 0)
        for name in (
            "enable_attention_dp",
            "enable_chunked_prefill",
            "disable_overlap_scheduler",
            "engine_process",
        ):
            if name == "engine_process" and self.engine_process is None:
                continue  # the default: decided where the server starts (on for one rank on CUDA)
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{o}: {name} must be true or false, got {getattr(self, name)!r}")
        _check_choice(o, "attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _check_choice(o, "dtype", self.dtype, ("auto", "bfloat16", "float16", "float32"))
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"{o}: device is {self.device!r}; allowed: 'auto', 'cpu', 'cuda', 'cuda:N'")
        if (
            not self.enable_chunked_prefill
            and self.max_seq_len is not None
            and self.max_num_tokens < self.max_seq_len
        ):
            raise ValueError(
                f"{o}: with enable_chunked_prefill false, max_num_tokens ({self.max_num_tokens}) must be >= "
                f"max_seq_len ({self.max_seq_len}) so that every prompt fits one step"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineConfig:
        """Build from a plain dict (YAML, CLI); unknown keys are an error listing the valid ones."""
        return _from_dict(cls, d, "engine config")

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_NESTED = {"kv_cache_config": KvCacheConfig, "cuda_graph_config": CudaGraphConfig, "moe_config": MoeConfig}


def _from_dict(cls: type, d: dict[str, Any], owner: str) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{owner}: expected a mapping, got {type(d).__name__}")
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise ValueError(
            f"{owner}: unknown option(s) {', '.join(unknown)}; valid options: {', '.join(valid)}"
        )
    kwargs = {}
    for k, v in d.items():
        if k in _NESTED and cls is EngineConfig:
            if v is None and k == "cuda_graph_config":
                v = {"max_batch_size": 0}
            v = _from_dict(_NESTED[k], v or {}, k) if not isinstance(v, _NESTED[k]) else v
        kwargs[k] = v
    return cls(**kwargs)
