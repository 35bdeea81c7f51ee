"""Kernel micro-benchmark: every Triton kernel against its PyTorch twin and its floor, on one GPU.

    osserve bench kernels [--quick] [--out DIR] [--only attention,moe,...] [--budget-s 240]
    osserve bench kernels --only profile [--models 20b,120b] --out DIR   # per-kernel share of whole steps

For each case (gpt-oss shapes) it builds fresh random inputs, checks each candidate config against the
reference twin, times it with triton.testing.do_bench (median, L2 flushed between runs) and, when a call is
short (decode sizes), also inside a CUDA graph: N calls captured, replayed, time / N. That is the kernel time
the engine's decode graphs see; eager timings of small cases mostly measure Python launch overhead. It
prints achieved GB/s or TFLOP/s (from the graph time where there is one) against this GPU's ceilings,
measured first (device copy, bf16 matmul: bench/kernel_profile.py). A failing kernel or config is reported
and skipped. The fastest config per tuning key goes to DIR/best_configs.json
(install with OSSERVE_TRITON_CONFIGS=DIR/best_configs.json); everything goes to DIR/kernels.json. Last,
it times whole forwards of a random-weight gpt-oss with the tuned configs (bench/kernel_estimate.py).
`--only profile` breaks whole decode and prefill steps of gpt-oss-20b / 120b down by kernel family, each
family's achieved rate as a percentage of the ceilings (bench/kernel_profile.py).
`--smoke` runs tiny shapes on the CPU under the Triton interpreter, to check this script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from osserve.bench.kernel_cases import BUDGET_SHARE, SMOKE, SUITES, Case, Setup

# Ceilings for %floor; on a GPU `main` replaces them with the ones it measures (kernel_profile.ceilings).
PEAK_BW = 3.0e12  # device-to-device copy measured on the H100 (shared/reference/README.md)
PEAK_FLOPS = 790e12  # dense bf16 matmul, H100 SXM
PARTS = ("estimate", "profile")  # --only items besides the suites


@dataclass
class Result:
    kernel: str
    case: str
    config: dict
    key: str = ""
    status: str = "ok"
    median_us: float | None = None
    # Per call inside a CUDA graph (short cases only; None where not measured or capture failed).
    graph_us: float | None = None
    gbps: float | None = None
    tflops: float | None = None
    pct_of_floor: float | None = None
    max_err: float | None = None
    error: str | None = None
    params: dict | None = None


# ---------------------------------------------------------------------------------------------------------
# Running


def _bench(fn: Callable[[], Any], s: Setup) -> float:
    """Median milliseconds of fn."""
    if s.device == "cpu":
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    return triton.testing.do_bench(
        fn, warmup=10 if s.quick else 25, rep=30 if s.quick else 80, return_mode="median"
    )


# Cases whose eager median is below this are also timed inside a CUDA graph.
GRAPH_MAX_US = 2000.0


def _bench_graph(fns: list[Callable[[], Any]], median_us: float) -> float | None:
    """Microseconds per call inside a CUDA graph: the calls cycle through fns (e.g. other inputs), enough of
    them per replay for a few ms; median over replays. None if the capture fails."""
    reps = max(len(fns), min(400, int(4000.0 / max(median_us, 1.0))))
    reps -= reps % len(fns)
    try:
        for fn in fns:
            fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for r in range(reps):
                fns[r % len(fns)]()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(7):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / reps)
        del graph
        return sorted(times)[len(times) // 2]
    except Exception:  # noqa: BLE001  (a kernel that cannot be captured keeps its eager time only)
        torch.cuda.synchronize()
        return None


def best_time_us(r: Result) -> float | None:
    """The time that counts: in-graph where measured (what decode steps see), else the eager median."""
    return r.graph_us if r.graph_us is not None else r.median_us


def run_case(case: Case, s: Setup, deadline: float, log: Callable[[str], None]) -> list[Result]:
    from osserve.kernels.triton_testing import assert_close

    results: list[Result] = []
    try:
        inputs = case.make()
        ref = case.reference(inputs) if case.reference is not None else None
        nbytes, nflops = float(case.bytes(inputs)), float(case.flops(inputs))
    except Exception as e:  # noqa: BLE001  (report and go on)
        log(f"  {case.name}: inputs / reference failed: {e!r}")
        return [Result(case.kernel, case.name, {}, key=case.key, status="error", error=f"setup: {e!r}"[:400])]
    graph_variants: dict[int, list] = {}
    for cfg in case.configs:
        r = Result(case.kernel, case.name, cfg, key=case.key, params=case.params)
        results.append(r)
        if time.monotonic() > deadline and len(results) > 1:
            r.status = "skipped"
            continue
        try:
            out = case.run(inputs, cfg)
            if s.device == "cuda":
                torch.cuda.synchronize()
            if ref is not None:
                r.max_err = assert_close(out, ref, case.name, tol=case.tol)
            elif not torch.isfinite(out).all():
                raise AssertionError(f"{case.name}: non-finite output (no reference at this size)")
            fn = case.timed or case.run
            ms = _bench(lambda fn=fn, cfg=cfg: fn(inputs, cfg), s)
            r.median_us = ms * 1e3
            if s.device == "cuda" and r.median_us < GRAPH_MAX_US:
                variants = graph_variants.setdefault(
                    0, case.graph_inputs(inputs) if case.graph_inputs else [inputs]
                )
                r.graph_us = _bench_graph(
                    [lambda fn=fn, v=v, cfg=cfg: fn(v, cfg) for v in variants], r.median_us
                )
            sec = best_time_us(r) * 1e-6
            r.gbps = nbytes / sec / 1e9
            r.tflops = nflops / sec / 1e12 if nflops else None
            r.pct_of_floor = 100.0 * max(nbytes / PEAK_BW, nflops / PEAK_FLOPS) / sec
        except Exception as e:  # noqa: BLE001
            r.status, r.error = "error", f"{e!r}"[:400]
            log(f"  {case.name} {json.dumps(cfg)}: {r.error}")
            if not isinstance(e, AssertionError):
                log("    " + traceback.format_exc(limit=-3).replace("\n", "\n    "))
    return results


def best_configs(results: list[Result]) -> dict[str, dict[str, dict]]:
    """Per (kernel, key): the config with the smallest sum over cases of time / that case's best time."""
    by_key: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    for r in results:
        if r.status == "ok" and best_time_us(r) is not None:
            cfgs = by_key.setdefault((r.kernel, r.key), {})
            cfgs.setdefault(json.dumps(r.config, sort_keys=True), {})[r.case] = best_time_us(r)
    table: dict[str, dict[str, dict]] = {}
    for (kernel, key), per_cfg in by_key.items():
        cases = set().union(*per_cfg.values())
        best = {c: min(v[c] for v in per_cfg.values() if c in v) for c in cases}

        def score(times: dict[str, float], best=best, cases=cases) -> float:
            # A config that failed or was skipped on some case counts 10x the best time there.
            return sum(times[c] / best[c] if c in times else 10.0 for c in cases)

        table.setdefault(kernel, {})[key] = json.loads(min(per_cfg, key=lambda k: score(per_cfg[k])))
    _moe_crossover(results, table)
    return table


