"""Fault table of the service pair: bad inputs get their specific status, cancellation and
dead peers free slots, a dead prefill gives UNAVAILABLE within the deadline, SIGTERM
drains. Real processes on loopback, synthetic tiny GPT-2 (256 positions), 1.5 s lease."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest

from client.api import HybridClient
from client.launch import ServicePair, free_port, spawn, stop, wait_serving
from client.remote import run_remote
from engine import errors
from engine.sampling import SamplingParams
from protos import hybrid_pb2 as pb
from protos import hybrid_pb2_grpc as pbg
from tests.services_util import counters, raw_stubs, slots_in_use, wait_until

MODEL = "synthetic:tiny-gpt2"
LEASE_S = 1.5
TOKEN_DELAY_MS = 20
C = grpc.StatusCode


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    logs = str(tmp_path_factory.mktemp("logs"))
    # 20 ms a token: a cancel after 3 of 250 tokens must land mid-stream even on a slow
    # machine (undelayed, the tiny model finished all 250 first and CI saw no cancel).
    with ServicePair(model=MODEL, device="cpu", log_dir=logs,
                     prefill_args=["--lease-s", str(LEASE_S)],
                     decode_env={"HYBRID_FAULT_TOKEN_DELAY_MS": str(TOKEN_DELAY_MS)}) as p:
        yield p


@pytest.fixture(scope="module")
def stubs(pair):
    with raw_stubs(pair) as both:
        yield both


def _prefill(stub, **kw) -> tuple[pb.KvHandle, pb.PrefillDone]:
    msgs = list(stub.Prefill(pb.PrefillRequest(**kw), timeout=10))
    return msgs[0].handle, msgs[-1].done


def _code(fn) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as e:
        return e.code()
    return C.OK


PREFILL_BAD = {
    "empty prompt": (dict(), C.INVALID_ARGUMENT),
    "id outside vocab": (dict(prompt_ids=[5, 10_000]), C.INVALID_ARGUMENT),
    "too many tokens": (dict(prompt_ids=[1, 2], max_new_tokens=10_000), C.INVALID_ARGUMENT),
    "unknown layout": (dict(prompt_ids=[1, 2], layout=9), C.INVALID_ARGUMENT),
    "negative temperature": (dict(prompt_ids=[1], sampling=pb.SamplingParams(temperature=-1)),
                             C.INVALID_ARGUMENT),
    "top_p > 1": (dict(prompt_ids=[1], sampling=pb.SamplingParams(top_p=1.5)), C.INVALID_ARGUMENT),
    "fingerprint mismatch": (dict(prompt_ids=[1], expected_fingerprint="00" * 16),
                             C.FAILED_PRECONDITION),
}


@pytest.mark.parametrize("case", PREFILL_BAD)
def test_prefill_bad_input(stubs, pair, case):
    kw, want = PREFILL_BAD[case]
    assert _code(lambda: _prefill(stubs[0], **kw)) == want
    assert slots_in_use(pair.prefill) == 0


def test_prefill_slot_dtype_follows_the_decoder(stubs, pair):
    """The client passes the decoder's dtype in PrefillRequest.kv_dtype."""
    def prefill(dtype):
        msgs = list(stubs[0].Prefill(pb.PrefillRequest(prompt_ids=[1, 2, 3, 4], kv_dtype=dtype),
                                     timeout=10))
        stubs[0].Release(pb.LeaseRequest(kv=msgs[0].handle.kv), timeout=5)
        return msgs[0].handle.kv

    fp32, fp16 = prefill(pb.DTYPE_FP32), prefill(pb.DTYPE_FP16)
    assert (fp32.dtype, fp16.dtype) == (pb.DTYPE_FP32, pb.DTYPE_FP16)
    assert sum(r.length for r in fp32.layers) == 2 * sum(r.length for r in fp16.layers)
    with pytest.raises(grpc.RpcError) as e:
        prefill(9)
    assert e.value.code() == C.INVALID_ARGUMENT and "kv_dtype" in e.value.details()
    assert slots_in_use(pair.prefill) == 0


