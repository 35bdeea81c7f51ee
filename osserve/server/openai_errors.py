"""Every error the server returns, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Bad input is always a 4xx: FastAPI's validation errors, malformed JSON and unknown routes are converted
here, and a ValueError raised while checking a request becomes a 400 that names the field where it can.
Anything else, native libraries' panics (BaseException) included, is a 500 in the same shape; only
KeyboardInterrupt, SystemExit and cancellation pass through (`PROPAGATE`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from osserve.sampling_params import ContextLengthError

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered with `status` and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


LONE_SURROGATE = (
    "contains a lone UTF-16 surrogate (\\ud800 to \\udfff); text must be valid Unicode (a character beyond "
    "U+FFFF is written as a pair of \\u escapes, high then low)"
)
# What must never be turned into an error response: stopping the process, and task cancellation.
PROPAGATE = (KeyboardInterrupt, SystemExit, asyncio.CancelledError, GeneratorExit)


def internal_error(e: BaseException, doing: str) -> APIError:
    """A failure that is not the client's (a bug, or a native library's panic), logged with its traceback."""
    logger.error("internal error while %s", doing, exc_info=e)
    detail = str(e).splitlines()[0][:300] if str(e) else ""
    return APIError(
        500,
        f"internal error while {doing}: {type(e).__name__}" + (f": {detail}" if detail else ""),
        "server_error",
        None,
        "internal_error",
    )


def draining_error() -> APIError:
    return APIError(
        503,
        "the server is shutting down and takes no new requests; retry (on another replica)",
        "server_error",
        None,
        "server_draining",
        {"Retry-After": "1"},
    )


def shutdown_error(grace_s: float) -> APIError:
    return APIError(
        503,
        f"the server shut down before this request finished (it had {grace_s:g} s to finish); retry it",
        "server_error",
        None,
        "server_shutdown",
    )


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def from_value_error(
    e: ValueError, param_names: dict[str, str] | None = None, prompt_param: str = "messages"
) -> APIError:
    """A validation ValueError -> 400. `param` comes from the error itself (`InvalidRequest.param`) or from
    the field its message starts with (SamplingParams: "top_p must be ..."), renamed by `param_names`."""
    if isinstance(e, ContextLengthError):
        return bad_request(str(e), prompt_param, "context_length_exceeded")
    param = getattr(e, "param", None)
    if param is None:
        m = re.match(r"([a-z_]+)\b", str(e))
        if m and param_names and m.group(1) in param_names:
            param = param_names[m.group(1)]
    return bad_request(str(e), param)


# Tags of the tagged unions in protocol.py (message roles, Responses item types): pydantic puts the tag in
# the error location after the list index; the client never wrote it.
_TAGS = {
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "message",
    "function_call",
    "function_call_output",
    "reasoning",
}
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict"}


def _param(error: dict[str, Any]) -> tuple[str | None, int]:
    """OpenAI's `param` (`messages[0].content`) for a pydantic error, and how deep it points."""
    loc = [p for p in error.get("loc", ()) if p != "body"]
    parts: list[str | int] = []
    for i, p in enumerate(loc):
        if isinstance(p, str) and (
            p in _TYPE_NAMES or "[" in p or p[:1].isupper() or p.startswith("constrained-")
        ):
            continue  # a union member's type, not a field
        if isinstance(p, str) and p in _TAGS and i > 0 and isinstance(loc[i - 1], int):
            continue
        parts.append(p)
    if error.get("type") in ("union_tag_invalid", "union_tag_not_found"):
        field = str((error.get("ctx") or {}).get("discriminator", "")).strip("'")
        parts.append("type" if field.endswith("()") else field)
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None, len(parts)


def _message(error: dict[str, Any]) -> str:
    ctx = error.get("ctx") or {}
    if error.get("type") == "union_tag_invalid":
        return f"{ctx.get('tag')!r} is not one of {ctx.get('expected_tags')}"
    if error.get("type") == "union_tag_not_found":
        return "Field required"
    return error.get("msg", "invalid value")


def validation_error(exc: RequestValidationError, content_type: str = "application/json") -> APIError:
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request body")
    first = errors[0]
    kind = first.get("type", "")
    loc = tuple(first.get("loc", ()))
    if kind == "json_invalid":
        ctx = first.get("ctx") or {}
        where = f" at character {loc[1]}" if len(loc) > 1 and isinstance(loc[1], int) else ""
        return bad_request(f"request body is not valid JSON{where}: {ctx.get('error', first.get('msg'))}")
    if loc in (("body",), ()) and kind in ("model_attributes_type", "dict_type", "model_type"):
        if "json" not in content_type:
            return bad_request(
                f"request body must be a JSON object sent with Content-Type: application/json "
                f"(got Content-Type {content_type or 'none'!r})"
            )
        return bad_request("request body must be a JSON object")
    if loc in (("body",), ()) and kind == "missing":
        return bad_request("request body is missing; send a JSON object")
    for e in errors:
        if e.get("type") == "string_unicode":  # a lone surrogate, which pydantic reads as no string at all
            param = _param(e)[0]
            return bad_request(f"{param or 'request body'}: {LONE_SURROGATE}", param)
    # With unions, pydantic reports every member that failed; the one that got deepest is what the client
    # meant (a list of messages with one bad message, not "input should be a string").
    located = [(e, *_param(e)) for e in errors]
    deepest = max(depth for _, _, depth in located)
    # Among those, an error about the value (too short, too small) beats "should be a valid <type>": it
    # comes from the form whose types fit, the one the client wrote.
    candidates = [(e, p) for e, p, depth in located if depth == deepest]
    valued = [(e, p) for e, p in candidates if not str(e.get("type", "")).endswith("_type")] or candidates
    param = valued[0][1]
    same = [e for e, p in valued if p == param]
    msgs = list(dict.fromkeys(_message(e) for e in same))
    msg = msgs[0] if len(msgs) == 1 else "fits none of the allowed forms: " + "; or ".join(msgs)
    where = f"{param}: " if param else ""
    # Other fields, not the union alternatives that led to this one (`input` for `input[0].type`).
    rest = len({p for _, p, _ in located if p != param and not (param or "").startswith(p or "")})
    extra = f" (and problems with {rest} other field(s))" if rest else ""
    return bad_request(f"{where}{msg}{extra}", param)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc, request.headers.get("content-type", "")).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see GET /docs for the API"
        return APIError(exc.status_code, message, kind, None, code, getattr(exc, "headers", None)).response()
