"""Worker discovery: workers register under a lease they keep alive; the frontend lists them.

Two stores with one interface (`Registry`), as NVIDIA Dynamo does it:
- `EtcdRegistry`: etcd's v3 API through its JSON gateway (httpx; keys and values base64), for deployments
  that span hosts. A worker whose lease lapses (dead, hung, cut off) disappears from the listing after the
  lease's TTL, without anyone deleting it.
- `MemoryRegistry`: the same leases and TTLs inside the frontend, for a single-host deployment with no etcd;
  `RegistryServer` serves it to workers over ZeroMQ and `RemoteRegistry` is the workers' client.

`Registration` is the worker's side: grant a lease, put its record, keep the lease alive, and register again
after the lease was lost (e.g. etcd restarted, or the process was paused past its TTL).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import math
import secrets
import time
from abc import ABC, abstractmethod
from typing import Any

import httpx
import zmq
import zmq.asyncio

from osserve.disagg.messages import RegistryCall, RegistryReply, decode, encode

logger = logging.getLogger("osserve.disagg.discovery")

KEY_ROOT = "osserve"
# etcd's smallest lease TTL with its default timing (1.5 x the election timeout, rounded up).
MIN_TTL_S = 2.0
CALL_TIMEOUT_S = 3.0


def workers_prefix(namespace: str) -> str:
    return f"{KEY_ROOT}/{namespace}/workers/"


class RegistryError(RuntimeError):
    """The store could not be reached or refused the call."""


class Registry(ABC):
    """Leased key-value records (all methods may raise RegistryError)."""

    description = ""

    @abstractmethod
    async def grant(self, ttl_s: float) -> int: ...

    @abstractmethod
    async def keepalive(self, lease: int) -> bool:
        """Refresh a lease; False when it no longer exists (expired or revoked)."""

    @abstractmethod
    async def put(self, key: str, value: dict[str, Any], lease: int) -> None: ...

    @abstractmethod
    async def list(self, prefix: str) -> dict[str, dict[str, Any]]: ...

    @abstractmethod
    async def revoke(self, lease: int) -> None:
        """End a lease and delete its keys."""

    async def close(self) -> None:
        return None


# -- etcd -------------------------------------------------------------------------------------------------
def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def _prefix_end(prefix: str) -> str:
    """etcd's range end for "every key starting with prefix": the prefix with its last byte incremented."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return _b64(bytes(raw))


