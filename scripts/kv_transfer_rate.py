"""Print a disaggregated deployment's KV-transfer figures from its frontend's /metrics.

Per transport: fetches, GiB moved, and GiB/s two ways: end to end (the decode worker's reserved blocks ->
KV in place: asking the source, moving, writing) and moving alone (NIXL: READ posted -> complete; for zmq the
same as end to end). Then the fallbacks to recomputing, by reason.

    python scripts/kv_transfer_rate.py http://127.0.0.1:8000 --save before.json
    ... run a benchmark ...
    python scripts/kv_transfer_rate.py http://127.0.0.1:8000 --since before.json --json after-rate.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

# metric family -> key in the snapshot
FAMILIES = {
    "osserve_kv_transfers": "fetches",
    "osserve_kv_transfer_bytes": "bytes",
    "osserve_kv_transfer_seconds": "seconds",
    "osserve_kv_transfer_move_seconds": "move_seconds",
    "osserve_kv_transfer_fallbacks": "fallbacks",
}


def snapshot(url: str) -> dict[str, dict[str, float]]:
    """{"bytes": {"nixl": ...}, "fallbacks": {"timeout": ...}, ...} from the frontend's /metrics."""
    text = httpx.get(url.rstrip("/") + "/metrics", timeout=10).text
    out: dict[str, dict[str, float]] = {key: {} for key in FAMILIES.values()}
    for family in text_string_to_metric_families(text):
        key = FAMILIES.get(family.name)
        if key is None:
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                (label,) = sample.labels.values()
                out[key][label] = sample.value
    return out


def minus(
    now: dict[str, dict[str, float]], before: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    return {
        k: {label: v - before.get(k, {}).get(label, 0.0) for label, v in d.items()} for k, d in now.items()
    }


def rates(snap: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per transport: fetches, GiB, seconds, GiB/s end to end and moving."""
    out = {}
    for transport, n in sorted(snap["fetches"].items()):
        if not n:
            continue
        gib = snap["bytes"].get(transport, 0.0) / 2**30
        secs = snap["seconds"].get(transport, 0.0)
        move = snap["move_seconds"].get(transport, 0.0)
        out[transport] = {
            "fetches": n,
            "gib": gib,
            "mib_per_fetch": gib * 1024 / n,
            "seconds": secs,
            "move_seconds": move,
            "gib_per_s": gib / secs if secs else 0.0,
            "move_gib_per_s": gib / move if move else 0.0,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="the frontend's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--save", type=Path, help="write the raw counters here (for a later --since)")
    p.add_argument("--since", type=Path, help="report only what happened after this --save")
    p.add_argument("--json", type=Path, help="write the figures printed here as JSON too")
    args = p.parse_args(argv)
    snap = snapshot(args.url)
    if args.save:
        args.save.write_text(json.dumps(snap))
    if args.since:
        snap = minus(snap, json.loads(args.since.read_text()))
    figures = rates(snap)
    for transport, r in figures.items():
        print(
            f"{transport}: {r['fetches']:.0f} fetches, {r['gib']:.3f} GiB ({r['mib_per_fetch']:.1f} MiB each); "
            f"{r['gib_per_s']:.2f} GiB/s end to end ({r['seconds']:.3f} s), "
            f"{r['move_gib_per_s']:.2f} GiB/s moving ({r['move_seconds']:.4f} s)"
        )
    if not figures:
        print("no KV fetches")
    fallbacks = {k: v for k, v in snap["fallbacks"].items() if v}
    print("fallbacks to recomputing:", ", ".join(f"{k} {v:.0f}" for k, v in fallbacks.items()) or "none")
    if args.json:
        args.json.write_text(json.dumps({"transports": figures, "fallbacks": fallbacks}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
