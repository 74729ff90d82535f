"""Chaos suite, KV handles (issue 13, findings 1-3): a handle is a capability. An attacker
with nothing but Prefill.Info enumerates descriptors and gets no byte and learns nothing;
FIFOs and symlinks planted in /dev/shm are refused at once (never a wedged decode); a
decode reads only its own prefill's region.

Real processes on loopback, synthetic tiny GPT-2 on the CPU, a 20 s lease: a slot freed
within a second was freed by the service that noticed, not by the lease reaper."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import subprocess
import threading
import time

import grpc
import pytest

from client.api import HybridClient
from client.launch import ServicePair
from engine import errors
from protos import hybrid_pb2 as pb
from protos import hybrid_pb2_grpc as pbg
from tests.chaos.chaos_util import (
    INVALID_HANDLE,
    MODEL,
    C,
    Service,
    counters,
    edited,
    free_port,
    mapped_segments,
    outcome,
    wait_for,
)
from tests.services_util import raw_stubs

LEASE_S = 20.0
MAX_SLOTS = 16


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    with ServicePair(model=MODEL, device="cpu", log_dir=str(logs),
                     prefill_args=["--lease-s", str(LEASE_S), "--max-slots", str(MAX_SLOTS)]) as p:
        yield p


@pytest.fixture(scope="module")
def stubs(pair):
    with raw_stubs(pair) as both:
        yield both


@pytest.fixture
def held(stubs):
    """Handles a test holds: released however the test ends, so a failure does not leave
    slots behind for the next test (the lease is 20 s)."""
    handles: list[pb.KvHandle] = []
    yield handles
    for h in handles:
        outcome(lambda h=h: stubs[0].Release(pb.LeaseRequest(kv=h.kv), timeout=5))


def _in_use(target: str) -> int:
    return counters(target, "prefill")["slots-in-use"]


def _prefill(stub, ids: list[int], max_new: int = 6) -> pb.KvHandle:
    """A completed prefill: the slot is live and held until released or its lease ends."""
    msgs = list(stub.Prefill(pb.PrefillRequest(prompt_ids=ids, max_new_tokens=max_new),
                             timeout=10))
    assert msgs[-1].HasField("done")
    return msgs[0].handle


def _tokens(dstub, handle: pb.KvHandle, max_new: int = 6, **kw) -> list[int]:
    out = []
    for m in dstub.Generate(pb.GenerateRequest(handle=handle, max_new_tokens=max_new, **kw),
                            timeout=10):
        if m.HasField("tokens"):
            out.extend(m.tokens.ids)
    return out


def _numbers(text: str, public: list[str]) -> set[int]:
    """Integers in an error text, leaving out what Info tells anyone (region, epoch)."""
    for p in public:
        text = text.replace(p, "")
    return {int(x) for x in re.findall(r"\d+", text)}


def _examples(failures: list[tuple[str, str]]) -> list[str]:
    """One failure per (call, secret kind, answer): the distinct ways the hunt got more."""
    out, seen = [], set()
    for key, text in failures:
        if key not in seen:
            seen.add(key)
            out.append(text)
    return out


# ---- finding 1 ---------------------------------------------------------------------------
def test_finding01_forged_handle_hunt_gets_no_byte(pair, stubs, held):
    """Issue 13, finding 1: 155 FetchKv calls found a live descriptor and read a victim's
    KV (its prompt). Now an attacker knowing the region and epoch (Info), the shape (its
    own request) and even the victim's exact slot, generation and offset, but not its
    secret, gets no byte from FetchKv or Generate (shm and grpc transports) and frees
    nothing with Release; every answer is ABORTED with the one INVALID_HANDLE text, or
    INVALID_ARGUMENT naming no number of the live descriptor (slot, generation, offset,
    length, end); the victim's own Generate then gets the right tokens."""
    ps, ds = stubs
    prompt = [11, 22, 33, 44, 55]
    want = _tokens(ds, _prefill(ps, prompt))  # greedy reference, before any attack
    assert len(want) == 6
    info = ps.Info(pb.InfoRequest(), timeout=5)

    victim = _prefill(ps, prompt)  # a live slot, held by its handle
    own = _prefill(ps, [1, 2, 3, 4, 5])  # the attacker's own request: same shape
    held.extend([victim, own])
    v, o = victim.kv, own.kv
    released0 = counters(pair.prefill, "prefill")["slots-released"]
    assert _in_use(pair.prefill) == 2

    secrets_tried = {"zeros": bytes(16), "random": secrets.token_bytes(16),
                     "attacker's own": o.secret, "empty": b"",
                     "victim's, 1 bit flipped": bytes([v.secret[0] ^ 1]) + v.secret[1:]}
    gens = sorted({1, 2, 3, max(1, v.generation - 1), v.generation, v.generation + 1})
    offsets = sorted({0, v.offset, o.offset, o.offset + o.length, v.offset + v.length,
                      v.offset + 4096})
    live = {v.slot, v.generation, v.offset, v.length, v.offset + v.length}
    public = [info.region, info.region.lstrip("/"), str(info.region_epoch)]
    fetch = ps.FetchKv
    failures: list[tuple[str, str]] = []

    def probe(kind: str, fn, fields: dict) -> None:
        code, details, got = outcome(fn)
        leaked = _numbers(details, public) & live
        if got or code not in (C.ABORTED, C.INVALID_ARGUMENT) or leaked or \
                (code == C.ABORTED and details != INVALID_HANDLE):
            failures.append(((kind, fields["secret"], code, details[:20]),
                             f"{kind} {fields}: {code.name} {details[:100]!r} "
                             f"({len(got)} messages, live numbers {sorted(leaked)})"))

    n = 0
    for slot in range(MAX_SLOTS):
        for gen in gens:
            for off in offsets:
                for label, sec in secrets_tried.items():
                    if (slot, gen, off, sec) == (o.slot, o.generation, o.offset, o.secret):
                        continue  # the attacker's own handle: that one is valid
                    fields = dict(slot=slot, generation=gen, offset=off, secret=sec)
                    h = edited(own, region=info.region, epoch=info.region_epoch, **fields)
                    shown = dict(fields, secret=label)
                    probe("FetchKv", lambda h=h: fetch(pb.FetchKvRequest(kv=h.kv), timeout=5),
                          shown)
                    probe("Release", lambda h=h: ps.Release(pb.LeaseRequest(kv=h.kv), timeout=5),
                          shown)
                    n += 2
                    if slot in (v.slot, o.slot, MAX_SLOTS - 1) and off in (0, v.offset) \
                            and gen in (1, v.generation):
                        probe("Generate", lambda h=h: ds.Generate(
                            pb.GenerateRequest(handle=h, max_new_tokens=4), timeout=5), shown)
                        probe("Generate/grpc", lambda h=h: ds.Generate(
                            pb.GenerateRequest(handle=h, max_new_tokens=4,
                                               transport=pb.KV_TRANSPORT_GRPC), timeout=5),
                              shown)
                        n += 2
    assert n > 3000
    assert not failures, f"{len(failures)} of {n} probes got bytes, a number of the live " \
        f"descriptor or another ABORTED text, e.g.:\n" + "\n".join(_examples(failures))
    # nothing the attacker sent freed or touched the victim's slot
    c = counters(pair.prefill, "prefill")
    assert (c["slots-in-use"], c["slots-released"]) == (2, released0)
    ps.RenewLease(pb.LeaseRequest(kv=v), timeout=5)
    assert _tokens(ds, victim) == want  # the victim's own Generate: right tokens
    ps.Release(pb.LeaseRequest(kv=o), timeout=5)
    assert wait_for(lambda: _in_use(pair.prefill) == 0, 2)


