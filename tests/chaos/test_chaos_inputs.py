"""Chaos suite, bounded input (issue 13, findings 5, 7, 8, 10): what comes off the network
is refused before work proportional to it, never as UNKNOWN, never with a traceback or a
forged log line. Real processes on loopback, synthetic tiny GPT-2 on the CPU."""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from client.launch import ServicePair
from protos import hybrid_pb2 as pb
from protos import hybrid_pb2_grpc as pbg
from tests.chaos.chaos_util import (
    BIG_CHANNEL,
    DECODE,
    MAX_CHUNK_BYTES,
    MAX_STOP_IDS,
    METHODS,
    MIN_CHUNK_BYTES,
    MODEL,
    PREFILL,
    C,
    bad_log_lines,
    counters,
    health_latencies_ms,
    length_delimited,
    outcome,
    proc_status_kb,
    raw_call,
    settled_rss_mb,
    wait_for,
)

RSS_TOLERANCE = 0.10   # issue 13: RSS within +10% of before under oversized input
HEALTH_MEDIAN_MS = 100.0


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    with ServicePair(model=MODEL, device="cpu", log_dir=str(logs),
                     prefill_args=["--lease-s", "5"]) as p:
        p.logs = logs
        yield p


@pytest.fixture(scope="module")
def channels(pair):
    pch = grpc.insecure_channel(pair.prefill, options=BIG_CHANNEL)
    dch = grpc.insecure_channel(pair.decode, options=BIG_CHANNEL)
    yield pch, dch
    pch.close()
    dch.close()


@pytest.fixture(scope="module")
def stubs(channels):
    return pbg.PrefillServiceStub(channels[0]), pbg.DecodeServiceStub(channels[1])


def _log(pair, role: str) -> str:
    return (pair.logs / f"{role}.log").read_text(errors="replace")


def _pids(pair) -> dict[str, int]:
    return {role: p.pid for role, p in pair.procs.items()}


def _handle(ps, ids=(3, 4, 5)) -> pb.KvHandle:
    msgs = list(ps.Prefill(pb.PrefillRequest(prompt_ids=list(ids), max_new_tokens=4), timeout=10))
    return msgs[0].handle


class HealthProbe:
    """Health round trips of both services, measured on threads while a test runs."""

    def __init__(self, pair, n: int = 25) -> None:
        self.ms: dict[str, list[float]] = {}
        self._threads = [threading.Thread(target=self._run, args=(role, target, n))
                         for role, target in (("prefill", pair.prefill), ("decode", pair.decode))]

    def _run(self, role: str, target: str, n: int) -> None:
        self.ms[role] = health_latencies_ms(target, n)

    def __enter__(self) -> HealthProbe:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for t in self._threads:
            t.join(60)

    def check(self) -> None:
        print("health ms (median/max): " + ", ".join(
            f"{role} {statistics.median(ms):.1f}/{max(ms):.1f}" for role, ms in self.ms.items()))
        for role, ms in self.ms.items():
            med = statistics.median(ms)
            assert med < HEALTH_MEDIAN_MS, \
                f"{role} health median {med:.0f} ms (max {max(ms):.0f} ms) under oversized input"


def _send_all(jobs: list[tuple[object, bytes]]) -> list[tuple[grpc.StatusCode, str, float]]:
    """Every (call, request bytes) at once: (code, details, seconds) each."""
    def one(job):
        call, raw = job
        t0 = time.monotonic()
        code, details, got = outcome(lambda: call(raw, timeout=30))
        assert not got
        return code, details, time.monotonic() - t0

    with ThreadPoolExecutor(len(jobs)) as ex:
        return list(ex.map(one, jobs))


def _rss_check(pair, before: dict[str, float]) -> None:
    for role, pid in _pids(pair).items():
        now = settled_rss_mb(pid)
        print(f"{role} RSS {before[role]:.0f} -> {now:.0f} MB "
              f"(peak {proc_status_kb(pid, 'VmHWM') / 1024:.0f} MB)")
        assert now <= before[role] * (1 + RSS_TOLERANCE), \
            f"{role} RSS {before[role]:.0f} -> {now:.0f} MB (peak {proc_status_kb(pid, 'VmHWM') / 1024:.0f} MB)"