def _edit(h: pb.KvHandle, **kv) -> pb.KvHandle:
    h2 = pb.KvHandle()
    h2.CopyFrom(h)
    for k, v in kv.items():
        if k == "fingerprint":
            h2.weights_fingerprint = v
        else:
            setattr(h2.kv, k, v)
    return h2


GENERATE_BAD = {
    "missing handle": (lambda h: dict(max_new_tokens=4), C.INVALID_ARGUMENT),
    "zero max_new_tokens": (lambda h: dict(handle=h, max_new_tokens=0), C.INVALID_ARGUMENT),
    "too many tokens": (lambda h: dict(handle=h, max_new_tokens=10_000), C.INVALID_ARGUMENT),
    "fingerprint mismatch": (lambda h: dict(handle=_edit(h, fingerprint="ff" * 16),
                                            max_new_tokens=4), C.FAILED_PRECONDITION),
    "wrong layout": (lambda h: dict(handle=_edit(h, layout=pb.KV_LAYOUT_HBM), max_new_tokens=4),
                     C.INVALID_ARGUMENT),
    "wrong dtype": (lambda h: dict(handle=_edit(h, dtype=pb.DTYPE_FP16), max_new_tokens=4),
                    C.INVALID_ARGUMENT),
    "unknown transport": (lambda h: dict(handle=h, max_new_tokens=4, transport=7),
                          C.INVALID_ARGUMENT),
    "empty stop string": (lambda h: dict(handle=h, max_new_tokens=4, stop=["ok", ""]),
                          C.INVALID_ARGUMENT),
    "too many stop strings": (lambda h: dict(handle=h, max_new_tokens=4, stop=["x"] * 17),
                              C.INVALID_ARGUMENT),
    # not this decode's prefill: refused before any file is opened
    "unknown region": (lambda h: dict(handle=_edit(h, region="/hybrid-kv-1-1"), max_new_tokens=4),
                       C.INVALID_ARGUMENT),
    # not a live capability: the one answer that names no slot (issue 13)
    "slot out of range": (lambda h: dict(handle=_edit(h, slot=10**6), max_new_tokens=4),
                          C.ABORTED),
    "stale generation": (lambda h: dict(handle=_edit(h, generation=h.kv.generation + 5),
                                        max_new_tokens=4), C.ABORTED),
}


@pytest.mark.parametrize("case", GENERATE_BAD)
def test_generate_bad_input(stubs, pair, case):
    make, want = GENERATE_BAD[case]
    handle, _ = _prefill(stubs[0], prompt_ids=[3, 4, 5], max_new_tokens=4)
    req = pb.GenerateRequest(**make(handle))
    assert _code(lambda: list(stubs[1].Generate(req, timeout=10))) == want
    # The refused request's slot is released (or reaped within the lease), never leaked.
    assert wait_until(lambda: slots_in_use(pair.prefill) == 0, LEASE_S + 2)


def test_stale_handle_after_use(stubs, pair):
    handle, _ = _prefill(stubs[0], prompt_ids=[3, 4, 5], max_new_tokens=4)
    req = pb.GenerateRequest(handle=handle, max_new_tokens=4)
    assert len(list(stubs[1].Generate(req, timeout=10))) >= 2
    assert _code(lambda: list(stubs[1].Generate(req, timeout=10))) == C.ABORTED
    lease = pb.LeaseRequest(kv=handle.kv)
    assert _code(lambda: stubs[0].RenewLease(lease, timeout=5)) == C.ABORTED
    assert _code(lambda: stubs[0].Release(pb.LeaseRequest(), timeout=5)) == C.INVALID_ARGUMENT


