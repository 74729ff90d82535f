"""Layer shipping for one prefill: hand each layer's K/V to the copy path and mark the
layer ready in the slot once its copy has completed.

The copy itself (reshape into the decoder's layout + async D2H into the pinned slot) is
kernels.comm.LayerShipper's job. This module adds what the service needs around it: a
small thread that waits on the copy events in layer order and flips the ready flags, and
the latency-hiding figures (raw copy time vs the part not hidden behind compute).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any

import torch

from engine.errors import DeadlineExceeded, HybridError


class ShipperPool:
    """kernels.comm.LayerShipper is not thread-safe and owns a CUDA copy stream, so each
    concurrent prefill borrows one (created on demand, reused after)."""

    def __init__(self, config: Any, device: torch.device) -> None:
        self.config, self.device = config, device
        self._free: dict[tuple[str, str], list[Any]] = {}
        self._lock = threading.Lock()

    def take(self, layout: str, slot_dtype: str) -> Any:
        with self._lock:
            free = self._free.get((layout, slot_dtype))
            if free:
                return free.pop()
        from kernels.comm import LayerShipper

        # timing=True: each handle reports its copy-stream time (the raw transfer figure).
        return LayerShipper.for_model(self.config, layout, slot_dtype, self.device, timing=True)

    def give(self, layout: str, slot_dtype: str, shipper: Any) -> None:
        with self._lock:
            self._free.setdefault((layout, slot_dtype), []).append(shipper)


@dataclass
class ShipStats:
    transfer_ms: float = 0.0          # raw reshape + copy time, all layers
    exposed_transfer_ms: float = 0.0  # last layer's compute end -> last copy done
    kv_bytes: int = 0


class ReadyMarker:
    """Waits on each layer's copy in order and marks the layer ready in the region.

    CPU copies are synchronous (handle already done): the layer is marked at once, in
    the caller's thread. CUDA copies return a pending handle: a helper thread waits on
    them in order so the compute thread never blocks on the copy stream.

    Latency hiding is measured on the device's own clock: raw = sum of each layer's
    copy-stream time; exposed = from an event recorded on the compute stream when the
    whole prefill compute is done to the last layer's copy-done event (the copy time the
    request still waits for). On CPU the copies run inline between layers, nothing
    overlaps, and exposed = raw.
    """

    def __init__(self, region: Any, desc: Any) -> None:
        self.region, self.desc = region, desc
        self.stats = ShipStats()
        self._q: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._last: Any = None  # the last layer's copy handle

    def submit(self, layer: int, handle: Any, n_bytes: int) -> None:
        """`handle`: what LayerShipper.ship returned (already done on CPU)."""
        self.stats.kv_bytes += n_bytes
        self._last = handle
        if handle is None or handle.query():
            self._done(layer, handle)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._wait_loop, daemon=True)
            self._thread.start()
        self._q.put((layer, handle))

    def _done(self, layer: int, handle: Any) -> None:
        if handle is not None:
            self.stats.transfer_ms += handle.elapsed_ms()
        self.region.mark_ready(self.desc, layer)
        # A producer still filling the slot keeps it alive: a prefill longer than the
        # lease must not be reaped under its own feet.
        self.region.renew(self.desc)

    def _wait_loop(self) -> None:
        while (item := self._q.get()) is not None:
            layer, handle = item
            try:
                handle.wait()
                self._done(layer, handle)
            except BaseException as e:  # surfaced by finish()
                self._error = e
                return

    def close(self) -> None:
        """Stop the helper thread without waiting for the result (the request failed)."""
        if self._thread is not None:
            self._q.put(None)

    def finish(self, compute_done: Any, timeout_s: float) -> ShipStats:
        """Wait for every copy; returns the figures. `compute_done`: a CUDA event recorded
        on the compute stream after the whole prefill (None on CPU). Raises the helper's
        error."""
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise DeadlineExceeded(f"KV copies not done after {timeout_s:.0f}s")
        if self._error is not None:
            raise self._error if isinstance(self._error, HybridError) else HybridError(
                f"KV copy failed: {self._error}")
        if compute_done is not None and self._last is not None:
            self.stats.exposed_transfer_ms = max(
                0.0, compute_done.elapsed_time(self._last.event))
        else:  # CPU: each copy ran inline in the compute thread, so none of it was hidden
            self.stats.exposed_transfer_ms = self.stats.transfer_ms
        return self.stats
