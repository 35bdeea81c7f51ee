"""Where a gpt-oss step's GPU time goes, kernel by kernel, against the machine's measured ceilings.

    python -m osserve.bench.kernels --only ceilings,profile [--models 20b,120b] --out DIR
    python osserve/bench/kernel_profile.py --out DIR [--models 20b,120b]   # the same, standalone
    python -m osserve.bench.kernel_profile --compare OLD.json NEW.json   # two runs side by side

First the ceilings of this GPU: a device-to-device copy (GB/s, bytes read + written) and a bf16 matmul
(TFLOP/s). Then, per model (random weights, Triton ops, random token ids and a random KV cache, so routing
spreads over the experts as real traffic does): decode steps at batch 1, 64 and 512 (context 1024) captured
in a CUDA graph, and one 16k-token prefill step (16 prompts of 1024), each profiled with torch.profiler
(CUPTI sees the kernels of graph replays). Kernels are grouped into families; each family gets its bytes and
FLOPs per step from the model's shapes (MoE: the experts a random routing touches) and so its achieved GB/s,
TFLOP/s and % of the ceilings (the floor max(bytes / copy rate, FLOPs / matmul rate) over the time).

It imports only what the package had before the MoE rewrite (osserve.bench.kernel_estimate's helpers), so the
file also runs against an older checkout (`PYTHONPATH=OLD python kernel_profile.py`): old and new kernels in
one device session. Results: DIR/profile.json and DIR/profile.txt.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from osserve.bench.kernel_estimate import _time

# Family of a kernel, by name (first match): Triton kernels are named after their jit functions; cuBLAS and
# CUTLASS names vary by version, so the dense GEMM family is the catch-all of matmul-looking names.
FAMILIES = (
    ("moe", r"moe|dequant|swiglu|combine|align|[Gg]roup"),
    ("attention", r"decode_kernel|decode_reduce|prefill_kernel|attention|flash"),
    ("rope+kv", r"rope"),
    ("norm", r"rms_norm"),
    ("route", r"route|topk|softmax"),
    ("gemm", r"gemm|nvjet|xmma|cutlass|cublas|splitK|sm90|sm80|wgmma"),
)
PRESETS = {"20b": "gpt-oss-20b", "120b": "gpt-oss-120b", "tiny": "tiny"}  # tiny: the CPU smoke test
CONTEXT = {"20b": 1024, "120b": 1024, "tiny": 9}  # keys before a decode step
DECODE_BATCHES = {"20b": (1, 64, 512), "120b": (1, 64, 512), "tiny": (1, 5)}
PREFILL = {"20b": (16, 1024), "120b": (16, 1024), "tiny": (2, 9)}  # prompts x tokens: one prefill step


def family(kernel: str) -> str:
    return next((name for name, pat in FAMILIES if re.search(pat, kernel)), "other")


def ceilings() -> dict[str, float]:
    """Measured device copy rate (bytes read + written per second) and bf16 matmul rate (FLOP/s)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    copy = functools.partial(torch.empty_like(src).copy_, src)
    copy_s = min(_time(copy, 20) for _ in range(3))
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    matmul = functools.partial(torch.matmul, a, b)
    mm_s = min(_time(matmul, 20) for _ in range(3))
    del src, copy, a, b, matmul
    torch.cuda.empty_cache()  # NOTE: the caller may hand the GPU to a child process next
    return {"bytes_per_s": 2 * (1 << 30) / copy_s, "flops": 2 * n**3 / mm_s}


