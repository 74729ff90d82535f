"""Where a request's KV comes from: the shared region (same host) or the FetchKv stream
(another host). Both yield whole layers in order as prefill marks them ready, then the
first token."""

from __future__ import annotations

import asyncio
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from typing import Any

from engine.errors import DeadlineExceeded
from protos import hybrid_pb2 as pb
from transport.reader import ReaderPool


class IngestStats:
    """What one request's ingest cost: bytes, time waiting on prefill."""

    def __init__(self) -> None:
        self.bytes = 0
        self.wait_ms = 0.0


async def shm_layers(readers: ReaderPool, desc: Any, timeout_s: float, pool: Executor,
                     stats: IngestStats, stop: threading.Event
                     ) -> AsyncIterator[tuple[int, Any]]:
    """Yields (layer, bytes) from the mapped region; ends with (-1, first_token).
    `stop` (the request was cancelled) ends a wait within WAIT_SLICE_S."""
    loop = asyncio.get_running_loop()
    reader = await loop.run_in_executor(pool, readers.get, desc.region)
    for layer in range(desc.n_layers):
        t = time.perf_counter()
        data = await loop.run_in_executor(pool, _sliced, reader.read_layer, desc, layer,
                                          timeout_s, stop)
        stats.wait_ms += (time.perf_counter() - t) * 1e3
        stats.bytes += len(data)
        yield layer, data
    first = await loop.run_in_executor(pool, _sliced, _first_token, reader, desc, timeout_s, stop)
    yield -1, first


WAIT_SLICE_S = 0.25


def _first_token(reader: Any, desc: Any, timeout_s: float) -> int:
    return reader.wait_first_token(desc, timeout_s)


def wait_device_ready(reader: Any, desc: Any, timeout_s: float, stop: threading.Event) -> int:
    """An on-device slot: the first token (prefill publishes it once every layer's copy
    into its GPU mirror has completed), and every ready flag checked as a guard; no
    byte passes through host memory."""
    first = _sliced(_first_token, reader, desc, timeout_s, stop)
    for layer in range(desc.n_layers):
        reader.wait_layer(desc, layer, 0.0)  # DeadlineExceeded at once if one is not
    return first


def _sliced(wait: Any, a: Any, b: Any, timeout_s: float, stop: threading.Event) -> Any:
    """`wait(a, b, timeout)` in slices, so a pool thread blocked on a prefill that will
    never finish (killed, or the client gave up) is freed soon after `stop` is set."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            return wait(a, b, max(0.0, min(WAIT_SLICE_S, left)))
        except DeadlineExceeded:
            if stop.is_set() or time.monotonic() >= deadline:
                raise


async def grpc_layers(stub: Any, request_id: str, desc: Any, timeout_s: float,
                      stats: IngestStats) -> AsyncIterator[tuple[int, Any]]:
    """Same as shm_layers, over PrefillService.FetchKv; transport.fetch.FetchAssembler
    refuses gaps, reordering and truncation (DataLoss)."""
    from transport.fetch import FetchAssembler

    asm = FetchAssembler(desc)
    call = stub.FetchKv(pb.FetchKvRequest(request_id=request_id, kv=desc.to_proto()),
                        timeout=timeout_s)
    t = time.perf_counter()
    try:
        async for chunk in call:
            for layer, data in asm.feed(chunk):
                stats.wait_ms += (time.perf_counter() - t) * 1e3
                stats.bytes += len(data)
                yield layer, data
                t = time.perf_counter()
    finally:
        call.cancel()
    yield -1, asm.finish()


async def shm_into(readers: ReaderPool, desc: Any, buf: Any, timeout_s: float, pool: Executor,
                   stats: IngestStats, stop: threading.Event) -> int:
    """Every layer of the slot into `buf` (uint8, layer after layer, each as the slot
    holds it), verified, each as soon as prefill marks it ready; returns the first
    token. The copies run on `pool` threads (numpy releases the GIL)."""
    loop = asyncio.get_running_loop()
    reader = await loop.run_in_executor(pool, readers.get, desc.region)
    n = len(buf) // desc.n_layers
    for layer in range(desc.n_layers):
        t = time.perf_counter()
        part = buf[layer * n:(layer + 1) * n]
        await loop.run_in_executor(pool, _sliced, _into(reader, part), desc, layer, timeout_s, stop)
        stats.wait_ms += (time.perf_counter() - t) * 1e3
        stats.bytes += n
    return await loop.run_in_executor(pool, _sliced, _first_token, reader, desc, timeout_s, stop)


def _into(reader: Any, part: Any):
    return lambda desc, layer, timeout: reader.read_layer_into(desc, layer, part, timeout)


async def grpc_into(stub: Any, request_id: str, desc: Any, buf: Any, timeout_s: float,
                    stats: IngestStats) -> int:
    """shm_into over PrefillService.FetchKv (another host)."""
    import numpy as np

    n = len(buf) // desc.n_layers
    first = None
    async for layer, data in grpc_layers(stub, request_id, desc, timeout_s, stats):
        if layer < 0:
            first = data
            break
        np.copyto(buf[layer * n:(layer + 1) * n], np.frombuffer(data, np.uint8))
    return int(first)


class KvReceiver(ABC):
    """The decode side of the KV hand-over (the seam sglang's KvReceiver and vLLM's KV
    connectors have): one request's KV, layer by layer as prefill marks it ready, then
    the first token. The request's transport field picks the implementation in one
    place (DecodeServicer._receiver); everything after works on this interface."""

    name = ""

    def __init__(self, desc: Any, timeout_s: float, stats: IngestStats) -> None:
        self.desc, self.timeout_s, self.stats = desc, timeout_s, stats

    @abstractmethod
    def layers(self) -> AsyncIterator[tuple[int, Any]]:
        """(layer, bytes) in order 0..n-1, then (-1, first token). aclose() ends it."""

    @abstractmethod
    async def into(self, buf: Any) -> int:
        """Every layer into `buf` (uint8, layer after layer); returns the first token."""


class ShmReceiver(KvReceiver):
    """Same host: the prefill service's shared region, read-only, futex waits."""

    name = "shm"

    def __init__(self, desc, timeout_s, stats, *, readers: ReaderPool, pool: Executor,
                 stop: threading.Event) -> None:
        super().__init__(desc, timeout_s, stats)
        self.readers, self.pool, self.stop = readers, pool, stop

    def layers(self):
        return shm_layers(self.readers, self.desc, self.timeout_s, self.pool, self.stats,
                          self.stop)

    async def into(self, buf: Any) -> int:
        return await shm_into(self.readers, self.desc, buf, self.timeout_s, self.pool,
                              self.stats, self.stop)


class FetchReceiver(KvReceiver):
    """Another host: the same descriptor served by PrefillService.FetchKv."""

    name = "grpc"

    def __init__(self, desc, timeout_s, stats, *, stub: Any, request_id: str) -> None:
        super().__init__(desc, timeout_s, stats)
        self.stub, self.request_id = stub, request_id

    def layers(self):
        return grpc_layers(self.stub, self.request_id, self.desc, self.timeout_s, self.stats)

    async def into(self, buf: Any) -> int:
        return await grpc_into(self.stub, self.request_id, self.desc, buf, self.timeout_s,
                               self.stats)