@pytest.mark.parametrize("transport", [pb.KV_TRANSPORT_SHM, pb.KV_TRANSPORT_GRPC])
def test_corrupted_slot_is_data_loss(stubs, pair, transport):
    """Flip bytes of layer 0 in /dev/shm after prefill wrote it: the decoder (or FetchKv)
    reads exactly those bytes, so the per-layer checksum refuses them with DATA_LOSS.
    Also proves the KV really travels through the shared region."""
    handle, _ = _prefill(stubs[0], prompt_ids=[3, 4, 5, 6], max_new_tokens=4)
    kv = handle.kv
    with open(f"/dev/shm{kv.region}", "r+b") as f:
        f.seek(kv.offset + kv.layers[0].offset)
        data = f.read(16)
        f.seek(kv.offset + kv.layers[0].offset)
        f.write(bytes(b ^ 0xFF for b in data))
    req = pb.GenerateRequest(handle=handle, max_new_tokens=4, transport=transport)
    assert _code(lambda: list(stubs[1].Generate(req, timeout=10))) == C.DATA_LOSS
    assert wait_until(lambda: slots_in_use(pair.prefill) == 0, LEASE_S + 2)


@pytest.mark.parametrize("transport", [pb.KV_TRANSPORT_SHM, pb.KV_TRANSPORT_GRPC])
def test_first_token_out_of_vocabulary_is_data_loss(stubs, pair, transport):
    """A first token past the vocabulary in the shared slot header (a buggy or hostile
    prefill) is refused with DATA_LOSS before it reaches the model: on a GPU it would
    index past the embedding, a device-side assert that kills the whole decode."""
    import struct

    from transport import layout as L

    handle, _ = _prefill(stubs[0], prompt_ids=[3, 4, 5, 6], max_new_tokens=4)
    kv = handle.kv
    with open(f"/dev/shm{kv.region}", "r+b") as f:
        head = f.read(L.REGION_HEADER_BYTES)
        table, slot_bytes = (struct.unpack_from("<Q", head, 8 * w)[0]
                             for w in (L.H_SLOT_TABLE_OFFSET, L.H_SLOT_BYTES))
        f.seek(table + kv.slot * slot_bytes + 8 * L.S_FIRST_TOKEN)
        f.write(struct.pack("<Q", 1 << 31))  # fits the proto's uint32: FetchKv carries it
    req = pb.GenerateRequest(handle=handle, max_new_tokens=4, transport=transport)
    assert _code(lambda: list(stubs[1].Generate(req, timeout=10))) == C.DATA_LOSS
    assert wait_until(lambda: slots_in_use(pair.prefill) == 0, LEASE_S + 2)


def test_services_stay_healthy(pair, stubs):
    """After every bad input above (this test runs after them): still SERVING, nothing
    leaked, and a good request still works."""
    from client.api import health

    assert asyncio.run(health(pair.prefill)) == "SERVING"
    assert asyncio.run(health(pair.decode)) == "SERVING"
    res = run_remote(prompt_ids=[1, 2, 3], max_new_tokens=5, prefill=pair.prefill,
                     decode=pair.decode)
    assert len(res.token_ids) == 5
    assert wait_until(lambda: slots_in_use(pair.prefill) == 0, 3)
    assert counters(pair.decode, "decode")["sessions-open"] == 0


def test_abandoned_handle_freed_within_lease(stubs, pair):
    """A consumer that never comes (or died before releasing): the reaper frees it."""
    before = counters(pair.prefill, "prefill")["slots-reaped"]
    _prefill(stubs[0], prompt_ids=[9, 8, 7], max_new_tokens=4)
    assert slots_in_use(pair.prefill) == 1
    t0 = time.monotonic()
    assert wait_until(lambda: slots_in_use(pair.prefill) == 0, LEASE_S + 2)
    assert time.monotonic() - t0 <= LEASE_S + 3.0  # the lease + a reaper period (+ load)
    assert counters(pair.prefill, "prefill")["slots-reaped"] == before + 1


