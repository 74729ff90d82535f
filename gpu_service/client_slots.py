"""How many unclaimed KV slots each client holds, bounded, so one client cannot lock out
the rest.

A slot is held from its Prefill until the decoder releases it (or its lease ends). A
client that prefills and never generates (or renews the leases itself) would otherwise
fill the region for everyone: 64 one-token prefills plus a RenewLease every 10 s locked
all other traffic out. Each client may hold at most `cap` slots that no decode service
has claimed yet; its next request waits (bounded, like a full region) until one of them
is claimed or freed, then RESOURCE_EXHAUSTED. Other clients are not held up by it, and
a busy client is not either: a decoder claims a slot within milliseconds of its handle
(the client sends Generate at once), so only abandoned slots pile up against the cap.

A client is the peer's host as gRPC reports it: every connection from one machine
counts together (a client can open many connections, not many addresses). Behind a
proxy that is the proxy; docs/protocol.md says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter

from engine.errors import ResourceExhausted


def client_of(peer: str) -> str:
    """'ipv4:10.0.0.7:53211' -> 'ipv4:10.0.0.7', 'ipv6:[::1]:5' -> 'ipv6:[::1]'; a unix
    socket peer is one client."""
    kind, _, rest = (peer or "unknown").partition(":")
    if kind in ("ipv4", "ipv6"):
        return f"{kind}:{rest.rsplit(':', 1)[0]}"
    return kind


class ClientSlots:
    def __init__(self, cap: int, wait_s: float) -> None:
        if cap < 1:
            raise ValueError(f"slots per client must be >= 1, got {cap}")
        self.cap, self.wait_s = cap, wait_s
        self.held: Counter[str] = Counter()
        self._freed: dict[str, asyncio.Event] = {}

    async def acquire(self, client: str) -> None:
        """Count one more slot for `client`, waiting (bounded) while it is at its cap."""
        deadline = time.monotonic() + self.wait_s
        while self.held[client] >= self.cap:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ResourceExhausted(
                    f"this client already holds {self.held[client]} KV slots (limit "
                    f"{self.cap} per client); generate with them or release them first")
            event = self._freed.setdefault(client, asyncio.Event())
            with contextlib.suppress(TimeoutError):  # capped: a wake-up another waiter
                await asyncio.wait_for(event.wait(), min(left, 0.25))  # took is not lost
            event.clear()
        self.held[client] += 1

    def release(self, client: str) -> None:
        if self.held[client] <= 1:
            del self.held[client]
        else:
            self.held[client] -= 1
        event = self._freed.get(client)
        if event is not None:
            event.set()
            if client not in self.held:  # waiters keep their reference; no entry leaks
                del self._freed[client]
