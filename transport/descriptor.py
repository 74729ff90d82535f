"""KvDescriptor: where one request's KV lives in the shared region.

The dataclass mirrors protos `hybrid.v1.KvDescriptor` (enums as strings). A descriptor
arrives over the network, so `validate` checks every field against the region's own
geometry before anything is read, and the reader additionally compares its `digest()`
with the one the owner stored in the slot header at allocation time.

`secret` makes a descriptor a capability: 16 random bytes drawn per allocation, kept in
the slot header, carried only by the request's handle. Everything else in a descriptor
is guessable (region and epoch come from Info, slots and generations are small
integers), so every service compares the secret first (constant time) and answers a
mismatch with one fixed message that says nothing about which slots are live.
"""

from __future__ import annotations

import hmac
import secrets
import struct
from dataclasses import dataclass, field
from typing import NamedTuple

import xxhash

from engine.errors import Aborted, InvalidArgument
from protos import hybrid_pb2 as pb
from transport.layout import U64_MAX
from transport.shm import segment_path

LAYOUTS = {"dense": pb.KV_LAYOUT_DENSE, "hbm": pb.KV_LAYOUT_HBM}
DTYPES = {"float16": pb.DTYPE_FP16, "bfloat16": pb.DTYPE_BF16, "float32": pb.DTYPE_FP32}
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
_LAYOUT_NAMES = {v: k for k, v in LAYOUTS.items()}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
U32_MAX = (1 << 32) - 1
_U32_FIELDS = ("slot", "n_layers", "n_tokens", "n_kv_heads", "head_dim")
_U64_FIELDS = ("epoch", "offset", "length", "generation")
SECRET_BYTES = 16  # 128 bits: guessing one is hopeless, and it fits two header words
# The one answer to any handle that is not a live capability (forged, altered, released,
# expired): it names no slot, generation or offset, so probing learns nothing.
INVALID_HANDLE = "KV handle is not valid (released, expired, or not issued by this service)"


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def invalid_handle() -> Aborted:
    return Aborted(INVALID_HANDLE)


_NO_SECRET = bytes(SECRET_BYTES)  # what a free slot holds: never a valid capability


def same_secret(a: bytes, b: bytes) -> bool:
    """Constant-time equality of two secrets; an empty, short or all-zero one (a free
    slot's) never matches."""
    return (len(a) == len(b) == SECRET_BYTES and a != _NO_SECRET
            and hmac.compare_digest(a, b))


def check_positive(**values: object) -> None:
    for k, v in values.items():
        if type(v) is not int or v < 1:
            raise InvalidArgument(f"{k}={v!r}: expected a positive integer")


class LayerRange(NamedTuple):
    """One layer's bytes, `offset` relative to the slot start."""

    offset: int
    length: int


