"""DecodeService: handle -> checks -> session -> ingest layer by layer -> release the
slot -> stream tokens -> timings. Device work runs in a thread pool, never on the loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from engine.errors import DataLoss, FailedPrecondition, HybridError, InvalidArgument, Unavailable
from engine.generate import eos_id, is_stop
from engine.stop_text import StopStream, check_stops
from protos import hybrid_pb2 as pb
from protos import hybrid_pb2_grpc as pbg
from transport import limits
from transport import metrics as prom
from transport import servekit as kit
from transport.reader import ReaderPool

from .backends.base import DecodeBackend, DecodeSpec
from .ingest import FetchReceiver, IngestStats, KvReceiver, ShmReceiver
from .prefills import PrefillLink, PrefillSet, choose_transport, rpc_code
from .token_bridge import TokenBridge

log = logging.getLogger("hybrid.decode")
VERSION = "0.1.0"


class DecodeServicer(pbg.DecodeServiceServicer):
    def __init__(self, backend: DecodeBackend, prefill_addr: str | list[str],
                 admission: kit.Admission, wait_timeout_s: float = 60.0, security=None,
                 consumer: str = "", kv_device: str = "auto") -> None:
        self.backend, self.admission = backend, admission
        # The GPU-to-GPU KV path: our GPU's PCI bus id, sent at Attach ("" = host path
        # only: a CPU or FPGA backend, --kv-device off, or no CuPy)
        self.device_bus_id = _device_bus_id(backend, kv_device)
        info = backend.info()
        self.fingerprint, self.model = info["fingerprint"], info["model"]
        self.config, self.tokenizer = backend.config, backend.tokenizer
        self.eos = eos_id(self.tokenizer, self.config)
        self.wait_timeout_s = wait_timeout_s
        self.pool = ThreadPoolExecutor(admission.max_active * 2 + 2, "decode")
        self.readers = ReaderPool()  # one read-only mapping per prefill region
        # decode is a client of each of its prefills (`--prefill A,B`): one channel each,
        # its cert as client cert, its CA, its token (fpga_service/prefills.py)
        self.prefills = PrefillSet(prefill_addr, security)
        # Reported as Info trailing metadata: how KV reached us (shm vs grpc), sessions.
        self.stats: Counter = Counter()
        # Every backend decodes in its engine loop (engine/llm_engine.py): tokens reach
        # this event loop through the bridge, one wake-up per engine step.
        self.engine = backend.engine
        self.bridge = TokenBridge(asyncio.get_running_loop())
        self.engine.notifier = self.bridge.notify
        # Who we are to prefill (Attach): a name that survives a restart (host:port) and
        # this instance's epoch. A restarted instance attaches with a later epoch and
        # prefill frees at once the slots its dead predecessor held.
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}"
        self.consumer_epoch = time.time_ns()
        self._attached_at = 0.0  # last Attach of every prefill (re-attach rate limit)
        # Why this decode must not serve although it runs: its weights differ from its
        # prefills' (learnt from Attach; every attached one differs). Health NOT_SERVING
        # through `on_pairing` (the server's hook), the reason in Info; "" when one matches.
        self.not_serving = ""
        self.on_pairing: Callable[[str], None] | None = None
        self._background: set[asyncio.Task] = set()  # releases that outlive their request

    async def close(self) -> None:
        await self.prefills.close()
        self.readers.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ---- Generate ------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        rid = limits.printable(request.request_id)  # for the log line until checked
        t0 = time.perf_counter()
        fields: dict[str, Any] = {}
        obs = prom.Request("decode")  # metrics: observed from `fields` in the finally
        lease = owner = None
        try:
            rid = limits.request_id(request.request_id or request.handle.request_id)
            spec, desc, asked = self._check(request, rid)
            owner = await self._owner(desc)  # the prefill that lent this region, or refused
            transport = choose_transport(asked, owner.local)
            if desc.on_device:  # KV in the prefill GPU's mirror: GPU to GPU, or refused
                transport = _device_transport(owner)
            elif transport != asked:  # prefill on another host: FetchKv, not the region
                fields["kv_auto"] = "remote-region"
                self.stats["grpc_auto_requests"] += 1
            fields.update(n_prompt=spec.n_prompt, max_new=spec.max_new_tokens, kv=transport)
            # the slot stays ours however long this request waits here (admission, KV
            # blocks): renewed until its bytes are ingested and it is released
            lease = asyncio.create_task(self._keep_lease(request, rid, fields, owner))
            async with self.admission.slot() as queue_ms:
                fields["queue_ms"] = round(queue_ms, 2)
                obs.admitted(queue_ms)
                async for msg in self._generate(request, spec, desc, transport, context, fields,
                                                owner):
                    obs.sent(msg)
                    yield msg
            fields["status"] = "OK"
            self.stats[f"finish_{fields.get('finish', 'none')}"] += 1
        except (asyncio.CancelledError, GeneratorExit):  # client gone: an expected end,
            fields["status"] = "CANCELLED"               # one INFO line, no traceback
            self.stats["cancelled"] += 1
            if not fields.get("released") and request.handle.HasField("kv"):
                fields["released"] = True  # we noticed: the slot goes back now, not at lease end
                self._in_background(self._release(request, rid, owner or self._owner_of(request)))
            raise
        except Exception as e:
            code = kit.status_of(e)
            fields["status"] = code.name
            self.stats[f"status_{code.name.lower()}"] += 1
            if not fields.get("released") and request.handle.HasField("kv"):
                # refused: nobody will consume the slot. Only to the prefill that lent its
                # region: a handle of any other region is not ours to release
                await self._release(request, rid, owner or self._owner_of(request))
            if code == grpc.StatusCode.INTERNAL:
                log.exception("internal error id=%s", rid)
            # an upstream call's error carries its own details, not the call object's repr
            detail = e.details() if isinstance(e, grpc.aio.AioRpcError) else str(e)
            await context.abort(code, detail or type(e).__name__)
        finally:
            if lease is not None:
                lease.cancel()
            fields["total_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
            log.info("generate id=%s %s", rid, " ".join(f"{k}={v}" for k, v in fields.items()))
            obs.done(fields)

    async def _keep_lease(self, request, rid: str, fields: dict, owner: PrefillLink) -> None:
        """Claim the slot for this instance at once (a restart of ours then reclaims it),
        then renew its lease a third of it apart until it is released."""
        period = max(0.05, request.handle.lease_ms / 3e3) if request.handle.lease_ms else 5.0
        claim = pb.LeaseRequest(request_id=rid, kv=request.handle.kv, consumer=self.consumer,
                                consumer_epoch=self.consumer_epoch)
        while not fields.get("released"):
            try:
                await owner.stub.RenewLease(claim, timeout=5.0)
            except grpc.aio.AioRpcError as e:  # the read reports a lost slot precisely
                log.debug("renew id=%s: %s", rid, e.code().name)
                return
            await asyncio.sleep(period)

    def _in_background(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def attach(self) -> list[tuple[PrefillLink, BaseException | None]]:
        """Attach to every prefill service (at once): learn the one region each lets this
        decode read (a handle naming any other is refused before a file is opened), and
        have each free what an earlier instance of ours held. Again when a handle names
        an unknown region (a prefill restarted), at most twice a second. dns:/// names
        are looked up again first. Returns each prefill and its error (None: attached)."""
        await self.prefills.resolve()
        links = list(self.prefills)
        errs = await asyncio.gather(*(self.attach_one(link) for link in links),
                                    return_exceptions=True)
        self._attached_at = time.monotonic()
        self._update_not_serving()
        return [(link, e if isinstance(e, BaseException) else None)
                for link, e in zip(links, errs, strict=True)]

    async def attach_one(self, link: PrefillLink) -> tuple[str, int]:
        async with link.lock:
            try:
                reply = await link.stub.Attach(pb.AttachRequest(
                    consumer=self.consumer, consumer_epoch=self.consumer_epoch,
                    device_bus_id=self.device_bus_id), timeout=5.0)
            except grpc.aio.AioRpcError as e:
                link.state = f"unreachable: {e.code().name}"
                raise
            was = link.paired
            if self.prefills.paired(link, reply):
                log.info("attached to prefill %s region %s epoch %d (was %s; %s); prefill "
                         "freed %d slot(s) an earlier instance held", link.address,
                         reply.region, reply.region_epoch, was,
                         "on this host: shm" if link.local else "not on this host: FetchKv",
                         reply.reclaimed)
            link.weights = self._weights_reason(reply.weights_fingerprint)
            await self._map_mirror(link, reply)
            return link.paired

    async def _map_mirror(self, link: PrefillLink, reply: pb.AttachReply) -> None:
        """Open the prefill GPU's KV mirror (CUDA IPC) when it lent one and it is on this
        host; requests may then ask for KV on the device. A failure (no peer access
        between the two GPUs, ...) leaves the host path, said once in the log."""
        if link.mirror is not None or not reply.HasField("kv_device") or not link.local:
            return
        from transport import device_kv

        loop = asyncio.get_running_loop()
        try:
            # the IPC handle is in the region's header, not the reply: only a process
            # that may map the region (the prefill's uid) can have it
            reader = await loop.run_in_executor(self.pool, self.readers.get, reply.region)
            exported = reader.device_export()
            if exported is None:
                raise FailedPrecondition("the region's header names no GPU mirror")
            link.mirror = await loop.run_in_executor(
                self.pool, device_kv.PeerMirror.open, exported, self.backend.device_index())
        except Exception as e:
            note = f"{type(e).__name__}: {e}"
            if note != link.mirror_note:
                log.warning("prefill %s: its GPU KV mirror is not usable here (%s); KV "
                            "takes the host path", link.address, note)
            link.mirror_note = note
            return
        log.info("prefill %s: GPU KV mirror %s mapped on cuda:%d (CUDA IPC): KV GPU to GPU",
                 link.address, link.mirror.bus_id, link.mirror.device_index)

    def _weights_reason(self, prefill_fingerprint: str) -> str:
        theirs = prefill_fingerprint
        return "" if not theirs or theirs == self.fingerprint else (
            f"weights differ from the prefill service's: prefill fingerprint {theirs}, "
            f"decode fingerprint {self.fingerprint} (decode model {self.model}); start both "
            f"services with the same --model")

    def _update_not_serving(self) -> None:
        """Compare prefills' weights (AttachReply) with ours: a decode whose every
        attached prefill has other weights would fail every request, so say so once
        (ERROR), in health and in Info. With several prefills, one that differs while
        another matches is logged (its handles get FAILED_PRECONDITION) and we serve."""
        links = list(self.prefills)
        bad = [link for link in links if link.weights]
        good = any(link.paired and not link.weights for link in links)
        if len(links) > 1:
            for link in bad:
                if link.weights != link.logged:
                    link.logged = link.weights
                    log.error("prefill %s: %s; its handles are refused", link.address,
                              link.weights)
        if bad and not good:
            reason = bad[0].weights if len(links) == 1 else (
                "the weights of every attached prefill service differ from ours: " +
                "; ".join(f"{link.address}: {link.weights}" for link in bad))
        else:
            reason = ""
        if reason == self.not_serving:
            return
        if reason:
            log.error("%s; health NOT_SERVING, requests refused", reason)
        else:
            log.info("weights match the prefill service's again: serving")
        self.not_serving = reason
        if self.on_pairing is not None:
            self.on_pairing(reason)

    async def _owner(self, desc: Any) -> PrefillLink:
        """The prefill whose Attach lent the handle's region and epoch. A mismatch
        re-asks every prefill (one may have restarted), at most twice a second; still
        none: refused (nothing was opened)."""
        owner = self.prefills.owner(desc.region, desc.epoch)
        attached: list = []
        if owner is None and time.monotonic() - self._attached_at > 0.5:
            attached = await self.attach()
            owner = self.prefills.owner(desc.region, desc.epoch)
        if owner is not None:
            return owner
        down = [(link, e) for link, e in attached if e is not None]
        if down:  # the handle may be from a prefill we cannot reach now
            raise Unavailable("prefill service unreachable: " + ", ".join(
                f"{link.address} {rpc_code(e)}" for link, e in down))
        raise InvalidArgument("KV handle is not from one of this decode service's prefill "
                              "services (or from before it restarted)")

    def _owner_of(self, request) -> PrefillLink | None:
        kv = request.handle.kv
        return self.prefills.owner(kv.region, kv.epoch)

    def _check(self, request: pb.GenerateRequest, rid: str) -> tuple[DecodeSpec, Any, str]:
        from transport.descriptor import KvDescriptor

        if not request.HasField("handle") or not request.handle.HasField("kv"):
            raise InvalidArgument("missing handle (the KvHandle from Prefill)")
        h, c = request.handle, self.config
        if h.weights_fingerprint != self.fingerprint:
            raise FailedPrecondition(
                f"weights fingerprint mismatch: prefill {h.weights_fingerprint[:16]!r}, "
                f"decode {self.fingerprint[:16]!r}")
        if request.max_new_tokens < 1:
            raise InvalidArgument("max_new_tokens must be >= 1")
        check_stops(request.stop)
        stop_ids = limits.stop_ids(request.stop_ids)
        kv = h.kv
        want = kit.LAYOUTS[self.backend.kv_layout]
        if kv.layout != want:
            raise InvalidArgument(f"KV layout {pb.KvLayout.Name(kv.layout)} but backend "
                                  f"{self.backend.name} wants {pb.KvLayout.Name(want)}")
        if kv.dtype != kit.DTYPES[self.backend.kv_dtype]:
            raise InvalidArgument(f"KV dtype {pb.DType.Name(kv.dtype)} but backend wants "
                                  f"{self.backend.kv_dtype}")
        if (kv.n_layers, kv.n_kv_heads, kv.head_dim) != (c.n_layers, c.n_kv_heads, c.head_dim):
            raise InvalidArgument("KV shape (layers, kv heads, head dim) "
                                  f"{(kv.n_layers, kv.n_kv_heads, kv.head_dim)} does not fit the model")
        if kv.n_tokens < 1 or kv.n_tokens + request.max_new_tokens > c.max_positions:
            raise InvalidArgument(f"prompt ({kv.n_tokens}) + max_new_tokens "
                                  f"({request.max_new_tokens}) exceeds {c.max_positions} positions")
        transport = {pb.KV_TRANSPORT_UNSPECIFIED: "shm", pb.KV_TRANSPORT_SHM: "shm",
                     pb.KV_TRANSPORT_GRPC: "grpc"}.get(request.transport)
        if transport is None:
            raise InvalidArgument(f"unknown kv transport {request.transport}")
        spec = DecodeSpec(rid, kv.n_tokens, request.max_new_tokens,
                          kit.sampling_from_proto(request.sampling),
                          stop_ids, request.ignore_eos)
        return spec, KvDescriptor.from_proto(kv), transport

    async def _generate(self, request, spec: DecodeSpec, desc: Any, transport: str,
                        context, fields: dict, owner: PrefillLink):
        timeout = self.wait_timeout_s
        if context.time_remaining() is not None:
            timeout = min(timeout, max(0.0, context.time_remaining()))
        session = await self._open_session(spec)
        stop = threading.Event()
        tokens = None
        try:
            t_ingest = time.perf_counter()
            first, ist = await self._ingest(request, session, desc, transport, timeout, stop,
                                            owner)
            self._check_first(first)
            ingest_ms = (time.perf_counter() - t_ingest) * 1e3
            # The slot's bytes are in device memory: give it back, without making the
            # first token wait for that round trip to prefill.
            # In the background: a cancel of this handler must not cancel the Release
            # (the slot would stay held for a lease), and the stream's end must not wait
            # for prefill's answer (a stalled prefill would turn a finished stream into
            # DEADLINE_EXCEEDED).
            self._in_background(self._release(request, spec.request_id, owner))
            fields["released"] = True
            fields.update(kv_bytes=ist.bytes, ingest_ms=round(ingest_ms, 2),
                          ingest_wait_ms=round(ist.wait_ms, 2))
            text = StopStream(self.tokenizer, request.stop)
            piece, hit = text.push(first)
            yield _tokens([first], piece)
            n, finish = 1, "stop" if hit else _finish(first, spec, self.eos)
            if finish is None and spec.max_new_tokens > 1:
                tokens = self._chunks(session, first)
                async for chunk in tokens:
                    ids, pieces = [], []
                    for tok in chunk:
                        n += 1
                        ids.append(tok)
                        piece, hit = text.push(tok)
                        pieces.append(piece)
                        finish = "stop" if hit else _finish(tok, spec, self.eos)
                        if hit:
                            break
                    yield _tokens(ids, "".join(pieces))
                    if hit:
                        break  # the finally below stops the decode
            tail, hit = text.flush()  # bytes of an unfinished character, a stop's prefix
            if tail:
                yield _tokens([], tail)
            finish = "stop" if hit else finish
            yield self._done(session, finish or "length", n, ingest_ms, ist, fields)
        finally:
            stop.set()  # ends a pool thread still waiting on a layer
            if tokens is not None:
                await tokens.aclose()
            session.close()  # a cancel command to the engine loop: does not block
            if not fields.get("released"):  # never ingested: nobody else will consume it
                fields["released"] = True
                self._in_background(self._release(request, spec.request_id, owner))

    async def _open_session(self, spec: DecodeSpec):
        """backend.open_session on a pool thread. Cancelled while it runs (the client
        left), the thread still finishes it: the session it made (an engine sequence
        holding KV blocks) is closed when it does, instead of staying open for good."""
        fut = asyncio.get_running_loop().run_in_executor(self.pool, self.backend.open_session,
                                                         spec)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(_close_opened)
            raise

    def _done(self, session, finish: str, n: int, ingest_ms: float, ist: IngestStats,
              fields: dict) -> pb.GenerateResponse:
        t = session.timings()
        fields.update(n_tokens=n, decode_ms=round(t.get("decode_ms", 0.0), 2), finish=finish)
        prom.decode_timings(t)
        return pb.GenerateResponse(done=pb.GenerateDone(
            finish_reason=finish, backend=self.backend.name,
            timings=pb.DecodeTimings(
                ingest_ms=ingest_ms, ingest_wait_ms=ist.wait_ms,
                decode_ms=t.get("decode_ms", 0.0),
                decode_ms_per_token=t.get("decode_ms_per_token", 0.0),
                modeled_device_ms_per_token=t.get("modeled_device_ms_per_token", 0.0),
                n_tokens=n, queue_ms=fields.get("queue_ms", 0.0), kv_path=fields.get("kv", ""))))

    def _receiver(self, request, desc, transport: str, timeout: float, ist: IngestStats,
                  stop: threading.Event, owner: PrefillLink) -> KvReceiver:
        if transport == "shm":
            return ShmReceiver(desc, timeout, ist, readers=self.readers, pool=self.pool, stop=stop)
        return FetchReceiver(desc, timeout, ist, stub=owner.stub,
                             request_id=request.handle.request_id)

    async def _ingest(self, request, session, desc, transport: str, timeout: float,
                      stop: threading.Event, owner: PrefillLink):
        ist = IngestStats()
        if transport == "cuda-ipc":
            first = await self._ingest_device(session, desc, owner, timeout, stop, ist)
            self.stats["device_kv_bytes"] += ist.bytes
            self.stats["device_requests"] += 1
            return int(first), ist
        rx = self._receiver(request, desc, transport, timeout, ist, stop, owner)
        if hasattr(session, "prompt_buffer"):  # the engine takes the prompt in one piece
            first = await rx.into(session.prompt_buffer())
            session.ingest_staged()
        else:
            first = await self._ingest_layers(rx, session)
        self.stats[f"{rx.name}_kv_bytes"] += ist.bytes
        self.stats[f"{rx.name}_requests"] += 1
        return int(first), ist

    async def _ingest_device(self, session, desc, owner: PrefillLink, timeout: float,
                             stop: threading.Event, ist: IngestStats) -> int:
        """GPU to GPU: wait (futex, on the slot header as ever) until prefill published
        the first token -- every layer is in its mirror by then --, then the engine loop
        pulls the prompt's KV with one peer copy; the slot is released only after that
        copy has completed, and read again to be sure it is still this allocation."""
        if not hasattr(session, "ingest_device"):
            raise FailedPrecondition(f"the {self.backend.name} backend takes KV from host "
                                     "memory: ask prefill without kv_on_device")
        from kernels.comm import wait_event

        from .ingest import wait_device_ready

        loop = asyncio.get_running_loop()
        reader = await loop.run_in_executor(self.pool, self.readers.get, desc.region)
        t = time.perf_counter()
        first = await loop.run_in_executor(self.pool, wait_device_ready, reader, desc,
                                           timeout, stop)
        ist.wait_ms += (time.perf_counter() - t) * 1e3
        mirror = owner.mirror
        if mirror is None:
            raise FailedPrecondition("the prefill's GPU KV mirror is not mapped here")
        mirror.acquire()  # not unmapped under a copy (a re-attach waits for us)
        try:
            fut = session.ingest_device(mirror.view(desc.offset, desc.length), desc)
            event = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), timeout)
            if event is not None:
                await loop.run_in_executor(self.pool, wait_event, event, timeout,
                                           "GPU-to-GPU KV copy")
        finally:
            mirror.release()
        reader.check(desc)  # still this allocation: what was copied is its KV
        ist.bytes += desc.nbytes
        return first

    async def _ingest_layers(self, rx: KvReceiver, session) -> int:
        """Layer by layer into the session (the FPGA backends write each into HBM)."""
        layers, first = rx.layers(), None
        try:
            async for layer, data in layers:
                if layer < 0:
                    first = data
                    break
                session.ingest_layer(layer, data)  # a hand-over to the engine loop
        finally:
            await layers.aclose()  # ends a FetchKv stream at once
        return first

    def _check_first(self, first: int) -> None:
        """The first token comes from the prefill's shared region or a FetchKv stream; an
        id out of range would index past the embedding: a device-side assert poisons the
        CUDA context and takes the whole decode, every user's request, down with it."""
        if not 0 <= first < self.config.vocab_size:
            raise DataLoss(f"prefill's first token {first} is not in the model's vocabulary "
                           f"[0, {self.config.vocab_size})")

    async def _chunks(self, session, first: int):
        """Lists of tokens after `first`, from the engine's queue through the bridge."""
        session.start(first)
        async for chunk in self.bridge.chunks(session.seq, self.wait_timeout_s):
            yield chunk

    async def _release(self, request, rid: str, owner: PrefillLink | None) -> bool:
        """Give the slot back to the prefill that lent it (its bytes are in device memory,
        or the request ended). No owner (a region none of ours lent): not ours to free."""
        if owner is None:
            return False
        try:
            await owner.stub.Release(pb.LeaseRequest(request_id=rid, kv=request.handle.kv),
                                     timeout=5.0)
            return True
        except grpc.aio.AioRpcError as e:  # the lease reaper frees it anyway
            log.warning("release id=%s failed: %s %s", rid, e.code().name, e.details())
            return e.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.NOT_FOUND)

    async def keep_attached(self, period_s: float = 1.0, fast_s: float = 0.2,
                            fast_for_s: float = 60.0) -> None:
        """In the background, for as long as the service runs: attach to every prefill
        (every `fast_s` while one has not answered yet, for the first `fast_for_s`; then
        every `period_s`), map each one's region ahead of requests, and ask each prefill's
        Info every `period_s`: a restarted prefill (new region or epoch) is attached again
        at once, so Info's `prefills` (what a router pairs by) is never stale for long."""
        t0, rounds = time.monotonic(), 0
        while True:
            if rounds and rounds % 30 == 0:
                with contextlib.suppress(Exception):
                    await self.prefills.resolve()  # dns:/// names: new addresses
            rounds += 1
            links = list(self.prefills)
            await asyncio.gather(*(self._refresh(link, period_s) for link in links),
                                 return_exceptions=True)
            self._update_not_serving()
            waiting = any(link.paired is None for link in links)
            fast = waiting and time.monotonic() - t0 < fast_for_s
            await asyncio.sleep(fast_s if fast else period_s)

    async def _refresh(self, link: PrefillLink, timeout_s: float) -> None:
        if link.paired is not None:
            try:
                info = await link.stub.Info(pb.InfoRequest(), timeout=max(1.0, timeout_s))
            except grpc.aio.AioRpcError as e:
                link.state = f"unreachable: {e.code().name}"
                return
            if (info.region.lstrip("/"), info.region_epoch) == link.paired:
                link.state = "attached"
                return
        try:
            await self.attach_one(link)  # first time, or prefill restarted
        except grpc.aio.AioRpcError:  # not up yet (services may start in any order)
            return
        await self.premap_region(link)

    async def premap_region(self, link: PrefillLink) -> str | None:
        """Map an attached prefill's region ahead. The mapping pre-faults the whole
        region's page tables (MAP_POPULATE: 20-60 ms for 256 MiB on this machine), which
        the first request would pay otherwise. None when the prefill is on another host
        (no segment here: KV comes by FetchKv) or the region cannot be mapped."""
        region = link.paired[0] if link.paired else ""
        try:
            if not region or not link.local:
                return None
            if self.readers.mapped(region):  # a request was quicker
                return region
            t0 = time.perf_counter()
            await asyncio.get_running_loop().run_in_executor(self.pool, self.readers.get,
                                                             region)
        except HybridError as e:
            log.info("prefill region %s not mapped ahead: %s", region, e)
            return None
        log.info("mapped prefill region %s ahead of requests in %.1f ms", region,
                 (time.perf_counter() - t0) * 1e3)
        return region

    # ---- Info ----------------------------------------------------------------------
    async def Info(self, request, context):
        if self.not_serving and time.monotonic() - self._attached_at > 0.5:
            await self.attach()  # a prefill restarted with our weights? (errors: per link)
        c, b = self.config, self.backend
        info = b.info()
        metrics = dict(self.stats) | {"active": self.admission.active,
                                      "waiting": self.admission.waiting}
        keys = ["sessions_open", "batch_rows_busy", "batch_steps", "batch_tokens",
                "kv_blocks_free", "kv_blocks_total", "waiting_for_kv", "waiting_for_row"]
        for key in keys + [k for k in info if k.startswith("engine_")]:
            metrics[key] = info.get(key, "")  # optional: only backends that have them
        return pb.ServiceInfo(
            model=self.model, weights_fingerprint=self.fingerprint, device=info.get("device", ""),
            backend=b.name, kv_layout=kit.LAYOUTS[b.kv_layout], dtype=kit.DTYPES[b.kv_dtype],
            max_positions=c.max_positions, synthetic=bool(getattr(self.tokenizer, "synthetic", False)),
            n_layers=c.n_layers, version=VERSION, counters=kit.counters_proto(metrics),
            not_serving=self.not_serving, prefills=[link.proto() for link in self.prefills])


