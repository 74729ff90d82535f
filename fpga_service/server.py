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
    prefill: str = "localhost:50051"   # where Release / FetchKv go
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


async def _serve(opts: DecodeOptions) -> None:
    from .backends import make_backend
    from .servicer import DecodeServicer

    device, dtype = kit.resolve_device(opts.device, opts.dtype)
    admission = kit.Admission(opts.max_active, opts.max_queue)
    holder: dict = {}
    server, health = kit.make_server(
        lambda s: kit.add_service(s, "DecodeService", kit.late_servicer(
            pbg.DecodeServiceServicer, holder, ("Generate",), ("Info",))),
        [SERVICE], security=opts.security, reflection=opts.reflection,
        max_rpcs=opts.max_active + opts.max_queue + kit.SPARE_RPCS)
    port = kit.add_port(server, f"{opts.host}:{opts.port}", opts.security)
    await server.start()  # health answers NOT_SERVING while the backend loads
    log.info("decode listening on %s:%d (backend %s, %s on %s/%s)", opts.host, port,
             opts.backend, opts.model, device, dtype)
    backend = servicer = premap = None
    try:
        try:
            backend = await asyncio.to_thread(
                make_backend, opts.backend, model_spec=opts.model, device=device, dtype=dtype,
                **_backend_options(opts))
        except Unavailable as e:  # e.g. fpga-xrt without pyxrt / xclbin / card
            log.error("decode backend %s unavailable, health stays NOT_SERVING: %s",
                      opts.backend, e)
            await _until_signalled()
            return
        # the name a restart of this service keeps (prefill reclaims by it): host:port
        servicer = DecodeServicer(backend, opts.prefill, admission, opts.wait_timeout_s,
                                  security=opts.security,
                                  consumer=f"{socket.gethostname()}:{port}")
        premap = asyncio.create_task(servicer.premap_region())  # not a condition of SERVING
        if opts.warm_up:
            from .warmup import warm_up

            await kit.warm_up(log, "decode", servicer.pool, warm_up, backend)
        holder["servicer"] = servicer
        await kit.run_until_signalled(
            server, health, [SERVICE], admission, opts.grace_s,
            ready=lambda: log.info("decode SERVING backend=%s fingerprint=%s prefill=%s",
                                   backend.name, servicer.fingerprint[:16], opts.prefill))
    finally:
        if premap is not None:
            premap.cancel()
        await server.stop(0)
        if servicer is not None:
            await servicer.close()
        if backend is not None:
            backend.close()


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
    asyncio.run(_serve(opts))
    kit.exit_watchdog()
