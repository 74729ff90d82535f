"""Prometheus metrics of the prefill and decode processes (`--metrics-port N`).

Every metric is defined once, here, on this module's own registry (`REGISTRY`): a
process serves it at http://HOST:N/metrics (`serve_metrics`). Tests that run servicers
in-process share the module's objects, so nothing is ever registered twice. Torch-free.

Three kinds of source (docs/protocol.md, "Metrics", lists every name):
- per request: the servicers make one `Request` per Prefill / Generate RPC, hand it
  every response they send (`sent`) and the log line's `fields` in their `finally`
  (`done`): status, TTFT, TPOT, inter-token latency, queue waits, KV bytes.
- per prefill batch: the prefill loop observes its batch size (`PREFILL_BATCH`).
- at scrape time: gauges and engine counters read from the live service objects
  (`watch(role, source)`: admission, region slots, decode engine rows and KV blocks).

Metrics named `hybrid_prefill_*` / `hybrid_decode_*` are exported only by a process
that called `watch` for that role; the shared ones carry a `role` label.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

log = logging.getLogger("hybrid.metrics")
ROLES = ("prefill", "decode")

REGISTRY = CollectorRegistry()
for _collector in (ProcessCollector, PlatformCollector, GCCollector):
    _collector(registry=REGISTRY)  # process_*, python_info, python_gc_*

# Buckets for LLM serving: a millisecond to minutes for request-level latencies, a
# fraction of a millisecond to seconds for per-token ones.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 20.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05,
                 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# ---- shared by both roles (label `role`) -------------------------------------------
REQUESTS = Counter(
    "hybrid_requests", "Prefill / Generate RPCs by final gRPC status (OK, CANCELLED, "
    "INVALID_ARGUMENT, ...)", ["role", "status"], registry=REGISTRY)
REQUEST_SECONDS = Histogram(
    "hybrid_request_duration_seconds", "Whole Prefill / Generate RPC, arrival to end",
    ["role"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
TTFT = Histogram(
    "hybrid_time_to_first_token_seconds", "prefill: Prefill arrival to its first token "
    "computed (PrefillDone sent); decode: Generate arrival to the first token sent",
    ["role"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
QUEUE_WAIT = Histogram(
    "hybrid_queue_wait_seconds", "Time a request waited: queue=admission (both roles), "
    "slot (prefill: a KV slot / the client's share), batch (prefill: for the loop to "
    "take its prompt)", ["role", "queue"], buckets=LATENCY_BUCKETS, registry=REGISTRY)

# ---- one role each: registered by watch(role) --------------------------------------
PREFILL_BATCH = Histogram(
    "hybrid_prefill_batch_size", "Prompts per packed prefill forward (warm-up included)",
    buckets=BATCH_BUCKETS, registry=None)
PREFILL_SECONDS = Histogram(
    "hybrid_prefill_compute_seconds", "Prefill compute of a request (first layer to "
    "first token)", buckets=LATENCY_BUCKETS, registry=None)
KV_WRITTEN = Counter(
    "hybrid_prefill_kv_written_bytes", "KV bytes prefill wrote into region slots "
    "(completed prefills)", registry=None)
KV_FETCHED = Counter(
    "hybrid_prefill_kv_fetched_bytes", "KV bytes prefill streamed out through FetchKv",
    registry=None)
TPOT = Histogram(
    "hybrid_time_per_output_token_seconds", "Per completed request: (last token sent - "
    "first token sent) / (tokens - 1)", buckets=TOKEN_BUCKETS, registry=None)
ITL = Histogram(
    "hybrid_inter_token_latency_seconds", "Gap between consecutive token chunks of a "
    "Generate stream (a chunk holds the tokens of one engine step)",
    buckets=TOKEN_BUCKETS, registry=None)
KV_INGESTED = Counter(
    "hybrid_decode_kv_ingested_bytes", "KV bytes decode read from prefill, by transport "
    "(shm: the mapped region; grpc: FetchKv)", ["transport"], registry=None)
INGEST_SECONDS = Histogram(
    "hybrid_decode_ingest_seconds", "Decode's KV ingest of a request (into device memory)",
    buckets=LATENCY_BUCKETS, registry=None)
GENERATED = Counter(
    "hybrid_decode_generated_tokens", "Tokens sent by Generate (prefill's first token "
    "included)", registry=None)
DECODE_SECONDS = Histogram(
    "hybrid_decode_seconds", "Decode time a session reports (decode_ms: first token handed "
    "to the engine to its last token)", buckets=LATENCY_BUCKETS, registry=None)
DECODE_MODELED = Histogram(
    "hybrid_decode_modeled_device_seconds_per_token", "FPGA backends: modeled U55C device "
    "time per token (U55C cycle model)", buckets=TOKEN_BUCKETS, registry=None)

_ROLE_METRICS = {
    "prefill": (PREFILL_BATCH, PREFILL_SECONDS, KV_WRITTEN, KV_FETCHED),
    "decode": (TPOT, ITL, KV_INGESTED, INGEST_SECONDS, GENERATED, DECODE_SECONDS,
               DECODE_MODELED),
}

# ---- read at scrape time: name -> (type, help, labelled by role) -------------------
SCRAPED: dict[str, tuple[str, str, bool]] = {
    "hybrid_requests_active": ("gauge", "Requests running (admitted)", True),
    "hybrid_requests_queued": ("gauge", "Requests waiting for admission", True),
    "hybrid_prefill_slots_in_use": ("gauge", "KV region slots allocated", False),
    "hybrid_prefill_slots": ("gauge", "KV region slots in all (--max-slots)", False),
    "hybrid_prefill_region_free_bytes": ("gauge", "Free bytes of the KV region", False),
    "hybrid_prefill_waiting_for_slot": ("gauge", "Requests in line for a KV slot", False),
    "hybrid_prefill_waiting_for_batch": ("gauge", "Prompts waiting for the prefill loop",
                                         False),
    "hybrid_decode_sessions_open": ("gauge", "Engine sequences not finished", False),
    "hybrid_decode_batch_rows_busy": ("gauge", "Engine batch rows decoding now", False),
    "hybrid_decode_steps_total": ("counter", "Engine decode steps", False),
    "hybrid_decode_batch_tokens_total": (
        "counter", "Rows computed over all engine steps (rate / steps' rate = mean batch "
        "size per step)", False),
    "hybrid_decode_kv_blocks_free": ("gauge", "Free paged-KV blocks", False),
    "hybrid_decode_kv_blocks": ("gauge", "Paged-KV blocks in all", False),
    "hybrid_decode_waiting_for_kv": ("gauge", "Sequences waiting for KV blocks", False),
    "hybrid_decode_waiting_for_row": ("gauge", "Sequences ready, waiting for a batch row",
                                      False),
    "hybrid_decode_hbm_used_bytes": ("gauge", "FPGA backends: HBM bytes in use", False),
    "hybrid_decode_hbm_capacity_bytes": ("gauge", "FPGA backends: HBM capacity", False),
}


class _Scraped:
    """A collector that asks each watched role's source for its values at scrape time."""

    def __init__(self) -> None:
        self.sources: dict[str, Callable[[], dict[str, Any]]] = {}

    def describe(self) -> Iterable[Metric]:
        return []  # names vary with the sources: nothing to check at register time

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for role, source in list(self.sources.items()):
            try:
                values = source()
            except Exception:  # a scrape must never fail because one source did
                log.debug("metrics source %s failed", role, exc_info=True)
                continue
            for name, value in values.items():
                spec, number = SCRAPED.get(name), _number(value)
                if spec is None or number is None:
                    continue
                kind, doc, by_role = spec
                fam = families.get(name)
                if fam is None:
                    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                    fam = families[name] = cls(name, doc, labels=["role"] if by_role else [])
                fam.add_metric([role] if by_role else [], number)
        return list(families.values())


