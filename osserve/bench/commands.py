"""`osserve bench serve | plot | offline`. Flags keep the names of vLLM's `vllm bench serve` where they overlap."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from osserve.bench import host, offline
from osserve.bench import kernels as kernel_bench
from osserve.bench.aggregate import METRICS, parse_goodput, parse_percentiles


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    bench = subparsers.add_parser(
        "bench",
        help="benchmark a server (serve), plot saved results (plot), the engine (offline), its host path "
        "(host), the GPU kernels (kernels)",
    )
    sub = bench.add_subparsers(
        dest="bench_command", metavar="{serve,plot,offline,host,kernels}", required=True
    )
    add_serve_parser(sub)
    add_plot_parser(sub)
    # NOTE: offline's run returns its figures (a dict); `osserve` exits with what func returns.
    offline.add_parser(sub).set_defaults(func=lambda args: 0 if offline.run(args) is not None else 1)
    host.add_parser(sub)
    kernels = sub.add_parser(
        "kernels",
        help="Triton kernels against their twins and floors, per-kernel profiles of whole steps",
        description=(kernel_bench.__doc__ or "").split("\n\n")[0],
    )
    kernel_bench.add_arguments(kernels).set_defaults(func=kernel_bench.run)
    return bench


def _concurrencies(text: str) -> list[int | None]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"takes integers separated by commas, e.g. 1,8,64; got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be at least 1; got {text!r}")
    return list(values)


def add_serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve",
        help="load-test an OpenAI-compatible server (TTFT, TPOT, ITL, E2EL, throughput, goodput)",
        description="Stream requests to an OpenAI-compatible server at a request rate and a concurrency cap "
        "(or a sweep of caps) and report throughput and latency percentiles. See docs/BENCH.md.",
    )
    g = p.add_argument_group("server")
    g.add_argument(
        "--base-url",
        default=None,
        help="server URL, e.g. http://127.0.0.1:8000 (default: from --host/--port)",
    )
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument(
        "--endpoint",
        default="chat",
        help="chat | completions | responses, or the path (/v1/chat/completions, ...); default chat",
    )
    g.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    g.add_argument("--label", default=None, help="name of this series in result files and plots")
    g.add_argument(
        "--request-timeout", type=float, default=3600.0, help="seconds before a request counts as failed"
    )
    g.add_argument(
        "--ready-check-timeout-sec",
        type=float,
        default=0.0,
        help="first wait up to this long for GET /health to answer 200 (default 0: do not wait)",
    )

    g = p.add_argument_group("workload")
    g.add_argument("--dataset-name", default="random", choices=["random", "jsonl", "multi-turn"])
    g.add_argument(
        "--dataset-path",
        default=None,
        help='JSONL: one {"prompt": ...}, {"messages": [...]} or {"turns": [...]} per line, '
        'optional "output_len"',
    )
    g.add_argument("--disable-shuffle", action="store_true", help="take JSONL lines in file order")
    g.add_argument("--num-prompts", type=int, default=100, help="requests per run (sessions for multi-turn)")
    g.add_argument(
        "--num-prompts-per-concurrency",
        type=int,
        default=None,
        help="per run, this many prompts times its --max-concurrency (overrides --num-prompts)",
    )
    g.add_argument(
        "--random-input-len", type=int, default=1024, help="prompt tokens (exact, Harmony tokenizer)"
    )
    g.add_argument("--random-output-len", type=int, default=128, help="output tokens (max_tokens)")
    g.add_argument(
        "--random-range-ratio", type=float, default=0.0, help="lengths uniform in [len*(1-r), len*(1+r)]"
    )
    g.add_argument(
        "--random-prefix-len", type=int, default=0, help="tokens of a prefix shared by every prompt"
    )
    g.add_argument("--input-len", type=int, default=None, help="alias of --random-input-len")
    g.add_argument(
        "--output-len",
        type=int,
        default=None,
        help="alias of --random-output-len; also the default output length of JSONL lines",
    )
    g.add_argument("--multi-turn-num-turns", type=int, default=3, help="user turns per multi-turn session")
    g.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send ignore_eos and min_tokens so every output has the asked length (default on)",
    )
    g.add_argument(
        "--continuous-usage",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ask for stream_options.continuous_usage_stats (osserve, vLLM, SGLang), so that streams showing "
        "no text are timed from their first token; --no-continuous-usage for servers that refuse it",
    )
    g.add_argument(
        "--temperature", type=float, default=None, help="sampling temperature (default: the server's)"
    )
    g.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("load")
    g.add_argument(
        "--max-concurrency",
        type=_concurrencies,
        default=[None],
        help="most requests in flight; a comma list (1,8,64,256) is a sweep, one run per value",
    )
    g.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="requests (sessions) per second, Poisson arrivals; inf (default): all at once",
    )
    g.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of the arrival gaps: 1 Poisson, < 1 burstier, > 1 more even",
    )
    g.add_argument("--num-warmups", type=int, default=0, help="unrecorded random requests before each run")

    g = p.add_argument_group("figures and results")
    g.add_argument(
        "--percentile-metrics",
        default=",".join(METRICS),
        help=f"metrics whose percentiles are printed (of {','.join(METRICS)})",
    )
    g.add_argument("--metric-percentiles", default="50,90,99", help="percentiles to report, e.g. 50,90,99")
    g.add_argument(
        "--goodput",
        nargs="+",
        default=None,
        metavar="NAME:MS",
        help="SLOs for goodput, e.g. ttft:500 tpot:50 (names: ttft, tpot, e2el)",
    )
    g.add_argument(
        "--save-result", action="store_true", help="write each run's JSON (config, server, requests)"
    )
    g.add_argument("--result-dir", default=".", help="folder of the result files")
    g.add_argument("--result-filename", default=None, help="file name (a sweep adds -c<concurrency>)")
    g.add_argument(
        "--metadata", nargs="*", default=[], metavar="KEY=VALUE", help="saved in the result's config"
    )
    g.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    p.set_defaults(func=run_serve)
    return p


def add_plot_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "plot",
        help="PNG charts from saved `bench serve` results",
        description="Charts from result files of `osserve bench serve --save-result`: output tok/s "
        "per GPU against tok/s per user (one point per concurrency), and latency percentiles "
        "against concurrency. Runs are grouped into series by label, model, endpoint and workload.",
    )
    p.add_argument("result_files", nargs="+", help="result JSON files (one per run)")
    p.add_argument("--out", default=".", help="folder for the PNG files")
    p.add_argument("--num-gpus", type=int, default=1, help="GPUs of the server (throughput is divided by it)")
    p.add_argument("--title", default=None)
    p.set_defaults(func=run_plot)
    return p


def serve_config(args: argparse.Namespace) -> Any:
    from osserve.bench.load_generator import ServeConfig

    extra = json.loads(args.extra_body) if args.extra_body else {}
    if not isinstance(extra, dict):
        raise ValueError("--extra-body must be a JSON object")
    metadata = {}
    for item in args.metadata:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--metadata takes KEY=VALUE; got {item!r}")
        metadata[key] = value
    return ServeConfig(
        base_url=args.base_url or f"http://{args.host}:{args.port}",
        endpoint=args.endpoint,
        model=args.model,
        label=args.label,
        dataset_name=args.dataset_name,
        dataset_path=args.dataset_path,
        num_prompts=args.num_prompts,
        num_prompts_per_concurrency=args.num_prompts_per_concurrency,
        input_len=args.input_len if args.input_len is not None else args.random_input_len,
        output_len=args.output_len if args.output_len is not None else args.random_output_len,
        range_ratio=args.random_range_ratio,
        prefix_len=args.random_prefix_len,
        num_turns=args.multi_turn_num_turns,
        shuffle=not args.disable_shuffle,
        max_concurrency=tuple(args.max_concurrency),
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        num_warmups=args.num_warmups,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        continuous_usage=args.continuous_usage,
        temperature=args.temperature,
        extra_body=extra,
        request_timeout=args.request_timeout,
        ready_check_timeout=args.ready_check_timeout_sec,
        percentile_metrics=tuple(m.strip() for m in args.percentile_metrics.split(",") if m.strip()),
        percentiles=tuple(parse_percentiles(args.metric_percentiles)),
        goodput=parse_goodput(args.goodput),
        save_result=args.save_result,
        result_dir=args.result_dir,
        result_filename=args.result_filename,
        metadata=metadata,
        disable_tqdm=args.disable_tqdm,
    )


def run_serve(args: argparse.Namespace) -> int:
    from osserve.bench.load_generator import run_sweep

    try:
        cfg = serve_config(args)
    except (ValueError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return run_sweep(cfg)
    except ValueError as e:  # a bad dataset file, found while building the workload
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_plot(args: argparse.Namespace) -> int:
    from osserve.bench.plot import plot_results

    try:
        paths = plot_results(args.result_files, args.out, args.num_gpus, args.title)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"Wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m osserve.bench.commands serve|plot|offline ...` (the same as `osserve bench ...`)."""
    parser = argparse.ArgumentParser(prog="osserve")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    result = args.func(args)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
