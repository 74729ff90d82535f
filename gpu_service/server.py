"""Prefill server process: load weights, create the KV region, serve until SIGTERM.

`hybrid serve prefill ...` (client/cmd_serve.py) lands in `serve(PrefillOptions(...))`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field

from engine.errors import InvalidArgument
from protos import hybrid_pb2 as pb
from protos import hybrid_pb2_grpc as pbg
from transport import metrics
from transport import servekit as kit
from transport.security import Security

log = logging.getLogger("hybrid.prefill")
STREAMS, UNARIES = ("Prefill", "FetchKv"), ("RenewLease", "Release", "Info", "Attach")
SERVICE = pb.DESCRIPTOR.services_by_name["PrefillService"].full_name


def _env_int(name: str, default: int) -> int:
    """A positive integer option from the environment. For options the CLI does not
    pass yet (it reads every HYBRID_* variable it knows itself and passes the value)."""
    raw = os.environ.get(name, "").strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise InvalidArgument(f"{name} must be an integer, got {raw!r}") from None
    if value < 1:
        raise InvalidArgument(f"{name} must be >= 1, got {value}")
    return value


@dataclass(frozen=True)
class PrefillOptions:
    model: str = "synthetic:gpt2"
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "auto"
    dtype: str = "auto"
    region_mb: int = 256
    max_slots: int = 64
    lease_s: float = 30.0
    checksums: bool = True
    max_active: int = 64
    max_queue: int = 64
    slot_wait_s: float = 5.0           # a request waits this long for a slot when full
    slots_per_client: int = 0          # slots one client (peer host) may hold; 0 = half
    grace_s: float = 10.0
    log_level: str = "info"
    warm_up: bool = True
    # The prefill loop packs every waiting prompt into one forward, up to this many
    # prompts and tokens. Concurrency also needs max_active >= max_batch: requests
    # beyond max_active wait in admission, not in the loop's batch.
    max_batch: int = field(default_factory=lambda: _env_int("HYBRID_PREFILL_MAX_BATCH", 32))
    max_batch_tokens: int = field(
        default_factory=lambda: _env_int("HYBRID_PREFILL_MAX_TOKENS", 4096))
    security: Security | None = None   # TLS / mutual TLS / bearer tokens (None: plaintext)
    reflection: bool = False           # server reflection: off unless asked for
    metrics_port: int = 0              # Prometheus /metrics on host:metrics_port; 0 = off
    # A GPU mirror of the region payload that GPU decoders read through CUDA IPC
    # (transport/device_kv.py): "auto" = on a CUDA device with CuPy, "off" = never.
    kv_device: str = "auto"

    def __post_init__(self) -> None:
        if self.kv_device not in ("auto", "off"):
            raise InvalidArgument(f"kv_device must be auto or off, got {self.kv_device!r}")
        if self.max_batch < 1 or self.max_batch_tokens < 1:
            raise InvalidArgument(f"prefill max_batch ({self.max_batch}) and max_batch_tokens "
                                  f"({self.max_batch_tokens}) must be >= 1")


async def _serve(opts: PrefillOptions, outcome: dict) -> None:
    from engine.loader import load_model
    from transport.region import KvRegion
    from transport.shm import sweep_stale

    from .runner import PrefillRunner
    from .servicer import PrefillServicer

    device, dtype = kit.resolve_device(opts.device, opts.dtype)
    admission = kit.Admission(opts.max_active, opts.max_queue)
    holder: dict = {}
    server, health = kit.make_server(
        lambda s: kit.add_service(s, "PrefillService", kit.late_servicer(
            pbg.PrefillServiceServicer, holder, STREAMS, UNARIES)), [SERVICE],
        security=opts.security, reflection=opts.reflection,
        max_rpcs=opts.max_active + opts.max_queue + kit.SPARE_RPCS,
        max_request_bytes=kit.request_limit(opts.model))
    port = kit.add_port(server, f"{opts.host}:{opts.port}", opts.security)
    await server.start()  # health answers NOT_SERVING while the weights load
    log.info("prefill listening on %s:%d (loading %s on %s/%s)", opts.host, port,
             opts.model, device, dtype)
    region = servicer = metrics_http = None
    try:
        if opts.metrics_port:  # up while the weights load: scrapes see the admission gauges
            metrics_http = _serve_metrics(opts, admission, holder)
        lm = await asyncio.to_thread(load_model, opts.model, device, dtype)
        # What a SIGKILLed predecessor left in /dev/shm (owner gone; this user's, our
        # prefix only): otherwise each crash leaks a whole region of shared memory.
        for name in sweep_stale():
            log.info("removed stale KV region %s (its owner is gone)", name)
        region = KvRegion.create(opts.region_mb << 20, opts.max_slots, lm.config.n_layers,
                                 opts.lease_s)
        _attach_mirror(region, lm.device, opts.kv_device)
        runner = PrefillRunner(lm, region, max_batch=opts.max_batch,
                               max_batch_tokens=opts.max_batch_tokens)
        servicer = PrefillServicer(runner, region, admission, opts.lease_s,
                                   checksums=opts.checksums, slot_wait_s=opts.slot_wait_s,
                                   slots_per_client=opts.slots_per_client or None)
        servicer.loop.on_death = kit.on_fatal(health, [SERVICE], outcome, "prefill loop")
        log.info("prefill batches: up to %d prompts, %d tokens (max_active %d)", opts.max_batch,
                 opts.max_batch_tokens, opts.max_active)
        if opts.warm_up:  # the work runs on the loop's thread; this executor only waits
            await kit.warm_up(log, "prefill", None, servicer.warm_up)
        holder["servicer"] = servicer
        reaper = asyncio.create_task(servicer.reap_leases(max(0.1, opts.lease_s / 4)))
        await kit.run_until_signalled(
            server, health, [SERVICE], admission, opts.grace_s,
            ready=lambda: log.info("prefill SERVING model=%s fingerprint=%s region=%s",
                                   lm.spec, lm.fingerprint[:16], region.name))
        reaper.cancel()
    finally:
        await server.stop(0)
        try:
            if servicer is not None:  # the loop writes into the region: stop it first
                await asyncio.to_thread(servicer.close)
        finally:  # even when that failed (a poisoned CUDA context): no /dev/shm leak,
            # since a process whose device loop died leaves without atexit handlers
            if region is not None:
                region.close()
            if metrics_http is not None:
                await asyncio.to_thread(metrics.stop_metrics, metrics_http)


def _attach_mirror(region, device, mode: str) -> None:
    """The region's GPU mirror (the GPU-to-GPU KV path) when asked for and possible."""
    from transport import device_kv

    if mode == "off" or device.type != "cuda" or not device_kv.available():
        log.info("KV device mirror: off (%s)", "--kv-device off" if mode == "off" else
                 "needs a CUDA device and CuPy")
        return
    g = region.geometry
    index = device.index if device.index is not None else 0
    region.attach_device(device_kv.DeviceMirror(g.payload_bytes, index, g.payload_offset))
    log.info("KV device mirror: %s (CUDA IPC to GPU decoders)", region.device.describe())


def _serve_metrics(opts: PrefillOptions, admission: kit.Admission, holder: dict):
    """Prometheus metrics (transport/metrics.py) on the gRPC bind host: the request
    metrics, plus gauges read at scrape time from admission and the servicer."""
    def values() -> dict:
        out = {"hybrid_requests_active": admission.active,
               "hybrid_requests_queued": admission.waiting}
        svc = holder.get("servicer")
        if svc is not None:
            st = svc.region.stats()
            out.update(hybrid_prefill_slots_in_use=st["slots_used"],
                       hybrid_prefill_slots=st["slots_used"] + st["slots_free"],
                       hybrid_prefill_region_free_bytes=st["bytes_free"],
                       hybrid_prefill_waiting_for_slot=svc.slots.waiting,
                       hybrid_prefill_waiting_for_batch=svc.loop.waiting)
        return out

    metrics.watch("prefill", values)
    return metrics.serve_metrics(opts.metrics_port, opts.host)


def serve(opts: PrefillOptions) -> None:
    kit.setup_logging(opts.log_level)
    kit.run_process(lambda outcome: _serve(opts, outcome))