def test_finding01_altered_and_released_handles_look_alike(pair, stubs, held):
    """Every field the holder could alter, and the handle once released, get the same
    ABORTED INVALID_HANDLE from RenewLease, Release, FetchKv and Generate (no 'now 16',
    no 'does not match slot N'); the real handle is untouched by all of it."""
    ps, ds = stubs
    h = _prefill(ps, [5, 6, 7])
    held.append(h)
    kv = h.kv
    altered = {
        "slot": dict(slot=kv.slot + 1), "generation+1": dict(generation=kv.generation + 1),
        "older generation": dict(generation=kv.generation - 1 or kv.generation + 2),
        "offset": dict(offset=kv.offset + 4096), "offset 0": dict(offset=0),
        "length": dict(length=kv.length * 2),
        "secret bit": dict(secret=bytes([kv.secret[0] ^ 0x80]) + kv.secret[1:]),
        "no secret": dict(secret=b""), "long secret": dict(secret=kv.secret + b"\0"),
    }
    calls = {
        "RenewLease": lambda x: ps.RenewLease(pb.LeaseRequest(kv=x.kv), timeout=5),
        "Release": lambda x: ps.Release(pb.LeaseRequest(kv=x.kv), timeout=5),
        "FetchKv": lambda x: ps.FetchKv(pb.FetchKvRequest(kv=x.kv), timeout=5),
        "Generate": lambda x: ds.Generate(pb.GenerateRequest(handle=x, max_new_tokens=3),
                                          timeout=5),
        "Generate/grpc": lambda x: ds.Generate(pb.GenerateRequest(
            handle=x, max_new_tokens=3, transport=pb.KV_TRANSPORT_GRPC), timeout=5),
    }
    seen = {}
    for what, change in altered.items():
        for name, call in calls.items():
            code, details, got = outcome(lambda call=call, change=change: call(edited(h, **change)))
            seen[(what, name)] = (code.name, details[:100], len(got))
    bad = {k: s for k, s in seen.items() if s != ("ABORTED", INVALID_HANDLE, 0)}
    assert not bad, "altered handles answered otherwise:\n" + "\n".join(
        f"{k}: {v}" for k, v in bad.items())
    ps.RenewLease(pb.LeaseRequest(kv=kv), timeout=5)  # still live: nothing freed it
    ps.Release(pb.LeaseRequest(kv=kv), timeout=5)
    ps.Release(pb.LeaseRequest(kv=kv), timeout=5)  # idempotent for its holder
    after = {name: outcome(lambda call=call: call(h)) for name, call in calls.items()
             if name != "Release"}
    bad = {k: (c.name, d[:100], len(g)) for k, (c, d, g) in after.items()
           if (c, d, g) != (C.ABORTED, INVALID_HANDLE, [])}
    assert not bad, f"a released handle got: {bad}"
    assert _in_use(pair.prefill) == 0