# ---- finding 5 ---------------------------------------------------------------------------
def test_finding05_oversized_messages_refused_before_parsing(pair, channels):
    """Issue 13, finding 5: 4 concurrent 60 MiB prompts took prefill to 3.6 GB and a
    health check timed out; 30M stop_ids added 1.5 GiB to decode. Now a 60 MiB prompt,
    30M stop_ids and 4 concurrent 5 MiB prompts are RESOURCE_EXHAUSTED at once (the
    gRPC core refuses messages over MAX_REQUEST_BYTES before parsing), RSS stays within
    +10% and health answers meanwhile (median under 100 ms)."""
    pch, dch = channels
    prefill, generate = raw_call(pch, PREFILL + "Prefill"), raw_call(dch, DECODE + "Generate")
    before = {role: settled_rss_mb(pid) for role, pid in _pids(pair).items()}
    prompt60 = length_delimited(2, b"a" * (60 << 20))          # PrefillRequest.prompt
    stop_ids = length_delimited(5, b"\x01" * 30_000_000)       # GenerateRequest.stop_ids, packed
    prompt5 = length_delimited(3, b"\x05" * (5 << 20))          # PrefillRequest.prompt_ids, packed
    with HealthProbe(pair) as health:
        results = _send_all([(prefill, prompt60), (generate, stop_ids)] + [(prefill, prompt5)] * 4)
    for code, details, secs in results:
        assert code in (C.RESOURCE_EXHAUSTED, C.INVALID_ARGUMENT), details
        assert secs < 10, f"{code.name} after {secs:.1f} s"
    health.check()
    _rss_check(pair, before)
    assert counters(pair.prefill, "prefill")["slots-in-use"] == 0


def test_finding05_inputs_under_the_message_limit_bounded_before_work(pair, channels):
    """Issue 13, 'bounded inputs before work': limits on prompt length (the model's
    positions) and stop lists are enforced before any allocation proportional to the
    input. A prompt just under the 4 MiB message limit (text, or token ids) is
    INVALID_ARGUMENT at once, 4 of them at a time leave RSS within +10% and health
    responsive; more than MAX_STOP_IDS stop ids in a message that fits is INVALID_ARGUMENT."""
    pch, dch = channels
    prefill, generate = raw_call(pch, PREFILL + "Prefill"), raw_call(dch, DECODE + "Generate")
    h = _handle(pbg.PrefillServiceStub(pch))
    req = pb.GenerateRequest(handle=h, max_new_tokens=3, stop_ids=[7] * (MAX_STOP_IDS + 1))
    code, details, _ = outcome(lambda: generate(req.SerializeToString(), timeout=10))
    assert code == C.INVALID_ARGUMENT and "stop_ids" in details
    assert wait_for(lambda: counters(pair.prefill, "prefill")["slots-in-use"] == 0, 2)
    # the largest message the prefill takes: limits.request_bytes of its model (a prompt
    # of every position at 64 four-byte characters); larger ones never get parsed
    from engine.loader import peek_config
    from transport.limits import request_bytes

    n = request_bytes(peek_config(MODEL).max_positions) - 64
    text = length_delimited(2, b"c" * n)       # a prompt the byte tokenizer makes n tokens of
    ids = length_delimited(3, b"\x05" * n)     # n token ids of one byte each
    before = {role: settled_rss_mb(pid) for role, pid in _pids(pair).items()}
    with HealthProbe(pair) as health:
        results = _send_all([(prefill, text)] * 4 + [(prefill, ids)] * 4)
    for code, details, secs in results:
        assert code == C.INVALID_ARGUMENT, details
        assert secs < 10
    health.check()
    _rss_check(pair, before)


# ---- finding 7 ---------------------------------------------------------------------------
FORGED = "CHAOS-FORGED 1970-01-01 00:00:00,000 INFO hybrid.prefill prefill id=x status=OK"


def test_finding07_request_id_cannot_forge_or_flood_log_lines(pair, stubs):
    """Issue 13, finding 7: a request_id with a newline forged a log line; a 1 MiB id gave
    a 1 MiB line. Now both are INVALID_ARGUMENT on Prefill and Generate (neither service
    logs them raw), the error text does not echo a megabyte, FetchKv/Release/RenewLease log
    ids escaped, and no line of either log starts with the forged text."""
    ps, ds = stubs
    h = _handle(ps)
    bad_ids = {"newline": "ok\n" + FORGED, "carriage return": "ok\r" + FORGED,
               "1 MiB": "x" * (1 << 20), "65 chars": "a" * 65, "space": "a b"}
    for what, rid in bad_ids.items():
        calls = {
            "Prefill": lambda rid=rid: ps.Prefill(pb.PrefillRequest(request_id=rid, prompt_ids=[1, 2]),
                                                  timeout=10),
            "Generate": lambda rid=rid: ds.Generate(
                pb.GenerateRequest(request_id=rid, handle=h, max_new_tokens=3), timeout=10),
            "Generate (handle's id)": lambda rid=rid: ds.Generate(pb.GenerateRequest(
                handle=pb.KvHandle(request_id=rid, kv=h.kv, weights_fingerprint=h.weights_fingerprint,
                                   model=h.model, lease_ms=h.lease_ms), max_new_tokens=3),
                timeout=10),
        }
        for name, call in calls.items():
            code, details, got = outcome(call)
            # a 1 MiB id is over the model's message limit: refused before parsing
            want = (C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED) if what == "1 MiB" else (
                C.INVALID_ARGUMENT,)
            assert code in want, (what, name, code, details)
            assert len(details) < 400 and "\n" not in details and "\r" not in details
    # methods that only log the id: whatever their status, the line is escaped
    for rid in (bad_ids["newline"], bad_ids["1 MiB"]):
        outcome(lambda rid=rid: ps.FetchKv(pb.FetchKvRequest(request_id=rid, kv=h.kv), timeout=5))
        outcome(lambda rid=rid: ps.RenewLease(pb.LeaseRequest(request_id=rid, kv=h.kv), timeout=5))
        outcome(lambda rid=rid: ps.Release(pb.LeaseRequest(request_id=rid, kv=h.kv), timeout=5))
    time.sleep(0.3)  # the log lines of the last calls
    for role in ("prefill", "decode"):
        lines = _log(pair, role).splitlines()
        assert not [ln for ln in lines if ln.startswith("CHAOS-FORGED") or ln.startswith("\r")]
        assert not [ln for ln in lines if "CHAOS-FORGED" in ln and "\\n" not in ln
                    and "\\r" not in ln], "an id logged without escaping"
        assert max(map(len, lines)) < 2000, f"{role} logged a {max(map(len, lines))}-char line"
    assert wait_for(lambda: counters(pair.prefill, "prefill")["slots-in-use"] == 0, 6)


