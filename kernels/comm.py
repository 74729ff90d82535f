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

A packed prefill (several prompts in one forward) ships with `BatchShipper` instead: one
call per LAYER for every prompt of the batch, so the copy stream waits on the compute
stream once and ONE event covers the layer of all prompts:

    compute stream: [layer l: K,V of all prompts]--record ready_l--[layer l+1] ...
    copy stream:    wait ready_l--[prompt 0: reshape+D2H]..[prompt n-1: ...]--record done_l

Each prompt's destinations (its slot's per-layer views, typed for the dense layout) are
built once per batch (`ShipTarget`), not per layer.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.config import ModelConfig
from engine.errors import DeadlineExceeded, InvalidArgument
from kernels.dense import DenseLayout, pack_dense
from kernels.hbm_layout import HbmLayout
from kernels.reshape import TORCH_DTYPES, pack_layer

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
            wait_event(self.event, timeout_s, "layer copy")
        self.keep = ()

    def elapsed_ms(self) -> float:
        """Copy-stream time of this layer's reshape + copy (after its wait on compute);
        needs `LayerShipper(timing=True)` and a finished copy."""
        if self.start is None:
            raise InvalidArgument("this shipper does not time copies (timing=False)")
        self.wait()
        return self.start.elapsed_time(self.event)


def wait_event(event: torch.cuda.Event, timeout_s: float, what: str) -> None:
    """Block until `event` completed, polling with backoff (20 us .. 1 ms), so the wait
    is bounded; DeadlineExceeded("<what> not done after ...") past `timeout_s`. A host-side
    wait that issues no device work: any thread may do it."""
    deadline, pause = time.monotonic() + timeout_s, 20e-6
    while not event.query():
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"{what} not done after {timeout_s:.3f} s")
        time.sleep(pause)
        pause = min(pause * 2, 1e-3)


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


class _InFlight:
    """What both shippers share: the device, a copy stream of their own on CUDA, the
    done-events of shipped layers (oldest first) and one device staging buffer."""

    def __init__(self, device: torch.device | str = "cpu",
                 copy_stream: torch.cuda.Stream | None = None, timing: bool = False) -> None:
        self.timing = timing
        self.device = torch.device(device)
        self.copy_stream = None
        if self.device.type == "cuda":
            self.copy_stream = copy_stream or torch.cuda.Stream(self.device)
        self._inflight: deque[torch.cuda.Event] = deque()
        self._staging: torch.Tensor | None = None

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
        self._inflight.clear()


class LayerShipper(_InFlight):
    """Reshape + asynchronous copy of one layer at a time into slot memory.

    Not thread-safe: one shipper per prefill runner (calls come from its thread)."""

    def __init__(self, layout: Layout, device: torch.device | str = "cpu",
                 copy_stream: torch.cuda.Stream | None = None, timing: bool = False) -> None:
        super().__init__(device, copy_stream, timing)
        self.layout = layout

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

    def close(self) -> None:
        self.synchronize()
        self._staging = None


# ---- a packed batch: one layer of every prompt per call ---------------------------------
def _elem_bytes(dtype: str) -> int:
    return TORCH_DTYPES[dtype].itemsize


