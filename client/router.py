"""Spread requests over several prefill and decode services (docs/routing.md).

    router = Router(["p1:50051", "p2:50051"], ["d1:50052", "d2:50052", "d3:50052"])
    p, d = await router.pick()        # least-loaded SERVING prefill, and a decode for it
    ...                               # Prefill on p.stub, Generate on d.stub
    router.done(p, d)

One channel per address (a `dns:///host:port` entry: one per address the name resolves
to, looked up again every `resolve_every` polls). Each instance is polled every
`interval_s` (default 1 s): grpc.health.v1 Check and Info (its counters), both bounded by
`poll_timeout_s`. An instance that does not answer (refused at once; past the deadline
twice in a row), or answers anything but SERVING, gets no new requests until a poll
finds it SERVING again; a request that fails with UNAVAILABLE has its instances polled
at once, so a dead one is left out within milliseconds, and within one interval at the
latest.

The policy (`choose`) is a pure function of the polled state, tested on its own:
- prefill load: `active + waiting + waiting-for-slot` (+ this router's requests started
  on it since its last poll), then `slots-in-use`;
- decode load: short of KV blocks (under 10% free) first, then `active + waiting` (+ the
  same correction), then a region on the decode's own host (shm) before one it fetches;
- the least-loaded prefill among those some eligible decode is attached to, then the
  least-loaded decode attached to it; ties round-robin.
A decode is eligible for a prefill when its weights fingerprint is the prefill's and its
Info lists the prefill's current (region, epoch) (`ServiceInfo.prefills`: it attached to
it). A decode whose Info lists no prefills at all (an older version) is taken to serve
every prefill, and refuses a handle it cannot take (INVALID_ARGUMENT).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine import errors
from protos import hybrid_pb2 as pb
from protos import hybrid_pb2_grpc as pbg
from transport import endpoints
from transport.security import Security, open_channel

log = logging.getLogger("hybrid.router")
SERVING, NOT_SERVING, UNREACHABLE, UNKNOWN, REMOVED = (
    "SERVING", "NOT_SERVING", "UNREACHABLE", "UNKNOWN", "REMOVED")
KV_SHORT_FRACTION = 0.1  # a decode with less free KV than this goes after the others
# An instance back after a crash is dialled again within a second, not after gRPC's
# default backoff (up to 120 s), so the next poll finds it (set where not given).
RECONNECT = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000))
_STUBS = {"prefill": pbg.PrefillServiceStub, "decode": pbg.DecodeServiceStub}


@dataclass(eq=False)
class Instance:
    """One prefill or decode service as this router sees it."""

    role: str                          # "prefill" | "decode"
    address: str                       # what is dialed
    name: str = ""                     # as configured (the address, or dns:///name:port)
    channel: Any = None
    stub: Any = None
    health: Any = None
    state: str = UNKNOWN               # SERVING, NOT_SERVING, UNREACHABLE, UNKNOWN, REMOVED
    why: str = ""                      # for a state other than SERVING
    info: pb.ServiceInfo | None = None
    counters: Mapping[str, int] = field(default_factory=dict)
    inflight: int = 0                  # this router's requests on it now
    inflight_at_poll: int = 0          # ... when its counters were read
    polled_at: float = 0.0
    slow: bool = False                 # its last poll ran past the deadline
    poller: asyncio.Task | None = None

    @property
    def serving(self) -> bool:
        return self.state == SERVING

    def counter(self, name: str) -> int:
        return int(self.counters.get(name, 0))

    def pending(self) -> int:
        """Requests this router started (positive) or ended (negative) here since the
        counters were read: the load the next poll will show."""
        return self.inflight - self.inflight_at_poll

    def region(self) -> tuple[str, int] | None:
        if self.info is None or not self.info.region:
            return None
        return self.info.region.lstrip("/"), self.info.region_epoch

    def describe(self) -> dict:
        out = {"role": self.role, "address": self.address, "state": self.state,
               "inflight": self.inflight}
        if self.name != self.address:
            out["name"] = self.name
        if self.why:
            out["why"] = self.why
        keys = ("active", "waiting", "slots-in-use", "waiting-for-slot") if \
            self.role == "prefill" else ("active", "waiting", "kv-blocks-free", "sessions-open")
        out["counters"] = {k: self.counter(k) for k in keys}
        return out


# ---- the policy -----------------------------------------------------------------------
def prefill_load(p: Instance) -> tuple:
    queued = p.counter("active") + p.counter("waiting") + p.counter("waiting-for-slot")
    return (max(0, queued + p.pending()), p.counter("slots-in-use"))


def decode_load(d: Instance, prefill: Instance | None = None) -> tuple:
    total, free = d.counter("kv-blocks-total"), d.counter("kv-blocks-free")
    short = 1 if total and free < KV_SHORT_FRACTION * total else 0
    busy = max(0, d.counter("active") + d.counter("waiting") + d.pending())
    remote = 0
    if prefill is not None and d.info is not None:
        key = prefill.region()
        remote = 0 if any(x.local for x in d.info.prefills
                          if (x.region.lstrip("/"), x.region_epoch) == key) else 1
    return (short, busy, remote)


def serves(d: Instance, p: Instance) -> bool:
    """Whether decode `d` takes prefill `p`'s handles (see the module doc)."""
    if d.info is None or p.info is None:
        return False
    if d.info.weights_fingerprint != p.info.weights_fingerprint:
        return False
    if not d.info.prefills:  # a decode that does not say: let it refuse what it cannot take
        return True
    key = p.region()
    return key is not None and any(
        (x.region.lstrip("/"), x.region_epoch) == key for x in d.info.prefills)