def _moe_crossover(results: list[Result], table: dict[str, dict[str, dict]]) -> None:
    """The regime thresholds `auto` uses, from pair counts where two regimes were both measured:
    gemv's MAX_PAIRS = the largest count up to which gemv beats gemm everywhere; grouped's MIN_PAIRS = the
    smallest count from which the grouped GEMMs beat the Triton gemm everywhere above (never: 2^31)."""
    best: dict[tuple[str, int, str], float] = {}
    for r in results:
        t = best_time_us(r)
        if r.status == "ok" and r.params and t is not None:
            k = (r.params["shape"], r.params["pairs"], r.params["mode"])
            best[k] = min(best.get(k, float("inf")), t)

    def sizes(shape: str, mode: str) -> list[int]:
        return sorted({p for s_, p, m in best if s_ == shape and m == mode and (s_, p, "gemm") in best})

    for shape, cfg in table.get("moe_gemv", {}).items():
        max_pairs = 0
        for p in sorted({p for s_, p, m in best if s_ == shape and m == "gemv"}):
            if best.get((shape, p, "gemm"), float("inf")) <= best[(shape, p, "gemv")]:
                break  # the first count where gemm wins ends the gemv regime (a later gemv win is noise)
            max_pairs = p
        cfg["MAX_PAIRS"] = max_pairs
    for shape, cfg in table.get("moe_grouped", {}).items():
        min_pairs = 1 << 31
        for p in reversed(sizes(shape, "grouped")):
            if best[(shape, p, "grouped")] >= best[(shape, p, "gemm")]:
                break
            min_pairs = p
        cfg["MIN_PAIRS"] = min_pairs