def test_client_cancel_stops_decode(pair):
    before = counters(pair.decode, "decode")["cancelled"]
    tokens_before = counters(pair.decode, "decode")["batch-tokens"]

    async def go():
        async with HybridClient(pair.prefill, pair.decode, timeout_s=30) as c:
            agen = c.stream(prompt_ids=[1, 2, 3, 4], max_new_tokens=250, ignore_eos=True)
            n = 0
            async for _ in agen:
                n += 1
                if n == 3:
                    break
            await agen.aclose()
            return n

    assert asyncio.run(go()) == 3
    assert wait_until(lambda: counters(pair.decode, "decode")["cancelled"] == before + 1, 5)
    # the engine applies the cancel on its own thread: bounded, not instant
    assert wait_until(lambda: counters(pair.decode, "decode")["sessions-open"] == 0, 5)
    d = counters(pair.decode, "decode")
    assert d["active"] == 0
    assert d["batch-tokens"] - tokens_before < 200  # stopped, not decoded to the end
    assert wait_until(lambda: slots_in_use(pair.prefill) == 0, LEASE_S + 2)


def test_decode_killed_mid_request(tmp_path):
    """Decode dies mid-ingest (prefill is slowed to 0.8 s a layer so the kill lands
    there): the client gets UNAVAILABLE at once and the slot is freed within the lease."""
    pport, dport = free_port(), free_port()
    prefill, decode = f"127.0.0.1:{pport}", f"127.0.0.1:{dport}"
    procs = [spawn(["serve", "prefill", "--model", MODEL, "--device", "cpu", "--port", str(pport),
                    "--lease-s", str(LEASE_S)], env={"HYBRID_FAULT_LAYER_DELAY_MS": "800"},
                   log_path=str(tmp_path / "prefill.log")),
             spawn(["serve", "decode", "--model", MODEL, "--device", "cpu", "--port", str(dport),
                    "--prefill", prefill], log_path=str(tmp_path / "decode.log"))]
    try:
        wait_serving(prefill, procs[0], 60)
        wait_serving(decode, procs[1], 60)

        async def go():
            async with HybridClient(prefill, decode, timeout_s=20) as c:
                loop = asyncio.get_running_loop()
                loop.call_later(0.4, os.kill, procs[1].pid, signal.SIGKILL)
                async for _ in c.stream(prompt_ids=[1, 2, 3], max_new_tokens=8):
                    pass

        t0 = time.monotonic()
        with pytest.raises(errors.Unavailable):
            asyncio.run(go())
        assert time.monotonic() - t0 < 5
        # The client hung up its Prefill call too, so prefill stops at the next layer and
        # frees the slot itself; a consumer dying after prefill completed is the
        # reaper's case (test_abandoned_handle_freed_within_lease).
        # The client saw Generate fail and released the slot itself (issue 13): free at
        # once, not at the end of a lease.
        assert wait_until(lambda: slots_in_use(prefill) == 0, 2.0)
        c = counters(prefill, "prefill")
        assert c["slots-failed"] + c["slots-reaped"] + c["slots-released"] == 1
    finally:
        for p in reversed(procs):
            stop(p)


def test_sigterm_drains_in_flight_request(pair, tmp_path):
    port = free_port()
    target = f"127.0.0.1:{port}"
    proc = spawn(["serve", "decode", "--model", MODEL, "--device", "cpu", "--port", str(port),
                  "--prefill", pair.prefill, "--grace-s", "20"],
                 env={"HYBRID_FAULT_TOKEN_DELAY_MS": "10"},  # 2 s: SIGTERM lands mid-stream
                 log_path=str(tmp_path / "decode3.log"))
    try:
        wait_serving(target, proc, 60)

        async def go():
            async with HybridClient(pair.prefill, target, timeout_s=30) as c:
                res = None
                async for item in c.stream(prompt_ids=[1, 2, 3], max_new_tokens=200,
                                           ignore_eos=True):
                    if res is None:
                        res = "signalled"
                        proc.send_signal(signal.SIGTERM)
                    else:
                        res = item
                return res

        res = asyncio.run(go())
        assert len(res.token_ids) == 200  # the in-flight request ran to the end
        assert proc.wait(20) == 0
    finally:
        stop(proc)


