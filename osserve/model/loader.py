"""Load a Hugging Face gpt-oss checkpoint (MXFP4 experts) into GptOssModel.

The checkpoint is checked against the expected table before any weight is read: every file's header is
parsed, so a missing or extra tensor, a wrong shape or dtype, a truncated file, or a config.json that does
not match the tensors is one clear error. Then tensors stream from memory-mapped shards to the device one
at a time, each rank reading only its slice, so peak host memory stays near one tensor.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from osserve.config import ModelConfig
from osserve.kernels.reference import mxfp4_dequantize
from osserve.layers.moe import expert_range, intermediate_range
from osserve.model.checkpoint import TensorSpec, expected_tensors, random_tensor
from osserve.model.gpt_oss import GptOssModel
from osserve.parallel import ParallelConfig

logger = logging.getLogger(__name__)

_ST_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that does not match its config or the gpt-oss layout."""


@dataclass(frozen=True)
class CheckpointTensor:
    file: Path
    spec: TensorSpec


def _read_header(path: Path) -> dict:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path.name}: truncated file ({size} bytes), no safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path.name}: truncated file: header claims {n} bytes, file has {size}")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path.name}: corrupt safetensors header ({e})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path.name}: truncated file: its tensors need {8 + n + end} bytes, the file has {size}"
        )
    return header


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no model.safetensors.index.json and no *.safetensors files")
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{path}: shard {f.name} named in model.safetensors.index.json is missing")
    return files


def _config_hint(cfg: ModelConfig) -> str:
    return (
        f"config.json: hidden_size={cfg.hidden_size}, intermediate_size={cfg.intermediate_size}, "
        f"num_local_experts={cfg.num_local_experts}, num_attention_heads={cfg.num_attention_heads}, "
        f"num_key_value_heads={cfg.num_key_value_heads}, head_dim={cfg.head_dim}, vocab_size={cfg.vocab_size}, "
        f"num_hidden_layers={cfg.num_hidden_layers}"
    )


def inspect_checkpoint(path: str | Path, cfg: ModelConfig) -> dict[str, CheckpointTensor]:
    """Check a checkpoint folder against `cfg` without reading weights; return where each tensor lives."""
    path = Path(path)
    expected = expected_tensors(cfg)
    found: dict[str, CheckpointTensor] = {}
    for f in _shard_files(path):
        for name, entry in _read_header(f).items():
            if name == "__metadata__":
                continue
            dtype = _ST_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise CheckpointError(f"tensor {name!r} in {f.name}: unknown dtype {entry['dtype']!r}")
            found[name] = CheckpointTensor(f, TensorSpec(tuple(entry["shape"]), dtype))
    missing = [n for n in expected if n not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"checkpoint {path}: missing tensor {missing[0]!r}{more}; expected shape "
            f"{list(expected[missing[0]].shape)}, found none"
        )
    extra = [n for n in found if n not in expected]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(
            f"checkpoint {path}: unexpected tensor {extra[0]!r}{more} with shape "
            f"{list(found[extra[0]].spec.shape)}; it is not part of a gpt-oss checkpoint for this config.json"
        )
    for name, want in expected.items():
        got = found[name].spec
        if got.shape != want.shape:
            raise CheckpointError(
                f"tensor {name!r} in {found[name].file.name}: expected shape {list(want.shape)}, found "
                f"{list(got.shape)}; does config.json match the weights? ({_config_hint(cfg)})"
            )
        if got.dtype != want.dtype:
            raise CheckpointError(
                f"tensor {name!r} in {found[name].file.name}: expected dtype {_DTYPE_NAMES[want.dtype]}, "
                f"found {_DTYPE_NAMES.get(got.dtype, str(got.dtype))}"
            )
    return found


def resolve_model_path(model: str) -> Path:
    """A local folder, or a Hugging Face repo id found in the cache (downloaded only if not cached)."""
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    if p.exists() or model.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model {model!r}: not a checkpoint folder")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors"]
    try:
        return Path(snapshot_download(model, allow_patterns=patterns, local_files_only=True))
    except Exception as cached_error:  # noqa: BLE001 - any cache miss falls through to a download
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise FileNotFoundError(
                f"model {model!r} is not a folder and not in the Hugging Face cache, and HF_HUB_OFFLINE=1 "
                f"forbids a download ({cached_error})"
            ) from None
    logger.info("model %s not in the Hugging Face cache; downloading", model)
    try:
        return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001
        raise FileNotFoundError(
            f"model {model!r} is not a folder, not in the Hugging Face cache, and could not be downloaded "
            f"({type(e).__name__}: {e}). Pass a checkpoint folder, or write one with "
            f"`osserve make-checkpoint --preset gpt-oss-20b --out DIR`."
        ) from None


