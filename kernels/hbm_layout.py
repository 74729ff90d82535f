"""The U55C HBM layout of docs/hbm-layout.md as code: geometry, offsets, capacity.

Two places hold KV bytes in this layout:
- a *slot* (the shared region, one layer at a time): for each channel c in order, a
  chunk = [K tiles of c's lanes for the live blocks][V tiles, same count]; chunks are
  back to back (`channel_chunks`, `layer_bytes`);
- the *HBM* (32 channels x 512 MiB): per channel [weights part][KV areas of requests];
  inside a request's area layer l follows layer l-1, each region sized for the request's
  token capacity, K half then V half (`k_offset`, `v_offset`). A slot chunk's K part is
  the live prefix of the K half, its V part the live prefix of the V half.

A KV row of kv_dim elements is cut into 32-element lanes; when kv_dim is not a multiple
of 32 the last lane ends in zero pad elements (kv_dim .. kv_dim_padded-1), written as
zeros by every producer and never read as data.

Tiles (E = element, VEC = 32):
  K tile [32 tokens][32 dims]  token-major: the datapath dots q's lane against K rows.
  V tile [32 dims][32 tokens]  dim-major:   the datapath dots p's block against V rows.
A channel's tiles are ordered [block][lane in channel], so appending a block never moves
earlier ones and the live prefix is one contiguous range.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from engine.config import ModelConfig
from engine.errors import InvalidArgument, ResourceExhausted
from engine.freelist import FreeList
from kernels.weight_table import (
    ELEM_BYTES,
    ENTRY_ALIGN,
    N_CHANNELS,
    VEC,
    WeightEntry,
    build_table,
    split_rows,
)

CHANNEL_BYTES = 512 * 2**20     # one U55C HBM2 pseudo-channel
KV_ALIGN = 4096                 # the KV part of every channel starts on a 4 KiB boundary

__all__ = [
    "CHANNEL_BYTES", "ENTRY_ALIGN", "KV_ALIGN", "N_CHANNELS", "VEC", "ELEM_BYTES",
    "HbmLayout", "KvArea", "KvAllocator",
]


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


@dataclass(frozen=True)
class KvArea:
    """One request's KV area: the same byte offset in every channel."""

    offset: int
    capacity_tokens: int    # a multiple of VEC
    nbytes: int             # per channel


