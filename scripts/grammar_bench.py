"""Grammar engines for structured outputs, compared on what osserve asks of them: the token bitmask of a
Harmony completion grammar (free analysis text, then a final message matching a JSON schema), filled
before each sampled token, at batch 1 and batch 256.

    PYTHONPATH=. python scripts/grammar_bench.py [--batch 1 256] [--steps 200] [--libs llguidance xgrammar]

llguidance runs through osserve.structured (the grammar the server builds); xgrammar (not a dependency:
install it to compare) gets the same completion as a structural tag: the specials as tokens, the analysis
as any tokens but the specials, then the JSON schema. Each matcher replays openai-harmony-rendered
completions token by token (when one ends, a fresh matcher starts the next), so a batch mixes rows in
the analysis with rows inside the JSON. Prints, per library and batch: compile time, fill time per step
and per row (mean, p50, p99), and accept time per row, split by phase (analysis / JSON) at batch 1.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
from openai_harmony import Message, Role

from osserve.harmony.encoding import (
    CALL,
    CHANNEL,
    END,
    MESSAGE,
    RETURN,
    START,
    VOCAB_SIZE,
    get_tokenizer,
)
from osserve.harmony.formats import ResponseFormat
from osserve.structured import GrammarMatcher, build_structured, fill_bitmasks
from osserve.structured.matcher import BITMASK_WIDTH
from osserve.structured.vocabulary import grammar_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{4}$"},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "email": {"type": "string", "format": "email"},
                "tier": {"enum": ["free", "pro", "enterprise"]},
            },
            "required": ["name", "tier"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "maxItems": 8,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
                    "price": {"type": "number", "minimum": 0},
                },
                "required": ["sku", "quantity", "price"],
                "additionalProperties": False,
            },
        },
        "gift": {"type": "boolean"},
        "notes": {"type": ["string", "null"]},
    },
    "required": ["order_id", "customer", "items", "gift"],
    "additionalProperties": False,
}
ANSWERS = [
    '{"order_id":"AB-1234","customer":{"name":"Ann Lee","email":"ann@example.com","tier":"pro"},'
    '"items":[{"sku":"X-1","quantity":2,"price":9.99},{"sku":"Y-22","quantity":1,"price":120}],'
    '"gift":false,"notes":"leave at the door"}',
    '{"order_id": "ZZ-0001", "customer": {"name": "Bob", "tier": "free"}, "items": [], "gift": true, '
    '"notes": null}',
    '{"order_id":"QA-9876","customer":{"name":"Zoë Ångström","tier":"enterprise"},"items":[{"sku":"k",'
    '"quantity":100,"price":0.5}],"gift":false}',
]
REASONING = (
    "The user wants an order summary as JSON. Let me collect the order id, the customer, the items with "
    "their quantities and prices, and whether it is a gift. The schema requires order_id, customer, items "
    "and gift; notes are optional. I will keep the answer compact."
)


def completions(tok) -> list[tuple[list[int], int]]:
    """(token ids after `<|start|>assistant`, index of the first JSON token) per answer."""
    out = []
    for i, answer in enumerate(ANSWERS):
        msgs = [
            Message.from_role_and_content(Role.ASSISTANT, REASONING * (1 + i)).with_channel("analysis"),
            Message.from_role_and_content(Role.ASSISTANT, answer).with_channel("final"),
        ]
        ids = [t for m in msgs for t in tok.encoding.render(m)][2:]
        ids[-1] = RETURN
        out.append((ids, len(ids) - 1 - len(tok.encode(answer))))
    return out


class Llguidance:
    name = "llguidance"

    def __init__(self):
        import llguidance

        self.version = llguidance.__version__
        self.threads = "llguidance executor default (80% of CPUs, up to 32)"
        grammar_tokenizer()  # built once per process, like xgrammar's TokenizerInfo: not compile time
        t0 = time.perf_counter()
        self.structured = build_structured(ResponseFormat("order", SCHEMA), [], None, None)
        self.proto = GrammarMatcher(self.structured)
        self.compile_s = time.perf_counter() - t0

    def new(self):
        return self.proto.copy()

    def fill(self, matchers, bitmask):
        fill_bitmasks(matchers, bitmask)

    def accept(self, m, token):
        assert m.accept(token), m.error


class Xgrammar:
    name = "xgrammar"

    def __init__(self):
        import xgrammar as xgr
        from xgrammar import structural_tag as st

        tok = get_tokenizer()
        self.version = getattr(xgr, "__version__", None) or _dist_version("xgrammar")
        vocab = [tok.token_bytes(i, skip_special_tokens=False) for i in range(VOCAB_SIZE)]
        info = xgr.TokenizerInfo(
            vocab, xgr.VocabType.RAW, vocab_size=VOCAB_SIZE, stop_token_ids=[RETURN, CALL]
        )
        specials = sorted(tok.special_tokens.values())
        seq = st.SequenceFormat(
            elements=[
                st.TokenFormat(token=CHANNEL),
                st.ConstStringFormat(value="analysis"),
                st.TokenFormat(token=MESSAGE),
                st.AnyTokensFormat(exclude_tokens=specials),
                st.TokenFormat(token=END),
                st.TokenFormat(token=START),
                st.ConstStringFormat(value="assistant"),
                st.TokenFormat(token=CHANNEL),
                st.ConstStringFormat(value="final"),
                st.TokenFormat(token=MESSAGE),
                st.JSONSchemaFormat(json_schema=SCHEMA, max_whitespace_cnt=1),
                st.TokenFormat(token=RETURN),
            ]
        )
        t0 = time.perf_counter()
        compiler = xgr.GrammarCompiler(info, max_threads=max(1, (os.cpu_count() or 2) // 2))
        self.compiled = compiler.compile_structural_tag(st.StructuralTag(format=seq))
        self.compile_s = time.perf_counter() - t0
        self.xgr = xgr
        self.batch = xgr.BatchGrammarMatcher()
        self.threads = "BatchGrammarMatcher default (CPUs / 2)"

    def new(self):
        return self.xgr.GrammarMatcher(self.compiled)

    def fill(self, matchers, bitmask):
        import torch

        out = torch.from_numpy(bitmask)
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(out, 0)
        else:
            self.batch.batch_fill_next_token_bitmask(matchers, out)

    def accept(self, m, token):
        assert m.accept_token(token)


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def run(lib, batch: int, steps: int, data) -> dict:
    """Replay completions on `batch` rows for `steps` steps; rows start at staggered places."""
    rows = []
    for r in range(batch):
        ids, json_at = data[r % len(data)]
        m = lib.new()
        offset = (r * 37) % len(ids) if batch > 1 else 0
        for t in ids[:offset]:
            lib.accept(m, t)
        rows.append([m, r % len(data), offset])
    bitmask = np.empty((batch, BITMASK_WIDTH), dtype=np.int32)
    fill_s, accept_s, phase = [], [], []
    for _ in range(steps):
        matchers = [row[0] for row in rows]
        t0 = time.perf_counter()
        lib.fill(matchers, bitmask)
        fill_s.append(time.perf_counter() - t0)
        if batch == 1:
            ids, json_at = data[rows[0][1]]
            phase.append("json" if rows[0][2] >= json_at else "analysis")
        t0 = time.perf_counter()
        for i, row in enumerate(rows):
            m, which, pos = row
            ids = data[which][0]
            token = ids[pos]
            if batch == 1 or i < 4:  # the masks are right (spot check: the token is allowed)
                assert (bitmask[i, token // 32] >> (token % 32)) & 1, (lib.name, which, pos)
            lib.accept(m, token)
            row[2] += 1
            if row[2] == len(ids):  # next completion, fresh matcher (not timed below)
                row[1] = (which + 1) % len(data)
                row[2] = 0
        accept_s.append(time.perf_counter() - t0)
        for row in rows:
            if row[2] == 0:
                row[0] = lib.new()
    out = {"fill": fill_s, "accept": accept_s}
    if phase:
        out["phase"] = phase
    return out


def us(values: list[float], per: int = 1) -> str:
    v = sorted(x * 1e6 / per for x in values)
    return f"mean {statistics.fmean(v):8.1f}  p50 {v[len(v) // 2]:8.1f}  p99 {v[int(len(v) * 0.99)]:8.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--libs", nargs="+", default=["llguidance", "xgrammar"])
    args = ap.parse_args()
    tok = get_tokenizer()
    data = completions(tok)
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"completions: {[len(ids) for ids, _ in data]} tokens (analysis, then JSON)")
    for name in args.libs:
        try:
            lib = {"llguidance": Llguidance, "xgrammar": Xgrammar}[name]()
        except ImportError as e:
            print(f"{name}: not installed ({e})")
            continue
        print(f"\n{name} {lib.version}: compile {lib.compile_s * 1e3:.1f} ms; threads: {lib.threads}")
        for batch in args.batch:
            lib.new()  # warm caches before timing
            run(lib, batch, 10, data)
            res = run(lib, batch, args.steps, data)
            print(f"  batch {batch:4d} fill per step  {us(res['fill'])} us")
            print(f"  batch {batch:4d} fill per row   {us(res['fill'], batch)} us")
            print(f"  batch {batch:4d} accept per row {us(res['accept'], batch)} us")
            if "phase" in res:
                for p in ("analysis", "json"):
                    sel = [f for f, ph in zip(res["fill"], res["phase"], strict=True) if ph == p]
                    if sel:
                        print(f"  batch    1 fill in {p:8s}  {us(sel)} us ({len(sel)} tokens)")


if __name__ == "__main__":
    main()