def step_work(cfg: Any, seqs: list[tuple[int, int]]) -> dict[str, tuple[float, float]]:
    """(bytes, FLOPs) per step and family; seqs: (context before the step, new tokens) per sequence."""
    h, i, e, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok
    hq, hk, d, layers = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    sliding = sum(t == "sliding_attention" for t in cfg.layer_types)
    tokens = sum(n for _, n in seqs)
    # Experts a uniformly random top-k routing of `tokens` touches, per layer.
    touched = e * (1 - (1 - k / e) ** tokens)
    expert_bytes = 3 * h * i * (0.5 + 1 / 32) + (2 * i + h) * 4
    moe = (layers * (touched * expert_bytes + 4 * tokens * h * 2), layers * 2 * tokens * k * 3 * h * i)
    dense = h * (hq + 2 * hk) * d + hq * d * h + h * e
    logits = len(seqs) * h * cfg.vocab_size
    gemm = (layers * dense * 2 + h * cfg.vocab_size * 2, 2 * (layers * tokens * dense + logits))
    kv_bytes = attn_flops = 0.0
    for ctx, n in seqs:
        for window, count in ((None, layers - sliding), (cfg.sliding_window, sliding)):
            keys = [p + 1 if window is None else min(p + 1, window) for p in range(ctx, ctx + n)]
            visible = min(ctx + n, window + n - 1) if window else ctx + n
            kv_bytes += count * visible * hk * d * 2 * 2
            attn_flops += count * 4 * hq * d * sum(keys)
    attention = (kv_bytes + layers * 2 * tokens * hq * d * 2, attn_flops)
    return {
        "moe": moe,
        "gemm": gemm,
        "attention": attention,
        "rope+kv": (layers * tokens * d * 2 * (2 * hq + 5 * hk), 0.0),
        "norm": ((2 * layers + 1) * tokens * h * 2 * 4, 0.0),
        "route": (layers * tokens * e * 2, 0.0),
    }