def _least(items: list, key, rr: Iterator[int]):
    best = min(key(x) for x in items)
    tied = [x for x in items if key(x) == best]
    return tied[next(rr) % len(tied)] if len(tied) > 1 else tied[0]


def choose(prefills: Sequence[Instance], decodes: Sequence[Instance],
           rr_prefill: Iterator[int] | None = None, rr_decode: Iterator[int] | None = None,
           ) -> tuple[Instance, Instance]:
    """The (prefill, decode) pair for the next request, or Unavailable saying why none.
    `rr_*`: the round-robin counters that break ties (one per role, kept by the caller)."""
    rr_prefill = rr_prefill if rr_prefill is not None else itertools.count()
    rr_decode = rr_decode if rr_decode is not None else itertools.count()
    ps = [p for p in prefills if p.serving]
    ds = [d for d in decodes if d.serving]
    if not ps:
        raise errors.Unavailable("no prefill service is SERVING: " + states(prefills))
    if not ds:
        raise errors.Unavailable("no decode service is SERVING: " + states(decodes))
    eligible = {p: [d for d in ds if serves(d, p)] for p in ps}
    ps = [p for p in ps if eligible[p]]
    if not ps:
        raise errors.Unavailable(
            "no SERVING decode service is attached to a SERVING prefill service with the "
            "same weights (decode --prefill lists; ServiceInfo.prefills)")
    p = _least(ps, prefill_load, rr_prefill)
    d = _least(eligible[p], lambda d: decode_load(d, p), rr_decode)
    return p, d


def states(instances: Sequence[Instance]) -> str:
    return ", ".join(f"{i.address} {i.state}" + (f" ({i.why})" if i.why else "")
                     for i in instances) or "none configured"


