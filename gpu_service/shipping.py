"""Layer shipping for the prefill batches: hand each layer's K/V of every prompt of a
batch to the copy path, and mark the layer ready in every prompt's slot once the copy
has completed.

The copy itself (reshape into each decoder's layout + async D2H into the pinned slots)
is kernels.comm.BatchShipper's job: one call and ONE CUDA event per layer for the whole
batch. This module adds what the service needs around it:

- `ReadyPublisher`: ONE helper thread for the whole prefill loop (not one per prompt)
  that waits on the layer events in order and, as each completes, marks that layer
  ready (region.mark_ready: xxh3 + flag + futex wake, then region.renew) for every
  prompt of the batch that shipped it. It never issues CUDA work: it only waits on
  events and writes slot headers in host memory.
- `BatchMarks`: one batch's side of it (its layers in flight, its end barrier).
- `LaneMarks`: one prompt's figures (`ShipStats`) and the error that stopped it.

CPU copies are synchronous (the handle is already done): the layer is marked at once,
inline in the calling thread, and no helper thread exists.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from engine.errors import DeadlineExceeded, HybridError


class ShipperPool:
    """kernels.comm.BatchShipper is not thread-safe and owns a CUDA copy stream, so each
    batch in flight borrows one (the service's single loop thread: always the same one;
    concurrent `PrefillRunner.run` callers get their own). One shipper serves every
    layout and slot dtype: the layout travels with each prompt's ShipTarget."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._free: list[Any] = []
        self._lock = threading.Lock()

    def take(self) -> Any:
        with self._lock:
            if self._free:
                return self._free.pop()
        from kernels.comm import BatchShipper

        # timing=True: each layer's handle reports its copy-stream time (transfer_ms).
        return BatchShipper(self.device, timing=True)

    def give(self, shipper: Any) -> None:
        with self._lock:
            self._free.append(shipper)


@dataclass
class ShipStats:
    """One request's figures.

    transfer_ms: raw reshape + copy time of the layers this request shipped, where each
      layer counts the time of that layer's copy for the WHOLE batch (all prompts of the
      batch that shipped it: one copy-stream interval per layer on CUDA, the wall time of
      the synchronous copies on CPU), not this prompt's share of it. So the sum over the
      requests of a batch counts the batch's copies once per request; for a batch of 1
      it is the request's own copy time, as before batching.
    exposed_transfer_ms: from the end of the batch's compute (an event on the compute
      stream after the last layer) to this request's last copy done: the copy time the
      request still waited for. CPU: = transfer_ms (copies run inline, nothing hidden).
    kv_bytes: bytes written into this request's slot.
    """

    transfer_ms: float = 0.0
    exposed_transfer_ms: float = 0.0
    kv_bytes: int = 0


class LaneMarks:
    """One prompt of a batch as the ready marking sees it. Written by whoever marks its
    layers (the helper thread on CUDA, the batch's thread on CPU), read by the batch's
    thread after `BatchMarks.finish`."""

    __slots__ = ("desc", "stats", "last", "error", "shipped", "marked")

    def __init__(self, desc: Any) -> None:
        self.desc = desc
        self.stats = ShipStats()
        self.last: Any = None                  # handle of its last layer marked ready
        self.error: BaseException | None = None  # stops its marking; fails its job
        self.shipped = self.marked = 0         # layers handed to the copy path / marked

    def failure(self) -> BaseException | None:
        """The error for its job (a HybridError, so it maps to a gRPC status), or None."""
        e = self.error
        if e is None or isinstance(e, HybridError):
            return e
        return HybridError(f"KV copy failed: {e}")

    def incomplete(self) -> BaseException | None:
        """After `BatchMarks.finish`: an error if a layer was shipped but never marked
        (cannot happen while the helper works; a guard against publishing a first token
        for a slot whose layers are not all ready)."""
        if self.marked == self.shipped:
            return None
        return HybridError(f"KV ready marking incomplete: {self.marked} of {self.shipped} layers")


_FLUSH = object()  # an item that ends a batch: everything before it has been marked


