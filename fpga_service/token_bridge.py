"""Engine sequences' tokens into asyncio: the decode servicer's side of the engine loop.

The engine thread puts tokens on each sequence's thread-safe `out` queue and, once per
loop iteration, calls `notify` with the sequences it touched: one
`call_soon_threadsafe` per step wakes every reader, instead of one per token (at 256
streams that is the difference between one event-loop wake-up per step and 256). A
reader drains everything queued, so tokens that arrived together leave in one message.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator

from engine.errors import DeadlineExceeded
from engine.sequence import DONE, Sequence


class TokenBridge:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._events: dict[int, asyncio.Event] = {}

    def notify(self, seqs: list[Sequence]) -> None:
        """Engine thread: wake the readers of `seqs`."""
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._wake, [s.seq_id for s in seqs])

    def _wake(self, ids: list[int]) -> None:
        for i in ids:
            ev = self._events.get(i)
            if ev is not None:
                ev.set()

    async def chunks(self, seq: Sequence, timeout_s: float) -> AsyncIterator[list[int]]:
        """Lists of tokens as they come; ends at the sequence's end, raises its error
        (DeadlineExceeded when nothing comes for timeout_s)."""
        ev = self._events.setdefault(seq.seq_id, asyncio.Event())
        try:
            while True:
                items = _drain(seq.out)
                if not items:
                    ev.clear()  # no await since the drain: a wake-up cannot be lost
                    try:
                        await asyncio.wait_for(ev.wait(), timeout_s)
                    except TimeoutError:
                        raise DeadlineExceeded(f"no token within {timeout_s:.0f}s") from None
                    continue
                ids = [t for t in items if isinstance(t, int)]
                end = items[-1] if not isinstance(items[-1], int) else None
                if ids:
                    yield ids
                if end is DONE:
                    return
                if isinstance(end, BaseException):
                    raise end
        finally:
            self._events.pop(seq.seq_id, None)


def _drain(q: queue.SimpleQueue) -> list:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out
