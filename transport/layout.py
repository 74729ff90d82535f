"""Byte layout of the shared KV region (docs/transport.md has the same table).

    [region header: 4 KiB][slot table: max_slots x slot_bytes, 4 KiB-rounded][payload]

Every header field is an aligned little-endian u64 (or a u8 ready flag), read and
written through `memoryview.cast` views: CPython moves one such item with a fixed-size
memcpy, i.e. one aligned load/store, so a reader never sees a torn value of a field
that changes once (first_token) and a torn generation can only differ from the old one.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

# Pre-fault the page tables at map time (once per region per process) instead of on
# the first copy of each page during a request.
MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)

MAGIC = b"HYBRIDKV"
VERSION = 3  # 2: slot headers carry the handle secret; 3: the GPU mirror's IPC handle
PAGE = 4096
REGION_HEADER_BYTES = PAGE
ALLOC_ALIGN = PAGE          # slot payloads start and end on 4 KiB boundaries
LAYER_ALIGN = 256           # layer ranges inside a slot start on 256 B (DMA-friendly)
REASON_BYTES = 64
MAX_LAYERS_LIMIT = 4096
MAX_SLOTS_LIMIT = 1 << 16
U64_MAX = (1 << 64) - 1

# Region header: u64 word index of each field.
H_MAGIC, H_VERSION, H_HEADER_BYTES, H_EPOCH = 0, 1, 2, 3
H_OWNER_PID, H_OWNER_START, H_TOTAL_BYTES = 4, 5, 6
H_MAX_SLOTS, H_MAX_LAYERS, H_SLOT_BYTES = 7, 8, 9
H_SLOT_TABLE_OFFSET, H_PAYLOAD_OFFSET, H_PAYLOAD_BYTES = 10, 11, 12
H_STATE, H_LEASE_NS = 13, 14

REGION_LIVE, REGION_CLOSED = 1, 2

# The owner's GPU mirror (transport.device_kv), in the region header so that only a
# process that may map this mode-0600 file (the owner's uid) learns its CUDA IPC handle:
# it is never sent over the network. H_DEVICE_BYTES = 0: no mirror.
H_DEVICE_BYTES = 32               # u64: the mirror's size
DEVICE_HANDLE_BYTE = 512          # 64 bytes: cudaIpcMemHandle_t
DEVICE_BUS_BYTE = 576             # 32 bytes: the GPU's PCI bus id, UTF-8, NUL padded
DEVICE_HANDLE_LEN, DEVICE_BUS_LEN = 64, 32

# Slot header: u64 word index relative to the slot header's first word.
S_GENERATION, S_STATE, S_OFFSET, S_LENGTH = 0, 1, 2, 3
S_N_LAYERS, S_FLAGS, S_FIRST_TOKEN, S_LEASE_DEADLINE, S_DIGEST = 4, 5, 6, 7, 8
S_EVENTS_BYTE = 72          # u32 event counter: bumped on every change (futex word)
S_SECRET_BYTE = 80          # 16 bytes: the allocation's handle secret (zeros when free)
S_REASON_BYTE = 96          # 64 bytes of UTF-8, NUL padded
S_READY_BYTE = 160          # max_layers u8 flags, then (8-aligned) max_layers u64 checksums

SLOT_FREE, SLOT_ACTIVE, SLOT_FAILED = 0, 1, 2
FLAG_CHECKSUMS = 1
FLAG_DEVICE = 2             # the bytes are in the owner's GPU mirror (device_kv)
FIRST_TOKEN_UNSET = -1


def round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def plan_layers(sizes: list[int]) -> tuple[list[tuple[int, int]], int]:
    """Layer (offset, length) pairs inside a slot, each start LAYER_ALIGN-aligned, and
    the slot length (ALLOC_ALIGN-rounded)."""
    ranges, off = [], 0
    for n in sizes:
        ranges.append((off, n))
        off = round_up(off + n, LAYER_ALIGN)
    return ranges, round_up(max(off, 1), ALLOC_ALIGN)


def slot_header_bytes(max_layers: int) -> int:
    ready = round_up(max_layers, 8)
    return round_up(S_READY_BYTE + ready + 8 * max_layers, 64)


@dataclass(frozen=True)
class Geometry:
    """Where everything sits in one region; stored in (and read back from) its header."""

    max_slots: int
    max_layers: int
    slot_bytes: int
    slot_table_offset: int
    payload_offset: int
    payload_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.payload_offset + self.payload_bytes

    @classmethod
    def plan(cls, capacity_bytes: int, max_slots: int, max_layers: int) -> Geometry:
        slot_bytes = slot_header_bytes(max_layers)
        table = round_up(max_slots * slot_bytes, PAGE)
        return cls(max_slots, max_layers, slot_bytes, REGION_HEADER_BYTES,
                   REGION_HEADER_BYTES + table, round_up(capacity_bytes, ALLOC_ALIGN))

    def slot_word(self, slot: int) -> int:
        """u64 word index of slot `slot`'s header."""
        return (self.slot_table_offset + slot * self.slot_bytes) // 8

    def ready_byte(self, slot: int, layer: int) -> int:
        return self.slot_table_offset + slot * self.slot_bytes + S_READY_BYTE + layer

    def checksum_word(self, slot: int, layer: int) -> int:
        base = self.slot_table_offset + slot * self.slot_bytes + S_READY_BYTE
        return (base + round_up(self.max_layers, 8)) // 8 + layer

    def events_byte(self, slot: int) -> int:
        return self.slot_table_offset + slot * self.slot_bytes + S_EVENTS_BYTE

    def secret_range(self, slot: int) -> tuple[int, int]:
        start = self.slot_table_offset + slot * self.slot_bytes + S_SECRET_BYTE
        return start, start + 16

    def reason_range(self, slot: int) -> tuple[int, int]:
        start = self.slot_table_offset + slot * self.slot_bytes + S_REASON_BYTE
        return start, start + REASON_BYTES

    def write_header(self, u64: memoryview, epoch: int, owner_pid: int, owner_start: int,
                     lease_ns: int) -> None:
        """Everything but the magic and the state, which the creator sets last; slot
        headers start at generation 1 with no first token."""
        fields = {
            H_VERSION: VERSION, H_HEADER_BYTES: REGION_HEADER_BYTES, H_EPOCH: epoch,
            H_OWNER_PID: owner_pid, H_OWNER_START: owner_start,
            H_TOTAL_BYTES: self.total_bytes, H_MAX_SLOTS: self.max_slots,
            H_MAX_LAYERS: self.max_layers, H_SLOT_BYTES: self.slot_bytes,
            H_SLOT_TABLE_OFFSET: self.slot_table_offset,
            H_PAYLOAD_OFFSET: self.payload_offset, H_PAYLOAD_BYTES: self.payload_bytes,
            H_LEASE_NS: lease_ns,
        }
        for word, value in fields.items():
            u64[word] = value
        for slot in range(self.max_slots):
            u64[self.slot_word(slot) + S_GENERATION] = 1  # generation 0 is never valid
            u64[self.slot_word(slot) + S_FIRST_TOKEN] = to_u64(FIRST_TOKEN_UNSET)

    @classmethod
    def read_header(cls, u64: memoryview) -> Geometry:
        return cls(u64[H_MAX_SLOTS], u64[H_MAX_LAYERS], u64[H_SLOT_BYTES],
                   u64[H_SLOT_TABLE_OFFSET], u64[H_PAYLOAD_OFFSET], u64[H_PAYLOAD_BYTES])

    def problems(self, file_bytes: int) -> list[str]:
        """Why this geometry (read from an untrusted header) cannot describe the file."""
        out = []
        if not (1 <= self.max_layers <= MAX_LAYERS_LIMIT):
            out.append(f"max_layers {self.max_layers} outside [1, {MAX_LAYERS_LIMIT}]")
        if not (1 <= self.max_slots <= MAX_SLOTS_LIMIT):
            out.append(f"max_slots {self.max_slots} outside [1, {MAX_SLOTS_LIMIT}]")
        if self.slot_bytes != slot_header_bytes(self.max_layers):
            out.append(f"slot_bytes {self.slot_bytes} != {slot_header_bytes(self.max_layers)}")
        if self.slot_table_offset != REGION_HEADER_BYTES:
            out.append(f"slot table at {self.slot_table_offset}, expected {REGION_HEADER_BYTES}")
        table_end = self.slot_table_offset + self.max_slots * self.slot_bytes
        if self.payload_offset < table_end or self.payload_offset % ALLOC_ALIGN:
            out.append(f"payload offset {self.payload_offset} overlaps the slot table or is unaligned")
        if self.total_bytes != file_bytes:
            out.append(f"header says {self.total_bytes} bytes, the file has {file_bytes}")
        return out


def to_i64(u: int) -> int:
    """A u64 word holding a two's-complement i64."""
    return u - (1 << 64) if u >= 1 << 63 else u


def to_u64(i: int) -> int:
    return i & U64_MAX


def encode_reason(reason: str) -> bytes:
    raw = reason.encode("utf-8")[: REASON_BYTES - 1]
    return raw.ljust(REASON_BYTES, b"\0")


def decode_reason(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")
