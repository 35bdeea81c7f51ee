"""`osserve frontend` and `osserve worker`: argument parsing only (the heavy modules load when they run)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from osserve.disagg.messages import KV_TRANSPORTS, ROLES
from osserve.disagg.router import ROUTER_MODES
from osserve.server.logs import LOG_LEVELS

FRONTEND_EPILOG = """\
examples:
  osserve frontend --port 8000 --router-mode kv           # workers register at tcp://127.0.0.1:8001
  osserve worker --role prefill --registry tcp://127.0.0.1:8001
  osserve worker --role decode --registry tcp://127.0.0.1:8001

  osserve frontend --etcd http://10.0.0.1:2379 --host 0.0.0.0 --model openai/gpt-oss-120b
Workers and the frontend must serve the same model name (--model / --served-model-name)."""

WORKER_EPILOG = """\
examples:
  osserve worker --role prefill --registry tcp://10.0.0.1:8001 --model openai/gpt-oss-120b
  osserve worker --role decode --etcd http://10.0.0.1:2379 --host 0.0.0.0 --model openai/gpt-oss-120b \\
      --max-batch-size 128
A frontend (osserve frontend) routes to the workers it finds in the same registry and namespace."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    add_frontend_parser(subparsers)
    add_worker_parser(subparsers)


# -- frontend ---------------------------------------------------------------------------------------------
def add_frontend_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "frontend",
        help="run the OpenAI-compatible server in front of prefill / decode workers",
        description="The OpenAI API (chat completions, responses, completions; Harmony inside) routing each "
        "request to the workers registered in etcd or in this frontend's own registry. "
        "See docs/DEPLOY.md.",
        epilog=FRONTEND_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model_tag", nargs="?", metavar="MODEL", help="the model the workers serve (same as --model)"
    )
    p.add_argument("--model", default=None, help="the model the workers serve (names it in the API)")
    p.add_argument(
        "--served-model-name", default=None, help="the name clients send as `model` (default: --model)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--router-mode",
        choices=ROUTER_MODES,
        default="round-robin",
        help="kv: the worker with the longest cached prompt prefix (less load); default: round-robin",
    )
    p.add_argument("--etcd", default=None, metavar="URL", help="find workers in etcd at URL")
    p.add_argument(
        "--registry-port",
        type=int,
        default=None,
        help="without --etcd: the port of this frontend's worker registry (default: --port + 1)",
    )
    p.add_argument("--namespace", default="default")
    p.add_argument(
        "--expect-roles",
        default=None,
        metavar="ROLES",
        help="roles that must be ready for /health to be 200, e.g. prefill,decode or both "
        "(default: inferred from the registered workers)",
    )
    p.add_argument(
        "--liveness-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="a worker silent this long is treated as gone (default: 10)",
    )
    p.add_argument(
        "--retry-timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="how long a request waits for a worker of the role it needs (default: 5)",
    )
    p.add_argument(
        "--max-retries", type=int, default=3, help="fail-overs per request before it errors (default: 3)"
    )
    p.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $OSSERVE_API_KEY)"
    )
    p.add_argument("--max-queue-len", type=int, default=None, metavar="N")
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM, seconds requests in flight get to finish before they end with an error (default: 30)",
    )
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    p.set_defaults(func=run_frontend)


def parse_roles(text: str | None) -> tuple[str, ...] | None:
    if not text:
        return None
    roles = tuple(r.strip() for r in text.split(",") if r.strip())
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise ValueError(f"--expect-roles: unknown role(s) {', '.join(bad)}; allowed: {', '.join(ROLES)}")
    return roles


def run_frontend(args: argparse.Namespace) -> int:
    from osserve.disagg.frontend import create_frontend_app, serve_app
    from osserve.disagg.remote_engine import FrontendSettings
    from osserve.server.logs import setup_logging

    try:
        if args.model_tag and args.model and args.model_tag != args.model:
            raise ValueError(f"two models given: {args.model_tag!r} and --model {args.model!r}")
        registry_port = args.registry_port if args.registry_port is not None else args.port + 1
        settings = FrontendSettings(
            router_mode=args.router_mode,
            etcd=args.etcd,
            registry_address=f"tcp://{args.host}:{registry_port}",
            namespace=args.namespace,
            expect_roles=parse_roles(args.expect_roles),
            liveness_timeout=args.liveness_timeout,
            retry_timeout=args.retry_timeout,
            max_retries=args.max_retries,
        )
    except ValueError as e:
        print(f"osserve frontend: error: {e}", file=sys.stderr)
        return 2
    setup_logging(args.log_level)
    app = create_frontend_app(
        settings,
        model=args.model_tag or args.model or "",
        served_model_name=args.served_model_name,
        api_key=args.api_key or os.environ.get("OSSERVE_API_KEY"),
        max_queue_len=args.max_queue_len,
        shutdown_timeout=args.shutdown_timeout,
    )
    return serve_app(app, args.host, args.port, args.log_level)


