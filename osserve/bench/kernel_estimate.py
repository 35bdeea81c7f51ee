"""Whole-forward estimates for the kernel benchmark: a random-weight gpt-oss on the GPU with the Triton ops.

Decode steps are captured in a CUDA graph (which also checks that the decode path is capturable) and
replayed; the 8k prompt runs eagerly. The figures cover the model forward and the unembedding of the
sampled rows only: no scheduler, no sampling, no host work, so they bound what the engine can reach.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from osserve.config import get_preset
from osserve.model.batch import ForwardBatch
from osserve.model.gpt_oss import GptOssModel

BLOCK_SIZE = 16


def random_model(preset: str, device: str = "cuda") -> GptOssModel:
    cfg = get_preset(preset)
    with torch.device("meta"):
        model = GptOssModel(cfg, dtype=torch.bfloat16, packed_experts=True)
    model.to_empty(device=device)
    model.reset_rope(torch.device(device))
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dtype == torch.uint8:
                lo, hi = (118, 124) if name.endswith("scales") else (0, 256)
                p.copy_(torch.randint(lo, hi, p.shape, generator=g, device=device, dtype=torch.uint8))
            elif "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias") or "sinks" in name:
                p.normal_(0.0, 0.1, generator=g)
            else:
                p.normal_(0.0, 0.02, generator=g)
    from osserve.kernels.triton_ops import make_ops

    model.ops = make_ops()
    return model


def _caches(model: GptOssModel, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cfg, dev = model.config, model.embed_tokens.weight.device
    shape = (num_blocks, BLOCK_SIZE, cfg.num_key_value_heads, cfg.head_dim)
    return [
        (
            torch.zeros(shape, dtype=torch.bfloat16, device=dev),
            torch.zeros(shape, dtype=torch.bfloat16, device=dev),
        )
        for _ in range(cfg.num_hidden_layers)
    ]


def _batch(seqs: list[tuple[int, int]], window: int, device: torch.device) -> tuple[ForwardBatch, int]:
    """seqs: (context before the step, new tokens); each sequence owns fresh consecutive blocks."""
    ids, pos, slots, qsl, lens, tables = [], [], [], [0], [], []
    nxt = 1
    max_blocks = max(-(-(c + n) // BLOCK_SIZE) for c, n in seqs)
    for ctx, new in seqs:
        nb = -(-(ctx + new) // BLOCK_SIZE)
        blocks = list(range(nxt, nxt + nb))
        nxt += nb
        ids += [7] * new
        pos += list(range(ctx, ctx + new))
        slots += [blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(ctx, ctx + new)]
        qsl.append(qsl[-1] + new)
        lens.append(ctx + new)
        tables.append(blocks + [0] * (max_blocks - nb))
    t = lambda x, dt: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
    table, slot = t(tables, torch.int32), t(slots, torch.int64)
    batch = ForwardBatch(
        input_ids=t(ids, torch.int64),
        positions=t(pos, torch.int64),
        query_start_loc=t(qsl, torch.int32),
        query_start_loc_cpu=qsl,
        seq_lens=t(lens, torch.int32),
        seq_lens_cpu=lens,
        full_block_table=table,
        sliding_block_table=table,
        full_slot_mapping=slot,
        sliding_slot_mapping=slot,
        logits_indices=t([q - 1 for q in qsl[1:]], torch.int64),
        sliding_window=window,
        num_tokens=len(ids),
    )
    return batch, nxt


def _step_fn(model: GptOssModel, batch: ForwardBatch, caches) -> Callable[[], torch.Tensor]:
    return lambda: model.compute_logits(model(batch, caches)[batch.logits_indices])


def _time(fn: Callable[[], Any], reps: int) -> float:
    """Mean seconds per call."""
    fn()
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def decode(
    model: GptOssModel, batch_size: int, ctx: int, log: Callable[[str], None], profile: bool = False
) -> dict:
    dev = model.embed_tokens.weight.device
    batch, num_blocks = _batch([(ctx, 1)] * batch_size, model.config.sliding_window, dev)
    caches = _caches(model, num_blocks)
    step = _step_fn(model, batch, caches)
    eager_s = _time(step, 5 if dev.type == "cuda" else 1)
    out: dict[str, Any] = {
        "batch": batch_size,
        "ctx": ctx,
        "eager_step_ms": eager_s * 1e3,
        "eager_tok_s": batch_size / eager_s,
    }
    if dev.type == "cuda":
        prof_log: list[str] = []
        out.update(_graph(step, batch_size, prof_log.append if profile else None))
    log(
        f"  decode b{batch_size} ctx{ctx}: "
        + ", ".join(
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items() if k != "profile"
        )
    )
    if dev.type == "cuda":
        for line in prof_log:
            log(line)
    del caches
    return out


def _graph(
    step: Callable[[], Any], batch_size: int, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        graph = torch.cuda.CUDAGraph()
        step()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            step()
        graph_s = _time(graph.replay, 20)
        out.update(graph_step_ms=graph_s * 1e3, graph_tok_s=batch_size / graph_s)
    except Exception as e:  # noqa: BLE001  (report: the decode path must be capturable)
        out["graph_error"] = repr(e)[:300]
        return out
    if log is not None:
        try:
            out["profile"] = profile_graph(graph, log)
        except Exception as e:  # noqa: BLE001  (the breakdown is extra information)
            log(f"    profile failed: {e!r}")
    return out


def profile_graph(
    graph: torch.cuda.CUDAGraph, log: Callable[[str], None], replays: int = 10, top: int = 25
) -> list[dict]:
    """Per-kernel GPU time of one replay of a captured step (torch.profiler; CUPTI records the kernels of
    graph replays), grouped by kernel name, largest first; logged as a table and returned."""
    from torch.profiler import ProfilerActivity, profile

    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None)
        if us is None:
            us = getattr(ev, "cuda_time_total", 0.0)
        if us > 0 and ev.count > 0:
            rows.append({"kernel": ev.key, "us_per_step": us / replays, "calls_per_step": ev.count / replays})
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows) or 1.0
    log(f"    kernel time per step {total:.0f} us (sum over kernels; the step time adds gaps between them):")
    for r in rows[:top]:
        log(
            f"    {r['us_per_step']:8.1f} us {100 * r['us_per_step'] / total:5.1f}%  {r['calls_per_step']:5.0f}x  "
            f"{r['kernel'][:90]}"
        )
    return rows[:top]


def prefill(model: GptOssModel, prompt: int, log: Callable[[str], None], moe_backend: str = "auto") -> dict:
    """One eager forward of a `prompt`-token prompt with the given MoE backend (auto / triton / grouped)."""
    dev = model.embed_tokens.weight.device
    batch, num_blocks = _batch([(0, prompt)], model.config.sliding_window, dev)
    caches = _caches(model, num_blocks)
    ops = model.ops
    if dev.type == "cuda":
        from osserve.kernels.triton_ops import make_ops

        model.ops = make_ops(moe_backend=moe_backend)
    try:
        s = _time(_step_fn(model, batch, caches), 3 if dev.type == "cuda" else 1)
    finally:
        model.ops = ops
    out = {"prompt": prompt, "moe_backend": moe_backend, "forward_ms": s * 1e3}
    log(
        f"  prefill {prompt} (moe {moe_backend}): forward {s * 1e3:.1f} ms (the TTFT floor without scheduling "
        "and sampling)"
    )
    del caches
    return out


def smoke(log: Callable[[str], None]) -> dict:
    """The same code paths on the "tiny" preset on the CPU (interpreter), without CUDA graphs."""
    model = random_model("tiny", "cpu")
    return {"tiny decode": decode(model, 2, 9, log), "tiny prefill": prefill(model, 12, log)}


def estimate(log: Callable[[str], None], quick: bool) -> dict:
    log("estimates (random-weight model, Triton ops with the tuned configs):")
    res: dict[str, Any] = {}
    t0 = time.monotonic()
    model = random_model("gpt-oss-20b")
    log(f"  gpt-oss-20b built in {time.monotonic() - t0:.0f}s")
    for name, fn in [
        ("20b decode b1 ctx1k", lambda: decode(model, 1, 1024, log, profile=True)),
        ("20b decode b1 ctx8k", lambda: decode(model, 1, 8192, log)),
        ("20b decode b64 ctx1.5k", lambda: decode(model, 64, 1536, log)),
        ("20b decode b256 ctx1.5k", lambda: decode(model, 256, 1536, log)),
        ("20b prefill 8k", lambda: prefill(model, 8192, log)),
        ("20b prefill 8k moe triton", lambda: prefill(model, 8192, log, "triton")),
        ("20b prefill 8k moe grouped", lambda: prefill(model, 8192, log, "grouped")),
        ("20b prefill 2k", lambda: prefill(model, 2048, log)),
    ]:
        if quick and "b64" in name:
            continue
        try:
            res[name] = fn()
        except Exception as e:  # noqa: BLE001
            res[name] = {"error": repr(e)[:300]}
            log(f"  {name}: {e!r}")
        torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    if not quick and free > 70e9:
        try:
            model = random_model("gpt-oss-120b")
            res["120b decode b1 ctx1k"] = decode(model, 1, 1024, log)
            del model
        except Exception as e:  # noqa: BLE001
            res["120b decode b1 ctx1k"] = {"error": repr(e)[:300]}
            log(f"  120b: {e!r}")
        torch.cuda.empty_cache()
    elif not quick:
        log(f"  120b skipped: {free / 1e9:.0f} GB free")
    return res