def _profile(fn: Callable[[], Any], reps: int) -> dict[str, dict]:
    """GPU time per call of fn by kernel name (torch.profiler, CUPTI); on a CPU (the smoke test), op time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    fn()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
        if cuda:
            torch.cuda.synchronize()
    rows = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) if cuda else ev.self_cpu_time_total
        us = getattr(ev, "cuda_time_total", 0.0) if us is None else us
        if us > 0 and ev.count > 0:
            rows[ev.key] = {"us": us / reps, "calls": ev.count / reps}
    return rows


def run_case(model: Any, seqs: list[tuple[int, int]], graph: bool, ceil: dict, log: Callable) -> dict:
    from osserve.bench import kernel_estimate as ke

    dev = model.embed_tokens.weight.device
    cfg = model.config
    batch, num_blocks = ke._batch(seqs, cfg.sliding_window, dev)
    g = torch.Generator(device=dev).manual_seed(len(seqs))
    # NOTE: distinct tokens and a random cache: with one repeated token every sequence would route alike.
    batch.input_ids.copy_(torch.randint(0, cfg.vocab_size, batch.input_ids.shape, generator=g, device=dev))
    caches = ke._caches(model, num_blocks)
    for kc, vc in caches:
        kc.normal_(generator=g)
        vc.normal_(generator=g)
    step = ke._step_fn(model, batch, caches)
    out: dict[str, Any] = {"seqs": len(seqs), "tokens": sum(n for _, n in seqs)}
    fn = step
    if graph and dev.type == "cuda":
        step()
        torch.cuda.synchronize()
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            step()
        fn = cuda_graph.replay
    cuda = dev.type == "cuda"
    out["step_ms"] = _time(fn, (20 if graph else 3) if cuda else 1) * 1e3
    kernels = _profile(fn, (10 if graph else 2) if cuda else 1)
    work = step_work(cfg, seqs)
    fams: dict[str, dict] = {}
    for name, row in kernels.items():
        f = fams.setdefault(family(name), {"us": 0.0, "calls": 0.0})
        f["us"] += row["us"]
        f["calls"] += row["calls"]
    total = sum(f["us"] for f in fams.values()) or 1.0
    for name, f in fams.items():
        nbytes, nflops = work.get(name, (0.0, 0.0))
        sec = f["us"] * 1e-6
        f["share"] = f["us"] / total
        f["gbps"] = nbytes / sec / 1e9 if nbytes else None
        f["tflops"] = nflops / sec / 1e12 if nflops else None
        floor = max(nbytes / ceil["bytes_per_s"], nflops / ceil["flops"])
        f["pct_ceiling"] = 100 * floor / sec if floor else None
    out["kernel_us"] = total
    out["families"] = dict(sorted(fams.items(), key=lambda kv: -kv[1]["us"]))
    out["kernels"] = dict(sorted(kernels.items(), key=lambda kv: -kv[1]["us"])[:25])
    del caches
    torch.cuda.empty_cache()
    return out


def print_case(label: str, r: dict, log: Callable[[str], None]) -> None:
    log(f"{label}: step {r['step_ms']:.3f} ms, kernels {r['kernel_us']:.0f} us ({r['tokens']} tokens)")
    log(
        f"  {'family':<10} {'us/step':>9} {'share':>6} {'calls':>6} {'GB/s':>7} {'TFLOP/s':>8} {'%ceiling':>8}"
    )
    for name, f in r["families"].items():

        def fmt(v, spec):
            return format(v, spec) if v is not None else "-"

        log(
            f"  {name:<10} {f['us']:9.1f} {100 * f['share']:5.1f}% {f['calls']:6.0f} {fmt(f['gbps'], '7.0f'):>7} "
            f"{fmt(f['tflops'], '8.1f'):>8} {fmt(f['pct_ceiling'], '7.1f'):>7}%"
        )
    for name, row in list(r["kernels"].items())[:12]:
        log(f"    {row['us']:9.1f} us {row['calls']:5.0f}x  {name[:100]}")


def profile(models: list[str], ceil: dict, log: Callable[[str], None], device: str = "cuda") -> dict:
    from osserve.bench import kernel_estimate as ke

    res: dict[str, Any] = {}
    for m in models:
        # NAME+bf16: the model with bf16 copies of its experts (moe_config.bf16_experts).
        name, _, extra = m.partition("+")
        t0 = time.monotonic()
        try:
            model = ke.random_model(PRESETS[name], device)
            if extra == "bf16":
                for layer in model.layers:
                    layer.mlp.keep_bf16_copy(model.ops.mxfp4_dequantize)
        except Exception as e:  # noqa: BLE001  (e.g. out of memory: report, go on)
            res[m] = {"error": repr(e)[:300]}
            log(f"{m}: could not build: {e!r}")
            continue
        log(f"{m}: built in {time.monotonic() - t0:.0f}s")
        cases = [(f"decode b{b}", [(CONTEXT[name], 1)] * b, True) for b in DECODE_BATCHES[name]]
        cases.append(
            (
                f"prefill {PREFILL[name][0]}x{PREFILL[name][1]}",
                [(0, PREFILL[name][1])] * PREFILL[name][0],
                False,
            )
        )
        for label, seqs, graph in cases:
            try:
                res[f"{m} {label}"] = r = run_case(model, seqs, graph, ceil, log)
                print_case(f"{m} {label}", r, log)
            except Exception as e:  # noqa: BLE001
                res[f"{m} {label}"] = {"error": repr(e)[:300]}
                log(f"{m} {label}: {e!r}")
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()
    return res


def compare(old: dict, new: dict, log: Callable[[str], None]) -> None:
    """Step time and per-family time of two profile.json records, case by case."""
    log(
        f"{'case':<28} {'family':<10} {'old us':>9} {'new us':>9} {'new/old':>8} {'old %ceil':>9} {'new %ceil':>9}"
    )
    for case, n in new["profile"].items():
        o = old["profile"].get(case)
        if not o or "families" not in o or "families" not in n:
            continue
        log(
            f"{case:<28} {'step ms':<10} {o['step_ms']:9.3f} {n['step_ms']:9.3f} {n['step_ms'] / o['step_ms']:8.2f}"
        )
        for fam in n["families"]:
            a, b = o["families"].get(fam), n["families"][fam]
            if a is None:
                continue
            pa = f"{a['pct_ceiling']:8.1f}%" if a.get("pct_ceiling") else f"{'-':>9}"
            pb = f"{b['pct_ceiling']:8.1f}%" if b.get("pct_ceiling") else f"{'-':>9}"
            log(f"{'':<28} {fam:<10} {a['us']:9.1f} {b['us']:9.1f} {b['us'] / a['us']:8.2f} {pa} {pb}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--models",
        default="20b,120b",
        help=f"comma list of: {', '.join(PRESETS)}; NAME+bf16 with bf16 copies of the experts",
    )
    p.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"), default=None)
    args = p.parse_args(argv)
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    if args.compare:
        compare(*(json.loads(f.read_text()) for f in args.compare), log)
        return 0
    models = [m for m in args.models.split(",") if m]
    if not torch.cuda.is_available() or {m.partition("+")[0] for m in models} - set(PRESETS):
        print(f"needs a CUDA device and --models from {', '.join(PRESETS)}")
        return 2
    ceil = ceilings()
    log(
        f"{torch.cuda.get_device_name()}: copy {ceil['bytes_per_s'] / 1e9:.0f} GB/s, "
        f"bf16 matmul {ceil['flops'] / 1e12:.0f} TFLOP/s"
    )
    record = {"device": torch.cuda.get_device_name(), "ceilings": ceil, "profile": profile(models, ceil, log)}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile.json").write_text(json.dumps(record, indent=1))
        (args.out / "profile.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