_scraper = _Scraped()
REGISTRY.register(_scraper)
_lock = threading.Lock()
_watched: set[str] = set()


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def watch(role: str, source: Callable[[], dict[str, Any]] | None = None) -> None:
    """This process serves `role`: export its metrics, and read `source()` (metric name
    -> value, names from SCRAPED; others ignored) at every scrape. Idempotent; a later
    call replaces the role's source."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    with _lock:
        if role not in _watched:
            for metric in _ROLE_METRICS[role]:
                REGISTRY.register(metric)
            _watched.add(role)
            # the series dashboards expect, at 0 before the first request
            REQUESTS.labels(role, "OK")
            REQUEST_SECONDS.labels(role)
            TTFT.labels(role)
            QUEUE_WAIT.labels(role, "admission")
        if source is not None:
            _scraper.sources[role] = source


def serve_metrics(port: int, host: str = "127.0.0.1") -> Any:
    """Serve REGISTRY at http://host:port/metrics from a daemon thread; the HTTP server
    (shut it down with `stop_metrics`). A port that cannot be bound is an Unavailable
    with one line of reason, not a traceback."""
    from prometheus_client import start_http_server

    from engine.errors import Unavailable

    try:
        server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as e:
        raise Unavailable(f"cannot serve metrics on {host}:{port}: "
                          f"{e.strerror or e}") from None
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server


def stop_metrics(server: Any) -> None:
    """Stop a `serve_metrics` server (blocks up to its poll interval, 0.5 s)."""
    if server is not None:
        server.shutdown()
        server.server_close()


class Request:
    """One Prefill / Generate RPC: `sent(msg)` for each response before it is yielded,
    `admitted(queue_ms)` once admission let it in, `done(fields)` in the finally with the
    fields its log line prints. Never raises into the servicer."""

    __slots__ = ("role", "t0", "first", "last", "n_tokens", "queue_ms")

    def __init__(self, role: str) -> None:
        self.role, self.t0 = role, time.perf_counter()
        self.first: float | None = None   # first token sent (decode) / computed (prefill)
        self.last: float | None = None    # last token chunk sent (decode)
        self.n_tokens = 0
        self.queue_ms: float | None = None

    def admitted(self, queue_ms: float) -> None:
        self.queue_ms = queue_ms

    def sent(self, msg: Any) -> None:
        now = time.perf_counter()
        if self.role == "prefill":
            if self.first is None and msg.HasField("done"):
                self.first = now
            return
        if not msg.HasField("tokens") or not msg.tokens.ids:
            return
        if self.first is None:
            self.first = now
        else:
            ITL.observe(now - self.last)
        self.last = now
        self.n_tokens += len(msg.tokens.ids)

    def done(self, fields: dict[str, Any]) -> None:
        try:
            self._done(fields)
        except Exception:  # metrics must never change what a request does
            log.debug("metrics of a %s request failed", self.role, exc_info=True)

    def _done(self, f: dict[str, Any]) -> None:
        role, status = self.role, str(f.get("status", "UNKNOWN"))
        REQUESTS.labels(role, status).inc()
        REQUEST_SECONDS.labels(role).observe(time.perf_counter() - self.t0)
        if self.first is not None:
            TTFT.labels(role).observe(self.first - self.t0)
        if self.queue_ms is not None:
            QUEUE_WAIT.labels(role, "admission").observe(self.queue_ms / 1e3)
        if role == "prefill":
            if "slot_wait_ms" in f:
                QUEUE_WAIT.labels(role, "slot").observe(f["slot_wait_ms"] / 1e3)
            if "queue_ms" in f and self.queue_ms is not None:  # admission + batch wait
                QUEUE_WAIT.labels(role, "batch").observe(
                    max(0.0, f["queue_ms"] - self.queue_ms) / 1e3)
            if "prefill_ms" in f:
                PREFILL_SECONDS.observe(f["prefill_ms"] / 1e3)
            KV_WRITTEN.inc(f.get("kv_bytes", 0))
            return
        if f.get("kv_bytes"):
            KV_INGESTED.labels(str(f.get("kv", "shm"))).inc(f["kv_bytes"])
        if "ingest_ms" in f:
            INGEST_SECONDS.observe(f["ingest_ms"] / 1e3)
        GENERATED.inc(self.n_tokens)
        if status == "OK" and self.n_tokens > 1 and self.first is not None:
            TPOT.observe((self.last - self.first) / (self.n_tokens - 1))


def decode_timings(timings: dict[str, float]) -> None:
    """A finished decode session's timings (session.timings(): decode_ms,
    modeled_device_ms_per_token on the FPGA backends). Never raises."""
    try:
        DECODE_SECONDS.observe(timings.get("decode_ms", 0.0) / 1e3)
        modeled = timings.get("modeled_device_ms_per_token", 0.0)
        if modeled > 0:
            DECODE_MODELED.observe(modeled / 1e3)
    except Exception:
        log.debug("decode timings metrics failed", exc_info=True)