def load_config(path: str | Path) -> ModelConfig:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no config.json")
    try:
        return ModelConfig.from_file(cfg_file)
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


class _Target:
    """Where one checkpoint tensor (or this rank's slice of it) goes in the model."""

    def __init__(self, model: GptOssModel):
        self.model = model
        cfg, par = model.config, model.parallel
        self.e0, self.e1 = expert_range(cfg, par)
        self.i0, self.i1 = intermediate_range(cfg, par)
        tp, r = par.tp_size, par.tp_rank
        self.q_rows = (r * cfg.q_size // tp, (r + 1) * cfg.q_size // tp)
        self.kv_rows = (r * cfg.kv_size // tp, (r + 1) * cfg.kv_size // tp)
        self.heads = (r * cfg.num_attention_heads // tp, (r + 1) * cfg.num_attention_heads // tp)

    def load(self, name: str, f, device: torch.device) -> None:
        m, par = self.model, self.model.parallel
        sl = f.get_slice(name)
        if name == "model.embed_tokens.weight":
            return self._copy(m.embed_tokens.weight, sl[:], device)
        if name == "lm_head.weight":
            return self._copy(m.lm_head.weight, sl[:], device)
        if name == "model.norm.weight":
            return self._copy(m.norm.weight, sl[:], device)
        _, _, idx, rest = name.split(".", 3)
        layer = m.layers[int(idx)]
        attn, mlp = layer.self_attn, layer.mlp
        qs, ks = attn.q_size, attn.kv_size
        match rest:
            case "input_layernorm.weight":
                self._copy(layer.input_layernorm.weight, sl[:], device)
            case "post_attention_layernorm.weight":
                self._copy(layer.post_attention_layernorm.weight, sl[:], device)
            case "self_attn.q_proj.weight" | "self_attn.q_proj.bias":
                dst = attn.qkv_proj.weight if rest.endswith("weight") else attn.qkv_proj.bias
                self._copy(dst[:qs], sl[self.q_rows[0] : self.q_rows[1]], device)
            case "self_attn.k_proj.weight" | "self_attn.k_proj.bias":
                dst = attn.qkv_proj.weight if rest.endswith("weight") else attn.qkv_proj.bias
                self._copy(dst[qs : qs + ks], sl[self.kv_rows[0] : self.kv_rows[1]], device)
            case "self_attn.v_proj.weight" | "self_attn.v_proj.bias":
                dst = attn.qkv_proj.weight if rest.endswith("weight") else attn.qkv_proj.bias
                self._copy(dst[qs + ks :], sl[self.kv_rows[0] : self.kv_rows[1]], device)
            case "self_attn.o_proj.weight":
                self._copy(attn.o_proj.weight, sl[:, self.q_rows[0] : self.q_rows[1]], device)
            case "self_attn.o_proj.bias":
                self._copy_or_zero(attn.o_proj.bias, sl, device, par.tp_rank == 0 or par.attention_replicated)
            case "self_attn.sinks":
                self._copy(attn.sinks, sl[self.heads[0] : self.heads[1]], device)
            case "mlp.router.weight":
                self._copy(mlp.router.weight, sl[:], device)
            case "mlp.router.bias":
                self._copy(mlp.router.bias, sl[:], device)
            case "mlp.experts.gate_up_proj_bias":
                self._copy(mlp.w13_bias, sl[self.e0 : self.e1, 2 * self.i0 : 2 * self.i1], device)
            case "mlp.experts.down_proj_bias":
                t = sl[self.e0 : self.e1]
                self._copy(mlp.w2_bias, t if par.moe_tp_rank == 0 else torch.zeros_like(t), device)
            case "mlp.experts.gate_up_proj_blocks" | "mlp.experts.gate_up_proj_scales":
                t = sl[self.e0 : self.e1, 2 * self.i0 : 2 * self.i1]
                self._expert(mlp, "w13", rest.endswith("blocks"), t, device)
            case "mlp.experts.down_proj_blocks" | "mlp.experts.down_proj_scales":
                t = sl[self.e0 : self.e1, :, self.i0 // 32 : self.i1 // 32]
                self._expert(mlp, "w2", rest.endswith("blocks"), t, device)
            case _:
                raise CheckpointError(f"no place in the model for tensor {name!r}")

    def _expert(self, mlp, proj: str, is_blocks: bool, t: torch.Tensor, device: torch.device) -> None:
        if mlp.packed:
            dst = getattr(mlp, f"{proj}_blocks" if is_blocks else f"{proj}_scales")
            return self._copy(dst, t, device)
        # Dequantized path: hold the blocks until their scales arrive (the index keeps them in one shard
        # or adjacent ones), then dequantize on the device.
        pending = self.__dict__.setdefault("_pending", {})
        key = (id(mlp), proj)
        other = pending.pop(key, None)
        if other is None:
            pending[key] = (is_blocks, t)
            return
        blocks, scales = (t, other[1]) if is_blocks else (other[1], t)
        dense = mxfp4_dequantize(blocks.to(device), scales.to(device), self.model.dtype)
        getattr(mlp, proj).copy_(dense)

    @staticmethod
    def _copy(dst: torch.Tensor, src: torch.Tensor, device: torch.device) -> None:
        if tuple(dst.shape) != tuple(src.shape):
            raise CheckpointError(f"shape mismatch loading into {list(dst.shape)}: got {list(src.shape)}")
        dst.copy_(src.to(device, non_blocking=False))

    def _copy_or_zero(self, dst: torch.Tensor, sl, device: torch.device, keep: bool) -> None:
        if keep:
            self._copy(dst, sl[:], device)
        else:
            dst.zero_()


RANDOM_PREFIX = "random:"


def parse_random_spec(model: str) -> tuple[str, int] | None:
    """`random:PRESET[:SEED]` -> (preset, seed); None for anything else."""
    if not model.startswith(RANDOM_PREFIX):
        return None
    preset, _, seed = model[len(RANDOM_PREFIX) :].partition(":")
    return preset, int(seed or 0)


class _RandomSource:
    """Stands where a safetensors file would: hands out the tensors `make-checkpoint --seed` would write,
    drawn directly on the device (for benchmarks of checkpoints too big to write, e.g. 120b on a 64 GB disk)."""

    def __init__(self, cfg: ModelConfig, seed: int, device: torch.device):
        self.cfg, self.seed, self.device = cfg, seed, device
        self.specs = expected_tensors(cfg)

    def get_slice(self, name: str) -> torch.Tensor:
        return random_tensor(self.cfg, name, self.specs[name], self.seed, self.device)


def load_random_model(
    cfg: ModelConfig,
    seed: int,
    dtype: torch.dtype,
    device: torch.device,
    parallel: ParallelConfig | None = None,
    packed_experts: bool = False,
    progress: bool = True,
) -> GptOssModel:
    """The model `make-checkpoint --preset P --seed S` then `load_model` would give, without the files."""
    start = time.perf_counter()
    with torch.device("meta"):
        model = GptOssModel(cfg, dtype=dtype, parallel=parallel, packed_experts=packed_experts)
    model.to_empty(device=device)
    model.reset_rope(device)
    target = _Target(model)
    source = _RandomSource(cfg, seed, device)
    with torch.inference_mode():
        for name in tqdm(source.specs, desc="random weights", disable=not progress):
            target.load(name, source, device)
    logger.info("drew random weights for %s (seed %d) in %.1f s", cfg, seed, time.perf_counter() - start)
    return model


def load_model(
    model_path: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    parallel: ParallelConfig | None = None,
    packed_experts: bool = False,
    progress: bool = True,
) -> GptOssModel:
    """Build GptOssModel on `device` and fill it from the checkpoint folder."""
    path = Path(model_path)
    cfg = load_config(path)
    tensors = inspect_checkpoint(path, cfg)
    start = time.perf_counter()
    with torch.device("meta"):
        model = GptOssModel(cfg, dtype=dtype, parallel=parallel, packed_experts=packed_experts)
    model.to_empty(device=device)
    model.reset_rope(device)
    target = _Target(model)
    by_file: dict[Path, list[str]] = {}
    for name, t in tensors.items():
        by_file.setdefault(t.file, []).append(name)
    total = sum(t.spec.nbytes for t in tensors.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not progress) as bar:
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as f, torch.inference_mode():
                for name in names:
                    target.load(name, f, device)
                    bar.update(tensors[name].spec.nbytes)
    if target.__dict__.get("_pending"):
        raise CheckpointError(
            "expert blocks without their scales (or scales without blocks) in the checkpoint"
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    logger.info(
        "loaded %s (%d layers, %d experts, %s experts) in %.1f s",
        path,
        cfg.num_hidden_layers,
        cfg.num_local_experts,
        "MXFP4" if packed_experts else "dequantized",
        time.perf_counter() - start,
    )
    return model
