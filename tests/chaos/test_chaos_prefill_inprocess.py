"""Chaos suite, the prefill servicer in process (issue 13, findings 4, 9 and expired
handles of 1). Slots per client (finding 4: "64 one-token prefills plus RenewLease every
10 s locked out all other traffic"): a client is the peer host gRPC reports, and every
loopback connection is 127.0.0.1, so the PrefillServicer is driven directly with fake
contexts whose peer() names different hosts. A cancel that lands twice (finding 9) needs
the handler's task in hand. A real tiny model, a real region and the real prefill loop;
only the gRPC transport is left out."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import weakref

import grpc
import pytest

from engine import errors
from engine.loader import load_model
from protos import hybrid_pb2 as pb
from tests.chaos.chaos_util import INVALID_HANDLE
from transport import servekit as kit
from transport.region import KvRegion

MAX_SLOTS = 8          # default cap per client: half, 4
SLOT_WAIT_S = 0.3
A, A2 = "ipv4:10.0.0.1:5", "ipv4:10.0.0.1:7"   # one host, two connections
B = "ipv4:10.0.0.2:6"
C = "ipv4:10.0.0.3:9"
V6, V6B = "ipv6:[fd00::1]:5", "ipv6:[fd00::1]:6"


class Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class FakeContext:
    """What the servicer uses of grpc.aio.ServicerContext."""

    def __init__(self, peer: str) -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer

    def time_remaining(self) -> float:
        return 30.0

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Abort(code, details)


@pytest.fixture(scope="module")
def lm():
    return load_model("synthetic:tiny-gpt2", "cpu", "float32")


@pytest.fixture
def servicer(lm):
    from gpu_service.runner import PrefillRunner
    from gpu_service.servicer import PrefillServicer

    region = KvRegion.create(8 << 20, MAX_SLOTS, lm.config.n_layers, 30.0)
    svc = PrefillServicer(PrefillRunner(lm, region), region, kit.Admission(64, 64), lease_s=30.0,
                          slot_wait_s=SLOT_WAIT_S)
    yield svc
    svc.close()
    region.close()


async def _prefill(svc, peer: str, ids=(7,)) -> pb.KvHandle:
    msgs = [m async for m in svc.Prefill(
        pb.PrefillRequest(prompt_ids=list(ids), max_new_tokens=2), FakeContext(peer))]
    assert msgs[-1].HasField("done")
    return msgs[0].handle


async def _timed(coro) -> tuple[object, float]:
    t0 = time.monotonic()
    try:
        res = await coro
    except Abort as e:
        res = e
    return res, time.monotonic() - t0


def test_finding04_one_client_holding_its_share_does_not_lock_out_another(servicer):
    """Client A fires 8 one-token prefills at a region of 8 slots and keeps renewing the
    leases of what it got (the issue's lock-out). It gets its share (half the slots);
    the rest of its requests, and one more from another connection of the same host,
    wait --slot-wait-s and get RESOURCE_EXHAUSTED naming the per-client limit. Client B,
    another host, gets its slots at once meanwhile. A release gives A room again."""
    svc = servicer
    cap = MAX_SLOTS // 2
    assert svc.clients.cap == cap

    async def go():
        results = await asyncio.gather(*(_timed(_prefill(svc, A)) for _ in range(MAX_SLOTS)))
        held = [r for r, _ in results if isinstance(r, pb.KvHandle)]
        refused = [(r, s) for r, s in results if isinstance(r, Abort)]
        assert len(held) == cap and len(refused) == MAX_SLOTS - cap
        for r, secs in refused:
            assert r.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "per client" in r.details
            assert SLOT_WAIT_S * 0.9 <= secs < SLOT_WAIT_S + 2

        async def renew_forever():  # A keeps its slots alive, as in the issue
            while True:
                for h in held:
                    await svc.RenewLease(pb.LeaseRequest(kv=h.kv), FakeContext(A))
                await asyncio.sleep(0.05)

        renewer = asyncio.create_task(renew_forever())
        try:
            r, secs = await _timed(_prefill(svc, A2))  # same host, another connection
            assert isinstance(r, Abort) and r.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            b_results = await asyncio.gather(*(_timed(_prefill(svc, B)) for _ in range(cap)))
            for r, secs in b_results:
                assert isinstance(r, pb.KvHandle), r
                assert secs < SLOT_WAIT_S, f"client B waited {secs:.2f} s behind client A"
            m = svc.metrics()
            assert (m["clients_holding"], m["slots_in_use"]) == (2, MAX_SLOTS)
            await svc.Release(pb.LeaseRequest(kv=held[0].kv), FakeContext(A))
            r, secs = await _timed(_prefill(svc, A2))  # A has room again, at once
            assert isinstance(r, pb.KvHandle) and secs < SLOT_WAIT_S
            held[0] = r
        finally:
            renewer.cancel()
        for h in held:
            await svc.Release(pb.LeaseRequest(kv=h.kv), FakeContext(A))
        for r, _ in b_results:
            await svc.Release(pb.LeaseRequest(kv=r.kv), FakeContext(B))

    asyncio.run(go())
    m = svc.metrics()
    assert (m["clients_holding"], m["slots_in_use"]) == (0, 0)
    assert svc._holders == {}


def test_finding04_share_comes_back_when_alloc_reaps_expired_slots(servicer):
    """A client that abandoned its share (never generated, leases ran out) gets it back
    when the region reaps those slots, whichever path reaps them: here the reaping a full
    alloc does itself, which used to bypass the share, so the client stayed locked out
    for good. The lease clock is advanced by hand."""
    svc = servicer
    cap = MAX_SLOTS // 2
    clock = [1000.0]
    svc.region.clock = lambda: clock[0]

    async def go():
        a = [await _prefill(svc, A) for _ in range(cap)]     # A's whole share, abandoned
        b = [await _prefill(svc, B) for _ in range(cap)]     # the region is full now
        assert svc.clients.held[svc_client(A)] == cap
        clock[0] += 60.0                                      # every lease (30 s) ran out
        fresh = await _prefill(svc, C)   # the full alloc reaps all expired slots itself
        assert svc_client(A) not in svc.clients.held
        r, secs = await _timed(_prefill(svc, A))  # A's share is back, at once
        assert isinstance(r, pb.KvHandle) and secs < SLOT_WAIT_S
        for h in (fresh, r):
            await svc.Release(pb.LeaseRequest(kv=h.kv), FakeContext(C))
        return a, b

    asyncio.run(go())
    m = svc.metrics()
    assert (m["clients_holding"], m["slots_in_use"]) == (0, 0) and svc._holders == {}


def svc_client(peer: str) -> str:
    from gpu_service.client_slots import client_of

    return client_of(peer)


def test_finding04_ipv6_peer_is_one_client_and_failed_prefills_free_the_share(servicer):
    """The client is the host, whatever the port (IPv6 too); a prefill that fails after
    its slot was allocated (a cancel mid-prefill) gives the client's share back."""
    svc = servicer
    cap = MAX_SLOTS // 2

    async def go():
        held = [await _prefill(svc, V6 if i % 2 else V6B) for i in range(cap)]
        r, _ = await _timed(_prefill(svc, V6))
        assert isinstance(r, Abort) and r.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        for h in held:
            await svc.Release(pb.LeaseRequest(kv=h.kv), FakeContext(V6))
        # cancelled after its handle: the slot and the client's share go back
        svc.loop.pause()
        gen = svc.Prefill(pb.PrefillRequest(prompt_ids=[1, 2, 3], max_new_tokens=2),
                          FakeContext(V6))
        first = await gen.__anext__()
        assert first.HasField("handle") and svc.metrics()["clients_holding"] == 1
        task = asyncio.create_task(gen.__anext__())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        svc.loop.resume()

    asyncio.run(go())
    m = svc.metrics()
    assert (m["clients_holding"], m["slots_in_use"]) == (0, 0)


def test_finding01_expired_handle_is_the_same_invalid_handle(servicer):
    """A handle whose lease ran out (the reaper freed it) answers RenewLease and FetchKv
    like any forged one: ABORTED INVALID_HANDLE (Release stays idempotent for the
    holder, ABORTED for anyone else); the reaper gave the client's share back too."""
    svc = servicer

    async def go():
        h = await _prefill(svc, B, ids=(3, 4))
        svc.region.clock = lambda: time.monotonic() + 3600  # every lease has run out
        reaper = asyncio.create_task(svc.reap_leases(0.01))
        while svc.metrics()["slots_in_use"]:
            await asyncio.sleep(0.01)
        reaper.cancel()
        ctx = FakeContext(B)
        with pytest.raises(Abort) as e:
            await svc.RenewLease(pb.LeaseRequest(kv=h.kv), ctx)
        assert (e.value.code, e.value.details) == (grpc.StatusCode.ABORTED, INVALID_HANDLE)
        await svc.Release(pb.LeaseRequest(kv=h.kv), ctx)  # its holder may: idempotent
        forged = pb.KvDescriptor()
        forged.CopyFrom(h.kv)
        forged.secret = bytes(16)
        with pytest.raises(Abort) as e:  # anyone else may not
            await svc.Release(pb.LeaseRequest(kv=forged), ctx)
        assert (e.value.code, e.value.details) == (grpc.StatusCode.ABORTED, INVALID_HANDLE)
        with pytest.raises(Abort) as e:
            async for _ in svc.FetchKv(pb.FetchKvRequest(kv=h.kv), ctx):
                pytest.fail("a byte of an expired slot")
        assert (e.value.code, e.value.details) == (grpc.StatusCode.ABORTED, INVALID_HANDLE)

    asyncio.run(go())
    m = svc.metrics()
    assert (m["clients_holding"], m["slots_in_use"], m["slots_reaped"]) == (0, 0, 1)


def test_client_of_names_the_host():
    from gpu_service.client_slots import client_of

    assert client_of(A) == client_of(A2) != client_of(B)
    assert client_of(V6) == client_of(V6B) == "ipv6:[fd00::1]"
    with pytest.raises(errors.ResourceExhausted):
        from gpu_service.client_slots import ClientSlots

        async def full():
            slots = ClientSlots(1, 0.05)
            await slots.acquire("x")
            await slots.acquire("x")

        asyncio.run(full())


def test_finding09_cancel_twice_mid_prefill_logs_one_info_line(servicer, caplog):
    """Issue 13, finding 9: a client cancel mid-prefill logged "Future exception was never
    retrieved ... Cancelled" with a traceback. It happens when the handler is cancelled
    again while it waits for the prefill loop to let go of the slot (gRPC may cancel a
    handler's task more than once; server shutdown cancels it again): the loop's outcome
    future was then never looked at. Each of 8 such requests, cancelled twice mid-layer,
    leaves exactly one INFO line with status=CANCELLED, no 'never retrieved' and no
    traceback from asyncio, and its slot and client share back."""
    svc = servicer
    svc.runner.fault_layer_delay_s = 0.3  # the loop lets go of a slot at its next layer
    rids = [f"twice-{i}" for i in range(8)]
    outcomes: list[weakref.ref] = []  # the loop's outcome futures, to see them collected
    submit = svc.loop.submit_async

    def watched(*args, **kw):
        job, fut = submit(*args, **kw)
        outcomes.append(weakref.ref(fut))
        return job, fut

    svc.loop.submit_async = watched

    async def go():
        gens = [svc.Prefill(pb.PrefillRequest(request_id=rid, prompt_ids=[1, 2, 3 + i],
                                              max_new_tokens=2), FakeContext(f"ipv4:10.0.1.{i}:5"))
                for i, rid in enumerate(rids)]  # 8 clients: none at its share
        for g in gens:
            assert (await g.__anext__()).HasField("handle")
        tasks = [asyncio.create_task(g.__anext__()) for g in gens]
        while not svc.loop._running:  # the batch is computing its first layer
            await asyncio.sleep(0.01)
        for t in tasks:
            t.cancel()
        await asyncio.sleep(0.05)  # each handler now waits for the loop to let go ...
        for t in tasks:
            t.cancel()  # ... and is cancelled again
        for t in tasks:
            with pytest.raises(asyncio.CancelledError):
                await t
        for g in gens:
            await g.aclose()
        while svc.loop._running or svc.metrics()["slots_in_use"]:  # the loop settled them
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)

    with caplog.at_level(logging.INFO):
        asyncio.run(go())
        m = svc.metrics()
        svc.close()  # the loop thread's frame holds its last batch's jobs until it ends
        gc.collect()  # an unretrieved exception is reported when its future is collected
    assert len(outcomes) == len(rids) and not [r for r in outcomes if r() is not None]
    text = caplog.text
    assert "never retrieved" not in text and "Traceback" not in text, text
    for rid in rids:
        lines = [r for r in caplog.records if r.name == "hybrid.prefill"
                 and f"prefill id={rid} " in r.getMessage()]
        assert len(lines) == 1, (rid, [r.getMessage() for r in lines])
        assert lines[0].levelno == logging.INFO and "status=CANCELLED" in lines[0].getMessage()
    assert (m["clients_holding"], m["slots_in_use"]) == (0, 0)
