"""Every EngineConfig option as a command-line flag, for any command that builds an engine.

`add_engine_arguments(parser)` adds them to a command's parser; `engine_options_from_args(args)` gives back
the options the command line set, nested keys folded into their objects.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import types
import typing
from typing import Any

from osserve.config import EngineConfig

# Engine options as flags: --max-batch-size 64, --kv-cache-config.free-gpu-memory-fraction 0.8,
# --kv-cache-config '{"enable_block_reuse": false}'. Flags not given are absent from the parsed args, so a
# deployment file's values are overridden only by what the command line says.

ENGINE_GROUP_PREFIX = "engine:"

# Help for the fields that config.py leaves uncommented (its comments are the help of the others).
_HELP = {
    "served_model_name": "The name clients send as `model` and GET /v1/models lists; default: --model.",
    "tensor_parallel_size": "GPUs that each layer's weights are split over.",
    "moe_expert_parallel_size": "GPUs that the MoE experts are spread over.",
    "enable_attention_dp": "Data-parallel attention (each rank runs its own requests) beside expert-parallel MoE.",
    "enable_chunked_prefill": "Split long prompts over several steps so running decodes keep going.",
    "attention_backend": "auto: Triton on CUDA, the PyTorch reference elsewhere; or triton, torch.",
    "dtype": "auto, bfloat16, float16 or float32.",
    "seed": "Seed of the engine's random state (requests without a seed).",
}


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.strip().lower() in ("none", "null") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def field_comments(cls: type) -> dict[str, str]:
    """The `# comment` lines written above each field of a dataclass, which serve as its --help."""
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# ").strip())
        elif m := re.match(r"(\w+)\s*:", stripped):
            if pending:
                comments[m.group(1)] = " ".join(pending)
            pending = []
        else:
            pending = []
    return comments


def _flag_type(hint: Any) -> tuple[Any, str | None]:
    """argparse type and metavar for a field's type hint."""
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if base is bool:
        return _bool, "{true,false}"
    if base in (int, float, str):
        return (_optional(base) if optional else base), base.__name__.upper()
    return str, None


def _add_field(group: argparse._ArgumentGroup, dest: str, f: dataclasses.Field, hint: Any, doc: str) -> None:
    kind, metavar = _flag_type(hint)
    default = f.default if f.default is not dataclasses.MISSING else None
    help_text = f"{doc} (default: {default!r})" if doc else f"(default: {default!r})"
    flag = "--" + dest.replace("_", "-")
    kwargs: dict[str, Any] = {
        "dest": ENGINE_GROUP_PREFIX + dest,
        "type": kind,
        "metavar": metavar,
        "default": argparse.SUPPRESS,
        "help": help_text,
    }
    if kind is _bool:
        kwargs.update(nargs="?", const=True)
    group.add_argument(flag, **kwargs)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Every EngineConfig field as `--name-with-dashes`; nested option objects as JSON and per key."""
    group = parser.add_argument_group(
        "engine options",
        "Every EngineConfig option (osserve/config.py); same names as in the deployment file.",
    )
    hints = typing.get_type_hints(EngineConfig)
    docs = {
        **field_comments(EngineConfig),
        **{k: v for k, v in _HELP.items() if k not in field_comments(EngineConfig)},
    }
    for f in dataclasses.fields(EngineConfig):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            group.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=ENGINE_GROUP_PREFIX + f.name,
                type=_json_object,
                metavar="JSON",
                default=argparse.SUPPRESS,
                help=f"{f.name} as a JSON object, e.g. '{json.dumps(dataclasses.asdict(hint()))}'",
            )
            sub_hints = typing.get_type_hints(hint)
            sub_docs = field_comments(hint)
            for sf in dataclasses.fields(hint):
                _add_field(group, f"{f.name}.{sf.name}", sf, sub_hints[sf.name], sub_docs.get(sf.name, ""))
        else:
            _add_field(group, f.name, f, hint, docs.get(f.name, ""))


def engine_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options given on the command line, nested keys folded into their objects."""
    options: dict[str, Any] = {}
    given = {
        k[len(ENGINE_GROUP_PREFIX) :]: v for k, v in vars(args).items() if k.startswith(ENGINE_GROUP_PREFIX)
    }
    # Whole objects first, so a per-key flag refines a JSON one.
    for key, value in sorted(given.items(), key=lambda kv: "." in kv[0]):
        if "." in key:
            outer, inner = key.split(".", 1)
            options.setdefault(outer, {})[inner] = value
        else:
            options[key] = dict(value) if isinstance(value, dict) else value
    return options
