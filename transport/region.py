"""KvRegion: the owner's (prefill service's) side of the shared KV region.

The owner alone allocates, fills, marks ready and frees slots (docs/transport.md): alloc
publishes the slot header with state ACTIVE last; a layer's bytes (and checksum) land
before its ready flag, which waits for the copy's CUDA event; free bumps the generation
*before* anything else, so a reader that copied across a free/reuse sees the change on
its second generation read (seqlock; x86 keeps stores in program order).
"""

from __future__ import annotations

import atexit
import contextlib
import mmap
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import xxhash

from engine.errors import (
    FailedPrecondition,
    HybridError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from engine.freelist import FreeList
from transport import cuda, futex, shm
from transport import layout as L
from transport.descriptor import (
    KvDescriptor,
    check_positive,
    invalid_handle,
    new_secret,
    same_secret,
)


@dataclass
class _Owned:
    desc: KvDescriptor
    lease: float     # seconds a renewal (or producer activity) extends it by
    deadline: float  # time.monotonic() at which the lease expires
    consumer: tuple[str, int] | None = None  # (name, epoch) of the decoder that claimed it


class KvRegion:
    def __init__(self, name: str, path: str, mm: mmap.mmap, geom: L.Geometry, epoch: int,
                 lease_s: float) -> None:
        self.name, self.path, self.epoch, self.geometry = name, path, epoch, geom
        self.lease_s = lease_s
        # Lease deadlines and reaping read this clock: tests swap in one they advance by
        # hand, so a lease test does not depend on how the OS schedules its processes.
        self.clock: Callable[[], float] = time.monotonic
        # Told of every freed slot, whatever freed it (free, reap_expired, the reaping
        # inside alloc, reclaim), under the region's lock: what the owner keeps per slot
        # (the prefill service's per-client share) is released on every path.
        self.on_release: Callable[[KvDescriptor], None] | None = None
        self._mm = mm
        self._u8 = memoryview(mm)
        self._u64, self._u32 = self._u8.cast("Q"), self._u8.cast("I")
        self._addr = futex.address(mm) if futex.available() else 0
        self._lock = threading.RLock()
        self._free = FreeList(geom.payload_offset, geom.payload_bytes, L.ALLOC_ALIGN)
        self._owned: list[_Owned | None] = [None] * geom.max_slots
        self._last_secret: list[bytes] = [b""] * geom.max_slots  # for repeated releases
        self._owner_pid = os.getpid()
        self._tensor: Any = None
        # The GPU-to-GPU path (transport.device_kv): a device buffer mirroring the payload
        # area; slots allocated `on_device` keep their bytes there, headers stay here.
        self.device: Any = None
        self._registered_ptr: int | None = None
        self._closed = self._unlinked = False
        ref, pid = weakref.ref(self), self._owner_pid  # no strong ref from atexit
        self._atexit = lambda: shm.close_at_exit(ref, path, pid)
        atexit.register(self._atexit)

    # -- lifecycle --------------------------------------------------------------
    @classmethod
    def create(cls, capacity_bytes: int, max_slots: int, max_layers: int, lease_s: float,
               name_prefix: str = "hybrid-kv", *, cuda_register: bool | None = None,
               shm_dir: str = shm.SHM_DIR, mode: int = 0o600) -> KvRegion:
        """Create, reserve (posix_fallocate) and map a region with `capacity_bytes` of
        payload. `cuda_register`: None = when CUDA is available. Raises
        ResourceExhausted (with the sizes) when /dev/shm is too small."""
        check_positive(capacity_bytes=capacity_bytes, max_slots=max_slots, max_layers=max_layers)
        if max_layers > L.MAX_LAYERS_LIMIT or max_slots > L.MAX_SLOTS_LIMIT:
            raise InvalidArgument(f"max_layers <= {L.MAX_LAYERS_LIMIT} and max_slots <= "
                                  f"{L.MAX_SLOTS_LIMIT}, got {max_layers} and {max_slots}")
        if not lease_s > 0:
            raise InvalidArgument(f"lease_s={lease_s!r}: expected > 0")
        geom = L.Geometry.plan(capacity_bytes, max_slots, max_layers)
        epoch = time.time_ns()
        name = f"/{shm.check_prefix(name_prefix)}-{os.getpid()}-{epoch}"
        path = shm.segment_path(name, shm_dir)
        fd = shm.create_segment(path, geom.total_bytes, mode, shm_dir)
        try:
            mm = mmap.mmap(fd, geom.total_bytes, L.MAP_FLAGS,
                           mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            shm.unlink_quietly(path)
            raise
        finally:
            os.close(fd)
        region = cls(name, path, mm, geom, epoch, lease_s)
        try:
            region._init_header()
            if cuda.cuda_available() if cuda_register is None else cuda_register:
                region._register()
        except BaseException:
            region.close()
            raise
        return region

    def _init_header(self) -> None:
        g, u64 = self.geometry, self._u64
        g.write_header(u64, self.epoch, self._owner_pid, shm.process_start_ticks(os.getpid()) or 0,
                       int(self.lease_s * 1e9))
        u64[L.H_STATE] = L.REGION_LIVE
        u64[L.H_MAGIC] = int.from_bytes(L.MAGIC, "little")  # last: the header is complete

    def _register(self) -> None:
        base = self._torch_base()
        cuda.host_register(base.data_ptr(), self.geometry.total_bytes)
        self._registered_ptr = base.data_ptr()

    def _torch_base(self) -> Any:
        if self._tensor is None:
            import torch
            # Via a memoryview we never release: torch drops its buffer export at once,
            # so a tensor over the mmap itself would not stop mmap.close() (dangling
            # pointer); the memoryview's export does.
            self._tensor = torch.frombuffer(memoryview(self._mm), dtype=torch.uint8)
        return self._tensor

    def attach_device(self, mirror: Any) -> None:
        """Keep on-device slots in `mirror` (a transport.device_kv.DeviceMirror covering
        the payload area); the region owns it from now on and frees it at close."""
        g = self.geometry
        if mirror.payload_offset != g.payload_offset or mirror.nbytes < g.payload_bytes:
            raise InvalidArgument(
                f"device mirror [{mirror.payload_offset}, +{mirror.nbytes}) does not cover the "
                f"payload [{g.payload_offset}, +{g.payload_bytes})")
        exported = mirror.export()
        handle, bus = bytes(exported["ipc_handle"]), str(exported["bus_id"]).encode()
        if len(handle) != L.DEVICE_HANDLE_LEN or len(bus) > L.DEVICE_BUS_LEN:
            raise InvalidArgument(f"device mirror: a {L.DEVICE_HANDLE_LEN}-byte IPC handle "
                                  f"and a bus id of at most {L.DEVICE_BUS_LEN} bytes")
        with self._lock:
            self._check_open()
            self._u8[L.DEVICE_HANDLE_BYTE:L.DEVICE_HANDLE_BYTE + len(handle)] = handle
            self._u8[L.DEVICE_BUS_BYTE:L.DEVICE_BUS_BYTE + L.DEVICE_BUS_LEN] = \
                bus.ljust(L.DEVICE_BUS_LEN, b"\0")
            self._u64[L.H_DEVICE_BYTES] = mirror.nbytes  # last: readers see all or nothing
            self.device = mirror

    @property
    def registered(self) -> bool:  # page-locked for CUDA
        return self._registered_ptr is not None

    @property
    def total_bytes(self) -> int:
        return self.geometry.total_bytes

    def unlink(self) -> None:
        """Remove the /dev/shm name (mappings stay valid). Lock-free and idempotent, so
        signal handlers may call it; a forked child never unlinks its parent's region."""
        if os.getpid() == self._owner_pid and not self._unlinked:
            self._unlinked = True
            shm.unlink_quietly(self.path)

    def close(self) -> None:
        """Mark closed for readers, unregister from CUDA, unmap, unlink. Views still
        referenced keep the mapping alive until dropped (never a dangling pointer)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            atexit.unregister(self._atexit)
            try:
                self._u64[L.H_STATE] = L.REGION_CLOSED
                if self._registered_ptr is not None:  # no DMA may still target it
                    cuda.synchronize_quietly()
                    cuda.host_unregister(self._registered_ptr)
                    self._registered_ptr = None
                for slot in range(self.geometry.max_slots):  # waiters see CLOSED now
                    self._notify(slot)
                self._tensor = None
                if self.device is not None:  # after the sync above: no copy targets it
                    self._u64[L.H_DEVICE_BYTES] = 0
                    self.device.close()
                for view in (self._u64, self._u32, self._u8):
                    view.release()
                with contextlib.suppress(BufferError):  # handed-out views still alive
                    self._mm.close()
            finally:
                self.unlink()

    def __enter__(self) -> KvRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- slots ------------------------------------------------------------------
    def alloc(self, n_bytes: int, n_layers: int, *, layer_bytes: list[int] | None = None,
              layout: str = "dense", dtype: str = "float16", n_tokens: int = 0,
              n_kv_heads: int = 0, head_dim: int = 0, checksums: bool = False,
              lease_s: float | None = None, on_device: bool = False) -> KvDescriptor:
        """Reserve a slot for `n_bytes` of KV in `n_layers` equal layers (or the sizes in
        `layer_bytes`, summing to n_bytes). Never waits: ResourceExhausted at once when
        neither space nor a slot header is free after reaping expired leases.
        `on_device`: the bytes go to the device mirror (no checksums: they never pass
        through host memory, where a torn read could happen)."""
        if on_device and self.device is None:
            raise FailedPrecondition(f"KV region {self.name} has no GPU mirror: KV on the "
                                     "device needs a CUDA prefill with CuPy (--kv-device)")
        probe = self._probe(n_bytes, n_layers, layer_bytes, layout=layout, dtype=dtype,
                            n_tokens=n_tokens, n_kv_heads=n_kv_heads, head_dim=head_dim,
                            checksums=checksums and not on_device, on_device=on_device)
        lease = self.lease_s if lease_s is None else lease_s
        if not lease > 0:
            raise InvalidArgument(f"lease_s={lease_s!r}: expected > 0")
        with self._lock:
            self._check_open()
            slot, off = self._take(probe.length)
            if slot is None or off is None:
                self.reap_expired()
                slot, off = self._take(probe.length)
            if slot is None or off is None:
                raise ResourceExhausted(self._full_message(probe.length, slot is None))
            w = self.geometry.slot_word(slot)
            desc = replace(probe, slot=slot, offset=off, generation=self._u64[w])
            self._publish(desc, lease)
            return desc

    def _probe(self, n_bytes: int, n_layers: int, layer_bytes: list[int] | None,
               **meta: Any) -> KvDescriptor:
        check_positive(n_bytes=n_bytes, n_layers=n_layers)
        if layer_bytes is None:
            if n_bytes % n_layers:
                raise InvalidArgument(f"{n_bytes} bytes do not split into {n_layers} equal layers")
            layer_bytes = [n_bytes // n_layers] * n_layers
        sizes = list(layer_bytes)
        if len(sizes) != n_layers or sum(sizes) != n_bytes:
            raise InvalidArgument(f"layer_bytes {len(sizes)} sizes summing to {sum(sizes)}; "
                                  f"expected {n_layers} summing to {n_bytes}")
        ranges, length = L.plan_layers(sizes)
        g = self.geometry
        if length > g.payload_bytes:
            raise ResourceExhausted(f"a {length}-byte slot can never fit this region's "
                                    f"{g.payload_bytes}-byte payload area")
        probe = KvDescriptor(region=self.name, epoch=self.epoch, slot=0, offset=g.payload_offset,
                             length=length, generation=1, n_layers=n_layers, layers=ranges,
                             secret=new_secret(), **meta)
        return probe.validate(g.total_bytes, payload_offset=g.payload_offset,
                              max_slots=g.max_slots, max_layers=g.max_layers)

    def _take(self, length: int) -> tuple[int | None, int | None]:
        slot = next((i for i, o in enumerate(self._owned) if o is None), None)
        if slot is None:
            return None, None
        return slot, self._free.alloc(length)

    def _full_message(self, length: int, no_slot: bool) -> str:
        s = self.stats()
        what = (f"all {self.geometry.max_slots} slots in use" if no_slot else
                f"no free block of {length} bytes (free {s['bytes_free']} bytes, largest "
                f"block {s['largest_free']}, {s['slots_used']} slots in use)")
        return f"KV region {self.name} full: {what}; capacity {self.geometry.payload_bytes} bytes"

    def _publish(self, desc: KvDescriptor, lease: float) -> None:
        g, u64, w = self.geometry, self._u64, self.geometry.slot_word(desc.slot)
        u64[w + L.S_OFFSET] = desc.offset
        u64[w + L.S_LENGTH] = desc.length
        u64[w + L.S_N_LAYERS] = desc.n_layers
        u64[w + L.S_FLAGS] = ((L.FLAG_CHECKSUMS if desc.checksums else 0)
                              | (L.FLAG_DEVICE if desc.on_device else 0))
        u64[w + L.S_FIRST_TOKEN] = L.to_u64(L.FIRST_TOKEN_UNSET)
        u64[w + L.S_DIGEST] = desc.digest()
        a, b = g.secret_range(desc.slot)
        self._u8[a:b] = desc.secret
        a, b = g.reason_range(desc.slot)
        self._u8[a:b] = bytes(b - a)
        r = g.ready_byte(desc.slot, 0)
        self._u8[r:r + g.max_layers] = bytes(g.max_layers)
        c = g.checksum_word(desc.slot, 0)
        u64[c:c + g.max_layers] = memoryview(bytes(8 * g.max_layers)).cast("Q")
        u64[w + L.S_STATE] = L.SLOT_ACTIVE  # last: the header is complete
        self._owned[desc.slot] = rec = _Owned(desc, lease, 0.0)
        self._extend(rec, lease)

    def _extend(self, rec: _Owned, lease: float, at_least: bool = False) -> None:
        """Deadline := now + lease (or the later of both); mirrored in the header."""
        now, now_ns = self.clock(), time.monotonic_ns()
        rec.deadline = max(rec.deadline, now + lease) if at_least else now + lease
        w = self.geometry.slot_word(rec.desc.slot)
        self._u64[w + L.S_LEASE_DEADLINE] = max(0, now_ns + int((rec.deadline - now) * 1e9))

    def _notify(self, slot: int) -> None:
        """Bump the slot's event word, then wake readers sleeping on it (transport.futex)."""
        b = self.geometry.events_byte(slot)
        self._u32[b // 4] = (self._u32[b // 4] + 1) & 0xFFFFFFFF
        if self._addr:
            futex.wake(self._addr + b)

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable(f"KV region {self.name} is closed")

    def _current(self, desc: KvDescriptor) -> _Owned:
        """Owner record of `desc`. The secret is compared first: anything that is not a
        live capability (forged, altered, released, expired) gets the same Aborted,
        which names no slot, generation or offset."""
        self._check_open()
        if desc.region.lstrip("/") != self.name.lstrip("/") or desc.epoch != self.epoch:
            raise InvalidArgument("KV handle names another region (or a restarted one): "
                                  f"this service's is {self.name} epoch {self.epoch}")
        slot = desc.slot
        rec = self._owned[slot] if type(slot) is int and 0 <= slot < len(self._owned) else None
        if rec is None or not same_secret(desc.secret, rec.desc.secret) or rec.desc != desc:
            raise invalid_handle()
        return rec

    def check(self, desc: KvDescriptor) -> None:
        """Raise unless `desc` is a live capability of this region (Aborted otherwise)."""
        with self._lock:
            self._current(desc)

    def free(self, desc: KvDescriptor, reason: str = "released") -> bool:
        """Free the slot (generation bumps first). True if this call freed it; False if
        this very allocation was freed already (a repeated release); Aborted otherwise."""
        with self._lock:
            try:
                self._current(desc)
            except HybridError:
                slot = desc.slot
                known = type(slot) is int and 0 <= slot < len(self._owned)
                if known and self._owned[slot] is None and same_secret(
                        desc.secret, self._last_secret[slot]):
                    return False
                raise
            self._release(desc.slot, reason)
            return True

    def _release(self, slot: int, reason: str) -> None:
        g, u64, w = self.geometry, self._u64, self.geometry.slot_word(slot)
        rec = self._owned[slot]
        assert rec is not None
        u64[w + L.S_GENERATION] = rec.desc.generation + 1  # first: readers now see stale
        u64[w + L.S_STATE] = L.SLOT_FREE
        a, b = g.secret_range(slot)
        self._u8[a:b] = bytes(b - a)
        self._last_secret[slot] = rec.desc.secret
        a, b = g.reason_range(slot)
        self._u8[a:b] = L.encode_reason(reason)
        self._owned[slot] = None
        self._free.free(rec.desc.offset, rec.desc.length)
        self._notify(slot)
        if self.on_release is not None:
            self.on_release(rec.desc)

    def renew(self, desc: KvDescriptor, lease_s: float | None = None) -> float:
        """Lease := now + lease_s (default: the slot's). Aborted once freed or reaped."""
        with self._lock:
            rec = self._current(desc)
            lease = rec.lease if lease_s is None else lease_s
            self._extend(rec, lease)
        return lease

    def claim(self, desc: KvDescriptor, consumer: str, epoch: int) -> float:
        """renew(), and record the decode instance now responsible for the slot, so a
        restarted instance of it can reclaim the slot at once (reclaim)."""
        with self._lock:
            rec = self._current(desc)
            rec.consumer = (consumer, epoch)
            self._extend(rec, rec.lease)
            return rec.lease

    def reclaim(self, consumer: str, epoch: int) -> list[KvDescriptor]:
        """Free every slot claimed by another instance of `consumer` than `epoch` (the
        one attaching now: an earlier one died, and nothing will read or release its
        slots). Returns their descriptors."""
        with self._lock:
            if self._closed:
                return []
            dead = [o.desc for o in self._owned if o is not None and o.consumer is not None
                    and o.consumer[0] == consumer and o.consumer[1] != epoch]
            for desc in dead:
                self._release(desc.slot, "consumer restarted")
        return dead

    def reap_expired(self, now: float | None = None) -> list[KvDescriptor]:
        """Free every slot whose lease expired (consumer gone); returns their descriptors."""
        now = self.clock() if now is None else now
        with self._lock:
            if self._closed:
                return []
            dead = [o.desc for o in self._owned if o is not None and o.deadline <= now]
            for desc in dead:
                self._release(desc.slot, "lease expired")
        return dead

    def stats(self) -> dict[str, int]:
        with self._lock:
            used = sum(o is not None for o in self._owned)
            return {"slots_used": used, "slots_free": self.geometry.max_slots - used,
                    "bytes_free": self._free.free_bytes, "largest_free": self._free.largest,
                    "free_blocks": self._free.blocks, "capacity": self.geometry.payload_bytes}

    def owned(self) -> list[KvDescriptor]:
        with self._lock:
            return [o.desc for o in self._owned if o is not None]
    # -- filling ----------------------------------------------------------------
    def _producing(self, desc: KvDescriptor) -> None:
        """Producer activity keeps the lease at least one lease ahead: a slot must not
        expire (and its bytes be reused) while copies into it may still be in flight."""
        rec = self._current(desc)
        self._extend(rec, rec.lease, at_least=True)

    def layer_buffer(self, desc: KvDescriptor, layer: int) -> memoryview:
        """Writable view of the slot's bytes for `layer` (CPU producers, tests)."""
        _host_only(desc)
        with self._lock:
            self._producing(desc)
            a, n = desc.layer_span(layer)
            return self._u8[a:a + n]

    def write_layer(self, desc: KvDescriptor, layer: int, data: Any) -> None:
        src = memoryview(data).cast("B")
        dst = self.layer_buffer(desc, layer)
        if len(src) != len(dst):
            raise InvalidArgument(f"layer {layer} takes {len(dst)} bytes, got {len(src)}")
        dst[:] = src

    def layer_view(self, desc: KvDescriptor, layer: int) -> Any:
        """torch.uint8 tensor over the slot's `layer` range, zero-copy (pinned when the
        region is registered): the destination of non_blocking device-to-host copies.
        An on-device slot's view is in the device mirror instead (device-to-device)."""
        with self._lock:
            self._producing(desc)
            a, n = desc.layer_span(layer)
            if desc.on_device:
                return self.device.view(a, n)
            return self._torch_base()[a:a + n]

    def mark_ready(self, desc: KvDescriptor, layer: int, checksum: int | None = None,
                   event: Any = None) -> None:
        """Publish `layer`: waits for `event` (the copy's CUDA event), stores the checksum
        (xxh3 computed here if the slot has checksums and none is given), then sets the
        ready flag, strictly after the data."""
        if event is not None:
            event.synchronize()
        if checksum is not None and not desc.checksums:
            raise InvalidArgument("checksum given for a slot allocated without checksums")
        if desc.checksums and checksum is None:  # outside the lock: ~0.1 ms per 2 MiB
            with self.layer_buffer(desc, layer) as data:
                checksum = xxhash.xxh3_64_intdigest(data)
        with self._lock:
            self._producing(desc)  # still current: not freed while we hashed
            desc.layer_span(layer)  # InvalidArgument for a layer the slot does not have
            g, slot = self.geometry, desc.slot
            if self._u8[g.ready_byte(slot, layer)]:
                raise InvalidArgument(f"layer {layer} of slot {slot} is already marked ready")
            if checksum is not None:
                self._u64[g.checksum_word(slot, layer)] = checksum & L.U64_MAX
            self._u8[g.ready_byte(slot, layer)] = 1
            self._notify(slot)

    def set_first_token(self, desc: KvDescriptor, token: int) -> None:
        if type(token) is not int or not 0 <= token < 1 << 63:
            raise InvalidArgument(f"first token {token!r} must be a non-negative integer")
        with self._lock:
            self._current(desc)
            self._u64[self.geometry.slot_word(desc.slot) + L.S_FIRST_TOKEN] = token
            self._notify(desc.slot)

    def mark_failed(self, desc: KvDescriptor, reason: str) -> None:
        """Readers get Unavailable(reason); the slot stays allocated until freed."""
        with self._lock:
            self._current(desc)
            a, b = self.geometry.reason_range(desc.slot)
            self._u8[a:b] = L.encode_reason(reason or "prefill failed")
            self._u64[self.geometry.slot_word(desc.slot) + L.S_STATE] = L.SLOT_FAILED
            self._notify(desc.slot)



def _host_only(desc: KvDescriptor) -> None:
    if desc.on_device:
        raise FailedPrecondition("this slot's KV is in the prefill GPU's memory (on_device): "
                                 "it is read GPU to GPU, not from the shared region")