# ---- the router -----------------------------------------------------------------------
class Router:
    """Instances of both roles, their polled state, and `pick`. Create inside a running
    event loop; `close()` when done. With one prefill and one decode nothing is polled:
    `pick` returns the two and errors come from the calls themselves."""

    def __init__(self, prefill: str | Sequence[str], decode: str | Sequence[str], *,
                 security: Security | None = None,
                 channel_options: Iterable[tuple[str, object]] = (),
                 interval_s: float = 1.0, poll_timeout_s: float | None = None,
                 resolve_every: int = 10) -> None:
        if interval_s <= 0:
            raise errors.InvalidArgument(f"router interval must be > 0, got {interval_s}")
        self.security, self.options = security, list(channel_options)
        self.interval_s = interval_s
        self.poll_timeout_s = poll_timeout_s or max(1.0, interval_s)
        self.resolve_every = resolve_every
        self.names = {"prefill": endpoints.split(prefill, "prefill address"),
                      "decode": endpoints.split(decode, "decode address")}
        self.instances: dict[str, list[Instance]] = {"prefill": [], "decode": []}
        self._rr = {"prefill": itertools.count(), "decode": itertools.count()}
        self._started: asyncio.Task | None = None
        self._resolver: asyncio.Task | None = None
        self._closed = False
        if self.polled:
            given = {k for k, _ in self.options}
            self.options += [(k, v) for k, v in RECONNECT if k not in given]
        for role, names in self.names.items():
            for name in names:
                found = [] if endpoints.is_dns(name) else [name]  # dns:/// at start()
                for addr in found:
                    self._add(role, name, addr)

    @property
    def polled(self) -> bool:
        """Whether instances are polled (more than one of a role, or a dns:/// name)."""
        return any(len(v) > 1 or any(endpoints.is_dns(n) for n in v)
                   for v in self.names.values())

    def _add(self, role: str, name: str, addr: str) -> Instance:
        opts = self.options + endpoints.tls_name_options(name, addr)
        ch = open_channel(addr, opts, self.security)
        inst = Instance(role, addr, name, ch, _STUBS[role](ch), health_pb2_grpc.HealthStub(ch))
        if not self.polled:
            inst.state = SERVING  # a single pair: the calls say what is wrong
        self.instances[role].append(inst)
        return inst

    async def start(self) -> None:
        """Resolve names, poll every instance once (so the first pick sees real load),
        then keep polling in the background. Idempotent; awaited by the first pick."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
        await asyncio.shield(self._started)

    async def _start(self) -> None:
        if not self.polled:
            return
        await self._resolve()
        await asyncio.gather(*(self._poll(i) for i in self._all()))
        for inst in self._all():
            self._spawn_poller(inst)
        if any(endpoints.is_dns(n) for v in self.names.values() for n in v):
            self._resolver = asyncio.ensure_future(self._resolve_loop())

    def _all(self) -> list[Instance]:
        return [i for v in self.instances.values() for i in v if i.state != REMOVED]

    def _spawn_poller(self, inst: Instance) -> None:
        if inst.poller is None and not self._closed:
            inst.poller = asyncio.ensure_future(self._poll_loop(inst))

    async def _poll_loop(self, inst: Instance) -> None:
        while True:
            t0 = time.monotonic()
            await self._poll(inst)
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - t0)))

    async def _poll(self, inst: Instance) -> None:
        """Health and Info of one instance, both within poll_timeout_s."""
        t = self.poll_timeout_s
        check = inst.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=t)
        info = inst.stub.Info(pb.InfoRequest(), timeout=t)
        h, i = await asyncio.gather(check, info, return_exceptions=True)
        was = inst.state
        if isinstance(h, BaseException):
            state, why = UNREACHABLE, _err(h)
        else:
            state = health_pb2.HealthCheckResponse.ServingStatus.Name(h.status)
            why = ""
        if isinstance(i, BaseException):
            if state == SERVING:  # health answers but Info does not: no load to go by
                state = UNREACHABLE
            why = why or _err(i)
        else:
            inst.info, inst.counters = i, dict(i.counters)
            inst.inflight_at_poll, inst.polled_at = inst.inflight, time.monotonic()
            why = why or i.not_serving
        if inst.state == REMOVED:
            return
        late = [x for x in (h, i) if isinstance(x, BaseException)]
        if late and all(_late(x) for x in late) and was == SERVING and not inst.slow:
            inst.slow = True  # one slow answer (a pause, a load spike) is not a death:
            return            # the next poll decides; a refused connection counts at once
        inst.slow = False
        inst.state, inst.why = state, "" if state == SERVING else why
        if was != state:
            log.log(logging.INFO if state == SERVING or was == UNKNOWN else logging.WARNING,
                    "%s %s: %s -> %s%s", inst.role, inst.address, was, state,
                    f" ({inst.why})" if inst.why else "")

    async def _resolve(self) -> None:
        """dns:/// names: an instance per address found; one no longer found is removed
        (no new requests; its channel closes once its requests ended)."""
        for role, names in self.names.items():
            for name in names:
                if not endpoints.is_dns(name):
                    continue
                found = await asyncio.to_thread(endpoints.expand, name)
                if not found:  # a failed look-up keeps what we had
                    log.warning("%s %s resolves to nothing; keeping %d known", role, name,
                                sum(i.name == name for i in self.instances[role]))
                    continue
                have = {i.address: i for i in self.instances[role]
                        if i.name == name and i.state != REMOVED}
                for addr in found:
                    if addr not in have:
                        inst = self._add(role, name, addr)
                        if self._started is not None and self._started.done():
                            await self._poll(inst)
                            self._spawn_poller(inst)
                for addr, inst in have.items():
                    if addr not in found:
                        log.info("%s %s: no longer in %s, removed", role, addr, name)
                        inst.state = REMOVED
                        if inst.poller is not None:
                            inst.poller.cancel()
        for role in self.instances:
            keep = []
            for inst in self.instances[role]:
                if inst.state == REMOVED and inst.inflight == 0:
                    await inst.channel.close()
                else:
                    keep.append(inst)
            self.instances[role] = keep

    async def _resolve_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s * self.resolve_every)
            try:
                await self._resolve()
            except Exception:
                log.exception("resolving addresses")

    async def pick(self) -> tuple[Instance, Instance]:
        """The (prefill, decode) pair for one request (counted in flight until
        `done`); Unavailable when no pair can serve now."""
        await self.start()
        if not self.polled:  # the one pair: its calls say what is wrong
            p, d = self.instances["prefill"][0], self.instances["decode"][0]
        else:
            p, d = choose(self.instances["prefill"], self.instances["decode"],
                          self._rr["prefill"], self._rr["decode"])
        p.inflight += 1
        d.inflight += 1
        return p, d

    def done(self, *used: Instance, failed: BaseException | None = None) -> None:
        """A request on `used` ended. UNAVAILABLE: poll them now (a dead one is left
        out as soon as its poll fails, not at the next interval)."""
        for inst in used:
            inst.inflight -= 1
        if isinstance(failed, errors.Unavailable) and self.polled and not self._closed:
            for inst in used:
                task = asyncio.ensure_future(self._poll(inst))
                task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def any_serving(self, role: str) -> Instance | None:
        """A SERVING instance of `role` (the least loaded), for questions any of them can
        answer (the model, its positions)."""
        serving = [i for i in self.instances[role] if i.serving]
        if not serving:
            return None
        key = prefill_load if role == "prefill" else decode_load
        return min(serving, key=key)

    def snapshot(self) -> list[dict]:
        return [i.describe() for i in self._all()]

    async def close(self) -> None:
        self._closed = True
        tasks = [t for t in (self._started, self._resolver) if t is not None]
        tasks += [i.poller for v in self.instances.values() for i in v if i.poller]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        for v in self.instances.values():
            for inst in v:
                await inst.channel.close()


def _late(e: BaseException) -> bool:
    return isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def _err(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return e.code().name
    return type(e).__name__