class EtcdRegistry(Registry):
    """etcd v3 through its gRPC JSON gateway (/v3/...; etcd >= 3.4)."""

    def __init__(self, url: str, timeout_s: float = CALL_TIMEOUT_S):
        self.url = url.rstrip("/")
        self.description = f"etcd {self.url}"
        self._client = httpx.AsyncClient(base_url=self.url, timeout=timeout_s)

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            r = await self._client.post(path, json=body)
        except httpx.HTTPError as e:
            raise RegistryError(f"etcd at {self.url} unreachable ({type(e).__name__}: {e})") from None
        data = r.json() if r.content else {}
        if r.status_code != 200 or "error" in data:
            raise RegistryError(f"etcd {path}: {data.get('message') or data.get('error') or r.status_code}")
        return data

    async def grant(self, ttl_s: float) -> int:
        data = await self._post("/v3/lease/grant", {"TTL": max(int(math.ceil(ttl_s)), int(MIN_TTL_S))})
        return int(data["ID"])

    async def keepalive(self, lease: int) -> bool:
        # The gateway answers one keepalive per POST; a lease that is gone comes back with no TTL.
        data = await self._post("/v3/lease/keepalive", {"ID": lease})
        return int(data.get("result", {}).get("TTL", 0)) > 0

    async def put(self, key: str, value: dict[str, Any], lease: int) -> None:
        await self._post("/v3/kv/put", {"key": _b64(key), "value": _b64(json.dumps(value)), "lease": lease})

    async def list(self, prefix: str) -> dict[str, dict[str, Any]]:
        data = await self._post("/v3/kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix)})
        out = {}
        for kv in data.get("kvs", []):
            key = base64.b64decode(kv["key"]).decode()
            try:
                out[key] = json.loads(base64.b64decode(kv.get("value", "")))
            except (json.JSONDecodeError, UnicodeDecodeError):
                logger.warning("etcd key %s holds no JSON record; ignored", key)
        return out

    async def revoke(self, lease: int) -> None:
        try:
            await self._post("/v3/lease/revoke", {"ID": lease})
        except RegistryError as e:
            if "not found" not in str(e):
                raise

    async def close(self) -> None:
        await self._client.aclose()


# -- in the frontend --------------------------------------------------------------------------------------
class MemoryRegistry(Registry):
    """etcd's lease semantics in a dict: a key lives as long as its lease, a lease as long as it is kept
    alive within its TTL."""

    description = "frontend"

    def __init__(self) -> None:
        self._leases: dict[int, tuple[float, float]] = {}  # id -> (ttl, deadline)
        self._items: dict[str, tuple[dict[str, Any], int]] = {}

    def _expire(self) -> None:
        now = time.monotonic()
        dead = {lease for lease, (_, deadline) in self._leases.items() if deadline < now}
        for lease in dead:
            del self._leases[lease]
        if dead:
            self._items = {k: v for k, v in self._items.items() if v[1] not in dead}

    async def grant(self, ttl_s: float) -> int:
        lease = secrets.randbits(62) or 1
        ttl = max(ttl_s, 0.1)
        self._leases[lease] = (ttl, time.monotonic() + ttl)
        return lease

    async def keepalive(self, lease: int) -> bool:
        self._expire()
        if lease not in self._leases:
            return False
        ttl = self._leases[lease][0]
        self._leases[lease] = (ttl, time.monotonic() + ttl)
        return True

    async def put(self, key: str, value: dict[str, Any], lease: int) -> None:
        self._expire()
        if lease not in self._leases:
            raise RegistryError(f"lease {lease} not found")
        self._items[key] = (value, lease)

    async def list(self, prefix: str) -> dict[str, dict[str, Any]]:
        self._expire()
        return {k: v for k, (v, _) in self._items.items() if k.startswith(prefix)}

    async def revoke(self, lease: int) -> None:
        self._leases.pop(lease, None)
        self._items = {k: v for k, v in self._items.items() if v[1] != lease}


class RegistryServer:
    """Serves a MemoryRegistry to workers (ZeroMQ ROUTER); runs in the frontend's event loop."""

    def __init__(self, registry: MemoryRegistry, ctx: zmq.asyncio.Context, address: str):
        self.registry = registry
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.address = bind(self.socket, address)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._serve())

    async def _serve(self) -> None:
        while True:
            ident, *parts = await self.socket.recv_multipart()
            call_id = -1
            try:
                call, _ = decode(parts)
                call_id = call.call_id
                reply = await self._apply(call)
            except (ValueError, RegistryError) as e:
                reply = RegistryReply(call_id, ok=False, error=str(e))
            await self.socket.send_multipart([ident, *encode(reply)])

    async def _apply(self, call: RegistryCall) -> RegistryReply:
        r = self.registry
        if call.op == "grant":
            return RegistryReply(call.call_id, lease=await r.grant(call.ttl))
        if call.op == "keepalive":
            return RegistryReply(call.call_id, alive=await r.keepalive(call.lease))
        if call.op == "put":
            await r.put(call.key, call.value or {}, call.lease)
            return RegistryReply(call.call_id)
        if call.op == "list":
            return RegistryReply(call.call_id, items=await r.list(call.key))
        if call.op == "revoke":
            await r.revoke(call.lease)
            return RegistryReply(call.call_id)
        raise ValueError(f"unknown registry op {call.op!r}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.socket.close(0)


class RemoteRegistry(Registry):
    """A worker's client of the frontend's RegistryServer."""

    def __init__(self, address: str, ctx: zmq.asyncio.Context, timeout_s: float = CALL_TIMEOUT_S):
        self.description = f"frontend registry {address}"
        self.timeout_s = timeout_s
        self.socket = ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None

    async def _read(self) -> None:
        while True:
            parts = await self.socket.recv_multipart()
            try:
                reply, _ = decode(parts)
            except ValueError:
                continue
            fut = self._waiting.pop(reply.call_id, None)
            if fut is not None and not fut.done():
                fut.set_result(reply)

    async def _call(self, **fields: Any) -> RegistryReply:
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read())
        call = RegistryCall(next(self._ids), **fields)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[call.call_id] = fut
        try:
            await self.socket.send_multipart(encode(call))
            reply = await asyncio.wait_for(fut, self.timeout_s)
        except TimeoutError:
            raise RegistryError(f"{self.description}: no answer in {self.timeout_s:.0f}s") from None
        finally:
            self._waiting.pop(call.call_id, None)
        if not reply.ok:
            raise RegistryError(reply.error)
        return reply

    async def grant(self, ttl_s: float) -> int:
        return (await self._call(op="grant", ttl=ttl_s)).lease

    async def keepalive(self, lease: int) -> bool:
        return (await self._call(op="keepalive", lease=lease)).alive

    async def put(self, key: str, value: dict[str, Any], lease: int) -> None:
        await self._call(op="put", key=key, value=value, lease=lease)

    async def list(self, prefix: str) -> dict[str, dict[str, Any]]:
        return (await self._call(op="list", key=prefix)).items

    async def revoke(self, lease: int) -> None:
        await self._call(op="revoke", lease=lease)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self.socket.close(0)


