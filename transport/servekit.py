"""gRPC server plumbing shared by the prefill and decode services.

Both services need the same lifecycle (health NOT_SERVING until ready, reflection,
bounded admission, graceful drain on SIGTERM) and the same error mapping; they may not
import each other, so it lives here beside the transport they share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection as grpc_reflection

from engine.errors import HybridError, ResourceExhausted, Unavailable
from transport.security import Security, open_channel

log = logging.getLogger("hybrid.server")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Largest message either side sends: KvChunk of FetchKv (default 1 MiB) with headroom.
MAX_MESSAGE_BYTES = 64 << 20
# Calls beyond the requests admission lets run or wait: Info, leases, FetchKv, health.
SPARE_RPCS = 128


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status an exception maps to; bad input never becomes UNKNOWN."""
    if isinstance(exc, HybridError):
        return grpc.StatusCode[exc.status]
    if isinstance(exc, grpc.aio.AioRpcError):  # an upstream call failed: keep its code
        return exc.code()
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(exc, ValueError | KeyError | IndexError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


class Admission:
    """Bounded concurrency with a bounded wait queue.

    At most `max_active` requests run; up to `max_queue` more wait; beyond that a
    request is refused at once with RESOURCE_EXHAUSTED rather than piling up.
    """

    def __init__(self, max_active: int, max_queue: int) -> None:
        self.max_active, self.max_queue = max_active, max_queue
        self._sem = asyncio.Semaphore(max_active)
        self.waiting = 0
        self.active = 0
        self.draining = False

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Yields the queue wait in ms."""
        from engine.errors import Unavailable

        if self.draining:
            raise Unavailable("server is shutting down")
        if self._sem.locked() and self.waiting >= self.max_queue:
            raise ResourceExhausted(
                f"queue full ({self.active} running, {self.waiting} waiting)")
        t0 = time.perf_counter()
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        try:
            yield (time.perf_counter() - t0) * 1e3
        finally:
            self.active -= 1
            self._sem.release()


def make_server(
    add_servicers: Callable[[grpc.aio.Server], None], service_names: Iterable[str], *,
    security: Security | None = None, reflection: bool = False, max_rpcs: int | None = None,
    max_request_bytes: int | None = None,
) -> tuple[grpc.aio.Server, health.HealthServicer]:
    """A grpc.aio server with health (NOT_SERVING for now), the bearer-token check when
    `security` has tokens, and server reflection only when asked for: reflection lists
    every method and message, which is a map for an attacker, so it is off by default.
    The port is bound by `add_port` (TLS or not).

    Requests are small (`max_request_bytes`, default limits.MAX_REQUEST_BYTES; the
    servers pass limits.request_bytes of their model): the gRPC core refuses a larger
    one with RESOURCE_EXHAUSTED before it is parsed, and at most `max_rpcs` calls run at
    once (beyond: RESOURCE_EXHAUSTED at once), so a flood of huge prompts can neither
    grow the process by gigabytes nor stall the event loop health answers on."""
    from transport.limits import MAX_REQUEST_BYTES

    server = grpc.aio.server(options=[
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", max_request_bytes or MAX_REQUEST_BYTES),
        ("grpc.so_reuseport", 0),
    ], interceptors=security.server_interceptors() if security else None,
        maximum_concurrent_rpcs=max_rpcs)
    add_servicers(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    for name in ["", *names]:
        health_servicer.set(name, NOT_SERVING)
    if reflection:
        grpc_reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             grpc_reflection.SERVICE_NAME], server)
    return server, health_servicer


def add_port(server: grpc.aio.Server, address: str, security: Security | None = None) -> int:
    """Bind `address`: TLS (mutual when the security has a CA) or plaintext. A port
    another process listens on is one clear Unavailable ("port 50051 on 127.0.0.1 is in
    use"), found by a test bind first, so the gRPC core logs no bind error of its own."""
    host, _, port = address.rpartition(":")
    check_port_free(host.strip("[]"), int(port) if port.isdigit() else 0)
    try:
        return (security or Security()).add_port(server, address)
    except RuntimeError as e:  # taken between the check and the bind, or not bindable
        raise Unavailable(f"cannot listen on port {port} on {host} ({e})") from None


def check_port_free(host: str, port: int) -> None:
    """Unavailable when `port` on `host` is taken (EADDRINUSE on a test bind with the
    SO_REUSEADDR the gRPC core sets too, so TIME_WAIT leftovers do not count). Port 0
    and addresses that do not resolve here are left to the real bind."""
    import errno
    import socket

    if port <= 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError:
        return
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(sockaddr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise Unavailable(
                        f"port {port} on {host or '*'} is in use (another process listens "
                        f"there: stop it, or choose another --port)") from None


def channel(target: str, options: list | None = None,
            security: Security | None = None) -> grpc.aio.Channel:
    """A channel from one service to another (decode -> prefill), secured like a client."""
    return open_channel(target, options, security)


def set_health(health_servicer: health.HealthServicer, names: Iterable[str], status) -> None:
    for name in ["", *names]:
        health_servicer.set(name, status)


async def run_until_signalled(
    server: grpc.aio.Server,
    health_servicer: health.HealthServicer,
    names: list[str],
    admission: Admission,
    grace_s: float,
    ready: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then: health NOT_SERVING, refuse new work, let
    in-flight requests finish for up to `grace_s`, stop. The caller closes resources."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    set_health(health_servicer, names, SERVING)
    if ready is not None:
        ready()
    await stop.wait()
    log.info("shutdown: draining %d active request(s), grace %.1fs", admission.active, grace_s)
    set_health(health_servicer, names, NOT_SERVING)
    admission.draining = True  # new requests: UNAVAILABLE from here on
    deadline = loop.time() + grace_s
    while (admission.active or admission.waiting) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    # server.stop() tears connections down once handlers return, which can cut off the
    # last responses still being written: give them a moment to leave first.
    await asyncio.sleep(0.2)
    await server.stop(max(0.5, deadline - loop.time()))
    log.info("shutdown: stopped")


def request_limit(model: str) -> int:
    """limits.request_bytes for `model`, read from its config without loading weights
    (the server starts before the weights load, so health answers meanwhile)."""
    from transport import limits

    try:
        from engine.loader import peek_config

        cfg = peek_config(model)
    except Exception:  # unknown preset, unreadable config: the load reports it
        cfg = None
    return limits.request_bytes(cfg.max_positions if cfg else None)


def on_fatal(health_servicer: health.HealthServicer, names: list[str], outcome: dict,
             what: str) -> Callable[[BaseException], None]:
    """A hook for a device loop (decode engine, prefill loop) that died of an error
    nothing in this process can recover from (a CUDA error poisons the context): from any
    thread, turn health NOT_SERVING at once, so routers and readiness probes move traffic
    elsewhere within a poll, and SIGTERM ourselves for the usual drain; `outcome["died"]`
    makes `run_process` exit with status 1, so a supervisor starts a fresh instance."""
    loop = asyncio.get_running_loop()

    def died(exc: BaseException) -> None:
        def on_loop() -> None:
            log.error("%s died (%s): health NOT_SERVING, exiting", what, exc)
            outcome["died"] = True
            set_health(health_servicer, names, NOT_SERVING)
            os.kill(os.getpid(), signal.SIGTERM)

        with contextlib.suppress(RuntimeError):  # the event loop is gone: exiting anyway
            loop.call_soon_threadsafe(on_loop)
    return died


def run_process(serve: Callable[[dict], Awaitable[None]]) -> None:
    """A service process: `asyncio.run(serve(outcome))`, then the exit watchdog; exit
    status 1 when a device loop died (`on_fatal` marked `outcome`), so a supervisor
    (Compose's restart policy, Kubernetes) starts a fresh instance."""
    outcome: dict = {}
    try:
        asyncio.run(serve(outcome))
    except BaseException:
        if not outcome.get("died"):
            raise
        # the clean-up after a dead device loop may fail on the same poisoned context
        log.exception("shutdown after a dead device loop failed")
    if outcome.get("died"):
        # The drain is over and the region closed. A dead device loop usually means a
        # poisoned CUDA context, and interpreter finalization would run torch's and
        # CuPy's destructors against it: c10 then aborts (seen on an H200: SIGABRT, exit
        # -6 and a core dump instead of 1, from a CUDAEvent destructor in Py_FinalizeEx).
        # Leave without finalizers.
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(1)
    exit_watchdog(code=0)


def exit_watchdog(grace_s: float = 5.0, code: int = 0) -> None:
    """Call once the server stopped. Interpreter exit joins every worker thread; one
    stuck in a call that cannot be interrupted (a device call that hangs, a blocking
    open) would keep the process alive after "shutdown: stopped" until SIGKILL. This
    ends it `grace_s` later, whatever still runs (exit status 0: the drain finished)."""
    import threading

    def force() -> None:
        log.warning("shutdown: worker threads still busy after %.0f s; exiting anyway", grace_s)
        logging.shutdown()
        os._exit(code)

    timer = threading.Timer(grace_s, force)
    timer.daemon = True
    timer.start()


# Proto enums <-> the names engine/, kernels/ and the backends use.
LAYOUTS = {"dense": 1, "hbm": 2}       # hybrid.v1.KvLayout
DTYPES = {"float16": 1, "bfloat16": 2, "float32": 3}  # hybrid.v1.DType


async def warm_up(role_log: logging.Logger, role: str, pool, fn: Callable, *args) -> None:
    """Run a service's warm-up `fn(*args)` (returns ms) before it says SERVING. On the
    requests' own executor `pool`: torch's CPU thread teams are per calling thread, and a
    warm-up on another thread made every later CPU prefill ~10 ms slower (75 -> 86 ms).
    A failed warm-up costs only the first request's speed: logged, never fatal."""
    try:
        ms = await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        role_log.info("%s warm-up done in %.0f ms", role, ms)
    except Exception:
        role_log.exception("%s warm-up failed; serving without it", role)


def layout_name(value: int) -> str:
    from engine.errors import InvalidArgument

    for name, v in LAYOUTS.items():
        if v == value:
            return name
    raise InvalidArgument(f"unknown KV layout {value} (known: dense=1, hbm=2)")


def dtype_name(value: int) -> str:
    from engine.errors import InvalidArgument

    for name, v in DTYPES.items():
        if v == value:
            return name
    raise InvalidArgument(f"unknown dtype {value} (known: fp16=1, bf16=2, fp32=3)")


def counters_proto(metrics: dict) -> dict[str, int]:
    """Service counters for ServiceInfo.counters: names with '-' for '_' ("slots-in-use"),
    only non-negative integer values (a backend that has no such count leaves it out)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, str) and v.isdigit():
            v = int(v)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            out[k.replace("_", "-")] = v
    return out


def sampling_from_proto(msg: object):
    """hybrid.v1.SamplingParams -> engine.sampling.SamplingParams (validated)."""
    from engine.errors import InvalidArgument
    from engine.sampling import SamplingParams

    # Proto floats are float32: 0.7 arrives as 0.699999988. Round back to the decimal
    # the user typed so sampling matches `generate --local` bit for bit.
    t, k, p = float(f"{msg.temperature:.7g}"), msg.top_k, float(f"{msg.top_p:.7g}")
    if not t >= 0.0:  # also catches NaN
        raise InvalidArgument(f"temperature must be >= 0, got {t}")
    if not 0.0 <= p <= 1.0:
        raise InvalidArgument(f"top_p must be in [0, 1], got {p}")
    seed = msg.seed if msg.HasField("seed") else None
    # A client that wants reproducible sampling sends the seed to both stages; without
    # one each stage draws its own (still a valid random sample).
    return SamplingParams(temperature=t, top_k=int(k), top_p=p or 1.0, seed=seed).with_seed()


class Undecodable:
    """What a request deserializer returns for bytes that are no valid message (garbage,
    invalid UTF-8 in a string field). Raising there would end the call as UNKNOWN with
    an ERROR traceback from the gRPC runtime; the servicer answers INVALID_ARGUMENT."""

    def __init__(self, error: str) -> None:
        self.error = error


def _parser(cls: type) -> Callable[[bytes], object]:
    def parse(raw: bytes) -> object:
        try:
            return cls.FromString(raw)
        except Exception as e:  # protobuf's DecodeError, UnicodeDecodeError, ...
            return Undecodable(f"undecodable {cls.DESCRIPTOR.name}: {type(e).__name__}")
    return parse


def add_service(server: grpc.aio.Server, service: str, servicer: object) -> None:
    """Register `servicer` for hybrid.v1 `service` like the generated add_*_to_server,
    but with parsers that hand undecodable bytes to the servicer as Undecodable."""
    from protos import hybrid_pb2 as pb

    desc = pb.DESCRIPTOR.services_by_name[service]
    handlers = {}
    for m in desc.methods:
        make = (grpc.unary_stream_rpc_method_handler if m.server_streaming
                else grpc.unary_unary_rpc_method_handler)
        handlers[m.name] = make(
            getattr(servicer, m.name), request_deserializer=_parser(getattr(pb, m.input_type.name)),
            response_serializer=getattr(pb, m.output_type.name).SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(desc.full_name,
                                                                          handlers),))


def late_servicer(base: type, holder: dict, streams: Iterable[str], unaries: Iterable[str]):
    """A servicer registered before the weights load (so health answers at once) that
    forwards each call to `holder["servicer"]` once it exists, UNAVAILABLE before: with
    `holder["error"]` (why it never will: no device, no pyxrt, ...) when set, else
    "weights are still loading". Register it with add_service: an Undecodable request
    is INVALID_ARGUMENT here."""

    async def real(request, context):
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)
        svc = holder.get("servicer")
        if svc is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                holder.get("error") or "weights are still loading")
        return svc

    def stream(name: str):
        async def method(self, request, context):
            async for msg in getattr(await real(request, context), name)(request, context):
                yield msg
        return method

    def unary(name: str):
        async def method(self, request, context):
            return await getattr(await real(request, context), name)(request, context)
        return method

    attrs = {n: stream(n) for n in streams} | {n: unary(n) for n in unaries}
    return type(f"Late{base.__name__}", (base,), attrs)()


def resolve_device(device: str, dtype: str) -> tuple[str, str]:
    """'auto' -> cuda when present, else cpu; dtype 'auto' -> float16 on CUDA, float32 on CPU."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    return device, dtype
