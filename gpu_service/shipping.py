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
import time
from dataclasses import dataclass
from typing import Any

import torch

from engine.errors import DeadlineExceeded, HybridError

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


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
        try:
            from kernels.comm import LayerShipper
        except ImportError:  # kernels/ not merged yet: the dense layout is a plain copy
            if layout != "dense":
                raise
            return DenseCopy(slot_dtype)
        return LayerShipper.for_model(self.config, layout, slot_dtype, self.device)

    def give(self, layout: str, slot_dtype: str, shipper: Any) -> None:
        with self._lock:
            self._free.setdefault((layout, slot_dtype), []).append(shipper)


class DenseCopy:
    """Dense layout (K [n_kv_heads, T, head_dim] then V, slot dtype), synchronous copy.
    Fallback only: used when kernels.comm is not importable."""

    def __init__(self, slot_dtype: str) -> None:
        self.dtype = _DTYPES[slot_dtype]

    def ship(self, layer: int, k: torch.Tensor, v: torch.Tensor, dst: torch.Tensor) -> None:
        out = dst.view(self.dtype)
        n = k.numel()
        out[:n].view_as(k).copy_(k)
        out[n:2 * n].view_as(v).copy_(v)
        return None


@dataclass
class ShipStats:
    transfer_ms: float = 0.0          # raw copy time, all layers
    exposed_transfer_ms: float = 0.0  # last layer's compute end -> last copy done
    kv_bytes: int = 0


class ReadyMarker:
    """Waits on each layer's copy event in order and marks it ready in the region.

    CPU copies are synchronous (handle already done): the layer is marked at once, in
    the caller's thread. CUDA copies return a pending handle: a helper thread waits on
    them in order so the compute thread never blocks on the copy stream.
    """

    def __init__(self, region: Any, desc: Any) -> None:
        self.region, self.desc = region, desc
        self.stats = ShipStats()
        self._q: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._last_done = 0.0
        self.last_submit = 0.0

    def submit(self, layer: int, handle: Any, t_submit: float, n_bytes: int) -> None:
        """`handle`: what LayerShipper.ship returned (None or already done: CPU copy)."""
        self.last_submit = t_submit
        self.stats.kv_bytes += n_bytes
        if handle is None or handle.query():
            self._done(layer, t_submit)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._wait_loop, daemon=True)
            self._thread.start()
        self._q.put((layer, handle, t_submit))

    def _done(self, layer: int, t_submit: float) -> None:
        now = time.perf_counter()
        # Copies are serialized on one stream: a copy starts when both it was submitted
        # and the previous one finished.
        self.stats.transfer_ms += (now - max(t_submit, self._last_done)) * 1e3
        self._last_done = now
        self.region.mark_ready(self.desc, layer)

    def _wait_loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            layer, handle, t_submit = item
            try:
                handle.wait()
                self._done(layer, t_submit)
            except BaseException as e:  # surfaced by finish()
                self._error = e
                return

    def finish(self, t_compute_end: float, timeout_s: float) -> ShipStats:
        """Wait for every copy; returns the figures. Raises the helper's error."""
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise DeadlineExceeded(f"KV copies not done after {timeout_s:.0f}s")
        if self._error is not None:
            raise self._error if isinstance(self._error, HybridError) else HybridError(
                f"KV copy failed: {self._error}")
        self.stats.exposed_transfer_ms = max(0.0, (self._last_done - t_compute_end) * 1e3)
        return self.stats