def bind(socket: zmq.Socket, address: str) -> str:
    """Bind `tcp://HOST:PORT` (PORT 0: any free port) and return the address others connect to."""
    if not address.startswith("tcp://"):
        raise ValueError(f"address {address!r}: expected tcp://HOST:PORT")
    host, _, port = address[len("tcp://") :].rpartition(":")
    if port in ("0", "*", ""):
        port = str(socket.bind_to_random_port(f"tcp://{host}"))
    else:
        socket.bind(address)
    return f"tcp://{host}:{port}"


# -- the worker's side ------------------------------------------------------------------------------------
class Registration:
    """Keep one record registered under a live lease until `close()`."""

    def __init__(self, registry: Registry, key: str, ttl_s: float):
        if ttl_s < MIN_TTL_S:
            raise ValueError(f"lease_ttl must be >= {MIN_TTL_S} s (etcd's minimum), got {ttl_s}")
        self.registry = registry
        self.key = key
        self.ttl_s = ttl_s
        self.value: dict[str, Any] = {}
        self.lease: int | None = None
        self._task: asyncio.Task | None = None

    async def start(self, value: dict[str, Any]) -> None:
        """Register now if the store answers; the keepalive loop retries (and re-registers) otherwise."""
        self.value = dict(value)
        try:
            await self._register()
        except RegistryError as e:
            logger.warning("registration of %s failed (%s); retrying", self.key, e)
        self._task = asyncio.ensure_future(self._keep())

    async def update(self, value: dict[str, Any]) -> None:
        self.value = dict(value)
        if self.lease is not None:
            try:
                await self.registry.put(self.key, self.value, self.lease)
            except RegistryError as e:
                logger.warning("could not update %s (%s); the keepalive loop retries", self.key, e)
                self.lease = None

    async def _register(self) -> None:
        lease = await self.registry.grant(self.ttl_s)
        while True:
            value = self.value
            await self.registry.put(self.key, value, lease)
            # NOTE: an update() while the put was under way found no lease yet and only set self.value: put
            # again, or the store would keep the older record (a worker "loading" for good).
            if value is self.value:
                break
        self.lease = lease
        logger.info(
            "registered %s in %s (lease %x, ttl %.0fs)",
            self.key,
            self.registry.description,
            lease,
            self.ttl_s,
        )

    async def _keep(self) -> None:
        interval = self.ttl_s / 3
        failing = False
        while True:
            await asyncio.sleep(interval)
            try:
                if self.lease is None or not await self.registry.keepalive(self.lease):
                    if self.lease is not None:
                        logger.warning("lease of %s lapsed; registering again", self.key)
                    self.lease = None
                    await self._register()
                if failing:
                    logger.info("registry reachable again; %s keeps its lease", self.key)
                failing = False
            except RegistryError as e:
                # Requests keep flowing without the registry; say so once, not every interval.
                (logger.debug if failing else logger.warning)("keepalive of %s failed: %s", self.key, e)
                failing = True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.lease is not None:
            try:
                await asyncio.wait_for(self.registry.revoke(self.lease), 2.0)
            except (TimeoutError, RegistryError) as e:
                logger.warning(
                    "could not revoke the lease of %s (%s); it lapses in %.0fs", self.key, e, self.ttl_s
                )
            self.lease = None
