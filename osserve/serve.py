"""`osserve serve`: one process holding the engine and the OpenAI-compatible HTTP server, or, for a deployment
file of several processes (prefill / decode workers, replicas), the disaggregated launcher (osserve/disagg)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from osserve.config import EngineConfig
from osserve.flags import add_engine_arguments, engine_options_from_args
from osserve.server.deploy import load_deploy_file, merge_options
from osserve.server.logs import LOG_LEVELS, setup_logging

logger = logging.getLogger("osserve.server")

SERVER_DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 8000,
    "api_key": None,
    "max_queue_len": None,
    "shutdown_timeout": 30.0,
    "log_level": "info",
}

EPILOG = """\
examples:
  osserve serve                                   # the embedded random-weight model (for trying things out)
  osserve serve --model openai/gpt-oss-20b --max-batch-size 64 --kv-cache-config.free-gpu-memory-fraction 0.8
  osserve serve --config deploy.yaml --port 9000  # flags override the file
  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64}'

The API key may also come from $OSSERVE_API_KEY. /health and /metrics need no key."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the OpenAI-compatible server with the engine in this process",
        description="Serve one gpt-oss model over the OpenAI API (chat completions, responses, completions). "
        "Harmony stays inside: clients see reasoning, content and tool calls.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model_tag",
        nargs="?",
        metavar="MODEL",
        help="checkpoint folder or Hugging Face repo id (same as --model)",
    )
    server = p.add_argument_group("server options")
    server.add_argument(
        "--config",
        metavar="YAML",
        help="deployment file: model, served_model_name and engine options at the top level, or "
        "one worker of role 'both' with its runtime; command-line flags override it",
    )
    server.add_argument(
        "--host",
        default=argparse.SUPPRESS,
        help="address to bind (default: 127.0.0.1; 0.0.0.0 for all interfaces)",
    )
    server.add_argument("--port", type=int, default=argparse.SUPPRESS, help="port (default: 8000)")
    server.add_argument(
        "--api-key",
        default=argparse.SUPPRESS,
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $OSSERVE_API_KEY, else none)",
    )
    server.add_argument(
        "--max-queue-len",
        type=int,
        default=argparse.SUPPRESS,
        metavar="N",
        help="hold at most max_batch_size + N sequences (running + queued); answer 503 with Retry-After at "
        "once beyond that; 0: no queue (default: unlimited)",
    )
    server.add_argument(
        "--shutdown-timeout",
        type=float,
        default=argparse.SUPPRESS,
        metavar="S",
        help="on SIGTERM / SIGINT, seconds requests in flight get to finish before they are ended with an "
        "error; new requests get 503 meanwhile (default: 30)",
    )
    server.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=argparse.SUPPRESS,
        help="info logs loading and readiness; debug also logs each request (default: info)",
    )
    add_engine_arguments(p)
    p.set_defaults(func=run)


def resolve(args: argparse.Namespace) -> tuple[EngineConfig, dict[str, Any]]:
    """Defaults < deployment file < command line, then validated. Raises ValueError saying what is wrong."""
    engine: dict[str, Any] = {}
    server = dict(SERVER_DEFAULTS)
    if os.environ.get("OSSERVE_API_KEY"):
        server["api_key"] = os.environ["OSSERVE_API_KEY"]
    if args.config:
        spec = load_deploy_file(args.config)
        engine, server = spec.engine, {**server, **spec.server}
    cli = engine_options_from_args(args)
    if args.model_tag is not None:
        if "model" in cli and cli["model"] != args.model_tag:
            raise ValueError(f"two models given: {args.model_tag!r} and --model {cli['model']!r}")
        cli["model"] = args.model_tag
    engine = merge_options(engine, cli)
    for key in SERVER_DEFAULTS:
        if hasattr(args, key):
            server[key] = getattr(args, key)
    port, queue, grace = server["port"], server["max_queue_len"], server["shutdown_timeout"]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer in [0, 65535], got {port!r}")
    if queue is not None and (isinstance(queue, bool) or not isinstance(queue, int) or queue < 0):
        raise ValueError(f"max_queue_len must be an integer >= 0, got {queue!r}")
    if isinstance(grace, bool) or not isinstance(grace, int | float) or not grace >= 0:
        raise ValueError(f"shutdown_timeout must be a number of seconds >= 0, got {grace!r}")
    if server["log_level"] not in LOG_LEVELS:
        raise ValueError(f"log_level is {server['log_level']!r}; allowed: {', '.join(LOG_LEVELS)}")
    return EngineConfig.from_dict(engine), server


def run(args: argparse.Namespace) -> int:
    if args.config:
        # A deployment of several processes (prefill / decode workers, discovery): the launcher runs it.
        from osserve.disagg.deployment import is_multi_process, run_deployment

        try:
            multi = is_multi_process(args.config)
        except ValueError as e:
            print(f"osserve serve: error: {e}", file=sys.stderr)
            return 2
        if multi:
            return run_deployment(args)
    try:
        config, server = resolve(args)
    except ValueError as e:
        print(f"osserve serve: error: {e}", file=sys.stderr)
        return 2
    setup_logging(server["log_level"])
    from osserve.server.app import create_app
    from osserve.server.lifecycle import serve_app

    app = create_app(
        config,
        api_key=server["api_key"],
        max_queue_len=server["max_queue_len"],
        shutdown_timeout=float(server["shutdown_timeout"]),
    )
    host, port = server["host"], server["port"]
    logger.info(
        "osserve listening on http://%s:%d%s", host, port, " (API key required)" if server["api_key"] else ""
    )
    return serve_app(app, host, port, server["log_level"], exit_on_engine_death=True)
