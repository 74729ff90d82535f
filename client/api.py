"""Python client of the service pair (grpc.aio).

    async with HybridClient("localhost:50051", "localhost:50052") as c:
        res = await c.generate("Hello", max_new_tokens=32)

Flow per request: Decode.Info (cached: the layout and weights the decoder wants) ->
Prefill stream (first message: the KV handle) -> at once Decode.Generate with that handle
while prefill still computes -> tokens stream in -> PrefillDone and GenerateDone timings.

Several services: `HybridClient("p1:50051,p2:50051", ["d1:50052", "d2:50052"])` (or
`dns:///name:port`): each request goes to the least-loaded SERVING prefill and a decode
attached to it (client/router.py, docs/routing.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine import errors
from engine.sampling_params import SamplingParams  # torch-free: the client never needs torch
from protos import hybrid_pb2 as pb
from transport.security import Security, open_channel

from .router import Instance, Router, states

_MAX_MSG = [("grpc.max_receive_message_length", 64 << 20)]
TRANSPORTS = {"shm": pb.KV_TRANSPORT_SHM, "grpc": pb.KV_TRANSPORT_GRPC}


@dataclass(frozen=True)
class RemoteResult:
    token_ids: list[int]           # generated ids only (prefill's first token included)
    text: str
    finish_reason: str
    model: str
    weights_fingerprint: str
    synthetic: bool
    timings: dict[str, float] = field(default_factory=dict)
    request_id: str = ""
    backend: str = ""
    prompt_ids: list[int] = field(default_factory=list)
    device: str = ""                 # "prefill <dev>, decode <dev>"
    dtype: str = ""                  # the decoder's KV dtype
    prefill_address: str = ""        # the services this request went to
    decode_address: str = ""
    kv_path: str = ""                # how the KV moved: shm | grpc | cuda-ipc

    def to_json(self) -> dict:
        return {"token_ids": self.token_ids, "text": self.text, "model": self.model,
                "weights_fingerprint": self.weights_fingerprint, "synthetic": self.synthetic,
                "finish_reason": self.finish_reason, "backend": self.backend,
                "request_id": self.request_id, "prompt_ids": self.prompt_ids,
                "device": self.device, "dtype": self.dtype, "timings": self.timings,
                "prefill_address": self.prefill_address,
                "decode_address": self.decode_address, "kv_path": self.kv_path}


def error_from_rpc(e: grpc.aio.AioRpcError | grpc.RpcError) -> errors.HybridError:
    """The engine.errors class named by a gRPC status, carrying its message."""
    by_status = {c.status: c for c in vars(errors).values()
                 if isinstance(c, type) and issubclass(c, errors.HybridError)}
    code = e.code()
    cls = by_status.get(code.name)
    err = (cls or errors.HybridError)(f"{code.name}: {e.details()}")
    if cls is None:
        err.status = code.name
    return err


def sampling_proto(p: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p)
    if p.seed is not None:
        msg.seed = p.seed
    return msg


class HybridClient:
    """One client for a prefill + decode pair, or for several of each (comma-separated
    strings or lists of addresses). Create inside a running event loop."""

    def __init__(self, prefill: str | Sequence[str] = "localhost:50051",
                 decode: str | Sequence[str] = "localhost:50052",
                 timeout_s: float = 120.0, security: Security | None = None,
                 channel_options: Iterable[tuple[str, object]] = (),
                 interval_s: float = 1.0) -> None:
        """`security`: TLS / mutual TLS / bearer token for every channel (None: plaintext).
        `channel_options`: more gRPC channel arguments, e.g. a long-lived client's
        `grpc.max_reconnect_backoff_ms` (client/openai_api/server.py). `interval_s`: how
        often each service is polled for health and load when there are several."""
        self.timeout_s = timeout_s
        self.router = Router(prefill, decode, security=security,
                             channel_options=[*_MAX_MSG, *channel_options], interval_s=interval_s)
        first = {r: (v[0].stub if v else None) for r, v in self.router.instances.items()}
        # the stubs of a single pair (None for dns:/// names)
        self.prefill, self.decode = first["prefill"], first["decode"]
        self._decode_info: pb.ServiceInfo | None = None

    async def __aenter__(self) -> HybridClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.router.close()

    async def decode_info(self) -> pb.ServiceInfo:
        """The decode service's Info (cached); with several, a SERVING one's last poll
        (they serve one model)."""
        if self.router.polled:
            return (await self._serving("decode")).info
        cached = self._decode_info
        if cached is None or any(not x.region for x in cached.prefills):
            # again until it attached to its prefill: what it mapped decides the KV path
            self._decode_info = await _call(self.decode.Info(pb.InfoRequest(), timeout=10.0))
        return self._decode_info

    async def prefill_info(self) -> pb.ServiceInfo:
        stub = (await self._serving("prefill")).stub if self.router.polled else self.prefill
        return await _call(stub.Info(pb.InfoRequest(), timeout=10.0))

    async def _serving(self, role: str) -> Instance:
        await self.router.start()
        inst = self.router.any_serving(role)
        if inst is None or inst.info is None:
            raise errors.Unavailable(f"no {role} service is SERVING: "
                                     f"{states(self.router.instances[role])}")
        return inst

    def routes(self) -> list[dict]:
        """Each service's state, load counters and this client's requests on it."""
        return self.router.snapshot()

    async def generate(self, prompt: str | None = None, *,
                       on_chunk: Callable[[list[int], str], None] | None = None,
                       **kw) -> RemoteResult:
        """Like `stream`, returning the result; each chunk's (ids, text) goes to `on_chunk`."""
        async for item in self.stream(prompt, **kw):
            if isinstance(item, RemoteResult):
                return item
            if on_chunk is not None:
                on_chunk(*item)
        raise errors.HybridError("stream ended without a result")

    async def stream(
        self, prompt: str | None = None, *, prompt_ids: Iterable[int] | None = None,
        max_new_tokens: int = 32, params: SamplingParams = SamplingParams(),  # noqa: B008 - frozen
        stop_ids: Iterable[int] = (), ignore_eos: bool = False, kv_transport: str = "shm",
        request_id: str | None = None, stop: Iterable[str] = (), kv_device: bool = True,
    ) -> AsyncIterator[tuple[list[int], str] | RemoteResult]:
        """Yields (ids, text piece) as tokens arrive, then one RemoteResult. `stop`: stop
        strings (engine.stop_text): the text ends before the first one completed.
        `kv_device`: with kv_transport shm, the KV goes GPU to GPU when the decode mapped
        its prefill's GPU mirror (CUDA IPC; its Info says so); False: always the host
        region. The result's `kv_path` says which way it went."""
        if kv_transport not in TRANSPORTS:
            raise errors.InvalidArgument(f"kv transport must be shm or grpc, not {kv_transport!r}")
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.timeout_s
        p, d = await self.router.pick()  # the least-loaded SERVING pair (or the only one)
        failed: BaseException | None = None
        try:  # aclosing: a consumer that stops early hangs up the calls at once
            async with contextlib.aclosing(self._stream(
                    p, d, t0, deadline, prompt, prompt_ids, max_new_tokens, params, stop_ids,
                    ignore_eos, kv_transport, request_id, stop, kv_device)) as items:
                async for item in items:
                    yield item
        except BaseException as e:
            failed = e
            raise
        finally:
            self.router.done(p, d, failed=failed)  # UNAVAILABLE: both are polled now

    async def _stream(self, p: Instance, d: Instance, t0: float, deadline: float, prompt,
                      prompt_ids, max_new_tokens, params, stop_ids, ignore_eos, kv_transport,
                      request_id, stop, kv_device=True):
        info = await self.decode_info() if not self.router.polled else d.info
        params = params.with_seed()  # both stages must draw from the same seed
        rid = request_id or uuid.uuid4().hex[:16]
        pcall = p.stub.Prefill(pb.PrefillRequest(
            request_id=rid, prompt=prompt or "", prompt_ids=list(prompt_ids or ()),
            layout=info.kv_layout, sampling=sampling_proto(params),
            max_new_tokens=max_new_tokens, expected_fingerprint=info.weights_fingerprint,
            kv_dtype=info.dtype,  # the decoder's slot dtype; UNSPECIFIED = prefill's default
            kv_on_device=kv_device and kv_transport == "shm" and device_paired(p, info)),
            timeout=_left(deadline))
        gcall = pdone_task = handle = None
        acc = _Tokens(t0)
        try:
            handle = await _first_handle(pcall)
            gcall = d.stub.Generate(pb.GenerateRequest(
                request_id=rid, handle=handle, sampling=sampling_proto(params),
                max_new_tokens=max_new_tokens, stop_ids=list(stop_ids),
                transport=TRANSPORTS[kv_transport], ignore_eos=ignore_eos, stop=list(stop)),
                timeout=_left(deadline))
            pdone_task = _watch_prefill(pcall, gcall)
            async for piece in acc.consume(gcall, pdone_task):
                yield piece
            pdone = await pdone_task
        finally:  # however we leave (error, consumer gone): hang up both calls
            pcall.cancel()
            if gcall is not None:
                gcall.cancel()
            if pdone_task is not None and not pdone_task.done():
                pdone_task.cancel()
            if handle is not None and acc.done is None:  # decode may never release it
                await _release_quietly(p.stub, rid, handle)
        yield _result(rid, handle, acc, pdone, (time.perf_counter() - t0) * 1e3, info,
                      p.address, d.address)