# ---- finding 2 ---------------------------------------------------------------------------
def _bounded(fn, timeout_s: float = 3.0):
    """fn() on a daemon thread: (finished, exception). Finding 2's open() never
    returned, so a hang must fail the test, not wedge it."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout_s)
    return not t.is_alive(), box.get("error")


@pytest.fixture
def planted(pair, stubs):
    """A FIFO and a symlink (to the live region) named like KV regions in /dev/shm."""
    region = stubs[0].Info(pb.InfoRequest(), timeout=5).region
    n = secrets.randbelow(10**9) + 1
    fifo, link = f"/hybrid-kv-4194301-{n}", f"/hybrid-kv-4194302-{n}"
    os.mkfifo("/dev/shm" + fifo, 0o600)
    os.symlink("/dev/shm" + region, "/dev/shm" + link)
    yield region, fifo, link
    for name in (fifo, link):
        if os.path.lexists("/dev/shm" + name):
            os.unlink("/dev/shm" + name)


def test_finding02_fifo_and_symlink_open_refused_at_once(planted):
    """Issue 13, finding 2 (in process): opening a FIFO named like a region blocked
    forever. open_readonly and KvReader.open refuse a FIFO, a symlink (even to a real
    region) and a file of another owner at once with InvalidArgument; the start-up sweep
    passes over them without blocking and without removing what is not its own."""
    from transport.reader import KvReader
    from transport.shm import open_readonly, sweep_stale

    region, fifo, link = planted
    cases = {
        "open_readonly(fifo)": lambda: open_readonly("/dev/shm" + fifo),
        "KvReader.open(fifo)": lambda: KvReader.open(fifo),
        "open_readonly(symlink)": lambda: open_readonly("/dev/shm" + link),
        "KvReader.open(symlink)": lambda: KvReader.open(link),
        "open_readonly(foreign owner)": lambda: open_readonly("/dev/shm" + region,
                                                              owner_uid=os.geteuid() + 1),
    }
    for what, fn in cases.items():
        t0 = time.monotonic()
        finished, err = _bounded(fn)
        assert finished, f"{what} blocked"
        assert isinstance(err, errors.InvalidArgument), f"{what}: {err!r}"
        assert time.monotonic() - t0 < 1.0
    finished, err = _bounded(lambda: os.close(open_readonly("/dev/shm" + region)[0]))
    assert finished and err is None  # the real region itself opens
    finished, err = _bounded(sweep_stale)
    assert finished and err is None
    assert os.path.lexists("/dev/shm" + fifo) and os.path.lexists("/dev/shm" + link)
    assert os.path.exists("/dev/shm" + region)


def test_finding02_planted_regions_never_wedge_decode(pair, stubs, planted, held, tmp_path):
    """Issue 13, finding 2 (service): a Generate whose region named a FIFO wedged the
    decode service (every later request DEADLINE_EXCEEDED, SIGTERM never ended it). Now
    FIFO and symlink regions are refused at once (INVALID_ARGUMENT: not this decode's
    prefill), by FetchKv too; the decode keeps serving and exits promptly on SIGTERM."""
    ps, _ = stubs
    region, fifo, link = planted
    grace = 2.0
    dec = Service("decode", free_port(), str(tmp_path / "decode.log"),
                  ["--prefill", pair.prefill, "--grace-s", str(grace)]).start()
    try:
        h = _prefill(ps, [9, 8, 7])
        held.append(h)
        with grpc.insecure_channel(dec.target) as ch:
            ds = pbg.DecodeServiceStub(ch)
            for name in (fifo, link):
                for transport in (pb.KV_TRANSPORT_SHM, pb.KV_TRANSPORT_GRPC):
                    t0 = time.monotonic()
                    code, details, got = outcome(lambda name=name, transport=transport: ds.Generate(
                        pb.GenerateRequest(handle=edited(h, region=name), max_new_tokens=3,
                                           transport=transport), timeout=10))
                    assert (code, got) == (C.INVALID_ARGUMENT, []), details
                    assert time.monotonic() - t0 < 2.0
                code, details, got = outcome(lambda name=name: ps.FetchKv(
                    pb.FetchKvRequest(kv=edited(h, region=name).kv), timeout=5))
                assert (code, got) == (C.INVALID_ARGUMENT, []), details
            assert not {s for s in mapped_segments(dec.pid) if fifo in s or link in s}
            assert len(_tokens(ds, h, 3)) == 3  # the real handle still decodes here

        async def good():
            async with HybridClient(pair.prefill, dec.target, timeout_s=20) as c:
                return await c.generate(prompt_ids=[1, 2, 3], max_new_tokens=5)

        assert len(asyncio.run(good()).token_ids) == 5
        t0 = time.monotonic()
        dec.signal(signal.SIGTERM)
        try:
            rc = dec.proc.wait(grace + 5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"decode still running {grace + 5:.0f} s after SIGTERM")
        assert rc == 0 and time.monotonic() - t0 < grace + 5
    finally:
        dec.stop()
    assert wait_for(lambda: _in_use(pair.prefill) == 0, 2)


# ---- finding 3 ---------------------------------------------------------------------------
def test_finding03_handle_of_another_prefill_refused_and_freed(pair, stubs, tmp_path):
    """Issue 13, finding 3: decode read any region on the host, including another
    prefill's (whose slot then stayed held: the Release went to the wrong prefill). Now a
    handle from a second prefill is INVALID_ARGUMENT before any file is opened, the
    paired prefill loses nothing, and through HybridClient the second prefill's slot is
    freed at once (not at the end of its 20 s lease)."""
    ps, ds = stubs
    other = Service("prefill", free_port(), str(tmp_path / "prefill2.log"),
                    ["--lease-s", str(LEASE_S)]).start()
    try:
        with grpc.insecure_channel(other.target) as ch:
            ostub = pbg.PrefillServiceStub(ch)
            oregion = ostub.Info(pb.InfoRequest(), timeout=5).region
            h = _prefill(ostub, [4, 5, 6])
            before = counters(pair.prefill, "prefill")
            for transport in (pb.KV_TRANSPORT_SHM, pb.KV_TRANSPORT_GRPC):
                t0 = time.monotonic()
                code, details, got = outcome(lambda transport=transport: ds.Generate(
                    pb.GenerateRequest(handle=h, max_new_tokens=3, transport=transport),
                    timeout=10))
                assert (code, got) == (C.INVALID_ARGUMENT, []), details
                assert time.monotonic() - t0 < 2.0
            assert not {s for s in mapped_segments(pair.procs["decode"].pid) if oregion in s}
            after = counters(pair.prefill, "prefill")
            assert (after["slots-released"], after["slots-in-use"]) == \
                (before["slots-released"], before["slots-in-use"])
            ostub.RenewLease(pb.LeaseRequest(kv=h.kv), timeout=5)  # the raw holder still has it
            ostub.Release(pb.LeaseRequest(kv=h.kv), timeout=5)

        async def through_client():
            async with HybridClient(other.target, pair.decode, timeout_s=20) as c:
                await c.generate(prompt_ids=[1, 2, 3], max_new_tokens=4)

        t0 = time.monotonic()
        with pytest.raises(errors.InvalidArgument):
            asyncio.run(through_client())
        assert time.monotonic() - t0 < 5
        freed = wait_for(lambda: _in_use(other.target) == 0, 1.0)
        assert freed is not None, "the second prefill's slot stayed held"
        assert counters(other.target, "prefill")["slots-reaped"] == 0
    finally:
        other.stop()
