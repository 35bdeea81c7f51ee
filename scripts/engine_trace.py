"""Where an engine step's time goes on the GPU, as the server runs it (CUDA graphs, overlap scheduling):

1. decode: one batch of BATCH prompts decoding, torch.profiler (CUPTI) over STEPS engine steps; prints the
   wall time per step, the GPU's busy time per step (union of kernel and copy intervals), its idle gaps, and
   the kernels by GPU time per step (graph-replayed and eager alike), so that what runs beside the captured
   forward (input copies, lm_head, sampling, read-back) is visible.
2. prefill: PROMPTS prompts of PROMPT_LEN tokens at once; for every step, the host time inside
   ModelRunner.launch (with its wait for the step before: device wait), whether the step launched before it
   was still running when launch returned, the time the engine then waited for the device, and what could
   stall the host inside a launch: allocator retries (a device-wide sync), cudaMalloc / cudaFree, Triton
   compiles, synchronizing calls.

  python scripts/engine_trace.py --model random:gpt-oss-20b --batch 1 --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from collections import defaultdict

import torch

from osserve.llm import LLM
from osserve.sampling_params import SamplingParams


def busy_and_gaps(events: list[tuple[float, float]]) -> tuple[float, list[float]]:
    """Union length of [start, end) intervals and the gaps between them (µs)."""
    busy, gaps, end = 0.0, [], None
    for s, e in sorted(events):
        if end is None:
            busy, end = e - s, e
        elif s > end:
            gaps.append(s - end)
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    return busy, gaps


def decode_trace(llm: LLM, batch: int, steps: int, prompt_len: int) -> None:
    eng = llm.engine
    params = SamplingParams(max_tokens=steps + 40, ignore_eos=True)
    for i in range(batch):
        eng.add_request(f"d{i}", [(7 * i + j) % 50000 + 100 for j in range(prompt_len)], params)
    while eng.core.scheduler.num_waiting:  # through the prefill
        eng.step()
    for _ in range(10):
        eng.step()
    if not torch.cuda.is_available():
        print("decode trace: no CUDA device, nothing to profile")
        while eng.has_unfinished():
            eng.step()
        return
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.step()
        wall = time.perf_counter() - t0
        torch.cuda.synchronize()
    while eng.has_unfinished():
        eng.step()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        trace = json.load(f)
    spans, by_name = [], defaultdict(lambda: [0.0, 0])
    for ev in trace.get("traceEvents", []):
        if ev.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in ev:
            spans.append((ev["ts"], ev["ts"] + ev["dur"]))
            row = by_name[ev["name"]]
            row[0] += ev["dur"]
            row[1] += 1
    busy, gaps = busy_and_gaps(spans)
    span = max(e for _, e in spans) - min(s for s, _ in spans)
    total = sum(r[0] for r in by_name.values())
    print(
        f"decode batch {batch}: {steps} steps, wall {wall / steps * 1e3:.3f} ms/step; GPU span "
        f"{span / steps / 1e3:.3f} ms/step, busy {busy / steps / 1e3:.3f} ms/step, idle gaps "
        f"{sum(gaps) / steps:.1f} us/step ({len(gaps) / steps:.1f} per step, largest {max(gaps, default=0):.1f} us); "
        f"kernel + copy time {total / steps / 1e3:.3f} ms/step in {sum(r[1] for r in by_name.values()) / steps:.0f} "
        "launches/step"
    )
    for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:40]:
        print(f"  {us / steps:8.1f} us/step {n / steps:6.1f}x  {name[:110]}")


def prefill_trace(llm: LLM, prompts: int, prompt_len: int) -> None:
    eng = llm.engine
    runner = eng.core.runner
    launch = runner.launch
    cuda = torch.cuda.is_available()
    rows = []
    compiled: list[str] = []

    def on_compile(*, fn, repr, **_):  # noqa: A002  (Triton's hook keyword)
        compiled.append(f"{fn.name}[{repr[:160]}]")

    import triton

    triton.knobs.runtime.jit_cache_hook = on_compile

    def mem() -> tuple[int, int, int, int]:
        if not cuda:
            return 0, 0, 0, 0
        st, host = torch.cuda.memory_stats(), torch.cuda.host_memory_stats()
        return (
            st.get("num_alloc_retries", 0),
            st.get("num_device_alloc", 0),
            st.get("num_device_free", 0),
            host.get("num_host_alloc", 0),
        )

    prepare, forward = runner.prepare_batch, runner.run_model
    prepare_s, forward_s = [0.0], [0.0]

    def timed(fn, into):
        def call(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                into[0] = time.perf_counter() - t0

        return call

    runner.prepare_batch, runner.run_model = timed(prepare, prepare_s), timed(forward, forward_s)

    def timed_launch(sched, b, **kw):
        prev = eng.core.inflight
        m0, n0, w0 = mem(), len(compiled), runner.device_wait_s
        with warnings.catch_warnings(record=True) as syncs:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            t0 = time.perf_counter()
            try:
                handle = launch(sched, b, **kw)
            finally:
                dt = time.perf_counter() - t0
                if cuda:
                    torch.cuda.set_sync_debug_mode(0)
        m1 = mem()
        busy = prev is not None and prev.event is not None and not prev.event.query()
        sync_lines = sorted({str(w.message)[:100] for w in syncs if "synchroniz" in str(w.message)})
        rows.append(
            [
                int(sched.num_new.sum()),
                dt,
                busy,
                (w0, runner.device_wait_s, prepare_s[0], forward_s[0]),
                [y - x for x, y in zip(m0, m1, strict=True)],
                compiled[n0:],
                sync_lines,
            ]
        )
        return handle

    runner.launch = timed_launch
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    for i in range(prompts):
        eng.add_request(f"p{i}", [(11 * i + j) % 50000 + 100 for j in range(prompt_len)], params)
    t0 = time.perf_counter()
    try:
        while eng.has_unfinished():
            eng.step()
    finally:
        runner.launch, runner.prepare_batch, runner.run_model = launch, prepare, forward
        triton.knobs.runtime.jit_cache_hook = None
    if cuda:
        torch.cuda.synchronize()
    print(f"prefill {prompts} x {prompt_len}: {time.perf_counter() - t0:.2f} s, {len(rows)} steps")
    print(
        "  step tokens | launch: host_ms (of which prepare_batch, run_model) wait_ms (for the step before) | prev_running | "
        "collect wait_ms | alloc_retries/cudaMalloc/cudaFree/cudaHostAlloc  compiles  syncs"
    )
    for i, (tokens, dt, busy, (w0, w1, prep, fwd), m, comp, sy) in enumerate(rows):
        collect = (rows[i + 1][3][0] - w1) * 1e3 if i + 1 < len(rows) else float("nan")
        print(
            f"  {i:4d} {tokens:6d} | {(dt - (w1 - w0)) * 1e3:8.2f} ({prep * 1e3:6.2f}, {fwd * 1e3:7.2f}) {(w1 - w0) * 1e3:8.2f} | "
            f"{busy!s:5} | {collect:8.2f} | {m[0]}/{m[1]}/{m[2]}/{m[3]}  {len(comp)}  {len(sy)}"
        )
        for c in comp[:8]:
            print(f"         compiled {c}")
        for line in sy[:4]:
            print(f"         sync: {line}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:gpt-oss-20b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--context", type=int, default=1024, help="prompt length of the decode trace")
    ap.add_argument("--prompts", type=int, default=64, help="prompts of the prefill trace (0: none)")
    ap.add_argument("--prompt-len", type=int, default=1000)
    ap.add_argument("--option", action="append", default=[], help="engine option KEY=JSON, repeatable")
    args = ap.parse_args()
    opts = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.option)}
    t0 = time.perf_counter()
    llm = LLM(model=args.model, **opts)
    print(f"engine built in {time.perf_counter() - t0:.0f} s")
    if args.steps:
        decode_trace(llm, args.batch, args.steps, args.context)
    if args.prompts:
        prefill_trace(llm, args.prompts, args.prompt_len)


if __name__ == "__main__":
    main()
