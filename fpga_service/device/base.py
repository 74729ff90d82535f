"""The HBM device layer: what a decode backend needs from a U55C (real or emulated).

Memory model (Alveo U55C): 32 HBM pseudo-channels x 512 MiB. Each channel has its own
allocator; a *buffer* reserves one range in every channel at once (sizes may differ per
channel), because the layout spreads every tensor over all 32 so they stream in parallel.
One buffer holds the model's weights image; each request gets a KV buffer, freed when the
request ends however it ends (`HbmBuffer.free()` is idempotent).

Host -> device: `write(channel, offset, data)` then `sync(channel, offset, size)`. Only
synced bytes are guaranteed visible to the kernel (XRT buffer objects have a host copy).
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from engine.config import ModelConfig
from engine.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from engine.freelist import FreeList
from fpga_service.device import abi
from fpga_service.device.bandwidth import BandwidthModel
from kernels.hbm_layout import HbmLayout, KvArea

N_CHANNELS = 32
CHANNEL_BYTES = 512 * 2**20
ALIGN = 4096  # allocation granularity: a DMA-friendly page


class ChannelAllocator:
    """One channel's address range: engine.freelist.FreeList (first fit, coalescing)
    plus the size of each live block, so a free needs only its offset."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free = FreeList(0, capacity, ALIGN)
        self._used: dict[int, int] = {}

    @property
    def used(self) -> int:
        return sum(self._used.values())

    def alloc(self, size: int) -> int | None:
        off = self._free.alloc(size)
        if off is not None:
            self._used[off] = self._free.round(size)
        return off

    def free(self, offset: int) -> None:
        self._free.free(offset, self._used.pop(offset))


@dataclass
class HbmBuffer:
    """One reservation across the channels: `offsets[c]` .. `+ sizes[c]` in channel c."""

    tag: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    capacity_tokens: int = 0        # KV areas: token capacity (a multiple of 32)
    _device: HbmDevice | None = field(default=None, repr=False)

    def free(self) -> None:
        """Return the space. Idempotent, so every exit path may call it."""
        dev, self._device = self._device, None
        if dev is not None:
            dev._release(self)

    @property
    def live(self) -> bool:
        return self._device is not None


@dataclass(frozen=True)
class StepResult:
    """What one kernel run returns. `tokens`: the kernel's greedy pick (first maximal
    index) for each step; `logits`: fp32 [vocab] of the last step, for host sampling."""

    tokens: tuple[int, ...]
    logits: object  # torch.Tensor [vocab] float32
    wall_ms: float
    modeled_ms: float
    bytes_read: int


