"""Prefill server process: load weights, create the KV region, serve until SIGTERM.

`hybrid serve prefill ...` (client/cmd_serve.py) lands in `serve(PrefillOptions(...))`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from protos import hybrid_pb2 as pb
from protos import hybrid_pb2_grpc as pbg
from transport import servekit as kit

log = logging.getLogger("hybrid.prefill")
STREAMS, UNARIES = ("Prefill", "FetchKv"), ("RenewLease", "Release", "Info")
SERVICE = pb.DESCRIPTOR.services_by_name["PrefillService"].full_name


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
    max_active: int = 4
    max_queue: int = 64
    grace_s: float = 10.0
    log_level: str = "info"
    warm_up: bool = True


async def _serve(opts: PrefillOptions) -> None:
    from engine.loader import load_model
    from transport.region import KvRegion

    from .runner import PrefillRunner
    from .servicer import PrefillServicer

    device, dtype = kit.resolve_device(opts.device, opts.dtype)
    admission = kit.Admission(opts.max_active, opts.max_queue)
    holder: dict = {}
    server, health = kit.make_server(
        lambda s: pbg.add_PrefillServiceServicer_to_server(
            kit.late_servicer(pbg.PrefillServiceServicer, holder, STREAMS, UNARIES), s), [SERVICE])
    port = server.add_insecure_port(f"{opts.host}:{opts.port}")
    await server.start()  # health answers NOT_SERVING while the weights load
    log.info("prefill listening on %s:%d (loading %s on %s/%s)", opts.host, port,
             opts.model, device, dtype)
    region = None
    try:
        lm = await asyncio.to_thread(load_model, opts.model, device, dtype)
        region = KvRegion.create(opts.region_mb << 20, opts.max_slots, lm.config.n_layers,
                                 opts.lease_s)
        servicer = PrefillServicer(PrefillRunner(lm, region), region, admission, opts.lease_s,
                                   checksums=opts.checksums)
        if opts.warm_up:
            await kit.warm_up(log, "prefill", servicer.pool, servicer.warm_up)
        holder["servicer"] = servicer
        reaper = asyncio.create_task(servicer.reap_leases(max(0.1, opts.lease_s / 4)))
        await kit.run_until_signalled(
            server, health, [SERVICE], admission, opts.grace_s,
            ready=lambda: log.info("prefill SERVING model=%s fingerprint=%s region=%s",
                                   lm.spec, lm.fingerprint[:16], region.name))
        reaper.cancel()
    finally:
        await server.stop(0)
        if region is not None:
            region.close()


def serve(opts: PrefillOptions) -> None:
    kit.setup_logging(opts.log_level)
    asyncio.run(_serve(opts))
