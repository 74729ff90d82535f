"""The fetch fallback: iter_chunks (server half) -> KvChunk stream -> FetchAssembler."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from engine.errors import Aborted, DataLoss, DeadlineExceeded, InvalidArgument, Unavailable
from protos import hybrid_pb2 as pb
from tests import transport_procs as procs
from transport.descriptor import KvDescriptor
from transport.fetch import FetchAssembler, assemble, iter_chunks
from transport.region import KvRegion


@pytest.fixture
def region():
    r = KvRegion.create(1 << 20, 4, 4, 0.3, name_prefix="hkvtest-fetch", cuda_register=False)
    yield r
    r.close()


def _ready(region, sizes, token=11):
    desc = region.alloc(sum(sizes), len(sizes), layer_bytes=sizes, checksums=True)
    for layer, n in enumerate(sizes):
        region.write_layer(desc, layer, procs.pattern(layer, n))
        region.mark_ready(desc, layer)
    region.set_first_token(desc, token)
    return desc


@pytest.mark.parametrize("chunk", [1000, 4096, 10_000, 0])
def test_round_trip_any_chunk_size(region, chunk):
    sizes = [10_000, 4096, 1]
    desc = _ready(region, sizes)
    chunks = list(iter_chunks(region, desc, chunk))
    step = chunk or 1 << 20
    assert len(chunks) == sum(-(-n // step) for n in sizes)
    assert all(len(c.data) <= step for c in chunks)
    assert [c.HasField("first_token") for c in chunks] == [False] * (len(chunks) - 1) + [True]
    layers, token = assemble(desc, chunks)
    assert layers == [procs.pattern(i, n) for i, n in enumerate(sizes)] and token == 11


def test_layers_stream_while_produced_across_processes():
    """Owner process streams a slowly produced slot; this process assembles. Layer l's
    chunks must arrive before the producer has written layer l+1 (about delay later)."""
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    n_layers, nbytes, delay = 4, 300_000, 0.15
    child = ctx.Process(target=procs.stream_owner, args=(n_layers, nbytes, 128 << 10, delay, there))
    child.start()
    assert here.poll(10)
    desc = KvDescriptor.from_bytes(here.recv())
    asm, done_at = FetchAssembler(desc), {}
    while (item := here.recv()) is not None:
        raw, sent = item
        chunk = pb.KvChunk.FromString(raw)
        for layer, data in asm.feed(chunk):
            assert data == procs.pattern(layer, nbytes)
            done_at[layer] = sent
    child.join(10)
    assert asm.finish() == 4242 and sorted(done_at) == list(range(n_layers))
    gaps = [done_at[i + 1] - done_at[i] for i in range(n_layers - 1)]
    assert min(gaps) > delay / 2, f"layers were not streamed as produced: {gaps}"


def test_stream_renews_lease_while_waiting(region):
    desc = region.alloc(2 * 4096, 2)
    region.write_layer(desc, 0, bytes(4096))
    region.mark_ready(desc, 0)
    it = iter_chunks(region, desc, 4096, timeout_s=2.0)
    now = time.monotonic()
    region.clock = lambda: now + shift[0]  # lease time advanced by hand, not slept
    shift = [0.2]  # lease 0.3 s from alloc
    next(it)  # layer 0 streamed: the open stream renewed the lease
    shift[0] = 0.4  # past the original expiry
    assert region.reap_expired() == []
    region.write_layer(desc, 1, bytes(4096))
    region.mark_ready(desc, 1)
    region.set_first_token(desc, 3)
    assert next(it).first_token == 3


def test_stream_errors_propagate(region):
    desc = region.alloc(2 * 4096, 2)
    region.write_layer(desc, 0, bytes(4096))
    region.mark_ready(desc, 0)
    it = iter_chunks(region, desc, 4096, timeout_s=0.05)
    next(it)
    with pytest.raises(DeadlineExceeded):
        next(it)
    region.mark_failed(desc, "prefill cancelled")
    with pytest.raises(Unavailable, match="prefill cancelled"):
        next(iter_chunks(region, desc, 4096, timeout_s=0.05))
    region.free(desc)
    with pytest.raises(Aborted):
        next(iter_chunks(region, desc, 4096, timeout_s=0.05))
    with pytest.raises(InvalidArgument):
        next(iter_chunks(region, desc, -1))


def _chunks(region, sizes=(5000, 3000), chunk=2000):
    desc = _ready(region, list(sizes))
    return desc, list(iter_chunks(region, desc, chunk))


def _copy(c, **kw):
    m = pb.KvChunk()
    m.CopyFrom(c)
    for k, v in kw.items():
        if v is None:
            m.ClearField(k)
        else:
            setattr(m, k, v)
    return m


@pytest.mark.parametrize("mutate", [
    lambda cs: cs[:2] + cs[3:],                            # gap inside layer 0
    lambda cs: [cs[1]] + cs[:1] + cs[2:],                  # reordered
    lambda cs: cs[:4] + cs[3:],                            # duplicate (overlap)
    lambda cs: cs[:3] + cs[4:],                            # missing a whole layer's start
    lambda cs: [_copy(cs[0], data=cs[0].data + b"x")] + cs[1:],   # longer than announced
    lambda cs: cs[:2] + [_copy(cs[2], layer_done=False)] + cs[3:],
    lambda cs: cs[:-1] + [_copy(cs[-1], first_token=None)],        # first token missing
    lambda cs: [_copy(cs[0], first_token=1)] + cs[1:],             # first token early
    lambda cs: cs + [cs[-1]],                                       # extra after the end
    lambda cs: cs[:-1],                                             # truncated
])
def test_assembler_refuses_damaged_streams(region, mutate):
    desc, chunks = _chunks(region)
    with pytest.raises(DataLoss):
        assemble(desc, mutate(chunks))


def test_assembler_yields_each_layer_once_complete(region):
    desc, chunks = _chunks(region)
    asm = FetchAssembler(desc)
    got = [asm.feed(c) for c in chunks]
    assert [len(g) for g in got] == [0, 0, 1, 0, 1]
    assert not asm.done or asm.finish() == 11
    assert asm.done and asm.first_token == 11


def test_fetch_from_a_closed_region_is_unavailable():
    r = KvRegion.create(1 << 16, 1, 1, 1.0, name_prefix="hkvtest-fetch", cuda_register=False)
    desc = r.alloc(4096, 1)
    r.close()
    with pytest.raises(Unavailable, match="closed"):
        next(iter_chunks(r, desc))