# ---- finding 8 ---------------------------------------------------------------------------
GARBAGE = b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"   # a varint that never ends
BAD_UTF8 = length_delimited(1, b"ok\xc3\x28\xff")           # field 1 is a string in most requests


def _nested_bad_utf8() -> bytes:
    """GenerateRequest.handle.kv.region (a string three messages deep) of invalid UTF-8."""
    kv = length_delimited(1, b"/hybrid-kv-\xff\xfe")
    return length_delimited(2, length_delimited(2, kv)) + b"\x20\x03"  # max_new_tokens=3


def test_finding08_undecodable_bytes_are_invalid_argument(pair, channels):
    """Issue 13, finding 8: garbage bytes or invalid UTF-8 in a string field returned
    UNKNOWN with an ERROR traceback from the gRPC runtime. Now every method of both
    services answers INVALID_ARGUMENT (Info has no string field: invalid UTF-8 in an
    unknown field is skipped, OK) and neither log shows a traceback or a deserializing
    error."""
    pch, dch = channels
    results = {}
    for method in METHODS:
        call = raw_call(pch if method.startswith(PREFILL) else dch, method)
        for what, raw in (("garbage", GARBAGE), ("invalid UTF-8", BAD_UTF8),
                          ("truncated", BAD_UTF8[:-2])):
            results[(method, what)] = outcome(lambda call=call, raw=raw: call(raw, timeout=5))[:2]
    results[("Generate", "nested invalid UTF-8")] = outcome(
        lambda: raw_call(dch, DECODE + "Generate")(_nested_bad_utf8(), timeout=5))[:2]
    want = {k: C.OK if k[0].endswith("/Info") and k[1] == "invalid UTF-8" else C.INVALID_ARGUMENT
            for k in results}
    got = {k: code for k, (code, _) in results.items()}
    assert got == want, {k: results[k] for k in got if got[k] != want[k]}
    time.sleep(0.3)
    for role in ("prefill", "decode"):
        assert bad_log_lines(_log(pair, role)) == []
    assert counters(pair.prefill, "prefill")["slots-in-use"] == 0


# ---- finding 10 --------------------------------------------------------------------------
def test_finding10_fetch_chunk_bytes_bounded(pair, stubs):
    """Issue 13, finding 10: FetchKv with chunk_bytes=1 turned an 8 KiB slot into 8,192
    messages. Now chunk_bytes must be 0 (default) or 64 KiB..64 MiB: 1, 64 KiB - 1 and
    64 MiB + 1 are INVALID_ARGUMENT with no chunk sent; a valid handle's 0 and 64 KiB
    stream the slot in one message per layer."""
    ps, _ = stubs
    h = _handle(ps)
    try:
        for chunk in (1, 4096, MIN_CHUNK_BYTES - 1, MAX_CHUNK_BYTES + 1, (1 << 32) - 1):
            code, details, got = outcome(lambda chunk=chunk: ps.FetchKv(
                pb.FetchKvRequest(kv=h.kv, chunk_bytes=chunk), timeout=5))
            assert (chunk, code, got) == (chunk, C.INVALID_ARGUMENT, []), details
        for chunk in (0, MIN_CHUNK_BYTES):
            code, details, got = outcome(lambda chunk=chunk: ps.FetchKv(
                pb.FetchKvRequest(kv=h.kv, chunk_bytes=chunk), timeout=5))
            assert code == C.OK, details
            assert len(got) == h.kv.n_layers  # 2 layers of 1.5 KiB: one message each
            assert sum(len(m.data) for m in got) == sum(r.length for r in h.kv.layers)
    finally:
        ps.Release(pb.LeaseRequest(kv=h.kv), timeout=5)
    assert counters(pair.prefill, "prefill")["slots-in-use"] == 0
    assert bad_log_lines(_log(pair, "prefill")) == []
