"""Server half of FetchKv: a slot's bytes as a stream of chunks, each layer as soon as
prefill marked it ready (for decoders on another host, without the shared region)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from protos import hybrid_pb2 as pb


def iter_chunks(region: Any, desc: Any, chunk_bytes: int, timeout_s: float) -> Iterator[pb.KvChunk]:
    """transport.fetch.iter_chunks when the transport package has it; else the same
    protocol over a reader attached to our own mapping: layers in order, each split into
    `chunk_bytes` pieces (the last one with layer_done), then a message with the first
    token. Every read waits on the ready flag and checks the generation around it."""
    try:
        from transport.fetch import iter_chunks as transport_iter_chunks
    except ImportError:
        return _iter_chunks(region, desc, chunk_bytes, timeout_s)
    return transport_iter_chunks(region, desc, chunk_bytes, timeout_s)


def _iter_chunks(region: Any, desc: Any, chunk_bytes: int, timeout_s: float) -> Iterator[pb.KvChunk]:
    from transport.reader import KvReader

    reader = KvReader.attach(region)
    for layer in range(desc.n_layers):
        data = memoryview(reader.read_layer(desc, layer, timeout_s))
        for off in range(0, len(data), chunk_bytes):
            end = min(off + chunk_bytes, len(data))
            yield pb.KvChunk(layer=layer, offset=off, data=bytes(data[off:end]),
                             layer_done=end == len(data))
    yield pb.KvChunk(layer=desc.n_layers, first_token=reader.wait_first_token(desc, timeout_s))