class _Tokens:
    """Collects one Generate stream: ids, text, the final GenerateDone, time to first token."""

    def __init__(self, t0: float) -> None:
        self.t0, self.ids, self.texts = t0, [], []
        self.done: pb.GenerateDone | None = None
        self.ttft_ms: float | None = None

    async def consume(self, gcall, pdone_task: asyncio.Task):
        try:
            async for msg in gcall:
                if msg.HasField("tokens"):
                    if self.ttft_ms is None:
                        self.ttft_ms = (time.perf_counter() - self.t0) * 1e3
                    self.ids.extend(msg.tokens.ids)
                    self.texts.append(msg.tokens.text)
                    yield list(msg.tokens.ids), msg.tokens.text
                else:
                    self.done = msg.done
        except grpc.aio.AioRpcError as e:
            cause = await _prefill_failure(pdone_task, e.code())
            raise (cause or error_from_rpc(e)) from None
        except asyncio.CancelledError:  # _watch_prefill cut decode short: prefill's error
            if pdone_task.done() and not pdone_task.cancelled() and pdone_task.exception():
                raise pdone_task.exception() from None
            raise
        if self.done is None:
            raise errors.Unavailable("decode stream ended without its timings")


async def _release_quietly(prefill, rid: str, handle: pb.KvHandle) -> None:
    """Give the slot back when this request did not finish: a decode service that died
    or refused the request would otherwise leave it held until its lease ends, and a
    decode restart would find the region full. A repeated release is harmless."""
    with contextlib.suppress(grpc.aio.AioRpcError):
        await asyncio.shield(prefill.Release(pb.LeaseRequest(request_id=rid, kv=handle.kv),
                                             timeout=2.0))