class ShipTarget:
    """One prompt's slot as the destination of all its layers, built once per batch.

    `views[l]`: a contiguous 1-D uint8 tensor of `layout.layer_bytes(n_tokens)` bytes (the
    slot's layer l, pinned host memory in the service). For the dense layout `typed[l]`
    is the same memory as the slot dtype, shaped [2, n_kv_heads, T, head_dim] (K then V),
    and `k_dst[l]`, `v_dst[l]` its halves: a layer then lands with one converting copy
    straight from the model's K, V, without a staging buffer. `typed` is None when the
    slot is not aligned to the element size (the layer then goes through staging)."""

    __slots__ = ("layout", "n_tokens", "nbytes", "shape", "dense", "aligned", "views", "typed",
                 "k_dst", "v_dst")

    def __init__(self, layout: Layout, n_tokens: int, views: Sequence[torch.Tensor],
                 typed: torch.Tensor | None = None) -> None:
        """`typed`: optional [n_layers, 2, H, T, D] slot-dtype tensor over the same bytes
        (what `from_slot` passes; built here from `views` otherwise)."""
        nbytes = layout.layer_bytes(n_tokens)
        for v in views:
            if v.dtype != torch.uint8 or v.dim() != 1 or v.numel() != nbytes \
                    or not v.is_contiguous():
                raise InvalidArgument(
                    f"destination must be a contiguous 1-D uint8 tensor of {nbytes} bytes for "
                    f"{n_tokens} tokens, got {v.dtype} {list(v.shape)}")
        self.layout, self.n_tokens, self.nbytes = layout, n_tokens, nbytes
        self.views = tuple(views)
        self.shape = (layout.n_kv_heads, n_tokens, layout.head_dim)  # what k, v must be
        elem = _elem_bytes(layout.dtype)
        self.aligned = all(v.data_ptr() % elem == 0 for v in self.views)
        self.dense = isinstance(layout, DenseLayout)
        self.typed = self.k_dst = self.v_dst = None
        if self.dense and self.aligned:
            if typed is None:
                dt = TORCH_DTYPES[layout.dtype]
                per = [v.view(dt).view(2, *self.shape) for v in self.views]
                self.typed = tuple(per)
                self.k_dst = tuple(t[0] for t in per)
                self.v_dst = tuple(t[1] for t in per)
            else:
                self.typed = typed.unbind(0)
                self.k_dst = typed.select(1, 0).unbind(0)
                self.v_dst = typed.select(1, 1).unbind(0)

    @classmethod
    def from_slot(cls, layout: Layout, n_tokens: int, slot: torch.Tensor,
                  n_layers: int) -> ShipTarget:
        """From one contiguous uint8 tensor holding `n_layers` equal layers back to back:
        a handful of tensor ops for the whole slot instead of a view per layer."""
        nbytes = layout.layer_bytes(n_tokens)
        if slot.dtype != torch.uint8 or slot.dim() != 1 or slot.numel() != n_layers * nbytes \
                or not slot.is_contiguous():
            raise InvalidArgument(
                f"slot must be a contiguous 1-D uint8 tensor of {n_layers} x {nbytes} bytes, "
                f"got {slot.dtype} {list(slot.shape)}")
        typed = None
        if isinstance(layout, DenseLayout) and slot.data_ptr() % _elem_bytes(layout.dtype) == 0:
            typed = slot.view(TORCH_DTYPES[layout.dtype]).view(
                n_layers, 2, layout.n_kv_heads, n_tokens, layout.head_dim)
        return cls(layout, n_tokens, slot.view(n_layers, nbytes).unbind(0), typed)

    @property
    def n_layers(self) -> int:
        return len(self.views)

    def check(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """InvalidArgument unless k, v are this prompt's [n_kv_heads, T, head_dim] and the
        slot has `layer` (a typed copy would broadcast a wrong shape silently)."""
        if k.shape != self.shape or v.shape != self.shape:
            raise InvalidArgument(
                f"layer {layer}: k, v must be {list(self.shape)} [n_kv_heads, T, head_dim], "
                f"got {list(k.shape)} and {list(v.shape)}")
        if not 0 <= layer < len(self.views):
            raise InvalidArgument(f"layer {layer} out of range [0, {len(self.views)})")


def kv_pair_view(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """k, v as ONE [2, *k.shape] view (index 0 reads k, index 1 reads v) when both live in
    the same storage with equal strides and v after k: GPT-2's K and V are slices of the
    fused c_attn output, so a dense layer is one strided copy instead of two. None
    otherwise (separate K and V tensors: Llama)."""
    if v.dtype != k.dtype or v.device != k.device:
        return None
    st = k.stride()
    if v.stride() != st or k.untyped_storage().data_ptr() != v.untyped_storage().data_ptr():
        return None
    off = k.storage_offset()
    delta = v.storage_offset() - off
    if delta <= 0:
        return None
    return k.as_strided((2, *k.shape), (delta, *st), off)


class BatchShipper(_InFlight):
    """Ships one layer of EVERY prompt of a packed batch per call: reshape into each
    prompt's layout + copy into its slot.

    CUDA: the copy stream waits once on an event recorded on the compute stream (after
    the layer's K, V of all prompts are queued), then per prompt issues its reshape and
    D2H (dense with an aligned slot: a single converting copy from the model's strided
    K, V straight into the pinned slot, its device temporary stream-ordered on the copy
    stream; hbm: the pack kernels into one device staging buffer, then D2H), and records
    ONE event covering the layer of all prompts. CPU: writes straight into the slots;
    the returned Done is already complete.

    Not thread-safe: one shipper per batch in flight (calls come from one thread)."""

    def ship(self, layer: int, parts: Sequence[tuple[ShipTarget, torch.Tensor, torch.Tensor]],
             compute_stream: torch.cuda.Stream | None = None) -> Done | CudaShipment:
        """`parts`: (target, k, v) per prompt, k, v that prompt's [n_kv_heads, T, head_dim]
        of layer `layer`. CUDA: one CudaShipment for all of them (its event follows the
        last copy; `elapsed_ms` is the copy-stream time of the whole layer); CPU: Done
        with the wall time of all of them."""
        for target, k, v in parts:
            target.check(layer, k, v)
        if not parts or not parts[0][1].is_cuda:
            t0 = time.perf_counter()
            for target, k, v in parts:
                self._write_cpu(layer, target, k, v)
            return Done((time.perf_counter() - t0) * 1e3)
        if self.copy_stream is None:
            raise InvalidArgument("CUDA tensors given to a CPU BatchShipper")
        return self._ship_cuda(layer, parts, compute_stream)

    @staticmethod
    def _write_cpu(layer: int, target: ShipTarget, k: torch.Tensor, v: torch.Tensor) -> None:
        if target.typed is not None:  # dense: the slot's typed view takes k, v as they are
            pair = kv_pair_view(k, v)
            if pair is not None:
                target.typed[layer].copy_(pair)
            else:
                target.k_dst[layer].copy_(k)
                target.v_dst[layer].copy_(v)
            return
        dest = target.views[layer]
        if target.aligned:  # hbm
            pack_into(k, v, target.layout, dest)
        else:  # an odd slot offset: typed views of dest are impossible, go through a copy
            dest.copy_(pack_into(k, v, target.layout, torch.empty_like(dest)))

    def _ship_cuda(self, layer: int, parts, compute_stream) -> CudaShipment:
        # Per LAYER (not per prompt): the current-stream read, both events, the wait and
        # the stream switch (see LayerShipper._ship_cuda on why no stream context).
        compute = compute_stream or torch.cuda.current_stream(parts[0][1].device)
        copy = self.copy_stream
        ready = torch.cuda.Event()
        ready.record(compute)
        copy.wait_event(ready)
        self._reap()
        # K, V were made on the compute stream and are read on the copy stream: the
        # caching allocator must not hand their memory out again before the copies ran.
        # Marked before the copies are queued (the allocator records the copy stream's
        # position when the tensor is freed, which is after everything queued here); one
        # call per storage (a packed layer's prompts all slice the same K, V tensors).
        seen: set[int] = set()
        for _, k, v in parts:
            for t in (k, v):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in seen:
                    seen.add(ptr)
                    t.record_stream(copy)
        start = done = None
        torch.cuda.set_stream(copy)
        try:
            if self.timing:
                start = torch.cuda.Event(enable_timing=True)
                start.record(copy)
            for target, k, v in parts:
                if target.typed is not None:  # dense: one converting D2H, no staging
                    pair = kv_pair_view(k, v)
                    if pair is not None:
                        target.typed[layer].copy_(pair, non_blocking=True)
                    else:
                        target.k_dst[layer].copy_(k, non_blocking=True)
                        target.v_dst[layer].copy_(v, non_blocking=True)
                else:  # hbm (or a misaligned dense slot): pack on the device, then D2H
                    staging = self._staging_for(target.nbytes, k.device)
                    pack_into(k, v, target.layout, staging, stream=copy)
                    target.views[layer].copy_(staging, non_blocking=True)
        finally:
            # Even after a failure part-way, one event follows whatever was queued, so
            # synchronize() covers every copy into the slots.
            done = torch.cuda.Event(enable_timing=self.timing)
            done.record(copy)
            torch.cuda.set_stream(compute)
            self._inflight.append(done)
        return CudaShipment(done, (parts,), start)

    def _staging_for(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """One device buffer for every packed layer (see LayerShipper._staging_for): only
        touched on the copy stream, whose order puts each pack after the previous D2H."""
        if self._staging is None or self._staging.numel() < nbytes:
            self._staging = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self._staging.record_stream(self.copy_stream)
        return self._staging[:nbytes]


    def close(self) -> None:
        self.synchronize()
        self._staging = None
