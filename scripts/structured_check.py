"""Structured outputs against a live server (e.g. gpt-oss on a GPU, engine process, CUDA graphs): the test
suite's 32 schemas and 4 tools (tests/structured_cases.py), streamed and not, Chat Completions and the
Responses API, all at once; every answer must parse and validate, every forced call go to an allowed
function with valid arguments, every reasoning be present.

    python scripts/structured_check.py --base-url http://127.0.0.1:8000 [--max-tokens 400]
    python scripts/structured_check.py --print-extra-body   # a response_format for `osserve bench serve`

Prints one line per kind of request ("N/N valid") and the first failures; exits 1 if any request failed.
Needs httpx and jsonschema.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from structured_cases import CHAT_TOOLS, PARAMS, SCHEMAS, TOOLS, validate  # noqa: E402

USER = [{"role": "user", "content": "Answer with JSON."}]
# The bench's structured load: a bounded schema of a few fields.
BENCH_SCHEMA = SCHEMAS["nested object"]


def chat(client: httpx.Client, stream: bool, body: dict) -> list[tuple]:
    """[(finish_reason, content, reasoning, [(name, arguments)])] per choice."""
    if not stream:
        r = client.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        out = []
        for c in r.json()["choices"]:
            m = c["message"]
            calls = [(t["function"]["name"], t["function"]["arguments"]) for t in m.get("tool_calls") or []]
            out.append((c["finish_reason"], m["content"], m.get("reasoning_content"), calls))
        return out
    choices: dict[int, dict] = {}
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            for c in event["choices"]:
                s = choices.setdefault(
                    c["index"], {"content": "", "reasoning": "", "calls": {}, "finish": None}
                )
                d = c["delta"]
                s["content"] += d.get("content") or ""
                s["reasoning"] += d.get("reasoning_content") or ""
                for t in d.get("tool_calls") or []:
                    call = s["calls"].setdefault(t["index"], ["", ""])
                    call[0] += t["function"].get("name") or ""
                    call[1] += t["function"].get("arguments") or ""
                s["finish"] = c.get("finish_reason") or s["finish"]
    return [
        (s["finish"], s["content"], s["reasoning"], [tuple(v) for v in s["calls"].values()])
        for _, s in sorted(choices.items())
    ]


def check_answer(choice: tuple, schema: dict) -> None:
    finish, content, reasoning, calls = choice
    assert finish == "stop" and not calls, f"finish {finish}, calls {calls}"
    validate(json.loads(content), schema)
    assert reasoning, "no reasoning"


def check_call(choice: tuple, allowed: list[str]) -> None:
    finish, content, reasoning, calls = choice
    assert finish == "tool_calls" and reasoning, f"finish {finish}"
    assert len(calls) == 1 and calls[0][0] in allowed, f"calls {calls}"
    validate(json.loads(calls[0][1]), PARAMS[calls[0][0]])


def responses(client: httpx.Client, body: dict) -> dict:
    r = client.post("/v1/responses", json=body)
    r.raise_for_status()
    return r.json()


def check_response(r: dict, schema: dict | None, allowed: list[str] | None) -> None:
    assert r["status"] == "completed", r["status"]
    kinds = [item["type"] for item in r["output"]]
    if schema is not None:
        assert kinds == ["reasoning", "message"], kinds
        validate(json.loads(r["output"][1]["content"][0]["text"]), schema)
    else:
        assert kinds == ["reasoning", "function_call"] and r["output"][1]["name"] in allowed, kinds
        validate(json.loads(r["output"][1]["arguments"]), PARAMS[r["output"][1]["name"]])


def jobs(client: httpx.Client, max_tokens: int) -> list[tuple[str, Callable[[], object]]]:
    base = {"messages": USER, "max_tokens": max_tokens}
    out = []
    for schema in SCHEMAS.values():
        fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
        for stream in (False, True):
            label = f"chat json_schema{' stream' if stream else ''}"

            def run(s=stream, f=fmt, sc=schema):
                for choice in chat(client, s, {**base, "response_format": f}):
                    check_answer(choice, sc)

            out.append((label, run))
    n_body = {**base, "n": 3, "temperature": 1.0}
    n_body["response_format"] = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": BENCH_SCHEMA},
    }
    out.append(
        (
            "chat n=3",
            lambda: [check_answer(c, BENCH_SCHEMA) for c in chat(client, True, n_body)],
        )
    )
    names = [n for n, _ in TOOLS]
    for stream in (False, True):
        body = {**base, "tools": CHAT_TOOLS, "tool_choice": "required"}
        out.append(
            ("chat tool_choice required", lambda s=stream, b=body: check_call(chat(client, s, b)[0], names))
        )
        for name in names:
            body = {
                **base,
                "tools": CHAT_TOOLS,
                "tool_choice": {"type": "function", "function": {"name": name}},
            }
            out.append(
                (
                    "chat tool_choice named",
                    lambda s=stream, b=body, n=name: check_call(chat(client, s, b)[0], [n]),
                )
            )
    rbase = {"input": "Answer with JSON.", "max_output_tokens": max_tokens}
    for name in ("tuple", "oneOf objects", "format date", "refs"):
        schema = SCHEMAS[name]
        fmt = {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}
        out.append(
            (
                "responses text.format",
                lambda f=fmt, sc=schema: check_response(
                    responses(client, {**rbase, "text": {"format": f}}), sc, None
                ),
            )
        )
    rtools = [{"type": "function", "name": n, **({"parameters": p} if p else {})} for n, p in TOOLS]
    for choice, allowed in (("required", names), ({"type": "function", "name": "add"}, ["add"])):
        body = {**rbase, "tools": rtools, "tool_choice": choice}
        out.append(
            ("responses tool_choice", lambda b=body, a=allowed: check_response(responses(client, b), None, a))
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--print-extra-body", action="store_true", help="print a bench --extra-body and exit")
    args = ap.parse_args()
    if args.print_extra_body:
        fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": BENCH_SCHEMA}}
        print(json.dumps({"response_format": fmt, "min_tokens": 0}))
        return 0
    with httpx.Client(base_url=args.base_url, timeout=1800) as client:
        todo = jobs(client, args.max_tokens)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(min(args.concurrency, len(todo))) as pool:
            futures = [(label, pool.submit(run)) for label, run in todo]
        results: dict[str, list[str | None]] = {}
        for label, future in futures:
            try:
                future.result()
                results.setdefault(label, []).append(None)
            except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the check
                results.setdefault(label, []).append(f"{type(e).__name__}: {str(e)[:300]}")
    failed = 0
    for label, errors in results.items():
        bad = [e for e in errors if e]
        failed += len(bad)
        print(
            f"{label:32s} {len(errors) - len(bad)}/{len(errors)} valid"
            + (f"  first failure: {bad[0]}" if bad else "")
        )
    print(f"{len(futures) - failed}/{len(futures)} requests valid in {time.perf_counter() - t0:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
