"""Helpers of the chaos suite (tests/chaos): hand-built request bytes, raw calls that
bypass the client's serializers, health round trips, log checks. Processes, RSS/fd
figures and the request load come from bench/soak.py (the long versions run there)."""

from __future__ import annotations

import re
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.soak import (  # noqa: F401 - re-exported for the tests
    MODEL,
    LoadResult,
    Service,
    counters,
    fd_count,
    free_port,
    mapped_segments,
    proc_status_kb,
    rss_mb,
    run_load,
    settled_rss_mb,
    wait_for,
)
from protos import hybrid_pb2 as pb

# The documented answers and limits (docs/protocol.md, issue 13), spelled out here rather
# than imported, so the suite pins them (and still loads against code without them).
INVALID_HANDLE = "KV handle is not valid (released, expired, or not issued by this service)"
MAX_REQUEST_BYTES = 4 << 20     # transport.limits: larger requests never get parsed
MAX_STOP_IDS = 1024
MIN_CHUNK_BYTES = 64 << 10      # FetchKv chunk_bytes: 0 or 64 KiB..64 MiB
MAX_CHUNK_BYTES = 64 << 20

C = grpc.StatusCode
# What a client may get when a peer stalls or dies (docs/protocol.md); anything else
# (UNKNOWN, INTERNAL, a hang) is a bug.
DOCUMENTED_FAULT_STATUSES = {"DEADLINE_EXCEEDED", "UNAVAILABLE", "ABORTED",
                             "RESOURCE_EXHAUSTED"}
PREFILL = "/hybrid.v1.PrefillService/"
DECODE = "/hybrid.v1.DecodeService/"
# method -> (streaming, response message name) of both services
METHODS = {
    PREFILL + "Prefill": (True, "PrefillResponse"),
    PREFILL + "FetchKv": (True, "KvChunk"),
    PREFILL + "RenewLease": (False, "LeaseReply"),
    PREFILL + "Release": (False, "LeaseReply"),
    PREFILL + "Attach": (False, "AttachReply"),
    PREFILL + "Info": (False, "ServiceInfo"),
    DECODE + "Generate": (True, "GenerateResponse"),
    DECODE + "Info": (False, "ServiceInfo"),
}
BIG_CHANNEL = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


# ---- protobuf wire format by hand ------------------------------------------------------
def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def length_delimited(field_no: int, payload: bytes) -> bytes:
    """One length-delimited field (string, bytes, message, packed repeated)."""
    return varint(field_no << 3 | 2) + varint(len(payload)) + payload


# ---- calls ---------------------------------------------------------------------------
def raw_call(channel: grpc.Channel, method: str):
    """A callable for `method` that sends bytes as they are (identity serializer)."""
    streaming, response = METHODS[method]
    make = channel.unary_stream if streaming else channel.unary_unary
    # (a proto without the message, i.e. code before it existed, still gets a parser)
    return make(method, request_serializer=lambda b: b,
                response_deserializer=getattr(pb, response, pb.InfoRequest).FromString)


def outcome(fn) -> tuple[grpc.StatusCode, str, list]:
    """(code, details, messages received) of a call; a stream is drained."""
    got: list = []
    try:
        res = fn()
        if isinstance(res, grpc.Call) and hasattr(res, "__next__"):
            for m in res:
                got.append(m)
        else:
            got.append(res)
    except grpc.RpcError as e:
        return e.code(), e.details() or "", got
    return C.OK, "", got


def health_latencies_ms(target: str, n: int, period_s: float = 0.03,
                        timeout_s: float = 5.0) -> list[float]:
    """`n` grpc.health.v1 checks on one (already connected) channel: round trips in ms."""
    out = []
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        for _ in range(n):
            t0 = time.perf_counter()
            stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
            out.append((time.perf_counter() - t0) * 1e3)
            time.sleep(period_s)
    return out


def edited(handle: pb.KvHandle, **kv) -> pb.KvHandle:
    """A copy of `handle` with KvDescriptor fields replaced."""
    h = pb.KvHandle()
    h.CopyFrom(handle)
    for k, v in kv.items():
        setattr(h.kv, k, v)
    return h


# ---- logs --------------------------------------------------------------------------------
BAD_LOG = re.compile(r"Traceback|never retrieved|Exception deserializing|"
                     r"Exception calling application|Exception iterating")


def bad_log_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if BAD_LOG.search(line)]