class HbmDevice(ABC):
    """A U55C-like device. Thread-safe allocation; one kernel run at a time."""

    name = "hbm"

    def __init__(self, channel_bytes: int = CHANNEL_BYTES,
                 bandwidth: BandwidthModel | None = None) -> None:
        self.n_channels = N_CHANNELS
        self.channel_bytes = channel_bytes
        self.bandwidth = bandwidth or BandwidthModel()
        self._alloc = [ChannelAllocator(channel_bytes) for _ in range(N_CHANNELS)]
        self._lock = threading.Lock()
        self._run_lock = threading.Lock()   # one io buffer: kernel runs are serialised
        self.layout: HbmLayout | None = None
        self.config: ModelConfig | None = None
        self.weights: HbmBuffer | None = None
        self._totals = {"runs": 0, "steps": 0, "wall_ms": 0.0, "modeled_ms": 0.0}

    # -- lifecycle -------------------------------------------------------------------
    @abstractmethod
    def open(self) -> None:
        """Acquire the device (and load the bitstream). Raises Unavailable when absent."""

    @abstractmethod
    def close(self) -> None:
        """Release the device. Idempotent."""

    # -- memory ----------------------------------------------------------------------
    def allocate(self, sizes: Sequence[int] | int, tag: str) -> HbmBuffer:
        """Reserve `sizes[c]` bytes in every channel c, all or nothing.
        Raises ResourceExhausted (and reserves nothing) when any channel is full."""
        if isinstance(sizes, int):
            sizes = [sizes] * self.n_channels
        if len(sizes) != self.n_channels or any(s < 0 for s in sizes):
            raise InvalidArgument(f"need {self.n_channels} non-negative sizes, got {sizes!r}")
        with self._lock:
            offsets: list[int] = []
            for c, size in enumerate(sizes):
                off = self._alloc[c].alloc(size)
                if off is None:
                    for cc, o in enumerate(offsets):
                        self._alloc[cc].free(o)
                    raise ResourceExhausted(
                        f"HBM full: {tag} needs {size} B in channel {c}, "
                        f"{self.channel_bytes - self._alloc[c].used} B free there")
                offsets.append(off)
        return HbmBuffer(tag, tuple(offsets), tuple(sizes), _device=self)

    def _release(self, buf: HbmBuffer) -> None:
        with self._lock:
            for c, off in enumerate(buf.offsets):
                self._alloc[c].free(off)

    def used_bytes(self) -> int:
        with self._lock:
            return sum(a.used for a in self._alloc)

    def capacity_bytes(self) -> int:
        return self.n_channels * self.channel_bytes

    def _check_range(self, channel: int, offset: int, size: int) -> None:
        if not 0 <= channel < self.n_channels:
            raise InvalidArgument(f"channel {channel} out of range 0..{self.n_channels - 1}")
        if offset < 0 or size < 0 or offset + size > self.channel_bytes:
            raise InvalidArgument(
                f"range [{offset}, {offset + size}) outside channel of {self.channel_bytes} B")

    @abstractmethod
    def write(self, channel: int, offset: int, data: bytes | memoryview) -> None:
        """Copy `data` into the host side of channel `channel` at `offset`."""

    @abstractmethod
    def sync(self, channel: int, offset: int, size: int) -> None:
        """Make host bytes [offset, offset+size) of `channel` visible to the kernel."""

    @abstractmethod
    def read(self, channel: int, offset: int, size: int) -> bytes:
        """Device -> host: the bytes the kernel sees (syncs from device first)."""

    def write_synced(self, channel: int, offset: int, data: bytes | memoryview) -> None:
        self.write(channel, offset, data)
        self.sync(channel, offset, memoryview(data).nbytes)

    def load_weights(self, chunks: Sequence, tag: str = "weights") -> HbmBuffer:
        """Allocate and write one weights image: `chunks[c]` goes to channel c."""
        sizes = [memoryview(b).nbytes for b in chunks]
        buf = self.allocate(sizes, tag)
        try:
            for c, data in enumerate(chunks):
                if sizes[c]:
                    self.write_synced(c, buf.offsets[c], data)
        except BaseException:
            buf.free()
            raise
        return buf

    # -- model and requests ----------------------------------------------------------
    def load_model(self, config: ModelConfig, dtype: str,
                   chunks: Sequence[bytes | memoryview | np.ndarray]) -> HbmBuffer:
        """Write a weights image (`chunks[c]` = channel c's weights part, offset 0 of the
        image) and the kernel's meta buffer. One model per device."""
        if self.weights is not None:
            raise FailedPrecondition(f"{self.name}: a model is already loaded")
        self.layout = HbmLayout.for_model(config, dtype)
        self.config = config
        self.weights = self.load_weights(chunks)
        meta = {"config": asdict(config), "dtype": dtype, "weights_base": list(self.weights.offsets)}
        self._configure(abi.encode_meta(meta), abi.io_bytes(config.vocab_size))
        return self.weights

    def alloc_kv(self, n_tokens: int, tag: str) -> HbmBuffer:
        """A request's KV area for n_tokens (prompt + new tokens), whole 32-token blocks.
        ResourceExhausted when the channels are full; free it with `.free()`."""
        lay = self._layout()
        if n_tokens < 1:
            raise InvalidArgument(f"a KV area needs >= 1 token, got {n_tokens}")
        cap = lay.capacity_tokens(n_tokens)
        buf = self.allocate(lay.kv_area_bytes(cap), tag)
        buf.capacity_tokens = cap
        return buf

    def write_kv_layer(self, kv: HbmBuffer, layer: int, data: memoryview, n_tokens: int) -> None:
        """Ingest one layer in slot form (kernels.reshape.pack_layer): chunk c's K part to
        channel c's K half of the layer, its V part to the V half; then sync."""
        lay = self._layout()
        data = memoryview(data).cast("B")
        if not 0 <= layer < lay.n_layers:
            raise InvalidArgument(f"layer {layer} outside 0..{lay.n_layers - 1}")
        if n_tokens > kv.capacity_tokens or len(data) != lay.layer_bytes(n_tokens):
            raise InvalidArgument(
                f"layer {layer}: {len(data)} bytes for {n_tokens} tokens, expected "
                f"{lay.layer_bytes(n_tokens)} (capacity {kv.capacity_tokens})")
        area = KvArea(0, kv.capacity_tokens, lay.kv_area_bytes(kv.capacity_tokens))
        k_rel, v_rel = lay.k_offset(area, layer), lay.v_offset(area, layer)
        for c, (off, n) in enumerate(lay.channel_chunks(n_tokens)):
            if n:
                half = n // 2
                self.write_synced(c, kv.offsets[c] + k_rel, data[off : off + half])
                self.write_synced(c, kv.offsets[c] + v_rel, data[off + half : off + n])

    # -- compute ---------------------------------------------------------------------
    @abstractmethod
    def _configure(self, meta: bytes, io_size: int) -> None:
        """Hold the kernel's meta buffer and an io buffer of io_size bytes."""

    @abstractmethod
    def _launch(self, io_header: bytes, scalars: dict[int, int], timeout_s: float) -> np.ndarray:
        """One kernel run with the ABI's arguments; returns the io buffer's bytes after it."""

    def run_decode(self, kv: HbmBuffer, token: int, position: int, n_steps: int = 1,
                   timeout_s: float = 30.0) -> StepResult:
        """Run the decode kernel for `n_steps` tokens starting with `token` at
        `position`, reading weights and `kv` from HBM and appending each step's K, V
        into `kv`. Step i > 0 is fed the kernel's own greedy pick of step i-1."""
        lay, cfg = self._layout(), self.config
        if not kv.live:
            raise InvalidArgument(f"KV buffer {kv.tag} was freed")
        scalars = {abi.ARG_N_STEPS: abi.check_scalar("n_steps", n_steps),
                   abi.ARG_POSITION: abi.check_scalar("position", position),
                   abi.ARG_TOKEN: abi.check_scalar("token", token),
                   abi.ARG_KV_CAPACITY: abi.check_scalar("kv_capacity", kv.capacity_tokens)}
        with self._run_lock:
            t0 = time.perf_counter()
            io = abi.IoView(self._launch(abi.pack_io_header(list(kv.offsets)), scalars, timeout_s))
            wall_ms = (time.perf_counter() - t0) * 1e3
            _, _, status, done = io.header()
            if status == abi.STATUS_KV_FULL:
                raise ResourceExhausted(f"{kv.tag}: position {position}+{n_steps} steps exceeds "
                                        f"the KV capacity of {kv.capacity_tokens} tokens")
            if status != abi.STATUS_OK or done != n_steps:
                raise InvalidArgument(f"decode kernel refused its arguments (status {status})")
            tokens = tuple(int(t) for t in io.tokens()[:n_steps])
            logits = torch.from_numpy(io.logits(cfg.vocab_size).copy())
        modeled, nbytes = 0.0, 0
        for i in range(n_steps):
            ms, b = self.bandwidth.step_ms(cfg, lay, position + i + 1)
            modeled, nbytes = modeled + ms, nbytes + b
        res = StepResult(tokens, logits, wall_ms, modeled, nbytes)
        self._account(res, n_steps)
        return res

    def _layout(self) -> HbmLayout:
        if self.layout is None or self.config is None:
            raise FailedPrecondition(f"{self.name}: no model loaded")
        return self.layout

    def _account(self, res: StepResult, n_steps: int) -> None:
        t = self._totals
        t["runs"] += 1
        t["steps"] += n_steps
        t["wall_ms"] += res.wall_ms
        t["modeled_ms"] += res.modeled_ms

    def timings(self) -> dict[str, float]:
        """Totals since open: runs, steps, wall_ms, modeled_ms (U55C cycle model)."""
        return dict(self._totals)