@dataclass(frozen=True)
class KvDescriptor:
    region: str            # POSIX shm name, "/hybrid-kv-<pid>-<epoch>"
    epoch: int             # region epoch (a restarted owner has a new one)
    slot: int              # slot header index
    offset: int            # slot payload offset in the region, bytes
    length: int            # slot payload length (4 KiB-rounded), bytes
    generation: int        # the slot's generation when allocated (>= 1)
    layout: str = "dense"  # "dense" | "hbm"
    dtype: str = "float16"  # "float16" | "bfloat16" | "float32"
    n_layers: int = 0
    n_tokens: int = 0      # live tokens: only these move
    layers: tuple[LayerRange, ...] = ()
    n_kv_heads: int = 0
    head_dim: int = 0
    checksums: bool = False  # per-layer xxh3_64 in the slot header
    secret: bytes = field(default=b"", repr=False)  # the capability; never printed
    on_device: bool = False  # in the prefill GPU's mirror of the payload (CUDA IPC)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(LayerRange(*r) for r in self.layers))

    @property
    def nbytes(self) -> int:
        """Bytes of KV (sum of the layer ranges)."""
        return sum(r.length for r in self.layers)

    def layer_span(self, layer: int) -> tuple[int, int]:
        """(absolute offset in the region, length) of `layer`; InvalidArgument if absent."""
        if not isinstance(layer, int) or not 0 <= layer < len(self.layers):
            raise InvalidArgument(f"layer {layer!r} out of range [0, {len(self.layers)})")
        r = self.layers[layer]
        return self.offset + r.offset, r.length

    # -- protobuf ---------------------------------------------------------------
    def to_proto(self) -> pb.KvDescriptor:
        return pb.KvDescriptor(
            region=self.region, epoch=self.epoch, slot=self.slot, offset=self.offset,
            length=self.length, generation=self.generation, layout=LAYOUTS[self.layout],
            dtype=DTYPES[self.dtype], n_layers=self.n_layers, n_tokens=self.n_tokens,
            layers=[pb.LayerRange(offset=r.offset, length=r.length) for r in self.layers],
            n_kv_heads=self.n_kv_heads, head_dim=self.head_dim, checksums=self.checksums,
            secret=self.secret, on_device=self.on_device)

    @classmethod
    def from_proto(cls, msg: pb.KvDescriptor) -> KvDescriptor:
        if msg.layout not in _LAYOUT_NAMES:
            raise InvalidArgument(f"descriptor layout {msg.layout} is not dense or hbm")
        if msg.dtype not in _DTYPE_NAMES:
            raise InvalidArgument(f"descriptor dtype {msg.dtype} is not fp16, bf16 or fp32")
        return cls(
            region=msg.region, epoch=msg.epoch, slot=msg.slot, offset=msg.offset,
            length=msg.length, generation=msg.generation, layout=_LAYOUT_NAMES[msg.layout],
            dtype=_DTYPE_NAMES[msg.dtype], n_layers=msg.n_layers, n_tokens=msg.n_tokens,
            layers=tuple(LayerRange(r.offset, r.length) for r in msg.layers),
            n_kv_heads=msg.n_kv_heads, head_dim=msg.head_dim, checksums=msg.checksums,
            secret=bytes(msg.secret), on_device=msg.on_device)

    def to_bytes(self) -> bytes:
        return self.to_proto().SerializeToString()

    @classmethod
    def from_bytes(cls, raw: bytes) -> KvDescriptor:
        msg = pb.KvDescriptor()
        try:
            msg.ParseFromString(raw)
        except Exception as e:  # protobuf's DecodeError
            raise InvalidArgument(f"undecodable KvDescriptor: {e}") from e
        return cls.from_proto(msg)

    # -- checks -----------------------------------------------------------------
    def validate(self, region_bytes: int, *, payload_offset: int = 0,
                 max_slots: int | None = None, max_layers: int | None = None) -> KvDescriptor:
        """Raise InvalidArgument unless every field fits a region of `region_bytes`
        (payload from `payload_offset`; slot and layer counts bounded when given).
        Returns self so calls chain."""
        segment_path(self.region)
        self._check_ints()
        if self.layout not in LAYOUTS or self.dtype not in DTYPES:
            raise InvalidArgument(f"descriptor layout/dtype {self.layout}/{self.dtype} unknown")
        if self.generation < 1:
            raise InvalidArgument("descriptor generation 0: not a descriptor from alloc()")
        if max_slots is not None and self.slot >= max_slots:
            raise InvalidArgument(f"slot {self.slot} out of range [0, {max_slots})")
        self._check_extent(region_bytes, payload_offset)
        self._check_layers(max_layers)
        return self

    def _check_ints(self) -> None:
        for name, top in [(f, U32_MAX) for f in _U32_FIELDS] + [(f, U64_MAX) for f in _U64_FIELDS]:
            v = getattr(self, name)
            if type(v) is not int or not 0 <= v <= top:
                raise InvalidArgument(f"descriptor {name}={v!r} not an integer in [0, {top}]")
        for flag in ("checksums", "on_device"):
            if type(getattr(self, flag)) is not bool:
                raise InvalidArgument(f"descriptor {flag}={getattr(self, flag)!r} not a bool")
        if type(self.secret) is not bytes or len(self.secret) != SECRET_BYTES:
            raise invalid_handle()

    def _check_extent(self, region_bytes: int, payload_offset: int) -> None:
        end = self.offset + self.length
        if end > U64_MAX:
            raise InvalidArgument(f"slot offset {self.offset} + length {self.length} overflows u64")
        if self.length == 0 or self.offset < payload_offset or end > region_bytes:
            raise InvalidArgument(
                f"slot bytes [{self.offset}, {end}) outside the region payload "
                f"[{payload_offset}, {region_bytes})")

    def _check_layers(self, max_layers: int | None) -> None:
        n = self.n_layers
        if n < 1 or n != len(self.layers):
            raise InvalidArgument(f"n_layers {n} but {len(self.layers)} layer ranges")
        if max_layers is not None and n > max_layers:
            raise InvalidArgument(f"n_layers {n} > the region's max_layers {max_layers}")
        prev_end = 0
        for i, (off, ln) in enumerate(self.layers):
            if type(off) is not int or type(ln) is not int or off < 0 or ln < 1:
                raise InvalidArgument(f"layer {i} range ({off!r}, {ln!r}) invalid")
            if off < prev_end or off + ln > self.length:
                raise InvalidArgument(
                    f"layer {i} bytes [{off}, {off + ln}) overlap the previous layer or "
                    f"leave the slot [0, {self.length})")
            prev_end = off + ln
        self._check_dense_shape()

    def _check_dense_shape(self) -> None:
        h, t, d = self.n_kv_heads, self.n_tokens, self.head_dim
        if self.layout != "dense" or not (h and t and d):
            return
        want = 2 * h * t * d * DTYPE_BYTES[self.dtype]
        bad = [i for i, r in enumerate(self.layers) if r.length != want]
        if bad:
            raise InvalidArgument(
                f"dense layer {bad[0]} has {self.layers[bad[0]].length} bytes; K+V of "
                f"{h} heads x {t} tokens x {d} x {self.dtype} is {want}")

    def digest(self) -> int:
        """xxh3_64 over every field but the region name (the epoch stands for it) and the
        secret (compared on its own, in constant time): the owner stores it in the slot
        header, the reader compares."""
        head = struct.pack("<QIQQQBBIIIIBB", self.epoch, self.slot, self.offset, self.length,
                           self.generation, LAYOUTS[self.layout], DTYPES[self.dtype],
                           self.n_layers, self.n_tokens, self.n_kv_heads, self.head_dim,
                           self.checksums, self.on_device)
        body = b"".join(struct.pack("<QQ", *r) for r in self.layers)
        return xxhash.xxh3_64_intdigest(head + body)
