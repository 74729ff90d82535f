"""The communication kernel: reshape one layer's K, V and copy it into the shared slot.

This is the source document's latency hiding. Prefill calls `LayerShipper.ship(l, k, v,
dest)` right after layer l's K and V are in the cache; on CUDA the work goes to a
dedicated copy stream that first waits on an event recorded on the compute stream, so
the reshape + device-to-host copy of layer l overlaps the compute of layer l+1:

    compute stream: [layer l]--record ready_l--[layer l+1]---------[layer l+2] ...
    copy stream:               wait ready_l--[reshape l][D2H l]--record done_l

`dest` is a uint8 tensor view of the slot's layer range (pinned host memory from
transport.region.KvRegion.layer_view; any uint8 tensor works, pageable memory just makes
the copy synchronous). The returned handle's `.wait()` / `.query()` follow `done_l`; the
caller marks layer l ready in the slot header after `.wait()`. The K, V tensors stay
referenced until their copy has finished; one device staging buffer (the largest layer
so far) serves every layer, in copy-stream order. On CPU the reshape writes straight
into `dest` and the handle is already done.

Use in a prefill runner (names from docs/interfaces.md):

    shipper = LayerShipper.for_model(cfg, "hbm", "float16", device="cuda", timing=True)
    handles = []
    def on_layer(l, k, v):                     # called by model.prefill after layer l
        handles.append(shipper.ship(l, k, v, region.layer_view(desc, l)))
    logits = model.prefill(ids, cache, on_layer=on_layer)
    for l, h in enumerate(handles):
        h.wait(timeout_s=5.0)
        region.mark_ready(desc, l)
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from engine.config import ModelConfig
from engine.errors import DeadlineExceeded, InvalidArgument
from kernels.dense import DenseLayout, pack_dense
from kernels.hbm_layout import HbmLayout
from kernels.reshape import pack_layer

Layout = HbmLayout | DenseLayout


@dataclass
class Done:
    """Handle of work that finished synchronously (the CPU path)."""

    ms: float = 0.0             # wall time of the reshape + copy

    def query(self) -> bool:
        return True

    def wait(self, timeout_s: float | None = None) -> None:
        return None

    def elapsed_ms(self) -> float:
        return self.ms


@dataclass
class CudaShipment:
    """Handle of one layer in flight: a CUDA event recorded after its D2H copy."""

    event: torch.cuda.Event
    keep: tuple = field(default=(), repr=False)    # tensors the copy still reads
    start: torch.cuda.Event | None = None           # set when the shipper times copies

    def query(self) -> bool:
        done = self.event.query()
        if done:
            self.keep = ()
        return done

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until the copy is in `dest`; DeadlineExceeded after timeout_s."""
        if timeout_s is None:
            self.event.synchronize()
        else:
            deadline, pause = time.monotonic() + timeout_s, 20e-6
            while not self.event.query():
                if time.monotonic() > deadline:
                    raise DeadlineExceeded(f"layer copy not done after {timeout_s:.3f} s")
                time.sleep(pause)
                pause = min(pause * 2, 1e-3)
        self.keep = ()

    def elapsed_ms(self) -> float:
        """Copy-stream time of this layer's reshape + copy (after its wait on compute);
        needs `LayerShipper(timing=True)` and a finished copy."""
        if self.start is None:
            raise InvalidArgument("this shipper does not time copies (timing=False)")
        self.wait()
        return self.start.elapsed_time(self.event)


def make_layout(kind: str, config: ModelConfig, dtype: str) -> Layout:
    """"dense" or "hbm" layout of `config`'s KV in `dtype`."""
    if kind == "dense":
        return DenseLayout.for_model(config, dtype)
    if kind == "hbm":
        return HbmLayout.for_model(config, dtype)
    raise InvalidArgument(f"unknown KV layout {kind!r} (expected 'dense' or 'hbm')")


def pack_into(k: torch.Tensor, v: torch.Tensor, layout: Layout, out: torch.Tensor,
              stream: torch.cuda.Stream | None = None) -> torch.Tensor:
    """Reshape k, v into `out` (uint8, layout.layer_bytes(T)) in either layout."""
    if isinstance(layout, DenseLayout):
        return pack_dense(k, v, layout, out=out)
    return pack_layer(k, v, layout, out=out, stream=stream)


