"""PrefillService: message -> checks -> slot -> prefill loop (one thread, batched) ->
messages.

Handlers run on the asyncio loop and never touch the device: they validate, allocate
the slot, send the handle, then hand the prompt to the PrefillLoop and await its
result. The handler owns the slot until the first token is published: it frees it when
the prefill did not complete (error or cancel); after that the consumer releases it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import weakref
from collections import Counter
from typing import Any

import grpc

from engine.errors import FailedPrecondition, HybridError, InvalidArgument
from engine.sampling import SamplingParams
from protos import hybrid_pb2 as pb
from protos import hybrid_pb2_grpc as pbg
from transport import limits
from transport import metrics as prom
from transport import servekit as kit
from transport.descriptor import KvDescriptor

from .client_slots import ClientSlots, client_of
from .loop import PrefillLoop
from .runner import PrefillRunner
from .slot_queue import SlotQueue

log = logging.getLogger("hybrid.prefill")
VERSION = "0.1.0"
_CONSUMER_RE = re.compile(r"^[A-Za-z0-9._:@\[\]-]{1,128}$")


class PrefillServicer(pbg.PrefillServiceServicer):
    def __init__(self, runner: PrefillRunner, region: Any, admission: kit.Admission,
                 lease_s: float, wait_timeout_s: float = 60.0, checksums: bool = True,
                 loop: PrefillLoop | None = None, slot_wait_s: float = 5.0,
                 slots_per_client: int | None = None) -> None:
        self.runner, self.region, self.admission = runner, region, admission
        # requests wait in line (bounded) for a slot while the region is full
        self.slots = SlotQueue(slot_wait_s)
        # ... and while their client holds its share: one client cannot fill the region
        cap = slots_per_client or max(1, region.geometry.max_slots // 2)
        self.clients = ClientSlots(cap, slot_wait_s)
        self._holders: dict[tuple[int, bytes], str] = {}  # (slot, secret) -> client
        self._aloop: asyncio.AbstractEventLoop | None = None  # where requests hold slots
        region.on_release = _weakly(self._on_release)  # the region must not keep us alive
        self.lm = runner.lm
        self.lease_s, self.wait_timeout_s = lease_s, wait_timeout_s
        self.checksums = checksums  # per-layer xxh3 in the slot header: DATA_LOSS on mismatch
        # Counters reported in ServiceInfo.counters: what tests and
        # operators use to see slots in use and how KV left this process.
        self.stats: Counter = Counter()
        # The one thread that does all device work (batches the waiting prompts). FetchKv's
        # blocking readiness waits run on the default executor: they never delay it.
        self.loop = loop or PrefillLoop(runner)

    def close(self) -> None:
        """Stop the prefill loop; prompts not yet run fail with UNAVAILABLE."""
        self.loop.close()

    # ---- Prefill -------------------------------------------------------------------
    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext):
        rid = limits.printable(request.request_id)  # for the log line until checked
        t0 = time.perf_counter()
        fields: dict[str, Any] = {}
        obs = prom.Request("prefill")  # metrics: observed from `fields` in the finally
        try:
            rid = limits.request_id(request.request_id)
            layout, ids, params = await self._check(request)
            dtype = self._requested_dtype(request)
            self.runner.layer_bytes(layout, 1, dtype)  # InvalidArgument for a bad layout/dtype pair
            fields.update(layout=layout, dtype=self.runner.slot_dtype(layout, dtype), n_prompt=len(ids))
            client = client_of(context.peer())
            on_device = request.kv_on_device
            if on_device:
                fields["kv"] = "device"
            async with self.admission.slot() as queue_ms:
                obs.admitted(queue_ms)
                async for msg in self._prefill(rid, client, ids, layout, dtype, params,
                                               queue_ms, fields, on_device):
                    obs.sent(msg)
                    yield msg
            fields["status"] = "OK"
        except (asyncio.CancelledError, GeneratorExit):  # client gone: an expected end,
            fields["status"] = "CANCELLED"               # one INFO line, no traceback
            raise
        except Exception as e:
            fields["status"] = kit.status_of(e).name
            await self._abort(context, e)
        finally:
            fields["total_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
            log.info("prefill id=%s %s", rid, " ".join(f"{k}={v}" for k, v in fields.items()))
            obs.done(fields)

    async def _check(self, request: pb.PrefillRequest):
        if request.expected_fingerprint and request.expected_fingerprint != self.lm.fingerprint:
            raise FailedPrecondition(
                f"weights fingerprint mismatch: decoder has {request.expected_fingerprint[:16]}, "
                f"prefill has {self.lm.fingerprint[:16]}")
        layout = "dense" if request.layout == pb.KV_LAYOUT_UNSPECIFIED else kit.layout_name(request.layout)
        # Sizes first (len() of a repeated field or a str is O(1)): a 4 MiB prompt must
        # not become a million-element list or a second-long tokenization before the
        # length check refuses it.
        limits.prompt_size(len(request.prompt_ids), len(request.prompt),
                           self.runner.config.max_positions)
        if request.prompt_ids:
            ids = list(request.prompt_ids)
        elif len(request.prompt) > limits.ENCODE_INLINE_CHARS:  # off the event loop
            ids = await asyncio.to_thread(self.lm.tokenizer.encode, request.prompt)
        else:
            ids = self.lm.tokenizer.encode(request.prompt) if request.prompt else []
        self.runner.check_prompt(ids, request.max_new_tokens)
        return layout, ids, kit.sampling_from_proto(request.sampling)

    @staticmethod
    def _requested_dtype(request: pb.PrefillRequest) -> str | None:
        """The slot dtype the decoder wants (`PrefillRequest.kv_dtype`, forwarded by the
        client from Decode.Info); None = DTYPE_UNSPECIFIED, the runner's default."""
        if request.kv_dtype == pb.DTYPE_UNSPECIFIED:
            return None
        try:
            return kit.dtype_name(request.kv_dtype)
        except InvalidArgument as e:
            raise InvalidArgument(f"PrefillRequest.kv_dtype: {e}") from None

    async def _prefill(self, rid: str, client: str, ids: list[int], layout: str,
                       dtype: str | None, params: Any, queue_ms: float, fields: dict,
                       on_device: bool = False):
        t_slot = time.perf_counter()
        desc = await self._hold_slot(client, lambda: self._alloc(ids, layout, dtype, on_device))
        fields["slot_wait_ms"] = round((time.perf_counter() - t_slot) * 1e3, 2)
        self.stats["slots_allocated"] += 1
        self.stats["device_slots"] += on_device
        done = False
        try:
            yield pb.PrefillResponse(handle=pb.KvHandle(
                request_id=rid, kv=desc.to_proto(), weights_fingerprint=self.lm.fingerprint,
                model=self.lm.spec, lease_ms=int(self.lease_s * 1e3), prompt_ids=ids))
            job, fut = self.loop.submit_async(ids, desc, layout, params)
            try:
                res = await asyncio.shield(fut)
            except asyncio.CancelledError:
                # Dropped if still queued, else stops at its next layer; the slot is freed
                # below once the loop let go of it (its copies have landed).
                self.loop.cancel(job)
                await asyncio.wait([fut], timeout=self.wait_timeout_s)
                if fut.done():
                    fut.exception()  # seen (Cancelled, mostly): asyncio must not log it
                raise
            st = res.ship
            queue_ms += res.queue_ms  # admission wait + wait for a batch
            fields.update(kv_bytes=st.kv_bytes, queue_ms=round(queue_ms, 2), batch=res.batch,
                          prefill_ms=round(res.prefill_ms, 2),
                          transfer_ms=round(st.transfer_ms, 3),
                          exposed_ms=round(st.exposed_transfer_ms, 3))
            done = True
            self.stats["prefills_done"] += 1
            yield pb.PrefillResponse(done=pb.PrefillDone(
                first_token=res.first_token,
                first_text=self.lm.tokenizer.decode([res.first_token]),
                device=str(self.lm.device),
                timings=pb.PrefillTimings(
                    queue_ms=queue_ms, prefill_ms=res.prefill_ms, transfer_ms=st.transfer_ms,
                    exposed_transfer_ms=st.exposed_transfer_ms, kv_bytes=st.kv_bytes)))
        finally:
            if not done:
                self._fail_slot(desc, "prefill did not complete")

    async def _hold_slot(self, client: str, alloc: Any) -> KvDescriptor:
        """A slot for `client`: within its share, then in line for the region."""
        self._aloop = asyncio.get_running_loop()
        await self.clients.acquire(client)
        try:
            desc = await self.slots.alloc(alloc)
        except BaseException:
            self.clients.release(client)
            raise
        self._holders[(desc.slot, desc.secret)] = client
        return desc

    def _claimed(self, desc: KvDescriptor) -> None:
        """A decoder took the slot on: it no longer counts against the client's share.
        The share bounds slots nobody consumes (a client that prefills and never
        generates), not a busy client's traffic: behind a gateway every user is one
        client, and its slots are claimed within milliseconds of their handles."""
        client = self._holders.pop((desc.slot, desc.secret), None)
        if client is not None:
            self.clients.release(client)

    def _on_release(self, desc: KvDescriptor) -> None:
        """The region's hook: every freed slot, whatever freed it (Release, a failed
        prefill, the reaper, alloc's own reaping of expired leases, a reclaim), gives back
        its client's share and wakes a waiter, on the event loop those live on."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # a worker thread (warm-up): the requests' loop does it
            if self._aloop is not None and not self._aloop.is_closed():
                self._aloop.call_soon_threadsafe(self._freed, desc)
            return
        self._freed(desc)

    def _freed(self, desc: KvDescriptor) -> None:
        self._claimed(desc)
        self.slots.wake_one()

    def _alloc(self, ids: list[int], layout: str, dtype: str | None,
               on_device: bool = False) -> Any:
        n_layers = self.runner.config.n_layers
        layer_bytes = self.runner.layer_bytes(layout, len(ids), dtype)
        return self.region.alloc(
            layer_bytes * n_layers, n_layers, layout=layout, checksums=self.checksums,
            dtype=self.runner.slot_dtype(layout, dtype), n_tokens=len(ids),
            n_kv_heads=self.runner.config.n_kv_heads, head_dim=self.runner.config.head_dim,
            on_device=on_device)

    def warm_up(self, n_tokens: int = 16) -> float:
        """One short prefill per slot layout through the request path (the prefill loop's
        thread: model, reshape kernels, shippers, region), before the service says
        SERVING: the first real request then finds kernels compiled, libraries
        initialised and buffers made instead of paying for them. Blocks (call it off the
        event loop). Leaves no slot and no counter behind; returns ms."""
        t0 = time.perf_counter()
        batch_counts = self.loop.stats.copy()  # the loop is idle before SERVING
        ids = [i % self.runner.config.vocab_size for i in range(1, n_tokens + 1)]
        kinds = [("dense", False), ("hbm", False)]
        if self.region.device is not None:  # the device-to-device copies into the mirror
            kinds.append(("dense", True))
        for layout, on_device in kinds:
            try:
                desc = self._alloc(ids, layout, None, on_device)
            except HybridError as e:  # a layout this model or region cannot take
                log.info("warm-up: no %s slot (%s)", layout, e)
                continue
            try:
                # No timeout, as a direct call had none: a slot may only be freed once
                # the loop let go of it.
                self.loop.run_sync(ids, desc, layout, SamplingParams())
            finally:
                self.region.free(desc, "warm-up")
        self.loop.stats.clear()
        self.loop.stats.update(batch_counts)
        return (time.perf_counter() - t0) * 1e3

    def _fail_slot(self, desc: Any, reason: str) -> None:
        try:
            self.region.mark_failed(desc, reason)
            self.region.free(desc)
            self.stats["slots_failed"] += 1
        except HybridError as e:  # already freed (stale generation): nothing to undo
            log.debug("fail_slot: %s", e)

    # ---- leases --------------------------------------------------------------------
    async def RenewLease(self, request: pb.LeaseRequest, context):
        """Renew a slot's lease; with `consumer` set (a decode service), also claim it
        for that instance, so its restart reclaims the slot at once (Attach)."""
        try:
            desc = self._desc(request)
            if request.consumer:
                self.region.claim(desc, _consumer(request.consumer), request.consumer_epoch)
                self._claimed(desc)
            else:
                self.region.renew(desc)
        except Exception as e:
            await self._abort(context, e)
        return pb.LeaseReply(lease_ms=int(self.lease_s * 1e3))

    async def Release(self, request: pb.LeaseRequest, context):
        """Free the slot now. Idempotent for its holder: a repeated release is OK."""
        try:
            desc = self._desc(request)
            if self.region.free(desc):
                self.stats["slots_released"] += 1
        except Exception as e:
            await self._abort(context, e)
        return pb.LeaseReply(lease_ms=0)

    async def Attach(self, request: pb.AttachRequest, context):
        """A decode service (re)starting: free the slots earlier instances of it held
        (they died mid-request: nothing will read or release them), and tell it which
        region it may read."""
        try:
            name = _consumer(request.consumer)
            if request.consumer_epoch < 1:
                raise InvalidArgument("consumer_epoch must be >= 1")
            dead = self.region.reclaim(name, request.consumer_epoch)
        except Exception as e:
            await self._abort(context, e)
        self.stats["slots_reclaimed"] += len(dead)
        log.info("attach consumer=%s epoch=%d reclaimed=%d", name, request.consumer_epoch,
                 len(dead))
        reply = pb.AttachReply(region=self.region.name, region_epoch=self.region.epoch,
                               reclaimed=len(dead), weights_fingerprint=self.lm.fingerprint)
        mirror = self.region.device
        if request.device_bus_id and mirror is not None:
            # a GPU decoder: where the mirror is, not its IPC handle. The handle maps
            # every slot's bytes, so it is only in the region's header, which only a
            # process that may map the region (our uid) can read (transport.md).
            ex = mirror.export()
            reply.kv_device.CopyFrom(pb.KvDevice(bus_id=ex["bus_id"], nbytes=ex["nbytes"],
                                                 payload_offset=ex["payload_offset"]))
        return reply

    def _desc(self, request: Any) -> KvDescriptor:
        if not request.HasField("kv"):
            raise InvalidArgument("missing kv descriptor")
        return KvDescriptor.from_proto(request.kv)

    async def reap_leases(self, period_s: float) -> None:
        """Free slots whose consumer stopped renewing (e.g. a decoder that died)."""
        while True:
            await asyncio.sleep(period_s)
            try:
                freed = self.region.reap_expired()
                if freed:
                    self.stats["slots_reaped"] += len(freed)
                    log.info("lease reaper freed %d slot(s): %s", len(freed),
                             ", ".join(str(d.slot) for d in freed))
            except Exception:
                log.exception("lease reaper")

    # ---- FetchKv -------------------------------------------------------------------
    async def FetchKv(self, request: pb.FetchKvRequest, context):
        from transport.fetch import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, iter_chunks

        t0, n, status = time.perf_counter(), 0, "OK"
        rid = limits.printable(request.request_id)
        try:
            desc = self._desc(request)
            self.region.check(desc)  # the capability, before anything else
            chunk = limits.chunk_bytes(request.chunk_bytes, DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES)
            timeout = min(self.wait_timeout_s, context.time_remaining() or self.wait_timeout_s)
            it = iter_chunks(self.region, desc, chunk, timeout)
            loop = asyncio.get_running_loop()
            end = object()
            while (chunk := await loop.run_in_executor(None, next, it, end)) is not end:
                n += len(chunk.data)
                self.stats["fetch_bytes"] += len(chunk.data)
                prom.KV_FETCHED.inc(len(chunk.data))
                yield chunk
            self.stats["fetch_streams"] += 1
        except (asyncio.CancelledError, GeneratorExit):
            status = "CANCELLED"
            raise
        except Exception as e:
            status = kit.status_of(e).name
            await self._abort(context, e)
        finally:
            log.info("fetch id=%s bytes=%d status=%s total_ms=%.2f", rid, n, status,
                     (time.perf_counter() - t0) * 1e3)

    # ---- Info ----------------------------------------------------------------------
    async def Info(self, request: pb.InfoRequest, context):
        c = self.runner.config
        return pb.ServiceInfo(
            model=self.lm.spec, weights_fingerprint=self.lm.fingerprint,
            device=str(self.lm.device), backend="prefill", kv_layout=pb.KV_LAYOUT_DENSE,
            dtype=kit.DTYPES[self.runner.compute_dtype], region=self.region.name,
            region_bytes=self.region.total_bytes, max_positions=c.max_positions,
            synthetic=self.lm.synthetic, n_layers=c.n_layers, version=VERSION,
            counters=kit.counters_proto(self.metrics()), region_epoch=self.region.epoch,
            kv_device=self.region.device.describe() if self.region.device is not None else "")

    def metrics(self) -> dict[str, int]:
        m = dict(self.stats)
        m["slots_in_use"] = self.region.stats()["slots_used"]
        m["active"], m["waiting"] = self.admission.active, self.admission.waiting
        m["waiting_for_slot"] = self.slots.waiting
        m["clients_holding"] = len(self.clients.held)
        m.update(self.loop.stats)  # prefill_batches, prefill_batched_prompts
        return m

    async def _abort(self, context: grpc.aio.ServicerContext, e: Exception) -> None:
        code = kit.status_of(e)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("internal error")
        await context.abort(code, str(e) or type(e).__name__)


def _consumer(name: str) -> str:
    if not _CONSUMER_RE.match(name):
        raise InvalidArgument(f"consumer must be 1-128 characters of [A-Za-z0-9._:@[]-], "
                              f"got {limits.printable(name)}")
    return name


def _weakly(method):
    """`method` of an object the caller must not keep alive: a no-op once it is gone."""
    ref = weakref.WeakMethod(method)

    def call(*args) -> None:
        bound = ref()
        if bound is not None:
            bound(*args)
    return call