def print_table(results: list[Result], log: Callable[[str], None]) -> None:
    log(
        "eager: do_bench median (L2 flushed; small cases mostly Python launch overhead); graph: per call inside "
        "a CUDA graph (MoE: experts cycled, weights from DRAM); GB/s, TFLOP/s and %floor from graph where measured"
    )
    log(
        f"{'kernel':<18} {'case':<36} {'eager us':>9} {'graph us':>9} {'GB/s':>7} {'TFLOP/s':>8} {'%floor':>7} "
        f"{'err':>8}  config   (* fastest of the case)"
    )
    best: dict[str, Result] = {}
    for r in results:
        if r.status == "ok" and (r.case not in best or best_time_us(r) < best_time_us(best[r.case])):
            best[r.case] = r
    for r in results:
        if r.status == "skipped":
            continue
        if r.status != "ok":
            log(f"{r.kernel:<18} {r.case:<36} {'ERROR':>9}  {json.dumps(r.config)}  {r.error}"[:240])
            continue
        tf = f"{r.tflops:8.1f}" if r.tflops else f"{'-':>8}"
        err = f"{r.max_err:8.1e}" if r.max_err is not None else f"{'-':>8}"
        mark = "*" if best.get(r.case) is r else " "
        graph = f"{r.graph_us:9.1f}" if r.graph_us is not None else f"{'-':>9}"
        log(
            f"{r.kernel:<18} {r.case:<36} {r.median_us:9.1f} {graph} {r.gbps:7.0f} {tf} {r.pct_of_floor:6.1f}%{mark}"
            f"{err}  {json.dumps(r.config)}"
        )
    skipped = sum(r.status == "skipped" for r in results)
    if skipped:
        log(f"({skipped} variant runs skipped by the time budget)")


def _run_suites(suites: list[str], setup: Setup, budget_s: float, log: Callable[[str], None]) -> list[Result]:
    t0 = time.monotonic()
    total_share = sum(BUDGET_SHARE[x] for x in suites) or 1.0
    deadline = t0
    results: list[Result] = []
    for suite in suites:
        deadline = max(deadline, time.monotonic()) + budget_s * BUDGET_SHARE[suite] / total_share
        try:
            cases = SUITES[suite](setup)
        except Exception as e:  # noqa: BLE001
            log(f"suite {suite}: could not build its cases: {e!r}")
            results.append(Result(suite, f"{suite} (setup)", {}, status="error", error=repr(e)[:400]))
            continue
        for case in cases:
            log(f"[{time.monotonic() - t0:6.1f}s] {case.name}: {len(case.configs)} config(s)")
            results += run_case(case, setup, deadline, log)
            if setup.device == "cuda":
                torch.cuda.empty_cache()
    return results