class BatchMarks:
    """One batch's ready marking: `submit` each shipped layer (in layer order) with the
    prompts it covers, then `finish` to wait until all of them are marked."""

    def __init__(self, publisher: ReadyPublisher) -> None:
        self.publisher = publisher
        self.aborted = False              # set by the batch's thread: mark nothing more
        self.done = threading.Event()
        self._async = False               # a layer went to the helper thread

    def submit(self, layer: int, handle: Any, lanes: list[LaneMarks]) -> None:
        """`handle`: what BatchShipper.ship returned. A synchronous one (CPU: Done, or a
        handle already done before any layer went async) is marked inline."""
        if not self._async and _is_sync(handle):
            self.publisher.mark(self, layer, handle, lanes)
            return
        self._async = True
        self.publisher.put((self, layer, handle, lanes))

    def finish(self, timeout_s: float) -> None:
        """Block until every submitted layer has been marked (or skipped after an error);
        DeadlineExceeded after `timeout_s`."""
        if not self._async:
            return
        self.publisher.put((self, -1, _FLUSH, None))
        if not self.done.wait(timeout_s):
            raise DeadlineExceeded(f"KV copies not done after {timeout_s:.0f}s")

    def abort(self) -> None:
        """The batch failed: its layers still queued are not marked any more (the copies
        themselves are the batch thread's to wait for)."""
        self.aborted = True


def _is_sync(handle: Any) -> bool:
    from kernels.comm import Done

    return isinstance(handle, Done)


class ReadyPublisher:
    """ONE helper thread for the whole prefill loop: waits on each shipped layer's event
    in submission order (so per batch in layer order) and marks the layer ready for
    every prompt that shipped it. Started on the first asynchronous layer; lives until
    `close()` (and starts again if used after). Blocked in a CUDA event wait it holds
    no GIL; it takes the GIL once per layer for the batch's flags."""

    HASH_THREADS = 4

    def __init__(self, region: Any, name: str = "prefill-ready") -> None:
        self.region, self.name = region, name
        # xxh3 of a layer's bytes in the pinned slot, for every prompt of a batch: in
        # parallel (xxhash releases the GIL; one thread hashing a 32-prompt batch's
        # 200 MB serially was most of that batch's prefill time on an H200)
        self._hashers = ThreadPoolExecutor(self.HASH_THREADS, thread_name_prefix=f"{name}-xxh3")
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._q: queue.SimpleQueue | None = None

    def _checksums(self, lanes: list, layer: int) -> list:
        """Each lane's layer checksum (None: the slot has none; an exception: that
        lane's slot could not be read)."""
        def one(lane):
            if lane.error is not None or not lane.desc.checksums:
                return None
            try:
                with self.region.layer_buffer(lane.desc, layer) as data:
                    return xxhash.xxh3_64_intdigest(data)
            except BaseException as e:
                return e

        if len(lanes) == 1:
            return [one(lanes[0])]
        return list(self._hashers.map(one, lanes))

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def put(self, item: tuple) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                if self._q is None:  # else a thread that died: its successor takes its queue
                    self._q = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._run, args=(self._q,),
                                                name=self.name, daemon=True)
                self._thread.start()
            self._q.put(item)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread after what is queued (bounded join)."""
        with self._lock:
            t, q = self._thread, self._q
            self._thread = self._q = None
        if t is not None and q is not None:
            q.put(None)
            if t is not threading.current_thread():
                t.join(timeout_s)

    def _run(self, q: queue.SimpleQueue) -> None:
        while (item := q.get()) is not None:
            batch, layer, handle, lanes = item
            if handle is _FLUSH:
                batch.done.set()
                continue
            try:
                self.mark(batch, layer, handle, lanes)
            except BaseException as e:  # never dies with a batch waiting on it
                for lane in lanes:
                    lane.error = lane.error or e
            del item, batch, handle, lanes  # the K, V and views the copy kept alive

    def mark(self, batch: BatchMarks, layer: int, handle: Any, lanes: list[LaneMarks]) -> None:
        """Wait for `handle` (one layer of `lanes`), then mark the layer ready for each
        lane not stopped by an earlier error: region.mark_ready (checksum, flag, wake),
        then region.renew (a producer still filling the slot keeps it alive: a prefill
        longer than the lease must not be reaped under its own feet). An error of one
        lane's slot stops only that lane; a failed copy stops every lane of the layer."""
        if batch.aborted:
            return
        try:
            handle.wait()  # CUDA: the layer's copy event (GIL released while waiting)
            ms = handle.elapsed_ms()
        except BaseException as e:
            for lane in lanes:
                lane.error = lane.error or e
            return
        region = self.region
        sums = self._checksums(lanes, layer)
        for lane, checksum in zip(lanes, sums, strict=True):
            if lane.error is not None or batch.aborted:
                continue
            try:
                if isinstance(checksum, BaseException):
                    raise checksum
                region.mark_ready(lane.desc, layer, checksum=checksum)
                region.renew(lane.desc)
            except BaseException as e:
                lane.error = e
                continue
            lane.stats.transfer_ms += ms
            lane.last = handle
            lane.marked += 1