@dataclass(frozen=True)
class HbmLayout:
    """The layout for one model and element dtype. Build with `for_model`."""

    model: str
    n_layers: int
    n_kv_heads: int
    head_dim: int
    dtype: str = "float16"
    weights_bytes: int = 0              # per channel, the weights part (unaligned end)
    n_channels: int = N_CHANNELS
    channel_bytes: int = CHANNEL_BYTES
    vec: int = VEC

    def __post_init__(self) -> None:
        dims = (self.n_layers, self.n_kv_heads, self.head_dim, self.n_channels, self.vec)
        if min(dims) < 1 or self.weights_bytes < 0:
            raise InvalidArgument(f"HBM layout dimensions must be positive, got {self}")
        if self.dtype not in ELEM_BYTES:
            raise InvalidArgument(
                f"HBM layout dtype must be one of {sorted(ELEM_BYTES)}, got {self.dtype!r}")
        if self.kv_base >= self.channel_bytes:
            raise ResourceExhausted(
                f"model {self.model} weights need {self.weights_bytes} bytes per HBM channel, "
                f"more than the channel capacity {self.channel_bytes} bytes")

    @classmethod
    def for_model(cls, config: ModelConfig, dtype: str = "float16") -> HbmLayout:
        _, used = build_table(config, dtype)
        return cls(config.name, config.n_layers, config.n_kv_heads, config.head_dim,
                   dtype, used)

    @classmethod
    def kv_only(cls, n_layers: int, n_kv_heads: int, head_dim: int,
                dtype: str = "float16") -> HbmLayout:
        """A layout with an empty weights part (reshape tests of arbitrary shapes)."""
        return cls(f"kv-{n_kv_heads}x{head_dim}", n_layers, n_kv_heads, head_dim, dtype, 0)

    # geometry ---------------------------------------------------------------------------
    @property
    def elem_bytes(self) -> int:
        return ELEM_BYTES[self.dtype]

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def n_lanes(self) -> int:
        """32-element lanes of a KV row; the last one is zero-padded when kv_dim is not a
        multiple of 32 (docs/hbm-layout.md, "Pad lanes")."""
        return -(-self.kv_dim // self.vec)

    @property
    def kv_dim_padded(self) -> int:
        """Width of a KV row in HBM: kv_dim rounded up to whole lanes (= kv_dim when it
        is a multiple of 32, the layout of every supported preset)."""
        return self.n_lanes * self.vec

    @property
    def kv_pad(self) -> int:
        """Pad elements at the end of every KV row (0..31): zeros, never read as data."""
        return self.kv_dim_padded - self.kv_dim

    @property
    def lanes_per_channel(self) -> int:
        """Lanes of the fullest channel (channels own contiguous lane blocks)."""
        return -(-self.n_lanes // self.n_channels)

    @property
    def tile_elems(self) -> int:
        return self.vec * self.vec

    @property
    def tile_bytes(self) -> int:
        return self.tile_elems * self.elem_bytes

    def lane_range(self, c: int) -> tuple[int, int]:
        """(first lane, number of lanes) of channel c; lane j = kv elements 32j..32j+31."""
        start, stop = split_rows(self.kv_dim_padded, self.n_channels, self.vec)[c]
        return start // self.vec, (stop - start) // self.vec

    def lanes_in_channel(self, c: int) -> int:
        return self.lane_range(c)[1]

    def channel_of_lane(self, j: int) -> int:
        return j // self.lanes_per_channel

    def n_blocks(self, n_tokens: int) -> int:
        return -(-n_tokens // self.vec)

    # slot form of one layer ------------------------------------------------------------
    def half_chunk_bytes(self, c: int, n_tokens: int) -> int:
        """Bytes of channel c's K part (= its V part) for n_tokens live tokens."""
        return self.n_blocks(n_tokens) * self.lanes_in_channel(c) * self.tile_bytes

    def channel_chunks(self, n_tokens: int) -> list[tuple[int, int]]:
        """(offset, length) of channel c's chunk inside one packed layer, for all c."""
        out, off = [], 0
        for c in range(self.n_channels):
            n = 2 * self.half_chunk_bytes(c, n_tokens)
            out.append((off, n))
            off += n
        return out

    def layer_bytes(self, n_tokens: int) -> int:
        """Size of one layer's packed K+V in a slot (sum of its 32 channel chunks)."""
        return 2 * self.n_blocks(n_tokens) * self.n_lanes * self.tile_bytes

    # the HBM map ----------------------------------------------------------------------
    @property
    def kv_base(self) -> int:
        """Byte offset of the KV part in every channel (weights part before it)."""
        return _align(self.weights_bytes, KV_ALIGN)

    def capacity_tokens(self, n_tokens: int) -> int:
        """A request's token capacity: n_tokens rounded up to whole 32-token blocks."""
        return self.n_blocks(n_tokens) * self.vec

    def region_half_bytes(self, capacity_tokens: int) -> int:
        return self.n_blocks(capacity_tokens) * self.lanes_per_channel * self.tile_bytes

    def layer_region_bytes(self, capacity_tokens: int) -> int:
        """One layer's K half + V half in one channel (same in all channels)."""
        return 2 * self.region_half_bytes(capacity_tokens)

    def kv_area_bytes(self, capacity_tokens: int) -> int:
        return self.n_layers * self.layer_region_bytes(capacity_tokens)

    def k_offset(self, area: KvArea, layer: int) -> int:
        return area.offset + layer * self.layer_region_bytes(area.capacity_tokens)

    def v_offset(self, area: KvArea, layer: int) -> int:
        return self.k_offset(area, layer) + self.region_half_bytes(area.capacity_tokens)

    @property
    def bytes_per_block(self) -> int:
        """HBM bytes one 32-token block of one request takes in each channel (all layers)."""
        return self.kv_area_bytes(self.vec)

    @property
    def max_tokens(self) -> int:
        """Most tokens (all requests' capacities together) the KV part of a channel holds.
        Every channel holds the same tokens, so this is also the device's limit."""
        return (self.channel_bytes - self.kv_base) // self.bytes_per_block * self.vec

    def check_area(self, offset: int, capacity_tokens: int) -> None:
        end = offset + self.kv_area_bytes(capacity_tokens)
        if offset < self.kv_base or end > self.channel_bytes:
            raise ResourceExhausted(
                f"KV area [{offset}, {end}) for {capacity_tokens} tokens does not fit the KV part "
                f"[{self.kv_base}, {self.channel_bytes}) of a {self.channel_bytes >> 20} MiB HBM "
                f"channel (limit: {self.max_tokens} tokens per channel for {self.model}, "
                f"{self.dtype})")

    def kv_address(self, area: KvArea, layer: int, which: str, token: int,
                   elem: int) -> tuple[int, int]:
        """(channel, byte offset) of K or V element `elem` (of the kv_dim row) of `token`.
        The formula the decode datapath implements; the reshape kernels agree with it."""
        if not (0 <= token < area.capacity_tokens and 0 <= elem < self.kv_dim):
            raise InvalidArgument(f"token {token} / element {elem} outside the area")
        lane, d = divmod(elem, self.vec)
        c = self.channel_of_lane(lane)
        first, lanes_c = self.lane_range(c)
        blk, r = divmod(token, self.vec)
        tile = blk * lanes_c + (lane - first)
        if which == "k":
            base, inner = self.k_offset(area, layer), r * self.vec + d
        elif which == "v":
            base, inner = self.v_offset(area, layer), d * self.vec + r
        else:
            raise InvalidArgument(f"which must be 'k' or 'v', got {which!r}")
        return c, base + (tile * self.tile_elems + inner) * self.elem_bytes

    def weight_table(self, config: ModelConfig) -> dict[str, WeightEntry]:
        table, used = build_table(config, self.dtype)
        if used != self.weights_bytes:
            raise InvalidArgument(f"config {config.name} does not match layout {self.model}")
        return table


class KvAllocator:
    """First-fit allocator of request KV areas inside the channels' KV part
    (engine.freelist.FreeList). Offsets are shared by all 32 channels. Thread-safe."""

    def __init__(self, layout: HbmLayout) -> None:
        self.layout = layout
        self._free = FreeList(layout.kv_base, layout.channel_bytes - layout.kv_base, 1)
        self._live: dict[int, KvArea] = {}
        self._lock = threading.Lock()

    def alloc(self, n_tokens: int) -> KvArea:
        """Reserve an area for n_tokens (prompt + max new tokens); ResourceExhausted if full."""
        if n_tokens <= 0:
            raise InvalidArgument(f"n_tokens must be positive, got {n_tokens}")
        lay = self.layout
        cap = lay.capacity_tokens(n_tokens)
        need = lay.kv_area_bytes(cap)
        with self._lock:
            start = self._free.alloc(need)
            if start is not None:
                area = self._live[start] = KvArea(start, cap, need)
                return area
        free = self.free_tokens
        raise ResourceExhausted(
            f"HBM full: a request of {n_tokens} tokens needs {need} bytes per channel; "
            f"{free} of the limit of {lay.max_tokens} tokens per channel are free "
            f"({lay.channel_bytes >> 20} MiB channels, model {lay.model}, {lay.dtype})")

    def free(self, area: KvArea) -> None:
        """Return an area; InvalidArgument if it is not live here (double free)."""
        with self._lock:
            if self._live.get(area.offset) != area:
                raise InvalidArgument(f"KV area at {area.offset} is not allocated here "
                                      f"(double free?)")
            del self._live[area.offset]
            self._free.free(area.offset, area.nbytes)

    @property
    def free_tokens(self) -> int:
        """Tokens of capacity still allocatable (summed over free spans)."""
        lay = self.layout
        with self._lock:
            return sum(n // lay.bytes_per_block for n in self._free.sizes()) * lay.vec

    @property
    def live(self) -> int:
        """Number of allocated areas."""
        return len(self._live)