def _tokens(ids: list[int], text: str) -> pb.GenerateResponse:
    return pb.GenerateResponse(tokens=pb.TokenChunk(ids=ids, text=text))


def _finish(tok: int, spec: DecodeSpec, eos: int | None) -> str | None:
    return is_stop(tok, eos, spec.stop_ids, spec.ignore_eos)


def _device_bus_id(backend: DecodeBackend, mode: str) -> str:
    """Our GPU's PCI bus id when this backend can take KV GPU to GPU, else ""."""
    index = getattr(backend, "device_index", lambda: None)()
    if mode == "off" or index is None:
        return ""
    from transport import device_kv

    if not device_kv.available():
        return ""
    try:
        return device_kv.bus_id(index)
    except Exception as e:
        log.warning("no GPU-to-GPU KV path: %s", e)
        return ""


def _device_transport(owner: PrefillLink) -> str:
    if owner.mirror is None:
        why = owner.mirror_note or "this decode has no GPU mapping of it"
        raise FailedPrecondition(f"the KV is in prefill {owner.address}'s GPU mirror, which "
                                 f"this decode cannot read ({why}); ask prefill without "
                                 "kv_on_device")
    return "cuda-ipc"


def _close_opened(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is None:
        fut.result().close()  # a cancel command to the engine loop: does not block
