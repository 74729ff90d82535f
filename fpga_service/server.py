"""Decode server process: load a backend, serve until SIGTERM.

`hybrid serve decode ...` (client/cmd_serve.py) lands in `serve(DecodeOptions(...))`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from dataclasses import dataclass

from engine.errors import Unavailable
from protos import hybrid_pb2 as pb
from protos import hybrid_pb2_grpc as pbg
from transport import metrics
from transport import servekit as kit
from transport.security import Security

log = logging.getLogger("hybrid.decode")
SERVICE = pb.DESCRIPTOR.services_by_name["DecodeService"].full_name


@dataclass(frozen=True)
class DecodeOptions:
    model: str = "synthetic:gpt2"
    host: str = "127.0.0.1"
    port: int = 50052
    device: str = "auto"
    dtype: str = "auto"
    backend: str = "gpu"
    max_batch: int = 64                # engine batch rows
    prefill: str = "localhost:50051"   # its prefill(s), comma-separated: Attach, Release, FetchKv
    max_active: int = 16
    max_queue: int = 128
    wait_timeout_s: float = 60.0
    grace_s: float = 10.0
    log_level: str = "info"
    warm_up: bool = True               # a short request through the backend before SERVING
    # TLS / mutual TLS / bearer tokens (None: plaintext). Also decode's own client side
    # towards prefill: its cert/key as client cert, its CA to verify prefill, its token.
    security: Security | None = None
    reflection: bool = False           # server reflection: off unless asked for
    metrics_port: int = 0              # Prometheus /metrics on host:metrics_port; 0 = off
    kv_device: str = "auto"            # map prefills' GPU KV mirrors (CUDA IPC); "off": never


async def _serve(opts: DecodeOptions, outcome: dict) -> None:
    from .backends import make_backend
    from .servicer import DecodeServicer

    device, dtype = kit.resolve_device(opts.device, opts.dtype)
    admission = kit.Admission(opts.max_active, opts.max_queue)
    holder: dict = {}
    server, health = kit.make_server(
        lambda s: kit.add_service(s, "DecodeService", kit.late_servicer(
            pbg.DecodeServiceServicer, holder, ("Generate",), ("Info",))),
        [SERVICE], security=opts.security, reflection=opts.reflection,
        max_rpcs=opts.max_active + opts.max_queue + kit.SPARE_RPCS,
        max_request_bytes=kit.request_limit(opts.model))
    port = kit.add_port(server, f"{opts.host}:{opts.port}", opts.security)
    await server.start()  # health answers NOT_SERVING while the backend loads
    log.info("decode listening on %s:%d (backend %s, %s on %s/%s)", opts.host, port,
             opts.backend, opts.model, device, dtype)
    backend = servicer = premap = metrics_http = None
    try:
        if opts.metrics_port:  # up while the backend loads: scrapes see the admission gauges
            metrics_http = _serve_metrics(opts, admission, holder)
        try:
            backend = await asyncio.to_thread(
                make_backend, opts.backend, model_spec=opts.model, device=device, dtype=dtype,
                **_backend_options(opts))
        except Unavailable as e:  # e.g. fpga-xrt without pyxrt / xclbin / card
            log.error("decode backend %s unavailable, health stays NOT_SERVING: %s",
                      opts.backend, e)
            holder["error"] = f"decode backend {opts.backend} unavailable: {e}"  # Info says so
            await _until_signalled()
            return
        if getattr(backend, "engine", None) is not None:
            # the engine loop died (a CUDA error): NOT_SERVING, then exit non-zero
            backend.engine.on_death = kit.on_fatal(health, [SERVICE], outcome, "decode engine")
        # the name a restart of this service keeps (prefill reclaims by it): host:port
        servicer = DecodeServicer(backend, opts.prefill, admission, opts.wait_timeout_s,
                                  security=opts.security,
                                  consumer=f"{socket.gethostname()}:{port}",
                                  kv_device=opts.kv_device)
        # attach to every prefill, map regions ahead, notice restarts (not a condition of
        # SERVING: requests attach on demand too)
        premap = asyncio.create_task(servicer.keep_attached())
        if opts.warm_up:
            from .warmup import warm_up

            await kit.warm_up(log, "decode", servicer.pool, warm_up, backend)
        holder["servicer"] = servicer

        def pairing(reason: str) -> None:  # weights differ from prefill's: NOT_SERVING
            if holder.get("up") and not admission.draining:
                kit.set_health(health, [SERVICE], kit.NOT_SERVING if reason else kit.SERVING)

        def ready() -> None:
            log.info("decode SERVING backend=%s fingerprint=%s prefill=%s",
                     backend.name, servicer.fingerprint[:16], opts.prefill)
            holder["up"] = True
            if servicer.not_serving:  # found by an Attach before this point
                pairing(servicer.not_serving)

        servicer.on_pairing = pairing
        await kit.run_until_signalled(server, health, [SERVICE], admission, opts.grace_s,
                                      ready=ready)
    finally:
        if premap is not None:
            premap.cancel()
        await server.stop(0)
        if servicer is not None:
            await servicer.close()
        if backend is not None:
            backend.close()
        if metrics_http is not None:
            await asyncio.to_thread(metrics.stop_metrics, metrics_http)


def _serve_metrics(opts: DecodeOptions, admission: kit.Admission, holder: dict):
    """Prometheus metrics (transport/metrics.py) on the gRPC bind host: the request
    metrics, plus gauges and engine counters read at scrape time (every backend's
    engine loop; HBM figures from the FPGA backends' info())."""
    def values() -> dict:
        out = {"hybrid_requests_active": admission.active,
               "hybrid_requests_queued": admission.waiting}
        svc = holder.get("servicer")
        if svc is not None:
            st, info = svc.engine.stats(), svc.backend.info()
            out.update(hybrid_decode_sessions_open=st.get("live"),
                       hybrid_decode_batch_rows_busy=st.get("running"),
                       hybrid_decode_waiting_for_kv=st.get("waiting"),
                       hybrid_decode_waiting_for_row=st.get("ready"),
                       hybrid_decode_steps_total=st.get("steps"),
                       hybrid_decode_batch_tokens_total=st.get("rows_computed"),
                       hybrid_decode_kv_blocks_free=st.get("blocks_free"),
                       hybrid_decode_kv_blocks=st.get("blocks_total"),
                       hybrid_decode_hbm_used_bytes=info.get("hbm_used_bytes"),
                       hybrid_decode_hbm_capacity_bytes=info.get("hbm_capacity_bytes"))
        return out

    metrics.watch("decode", values)
    return metrics.serve_metrics(opts.metrics_port, opts.host)


def _backend_options(opts: DecodeOptions) -> dict:
    """Every backend runs one engine loop; max_batch is its batch rows (on the FPGA
    backends, sequences that take turns on the card, one kernel run each per step)."""
    return {"max_batch": opts.max_batch}


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def serve(opts: DecodeOptions) -> None:
    kit.setup_logging(opts.log_level)
    kit.run_process(lambda outcome: _serve(opts, outcome))
