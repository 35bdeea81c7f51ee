"""Build an EngineCore from an EngineConfig: find and load the model, size the KV cache, wire the parts."""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from osserve.config import EngineConfig, get_preset
from osserve.engine.engine import EngineCore
from osserve.engine.kv_cache import KVCacheManager
from osserve.engine.runner import ModelRunner
from osserve.model.default import DEFAULT_NAME, default_checkpoint
from osserve.model.loader import load_model, load_random_model, parse_random_spec, resolve_model_path
from osserve.model.standin import StandInModel, parse_standin_spec
from osserve.parallel import ParallelConfig
from osserve.structured.vocabulary import prepare_in_background

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(config: EngineConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(config.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {config.device!r}: CUDA is not available on this machine")
    return dev


def resolve_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[config.dtype]


def model_location(config: EngineConfig) -> tuple[Path, str]:
    """(checkpoint folder, the name the model is served under)."""
    if not config.model:
        logger.warning(
            "no --model given: serving the embedded default, a small RANDOM-WEIGHT gpt-oss model whose "
            "answers are meaningless. Pass --model openai/gpt-oss-20b (or a checkpoint folder) for a real one."
        )
        return default_checkpoint(), config.served_model_name or DEFAULT_NAME
    return resolve_model_path(config.model), config.served_model_name or config.model


def eos_token_ids(path: Path, config_eos: int) -> list[int]:
    ids = {config_eos}
    gen = path / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(ids)


def num_kv_blocks(config: EngineConfig, runner: ModelRunner, device: torch.device) -> int:
    kvc = config.kv_cache_config
    per_block = runner.kv_bytes_per_block()
    if kvc.max_blocks is not None:
        return kvc.max_blocks
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(device)
        # NOTE: activations of the largest step are reserved before the fraction is applied.
        reserve = runner.activation_bytes_estimate(config.max_num_tokens)
        budget = int(max(0, free - reserve) * kvc.free_gpu_memory_fraction)
    else:
        budget = kvc.max_cpu_bytes
    return max(2, budget // per_block)


def build_engine(
    config: EngineConfig,
    parallel: ParallelConfig | None = None,
    progress: bool = True,
    agree_blocks: Callable[[int], int] | None = None,
) -> tuple[EngineCore, str]:
    """One rank's engine and the model name it serves. A config of several ranks needs `parallel` (this
    rank's place) and `agree_blocks` (the smallest KV pool any rank can hold): osserve.distributed passes
    both; `osserve.distributed.launcher.make_engine` builds an engine for any config."""
    wanted = ParallelConfig.from_engine_config(config)
    if parallel is None and wanted.is_distributed:
        raise ValueError(
            f"the config asks for {wanted.describe()}: build it with osserve.distributed.launcher.make_engine, "
            "which starts the other ranks"
        )
    device = resolve_device(config)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda" and (parallel is None or parallel.rank == 0):
        # Structured outputs' grammar tokenizer (a second of CPU), built while the model loads rather than
        # on the first constrained request; CPU engines (tests) build it when first needed.
        prepare_in_background()
    dtype = resolve_dtype(config, device)
    packed = device.type == "cuda" and config.moe_config.backend != "torch"
    random_spec = parse_random_spec(config.model)
    standin = parse_standin_spec(config.model)
    if standin is not None:
        model: Any = StandInModel(standin, dtype)
        path, name = None, config.served_model_name or config.model
    elif random_spec is not None:
        preset, seed = random_spec
        mcfg = get_preset(preset)
        model = load_random_model(
            mcfg, seed, dtype, device, parallel=parallel, packed_experts=packed, progress=progress
        )
        path, name = None, config.served_model_name or config.model
    else:
        path, name = model_location(config)
        model = load_model(path, dtype, device, parallel=parallel, packed_experts=packed, progress=progress)
    mcfg = model.config
    max_seq_len = min(config.max_seq_len or mcfg.max_position_embeddings, mcfg.max_position_embeddings)
    block_size = config.kv_cache_config.tokens_per_block
    runner = ModelRunner(model, config, device, block_size, max_seq_len)
    num_blocks = num_kv_blocks(config, runner, device)
    if parallel is not None and parallel.is_distributed:
        if agree_blocks is None:
            raise ValueError("a rank of a parallel engine needs agree_blocks (osserve.distributed passes it)")
        # Every rank's pool must hold the same blocks: rank 0's bookkeeping addresses them all.
        num_blocks = agree_blocks(num_blocks)
    runner.allocate_kv_cache(num_blocks)
    runner.warm_up()
    runner.capture_cuda_graphs()
    kv = KVCacheManager(
        num_blocks,
        block_size,
        mcfg.sliding_window,
        has_full_layers=bool(mcfg.full_layers),
        has_sliding_layers=bool(mcfg.sliding_layers),
        enable_reuse=config.kv_cache_config.enable_block_reuse,
    )
    fits = kv.max_tokens_per_request(config.max_num_tokens)
    if fits < max_seq_len:
        logger.warning(
            "max_seq_len lowered from %d to %d: the KV cache holds that many tokens for one request "
            "(give it more memory, or ask for a smaller max_seq_len, to silence this)",
            max_seq_len,
            fits,
        )
        max_seq_len = fits
    gib = num_blocks * runner.kv_bytes_per_block() / 2**30
    logger.info(
        "KV cache: %d blocks of %d tokens (%.2f GiB, %s) fit %d tokens; max_seq_len %d, max_batch_size %d, "
        "max_num_tokens %d, prefix caching %s",
        num_blocks - 1,
        block_size,
        gib,
        device,
        (num_blocks - 1) * block_size,
        max_seq_len,
        config.max_batch_size,
        config.max_num_tokens,
        "on" if config.kv_cache_config.enable_block_reuse else "off",
    )
    eos = eos_token_ids(path, mcfg.eos_token_id) if path is not None else [mcfg.eos_token_id]
    core = EngineCore(config, runner, kv, max_seq_len, eos)
    # NOTE: the block pool alone is ~10^5 long-lived objects; moving everything built so far out of the
    # collector's reach keeps full collections from stalling steps (-26% host time per step at batch 512,
    # scripts/host_overhead.py).
    gc.collect()
    gc.freeze()
    return core, name
