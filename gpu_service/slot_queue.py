"""Waiting for a free slot of the KV region, first come first served.

A slot is held from the handle to the decoder's Release (or a lease expiry). Under load
the region can be momentarily full while decoders ingest; refusing then made closed-loop
clients retry at once, and a storm of refused calls starved the service's event loop.
Instead a request waits (bounded) in a FIFO and is woken when a slot is freed, one
waiter per free, so a free costs one allocation attempt, not one per waiter.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from engine.errors import ResourceExhausted


class SlotQueue:
    def __init__(self, wait_s: float) -> None:
        self.wait_s = wait_s
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def wake_one(self) -> None:
        """A slot was freed (any free path calls this)."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    async def alloc(self, try_alloc: Callable[[], Any], wait_s: float | None = None) -> Any:
        """try_alloc() until it succeeds, waiting in line while the region is full;
        ResourceExhausted (with a retry hint) after wait_s."""
        deadline = time.monotonic() + (self.wait_s if wait_s is None else wait_s)
        if not self._waiters:
            try:
                return try_alloc()
            except ResourceExhausted:
                pass
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ResourceExhausted(f"KV region full for {self.wait_s:.0f} s "
                                        f"({len(self._waiters)} requests waiting); retry in ~1 s")
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                # a short cap too: a slot freed by the lease reaper or a failed prefill is
                # noticed even if that path did not wake anyone
                await asyncio.wait_for(fut, min(left, 0.25))
            except TimeoutError:
                pass
            finally:
                if not fut.done():
                    fut.cancel()
                    if fut in self._waiters:
                        self._waiters.remove(fut)
            try:
                return try_alloc()
            except ResourceExhausted:
                continue