# -- worker -----------------------------------------------------------------------------------------------
def add_worker_parser(subparsers: argparse._SubParsersAction) -> None:
    from osserve.flags import add_engine_arguments

    p = subparsers.add_parser(
        "worker",
        help="run one engine (prefill, decode or both) for a disaggregated deployment",
        description="One engine behind a ZeroMQ control endpoint, registered (with a lease) in etcd or in a "
        "frontend's registry. See docs/DEPLOY.md.",
        epilog=WORKER_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model_tag", nargs="?", metavar="MODEL", help="checkpoint folder or Hugging Face repo id")
    w = p.add_argument_group("worker options")
    w.add_argument("--role", choices=ROLES, default="both")
    w.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    w.add_argument(
        "--advertise-host", default=None, help="address others reach this worker at (default: --host)"
    )
    w.add_argument("--port", type=int, default=0, help="control port (default: any free one)")
    w.add_argument("--kv-port", type=int, default=0, help="KV transfer port (default: any free one)")
    w.add_argument(
        "--etcd", default=None, metavar="URL", help="register in etcd at URL (e.g. http://127.0.0.1:2379)"
    )
    w.add_argument(
        "--registry",
        default=None,
        metavar="ADDR",
        help="register in the frontend's registry at ADDR (tcp://HOST:PORT; the frontend logs it)",
    )
    w.add_argument(
        "--namespace", default="default", help="deployment namespace in the registry (default: default)"
    )
    w.add_argument(
        "--lease-ttl",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds a dead worker stays registered at most (default: 10)",
    )
    w.add_argument("--worker-id", default=None, help="unique id (default: role-hostname-pid-random)")
    # NOTE: no argparse choices: WorkerOptions says what is allowed (and what became of a removed value).
    w.add_argument(
        "--kv-transport",
        default="auto",
        metavar="{" + ",".join(KV_TRANSPORTS) + "}",
        help="how KV moves from prefill workers (nixl: a NIXL READ, GPU to GPU with no host copy; zmq: bytes "
        "over ZeroMQ; auto, the default: nixl when it is installed and both workers registered their KV "
        "pool, else zmq)",
    )
    w.add_argument(
        "--kv-transfer-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="decode: a KV fetch not done within S seconds is given up and the prompt recomputed here "
        "(default: 30)",
    )
    w.add_argument(
        "--kv-hold-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="prefill: free a prompt's KV if no decode worker pulled it within S seconds (default: 60)",
    )
    w.add_argument(
        "--engine-json",
        default=None,
        metavar="JSON",
        help="engine options as one JSON object (the deployment launcher passes them so); flags override",
    )
    w.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM, seconds requests in flight get to finish; the rest go back to the frontend, which "
        "moves them to another worker (default: 30)",
    )
    w.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    # Test hook (fault injection): seconds between reserving blocks and pulling KV, so that tests can
    # cancel requests mid-transfer; $OSSERVE_DEBUG_TRANSFER_DELAY reaches workers started by the launcher.
    w.add_argument(
        "--debug-transfer-delay",
        type=float,
        help=argparse.SUPPRESS,
        default=float(os.environ.get("OSSERVE_DEBUG_TRANSFER_DELAY") or 0.0),
    )
    add_engine_arguments(p)
    p.set_defaults(func=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from osserve.config import EngineConfig
    from osserve.disagg.worker import Worker, WorkerOptions, check_role_fits_engine, serve_worker
    from osserve.flags import engine_options_from_args
    from osserve.server.deploy import merge_options

    try:
        engine = json.loads(args.engine_json) if args.engine_json else {}
        if not isinstance(engine, dict):
            raise ValueError("--engine-json must be a JSON object")
        cli = engine_options_from_args(args)
        if args.model_tag is not None:
            cli["model"] = args.model_tag
        config = EngineConfig.from_dict(merge_options(engine, cli))
        check_role_fits_engine(args.role, config)
        opts = WorkerOptions(
            role=args.role,
            host=args.host,
            advertise_host=args.advertise_host,
            port=args.port,
            kv_port=args.kv_port,
            etcd=args.etcd,
            registry=args.registry,
            namespace=args.namespace,
            lease_ttl=args.lease_ttl,
            worker_id=args.worker_id,
            kv_transport=args.kv_transport,
            kv_hold_timeout=args.kv_hold_timeout,
            kv_transfer_timeout=args.kv_transfer_timeout,
            debug_transfer_delay=args.debug_transfer_delay,
            shutdown_timeout=args.shutdown_timeout,
        )
    except (ValueError, json.JSONDecodeError) as e:
        print(f"osserve worker: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(),
        datefmt="%H:%M:%S",
        force=True,
        format=f"%(asctime)s %(levelname)s [{opts.worker_id}] %(name)s: %(message)s",
    )
    return asyncio.run(serve_worker(Worker(config, opts)))