class LayerShipper:
    """Reshape + asynchronous copy of one layer at a time into slot memory.

    Not thread-safe: one shipper per prefill runner (calls come from its thread)."""

    def __init__(self, layout: Layout, device: torch.device | str = "cpu",
                 copy_stream: torch.cuda.Stream | None = None, timing: bool = False) -> None:
        self.layout = layout
        self.timing = timing
        self.device = torch.device(device)
        self.copy_stream = None
        if self.device.type == "cuda":
            self.copy_stream = copy_stream or torch.cuda.Stream(self.device)
        self._inflight: deque[torch.cuda.Event] = deque()
        self._staging: torch.Tensor | None = None

    @classmethod
    def for_model(cls, config: ModelConfig, kind: str, dtype: str,
                  device: torch.device | str = "cpu", **kw) -> LayerShipper:
        return cls(make_layout(kind, config, dtype), device, **kw)

    def layer_bytes(self, n_tokens: int) -> int:
        return self.layout.layer_bytes(n_tokens)

    def _check_dest(self, dest: torch.Tensor, n_tokens: int) -> None:
        nbytes = self.layout.layer_bytes(n_tokens)
        if dest.dtype != torch.uint8 or dest.dim() != 1 or dest.numel() != nbytes \
                or not dest.is_contiguous():
            raise InvalidArgument(
                f"destination must be a contiguous 1-D uint8 tensor of {nbytes} bytes for "
                f"{n_tokens} tokens, got {dest.dtype} {list(dest.shape)}")

    def ship(self, layer: int, k: torch.Tensor, v: torch.Tensor, dest: torch.Tensor,
             compute_stream: torch.cuda.Stream | None = None) -> Done | CudaShipment:
        """Reshape layer `layer`'s k, v [n_kv_heads, T, head_dim] into `dest`.

        CUDA: ordered after the work already queued on `compute_stream` (default: the
        current stream), runs on the copy stream; returns a CudaShipment. CPU: done on
        return."""
        if k.dim() != 3:
            raise InvalidArgument(f"layer {layer}: k must be [n_kv_heads, T, head_dim]")
        self._check_dest(dest, k.shape[1])
        if not k.is_cuda:
            t0 = time.perf_counter()
            self._pack_cpu(k, v, dest)
            return Done((time.perf_counter() - t0) * 1e3)
        return self._ship_cuda(k, v, dest, compute_stream)

    def _pack_cpu(self, k: torch.Tensor, v: torch.Tensor, dest: torch.Tensor) -> None:
        elem = self.layout.elem_bytes
        if dest.data_ptr() % elem == 0:
            pack_into(k, v, self.layout, dest)
        else:   # an odd slot offset: typed views of dest are impossible, go through a copy
            dest.copy_(pack_into(k, v, self.layout, torch.empty_like(dest)))

    def _ship_cuda(self, k, v, dest, compute_stream) -> CudaShipment:
        # torch.cuda.current_stream() and the torch.cuda.stream() context cost tens of
        # microseconds of Python each (measured: 140 us of CPU per layer with them, which
        # the prefill thread pays between its layers); so the current stream is read once
        # and the copy stream is set and restored directly.
        compute = compute_stream or torch.cuda.current_stream(k.device)
        copy = self.copy_stream
        ready = torch.cuda.Event()
        ready.record(compute)
        copy.wait_event(ready)
        self._reap()
        staging = self._staging_for(dest.numel(), k.device)
        start = done = None
        torch.cuda.set_stream(copy)
        try:
            if self.timing:
                start = torch.cuda.Event(enable_timing=True)
                start.record(copy)
            pack_into(k, v, self.layout, staging, stream=copy)
            dest.copy_(staging, non_blocking=True)
            done = torch.cuda.Event(enable_timing=self.timing)
            done.record(copy)
        finally:
            torch.cuda.set_stream(compute)
        # k, v were made on the compute stream; the copy stream reads them, so the caching
        # allocator must not hand their memory out again before `done`.
        k.record_stream(copy)
        v.record_stream(copy)
        self._inflight.append(done)
        return CudaShipment(done, (k, v, dest), start)

    def _staging_for(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """The device buffer a layer is packed into before its D2H copy. One buffer serves
        every layer: it is only touched on the copy stream, whose order already puts the
        reshape of layer l+1 after the copy of layer l. It grows to the largest layer
        seen. Marked as used on the copy stream when made, so whenever it is dropped
        (grown, closed, or the shipper collected) the allocator waits for its queued
        copies before reusing the memory."""
        if self._staging is None or self._staging.numel() < nbytes:
            self._staging = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self._staging.record_stream(self.copy_stream)
        return self._staging[:nbytes]

    def _reap(self) -> None:
        """Forget finished layers. Copies finish in stream order, so only the oldest
        entries are queried (one query per call in the steady state)."""
        while self._inflight and self._inflight[0].query():
            self._inflight.popleft()

    @property
    def in_flight(self) -> int:
        return sum(1 for ev in self._inflight if not ev.query())

    def synchronize(self) -> None:
        """Wait for every layer shipped so far."""
        for ev in self._inflight:
            ev.synchronize()

    def close(self) -> None:
        self.synchronize()
        self._inflight.clear()
        self._staging = None
