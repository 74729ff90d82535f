"""Child-process bodies for the transport tests (multiprocessing 'spawn' needs them
importable). They import transport only, never torch, so each child starts fast."""

from __future__ import annotations

import gc
import os
import threading
import time
from multiprocessing.connection import Connection

import xxhash

from engine.errors import DeadlineExceeded, HybridError
from transport.descriptor import KvDescriptor
from transport.reader import KvReader


def pattern(layer: int, n: int, salt: int = 0) -> bytes:
    """Deterministic, layer-specific bytes (not a constant fill, so offsets matter)."""
    seed = (layer * 131 + salt * 7 + 1) % 251
    return bytes((seed + i * 17) % 256 for i in range(256)) * (n // 256) + bytes(n % 256)


def follow_layers(name: str, raw_desc: bytes, conn: Connection, timeout_s: float) -> None:
    """Read every layer as it becomes ready; after each, report (layer, bytes, time)
    so the writer can check it was consumed before the next layer existed."""
    desc = KvDescriptor.from_bytes(raw_desc)
    try:
        with KvReader.open(name) as reader:
            for layer in range(desc.n_layers):
                data = reader.read_layer(desc, layer, timeout_s)
                conn.send(("layer", layer, data, time.monotonic()))
            conn.send(("first_token", reader.wait_first_token(desc, timeout_s)))
    except HybridError as e:
        conn.send(("error", type(e).__name__, str(e)))


def read_then_hang(name: str, raw_desc: bytes, conn: Connection) -> None:
    """Read layer 0, then wait for layer 1 (never written) while asking the owner to
    renew the lease every ~50 ms, as a decode service would. Killed by the test."""
    desc = KvDescriptor.from_bytes(raw_desc)
    reader = KvReader.open(name)
    conn.send(("layer0", reader.read_layer(desc, 0, 5.0)))
    while True:
        try:
            reader.read_layer(desc, 1, 0.05)
        except DeadlineExceeded:
            conn.send(("renew",))


def cycle_reader(name: str, conn: Connection) -> None:
    """Serve the owner's cycle test: receive a descriptor, read all layers, answer
    with their xxh3 digests; None ends it."""
    with KvReader.open(name) as reader:
        while (raw := conn.recv()) is not None:
            desc = KvDescriptor.from_bytes(raw)
            try:
                digests = [xxhash.xxh3_64_intdigest(reader.read_layer(desc, i, 5.0))
                           for i in range(desc.n_layers)]
                conn.send(("ok", digests))
            except HybridError as e:
                conn.send(("error", f"{type(e).__name__}: {e}"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def owner_cycles(n_cycles: int, warmup: int, conn: Connection) -> None:
    """The owner of the leak test, in its own process (no torch: a small, honest RSS).
    Spawns nothing itself: the reader process is passed descriptors through `conn`."""
    import multiprocessing as mp

    from transport.region import KvRegion

    region = KvRegion.create(1 << 20, 8, 4, 5.0, name_prefix="hkvtest-cycles",
                             cuda_register=False)
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    reader = ctx.Process(target=cycle_reader, args=(region.name, there), daemon=True)
    reader.start()
    rss0 = objs0 = failures = 0
    try:
        for i in range(n_cycles):
            if i == warmup:
                rss0, objs0 = rss_bytes(), len(gc.get_objects())
            desc = region.alloc(2 * 4096 + 2 * (i % 7) * 256, 2, checksums=True)
            want = []
            for layer in range(2):
                data = pattern(layer, desc.layers[layer].length, salt=i)
                region.write_layer(desc, layer, data)
                region.mark_ready(desc, layer)
                want.append(xxhash.xxh3_64_intdigest(data))
            here.send(desc.to_bytes())
            reply = here.recv()
            failures += reply != ("ok", want)
            region.free(desc)
        here.send(None)
        conn.send({"rss0": rss0, "rss1": rss_bytes(), "failures": failures,
                   "objects": len(gc.get_objects()) - objs0,
                   "stats": region.stats(), "path": region.path})
    finally:
        reader.join(5)
        region.close()


def stream_owner(n_layers: int, layer_bytes: int, chunk_bytes: int, delay_s: float,
                 conn: Connection) -> None:
    """Owner running the fetch server half: a producer thread fills layers slowly
    while `iter_chunks` streams each one as it becomes ready; chunks go to the parent
    serialized, as gRPC would carry them."""
    from transport.fetch import iter_chunks
    from transport.region import KvRegion

    with KvRegion.create(n_layers * layer_bytes + (1 << 16), 2, n_layers, 5.0,
                         name_prefix="hkvtest-fetch", cuda_register=False) as region:
        desc = region.alloc(n_layers * layer_bytes, n_layers, checksums=True)
        conn.send(desc.to_bytes())

        def produce() -> None:
            for layer in range(n_layers):
                time.sleep(delay_s)
                region.write_layer(desc, layer, pattern(layer, layer_bytes))
                region.mark_ready(desc, layer)
            region.set_first_token(desc, 4242)

        producer = threading.Thread(target=produce)
        producer.start()
        for chunk in iter_chunks(region, desc, chunk_bytes, timeout_s=5.0):
            conn.send((chunk.SerializeToString(), time.monotonic()))
        conn.send(None)
        producer.join()


def seqlock_reader(name: str, conn: Connection) -> None:
    """Read whatever descriptor arrives, however stale: every read must either return
    exactly that generation's bytes or fail with Aborted; never torn or foreign data."""
    from engine.errors import Aborted
    counts = {"ok": 0, "aborted": 0, "aborted_mid_copy": 0, "torn": 0}
    with KvReader.open(name) as reader:
        while (msg := conn.recv()) is not None:
            raw, hold = msg
            desc = KvDescriptor.from_bytes(raw)
            try:
                data = reader.read_layer(desc, 0, 1.0)
                ok = data == pattern(0, len(data), salt=desc.generation)
                counts["ok" if ok else "torn"] += 1
            except Aborted as e:
                counts["aborted_mid_copy" if "while reading" in str(e) else "aborted"] += 1
            if hold:
                conn.send("read")
    conn.send(counts)