def test_dead_prefill_resource_limits_then_unavailable(pair, tmp_path):
    """A prefill with 2 slots and no queue: full -> RESOURCE_EXHAUSTED; killed ->
    the client gets UNAVAILABLE well within its deadline, never a hang."""
    from transport.shm import sweep_stale

    port = free_port()
    target = f"127.0.0.1:{port}"
    proc = spawn(["serve", "prefill", "--model", MODEL, "--device", "cpu", "--port", str(port),
                  "--max-slots", "2", "--max-active", "1", "--max-queue", "0",
                  "--slot-wait-s", "0.3", "--slots-per-client", "2"],
                 log_path=str(tmp_path / "prefill2.log"))
    try:
        wait_serving(target, proc, 60)
        with grpc.insecure_channel(target) as ch:
            stub = pbg.PrefillServiceStub(ch)
            held = [_prefill(stub, prompt_ids=[1, 2], max_new_tokens=2)[0] for _ in range(2)]
            assert _code(lambda: _prefill(stub, prompt_ids=[1, 2])) == C.RESOURCE_EXHAUSTED
            for h in held:
                stub.Release(pb.LeaseRequest(kv=h.kv), timeout=5)
            assert _code(lambda: _prefill(stub, prompt_ids=[1, 2])) == C.OK
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        t0 = time.monotonic()
        with pytest.raises(errors.Unavailable):
            run_remote(prompt_ids=[1, 2, 3], max_new_tokens=4, prefill=target,
                       decode=pair.decode, params=SamplingParams(), timeout_s=5)
        assert time.monotonic() - t0 < 5
    finally:
        stop(proc)
        sweep_stale()  # SIGKILL left its region behind; a new owner would sweep it too
    from client.api import health

    assert asyncio.run(health(pair.decode)) == "SERVING"


def test_prefill_killed_mid_request(pair, tmp_path):
    """Prefill dies after the handle went out, while decode waits for layers that will
    never be ready: the client gets UNAVAILABLE well within its deadline."""
    from transport.shm import sweep_stale

    port, dport = free_port(), free_port()
    target, decode = f"127.0.0.1:{port}", f"127.0.0.1:{dport}"
    proc = spawn(["serve", "prefill", "--model", MODEL, "--device", "cpu", "--port", str(port)],
                 env={"HYBRID_FAULT_LAYER_DELAY_MS": "1500"},
                 log_path=str(tmp_path / "prefill3.log"))
    # a decode reads only its own prefill's region: this one is paired with the victim
    dproc = spawn(["serve", "decode", "--model", MODEL, "--device", "cpu", "--port", str(dport),
                   "--prefill", target], log_path=str(tmp_path / "decode4.log"))
    try:
        wait_serving(target, proc, 60)
        wait_serving(decode, dproc, 60)

        async def go():
            async with HybridClient(target, decode, timeout_s=20) as c:
                calls = c.stream(prompt_ids=[1, 2, 3], max_new_tokens=4)
                killer = asyncio.get_running_loop().call_later(0.5, os.kill, proc.pid,
                                                               signal.SIGKILL)
                try:
                    async for _ in calls:
                        pass
                finally:
                    killer.cancel()

        t0 = time.monotonic()
        with pytest.raises(errors.Unavailable):
            asyncio.run(go())
        assert time.monotonic() - t0 < 10
    finally:
        stop(dproc)
        stop(proc)
        sweep_stale()
    assert wait_until(lambda: counters(pair.decode, "decode")["active"] == 0, 5)
