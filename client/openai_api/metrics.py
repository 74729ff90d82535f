"""Prometheus metrics of the OpenAI endpoint process (prometheus_client, one registry per
app so several apps can live in one test process):

- `hybrid_openai_requests_total{endpoint, status}`: requests by route and HTTP status
  (499: the client went away before the answer)
- `hybrid_openai_request_duration_seconds{endpoint}`: request start to last byte
- `hybrid_openai_time_to_first_token_seconds{endpoint}`: request start to the first
  generated token (completions and chat)
- `hybrid_openai_requests_in_progress{endpoint}`
- `hybrid_openai_prompt_tokens_total`, `hybrid_openai_completion_tokens_total`
- the standard `process_*`, `python_*` collectors

`endpoint` is the route's path (`/v1/completions`, ...; `/v1/models/{id}` counts as
`/v1/models`) or `other`, so unknown paths cannot grow the label set.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TTFT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self, endpoints: tuple[str, ...]) -> None:
        self.endpoints = frozenset(endpoints)
        self.registry = r = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=r)
        self.requests = Counter("hybrid_openai_requests", "HTTP requests by route and status",
                                ["endpoint", "status"], registry=r)
        self.duration = Histogram("hybrid_openai_request_duration_seconds",
                                  "request start to the last byte of the answer",
                                  ["endpoint"], buckets=_LATENCY, registry=r)
        self.ttft = Histogram("hybrid_openai_time_to_first_token_seconds",
                              "request start to the first generated token", ["endpoint"],
                              buckets=_TTFT, registry=r)
        self.in_progress = Gauge("hybrid_openai_requests_in_progress", "requests being served",
                                 ["endpoint"], registry=r)
        self.prompt_tokens = Counter("hybrid_openai_prompt_tokens", "prompt tokens of "
                                     "completed generations", registry=r)
        self.completion_tokens = Counter("hybrid_openai_completion_tokens", "tokens generated",
                                         registry=r)

    def endpoint(self, path: str) -> str:
        if path.startswith("/v1/models/"):
            return "/v1/models"
        return path if path in self.endpoints else "other"

    def middleware(self, app):
        """ASGI middleware: counts every HTTP request by endpoint and final status, and
        times it to its last byte (streams included)."""
        metrics = self

        async def wrapped(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            endpoint = metrics.endpoint(scope.get("path", ""))
            status = {"code": 499}  # no response started: the client went away
            t0 = time.perf_counter()

            async def send_status(message):
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                await send(message)

            metrics.in_progress.labels(endpoint).inc()
            try:
                await app(scope, receive, send_status)
            except Exception:  # (a cancelled request stays 499)
                if status["code"] == 499:
                    status["code"] = 500
                raise
            finally:
                metrics.in_progress.labels(endpoint).dec()
                metrics.requests.labels(endpoint, str(status["code"])).inc()
                metrics.duration.labels(endpoint).observe(time.perf_counter() - t0)

        return wrapped