def _child(cmd: list[str], timeout: float, env: dict | None, log: Callable[[str], None]) -> dict | None:
    """Runs one part in its own process: a kernel that faults leaves a sticky CUDA error behind, which
    would fail everything after it in the same process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "part.json"
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "osserve.bench.kernels", *cmd, "--part-json", str(out)],
                timeout=timeout,
                env=env,
            )
        except subprocess.TimeoutExpired:
            log(f"{' '.join(cmd)}: timed out after {timeout:.0f}s")
            return None
        if not out.exists():
            log(f"{' '.join(cmd)}: exited with {proc.returncode} and no results")
            return None
        return json.loads(out.read_text())


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument(
        "--quick", action="store_true", help="defaults plus three variants per kernel; short estimate"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="folder for kernels.json, best_configs.json, kernels.txt"
    )
    p.add_argument("--only", default="", help=f"comma list of: {', '.join((*SUITES, *PARTS))}")
    p.add_argument("--models", default="20b,120b", help="models of the profile: 20b, 120b")
    p.add_argument(
        "--budget-s",
        type=float,
        default=240.0,
        help="seconds for the config sweeps; past a suite's share only default configs run",
    )
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under the Triton interpreter")
    p.add_argument("--part-json", type=Path, default=None, help=argparse.SUPPRESS)  # child process mode
    p.add_argument("--isolate", action="store_true", help=argparse.SUPPRESS)  # children also with --smoke
    p.add_argument("--ceilings", default=None, help=argparse.SUPPRESS)  # children: "bytes_per_s,flops"
    return p


def main(argv: list[str] | None = None) -> int:
    p = add_arguments(argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0]))
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """The benchmark with parsed arguments (`osserve bench kernels` and `python -m osserve.bench.kernels`)."""
    only = [x for x in args.only.split(",") if x] or [*SUITES, "estimate"]
    unknown = set(only) - set(SUITES) - set(PARTS)
    if unknown:
        print(f"--only: unknown {sorted(unknown)}; allowed: {', '.join((*SUITES, *PARTS))}")
        return 2
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        setup = SMOKE
    elif torch.cuda.is_available():
        setup = Setup(quick=args.quick)
    else:
        print("osserve.bench.kernels needs a CUDA device (or --smoke for the CPU interpreter)")
        return 2
    import triton

    from osserve.bench import kernel_profile
    from osserve.kernels import triton_common

    global PEAK_BW, PEAK_FLOPS
    if args.ceilings:
        PEAK_BW, PEAK_FLOPS = (float(v) for v in args.ceilings.split(","))
    elif setup.device == "cuda":
        ceil = kernel_profile.ceilings()
        PEAK_BW, PEAK_FLOPS = ceil["bytes_per_s"], ceil["flops"]

    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    suites = [x for x in only if x in SUITES]
    isolate = (setup.device == "cuda" or args.isolate) and args.part_json is None
    passed = (["--quick"] if args.quick else []) + (["--smoke"] if args.smoke else [])
    passed += ["--ceilings", f"{PEAK_BW},{PEAK_FLOPS}", "--models", args.models]
    if args.part_json is not None:  # a child: run what was asked, hand the results back
        part: dict[str, Any] = {"results": [], "estimates": {}}
        part["results"] = [r.__dict__ for r in _run_suites(suites, setup, args.budget_s, log)]
        if "estimate" in only:
            from osserve.bench import kernel_estimate

            try:
                part["estimates"] = (
                    kernel_estimate.smoke(log) if args.smoke else kernel_estimate.estimate(log, args.quick)
                )
            except Exception as e:  # noqa: BLE001
                log(f"estimate failed: {e!r}\n{traceback.format_exc(limit=-4)}")
        if "profile" in only and setup.device == "cuda":
            ceil = {"bytes_per_s": PEAK_BW, "flops": PEAK_FLOPS}
            part["profile"] = kernel_profile.profile(args.models.split(","), ceil, log)
        part["log"] = lines
        args.part_json.write_text(json.dumps(part, default=str))
        return 0

    device_name = torch.cuda.get_device_name() if setup.device == "cuda" else "cpu (interpreter)"
    log(f"device {device_name}  torch {torch.__version__}  triton {triton.__version__}")
    log(f"ceilings: copy {PEAK_BW / 1e9:.0f} GB/s, bf16 matmul {PEAK_FLOPS / 1e12:.0f} TFLOP/s")
    t0 = time.monotonic()
    results: list[Result] = []
    if isolate:
        total_share = sum(BUDGET_SHARE[x] for x in suites) or 1.0
        for suite in suites:
            budget = args.budget_s * BUDGET_SHARE[suite] / total_share
            cmd = ["--only", suite, "--budget-s", f"{budget:.0f}", *passed]
            part = _child(cmd, budget + 300, None, log)
            if part is None:
                results.append(
                    Result(suite, f"{suite} (process)", {}, status="error", error="crashed or timed out")
                )
                continue
            lines.extend(part["log"])
            results += [Result(**r) for r in part["results"]]
    else:
        results = _run_suites(suites, setup, args.budget_s, log)
    print_table(results, log)
    table = best_configs(results)
    estimates: dict[str, Any] = {}
    if "estimate" in only:
        if isolate:
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                json.dump(table, f)
            env = dict(os.environ, OSSERVE_TRITON_CONFIGS=f.name)
            part = _child(["--only", "estimate", *passed], 420, env, log)
            estimates = part["estimates"] if part else {"error": "crashed or timed out"}
            lines.extend(part["log"] if part else [])
            os.unlink(f.name)
        else:
            from osserve.bench import kernel_estimate

            triton_common.TUNED.clear()
            triton_common.install_tuned(table)
            try:
                estimates = kernel_estimate.smoke(log)
            except Exception as e:  # noqa: BLE001
                log(f"estimate failed: {e!r}\n{traceback.format_exc(limit=-4)}")
    profile: dict[str, Any] = {}
    if "profile" in only and setup.device == "cuda":
        part = _child(["--only", "profile", *passed], 600, None, log)
        profile = part.get("profile", {}) if part else {"error": "crashed or timed out"}
        lines.extend(part["log"] if part else [])
    errors = sum(r.status == "error" for r in results)
    log(f"done in {time.monotonic() - t0:.0f}s; {errors} error(s)")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {
            "device": device_name,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "ceilings": {"bytes_per_s": PEAK_BW, "flops": PEAK_FLOPS},
            "budget_s": args.budget_s,
            "quick": args.quick,
            "results": [r.__dict__ for r in results],
            "best_configs": table,
            "estimates": estimates,
            "profile": profile,
        }
        (args.out / "kernels.json").write_text(json.dumps(record, indent=1, default=str))
        if profile:  # the record `kernel_profile.py --compare` reads
            (args.out / "profile.json").write_text(json.dumps({**record, "profile": profile}, default=str))
        (args.out / "best_configs.json").write_text(json.dumps(table, indent=1))
        (args.out / "kernels.txt").write_text("\n".join(lines) + "\n")
        log(f"wrote {args.out}/kernels.json, best_configs.json, kernels.txt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
