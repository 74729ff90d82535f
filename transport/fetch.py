"""The fetch fallback for separate hosts: a slot's bytes as a stream of KvChunk messages.

Server half (`iter_chunks`) runs in the owner process inside the FetchKv servicer: it
yields each layer in chunks as soon as that layer is ready (same readiness, generation
and checksum checks as a shared-memory reader) and renews the lease as it goes (an open
stream is a live consumer). The final chunk of the last layer carries first_token.
Client half (`FetchAssembler`) rebuilds whole layers and refuses any gap, overlap,
reordering or truncation with DataLoss. No grpc import here: the servicer wires it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from engine.errors import DataLoss, InvalidArgument
from protos import hybrid_pb2 as pb
from transport.descriptor import KvDescriptor
from transport.reader import KvReader

DEFAULT_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 64 << 20  # well under gRPC's message limits once configured for it


def iter_chunks(region: Any, desc: KvDescriptor, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                timeout_s: float = 30.0, *, renew: bool = True) -> Iterator[pb.KvChunk]:
    """Yield `desc`'s layers in order, each as chunks of at most `chunk_bytes`
    (0 = default), waiting up to `timeout_s` per layer and for the first token.
    Raises the reader's errors (Aborted, Unavailable, DataLoss, DeadlineExceeded)."""
    chunk_bytes = chunk_bytes or DEFAULT_CHUNK_BYTES
    if type(chunk_bytes) is not int or not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise InvalidArgument(f"chunk_bytes={chunk_bytes!r}: expected 1..{MAX_CHUNK_BYTES}")
    reader = KvReader.attach(region)
    try:
        reader.validate(desc)
        last = desc.n_layers - 1
        for layer in range(desc.n_layers):
            data = memoryview(reader.read_layer(desc, layer, timeout_s))
            if renew:
                region.renew(desc)
            first_token = reader.wait_first_token(desc, timeout_s) if layer == last else None
            yield from _layer_chunks(layer, data, chunk_bytes, first_token)
    finally:
        reader.close()


def _layer_chunks(layer: int, data: memoryview, chunk_bytes: int,
                  first_token: int | None) -> Iterator[pb.KvChunk]:
    n = len(data)
    for off in range(0, n, chunk_bytes):
        end = min(off + chunk_bytes, n)
        msg = pb.KvChunk(layer=layer, offset=off, data=bytes(data[off:end]),
                         layer_done=end == n)
        if end == n and first_token is not None:
            msg.first_token = first_token
        yield msg


class FetchAssembler:
    """Client half: feed KvChunk messages in stream order; whole layers come out.

        asm = FetchAssembler(desc)
        for chunk in stream:
            for layer, data in asm.feed(chunk):
                session.ingest_layer(layer, memoryview(data))
        first_token = asm.finish()
    """

    def __init__(self, desc: KvDescriptor) -> None:
        self._lengths = [r.length for r in desc.layers]
        if not self._lengths:
            raise InvalidArgument("descriptor has no layers")
        self._layer = 0
        self._buf = bytearray(self._lengths[0])
        self._filled = 0
        self.first_token: int | None = None

    @property
    def done(self) -> bool:
        return self._layer == len(self._lengths)

    def feed(self, chunk: pb.KvChunk) -> list[tuple[int, bytes]]:
        """Append one chunk; returns the layers it completed ([] or [(layer, bytes)])."""
        if self.done:
            raise DataLoss(f"chunk for layer {chunk.layer} after the last layer")
        want, n = self._lengths[self._layer], len(chunk.data)
        if chunk.layer != self._layer or chunk.offset != self._filled:
            raise DataLoss(f"expected layer {self._layer} offset {self._filled}, got layer "
                           f"{chunk.layer} offset {chunk.offset}")
        end = self._filled + n
        if end > want or (n == 0 and not chunk.layer_done) or chunk.layer_done != (end == want):
            raise DataLoss(f"layer {self._layer}: chunk [{chunk.offset}, {end}) "
                           f"layer_done={chunk.layer_done} does not fit its {want} bytes")
        last = self._layer == len(self._lengths) - 1 and end == want
        if chunk.HasField("first_token") != last:
            raise DataLoss("first_token must come on the final chunk of the last layer, only")
        self._buf[self._filled:end] = chunk.data
        self._filled = end
        if end < want:
            return []
        if last:
            self.first_token = chunk.first_token
        return [self._next_layer()]

    def _next_layer(self) -> tuple[int, bytes]:
        out = (self._layer, bytes(self._buf))
        self._layer += 1
        if not self.done:
            self._buf = bytearray(self._lengths[self._layer])
            self._filled = 0
        return out

    def finish(self) -> int:
        """The first token, once every layer arrived; DataLoss for a truncated stream."""
        if not self.done or self.first_token is None:
            raise DataLoss(f"stream ended at layer {self._layer} byte {self._filled} of "
                           f"{len(self._lengths)} layers")
        return self.first_token


def assemble(desc: KvDescriptor, chunks: Iterable[pb.KvChunk]) -> tuple[list[bytes], int]:
    """Convenience: every layer and the first token from a finished stream."""
    asm = FetchAssembler(desc)
    layers = [data for chunk in chunks for _, data in asm.feed(chunk)]
    return layers, asm.finish()