async def _first_handle(pcall) -> pb.KvHandle:
    first = await _call(pcall.read())
    if first is grpc.aio.EOF or not first.HasField("handle"):
        raise errors.Unavailable("prefill stream ended before its KV handle")
    return first.handle


# decode errors that follow from a failed prefill (its slot was freed or marked failed)
_CONSEQUENCES = (grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS)


async def _prefill_failure(task: asyncio.Task, code: grpc.StatusCode,
                           wait_s: float = 0.2) -> BaseException | None:
    """When decode failed with a status a failed prefill causes, prefill's own error if
    it failed too (the root cause: "prefill loop died: ...", not "KV handle is not
    valid"); it arrives at about the same time, so wait a moment for it."""
    if code not in _CONSEQUENCES:
        return None
    if not task.done():
        await asyncio.wait([task], timeout=wait_s)
    if task.done() and not task.cancelled() and task.exception() is not None:
        return task.exception()
    return None


def _watch_prefill(pcall, gcall) -> asyncio.Task:
    """Reads the rest of the Prefill stream; if prefill fails, decode would only notice
    at its readiness timeout, so cancel Generate at once (the error surfaces instead)."""
    task = asyncio.create_task(_prefill_done(pcall))
    task.add_done_callback(lambda t: t.cancelled() or t.exception() is None or gcall.cancel())
    return task


async def _prefill_done(pcall) -> pb.PrefillDone:
    while (msg := await _call(pcall.read())) is not grpc.aio.EOF:  # read(): no mixing APIs
        if msg.HasField("done"):
            return msg.done
    raise errors.Unavailable("prefill stream ended without PrefillDone")


async def _call(awaitable):
    try:
        return await awaitable
    except grpc.aio.AioRpcError as e:
        raise error_from_rpc(e) from None


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise errors.DeadlineExceeded("client deadline passed")
    return left


def _result(rid, handle, acc: _Tokens, pdone, total_ms, info, prefill: str = "",
            decode: str = "") -> RemoteResult:
    pt, dt = pdone.timings, acc.done.timings
    timings = {
        "prefill_ms": pt.prefill_ms, "decode_ms": dt.decode_ms, "total_ms": total_ms,
        "ttft_ms": acc.ttft_ms or 0.0, "kv_bytes": pt.kv_bytes, "transfer_ms": pt.transfer_ms,
        "exposed_transfer_ms": pt.exposed_transfer_ms,
        "decode_ms_per_token": dt.decode_ms_per_token, "ingest_ms": dt.ingest_ms,
        "ingest_wait_ms": dt.ingest_wait_ms, "queue_ms": pt.queue_ms + dt.queue_ms,
    }
    if dt.modeled_device_ms_per_token:
        timings["modeled_device_ms_per_token"] = dt.modeled_device_ms_per_token
    dtype = {1: "float16", 2: "bfloat16", 3: "float32"}.get(info.dtype, "")
    return RemoteResult(acc.ids, "".join(acc.texts), acc.done.finish_reason, handle.model,
                        handle.weights_fingerprint, info.synthetic, timings, rid,
                        acc.done.backend, list(handle.prompt_ids),
                        f"prefill {pdone.device}, decode {info.device}", dtype, prefill, decode,
                        dt.kv_path)


def device_paired(p: Instance, decode_info: pb.ServiceInfo) -> bool:
    """Whether the decode mapped prefill `p`'s GPU KV mirror (its Info's `prefills`):
    only then may the request ask prefill for KV on the device. A pair whose prefill was
    not polled (one prefill, one decode) is matched by the decode's only prefill."""
    paired = list(decode_info.prefills)
    key = p.region() if p.info is not None else None
    if key is None:
        return len(paired) == 1 and paired[0].device
    return any(x.device and (x.region.lstrip("/"), x.region_epoch) == key for x in paired)


async def health(target: str, service: str = "", timeout_s: float = 5.0,
                 security: Security | None = None) -> str:
    """The grpc.health.v1 status name of `target` ("SERVING", "NOT_SERVING", ...). Health
    needs no token, but a TLS server needs `security`'s CA (and client cert for mTLS)."""
    async with open_channel(target, None, security) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        try:
            r = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
