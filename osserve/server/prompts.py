"""Prompt work off the event loop: rendering and tokenizing run on worker threads (openai-harmony's encoder
releases the GIL, see osserve/harmony/encoding.py), stop as soon as a prompt cannot fit the context, and
every failure, native ones included, becomes an OpenAI error."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from osserve.server.openai_errors import (
    LONE_SURROGATE,
    PROPAGATE,
    APIError,
    bad_request,
    from_value_error,
    internal_error,
)

T = TypeVar("T")
_SURROGATE = re.compile("[\ud800-\udfff]")


def num_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class PromptWorkers:
    """At most one prompt job per core at a time; more wait their turn (without holding the event loop)."""

    def __init__(self, max_workers: int | None = None):
        self.max_workers = max_workers or num_cores()
        self._limiter: anyio.CapacityLimiter | None = None  # made on the event loop, at first use

    async def run(self, fn: Callable[..., T], *args: Any, param: str = "messages") -> T:
        """`fn(*args)` on a worker thread. ValueError -> 400 naming `param` unless the error names its own;
        anything else (a panic in a native library is a BaseException) -> OpenAI's error object, 500."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.max_workers)
        try:
            return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=self._limiter)
        except APIError:
            raise
        except ValueError as e:
            raise from_value_error(e, None, param) from None
        except PROPAGATE:
            raise
        except BaseException as e:  # noqa: BLE001 - pyo3's PanicException is a BaseException
            raise internal_error(e, "preparing the prompt") from None


def check_unicode(value: Any, path: str = "") -> None:
    """Raise a 400 naming the field if a string anywhere in `value` (a request body as plain data) holds a
    lone UTF-16 surrogate: JSON may write one (\\ud800), but it is no character and has no UTF-8 form."""
    if isinstance(value, str):
        m = _SURROGATE.search(value)
        if m is not None:
            where = path or "request body"
            raise bad_request(f"{where} (at character {m.start()}) {LONE_SURROGATE}", path or None)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_unicode(key, path)
            check_unicode(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_unicode(item, f"{path}[{i}]")


def prompt_budget(max_seq_len: int | None, max_tokens: int | None) -> int | None:
    """The most prompt tokens a request may have (None: no known limit yet)."""
    if max_seq_len is None:
        return None
    return max_seq_len - (max_tokens if max_tokens is not None else 1)


def check_prompt_length(
    num_tokens: int, budget: int | None, max_seq_len: int | None, max_tokens: int | None, param: str
) -> None:
    """400 context_length_exceeded when rendering stopped past `budget` (the count is then a lower bound)."""
    if budget is None or max_seq_len is None or num_tokens <= budget:
        return
    if max_tokens is None:
        message = (
            f"prompt has more than {budget} tokens; max_seq_len is {max_seq_len} (prompt + output), "
            "leaving no room for output"
        )
    else:
        message = (
            f"prompt has more than {max(budget, 0)} tokens, which with max_tokens ({max_tokens}) is beyond "
            f"max_seq_len ({max_seq_len})"
        )
    raise bad_request(message, param, "context_length_exceeded")
