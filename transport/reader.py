"""KvReader: the consumer's (decode service's) read-only side of the shared KV region.

Per layer (seqlock): read the slot generation (must equal the descriptor's), wait for
the layer's ready flag, read its checksum, copy the bytes, read the generation again.
A change means the owner freed (and maybe reused) the slot while we copied: Aborted.
Waits sleep on the slot's event word (futex: the owner wakes us on every change), or
where futexes are unavailable poll with sleeps that back off to `poll_max_s`; never a
busy spin, always bounded by a timeout.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import xxhash

from engine.errors import (
    Aborted,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
)
from transport import futex
from transport import layout as L
from transport.descriptor import KvDescriptor, invalid_handle, same_secret
from transport.shm import SHM_DIR, open_readonly, segment_path

FUTEX_SLICE_S = 0.05  # longest single futex sleep: bounds how stale a liveness check gets


class KvReader:
    def __init__(self, name: str, mm: mmap.mmap, *, owns_map: bool, use_futex: bool = True,
                 poll_min_s: float = 20e-6, poll_max_s: float = 200e-6) -> None:
        self.name, self._mm, self._owns_map = name, mm, owns_map
        self.poll_min_s, self.poll_max_s = poll_min_s, poll_max_s
        self._u8 = memoryview(mm).toreadonly()
        self._u64, self._u32 = self._u8.cast("Q"), self._u8.cast("I")
        self._addr = futex.address(mm) if use_futex and futex.available() else 0
        self.epoch = self._u64[L.H_EPOCH]
        self.geometry = L.Geometry.read_header(self._u64)
        self._digests: dict[KvDescriptor, int] = {}  # validated descriptors (static checks)

    @classmethod
    def open(cls, name: str, *, shm_dir: str = SHM_DIR, **poll: Any) -> KvReader:
        """Map region `name` read-only and validate its header (magic, version,
        geometry against the file size). NotFound if it does not exist."""
        path = segment_path(name, shm_dir)
        fd, size = open_readonly(path)
        try:
            if size < L.REGION_HEADER_BYTES:
                raise InvalidArgument(f"{path} ({size} bytes) is too small to be a KV region")
            # Validate a copy of the header before mapping: the name comes off the wire,
            # and populating the page tables of some other large file is not free.
            _check_header(os.pread(fd, L.REGION_HEADER_BYTES, 0), path, size)
            mm = mmap.mmap(fd, size, L.MAP_FLAGS, mmap.PROT_READ)
        finally:
            os.close(fd)
        try:
            return cls(name, mm, owns_map=True, **poll)
        except BaseException:
            mm.close()
            raise

    @classmethod
    def attach(cls, region: Any, **poll: Any) -> KvReader:
        """A reader over an owner's own mapping (the gRPC fetch server runs there)."""
        region._check_open()  # Unavailable once closed
        return cls(region.name, region._mm, owns_map=False, **poll)

    def device_export(self) -> dict[str, Any] | None:
        """The owner's GPU mirror as it published it in the header (what
        device_kv.PeerMirror.open takes), or None: no mirror. Only a process allowed to
        map this file gets the IPC handle; it never crosses the network."""
        nbytes = self._u64[L.H_DEVICE_BYTES]
        if not nbytes:
            return None
        a, b = L.DEVICE_HANDLE_BYTE, L.DEVICE_BUS_BYTE
        return {"ipc_handle": bytes(self._u8[a:a + L.DEVICE_HANDLE_LEN]),
                "bus_id": bytes(self._u8[b:b + L.DEVICE_BUS_LEN]).rstrip(b"\0").decode(
                    "utf-8", "replace"),
                "nbytes": nbytes, "payload_offset": self.geometry.payload_offset}

    @property
    def closed_by_owner(self) -> bool:
        return self._u64[L.H_STATE] != L.REGION_LIVE

    def close(self) -> None:
        for view in (self._u64, self._u32, self._u8):
            view.release()
        if self._owns_map:
            with contextlib.suppress(BufferError):  # a caller still holds a layer view
                self._mm.close()

    def __enter__(self) -> KvReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- checks -----------------------------------------------------------------
    def validate(self, desc: KvDescriptor) -> int:
        """Every descriptor field against this region; InvalidArgument / Aborted. The
        secret is compared before anything else, so only a handle's holder ever sees a
        message about its fields. Returns the descriptor's digest (checked here)."""
        if desc.region.lstrip("/") != self.name.lstrip("/"):
            raise InvalidArgument(f"descriptor for region {desc.region!r}, reader has {self.name!r}")
        if desc.epoch != self.epoch:
            raise Aborted(f"descriptor epoch {desc.epoch}, region epoch {self.epoch}: "
                          "the region was recreated")
        self._check_secret(desc)
        # Then the fields as the owner published them (the digest in the slot header),
        # before any structural check: an altered handle gets the one fixed answer, as
        # the owner gives it, not a message about the region's geometry.
        desc._check_ints()  # digest() packs them: out-of-range values cannot be packed
        try:
            digest = desc.digest()
        except (struct.error, KeyError, TypeError):  # a layer range or enum past packing
            raise invalid_handle() from None
        if self._u64[self.geometry.slot_word(desc.slot) + L.S_DIGEST] != digest:
            raise invalid_handle()
        g = self.geometry
        desc.validate(g.total_bytes, payload_offset=g.payload_offset, max_slots=g.max_slots,
                      max_layers=g.max_layers)
        return digest

    def _stored_secret(self, slot: int) -> bytes:
        a, b = self.geometry.secret_range(slot)
        return bytes(self._u8[a:b])

    def _check_secret(self, desc: KvDescriptor) -> None:
        slot = desc.slot
        if type(slot) is not int or not 0 <= slot < self.geometry.max_slots or \
                not same_secret(desc.secret, self._stored_secret(slot)):
            raise invalid_handle()

    def _validated_digest(self, desc: KvDescriptor) -> int:
        """validate() + digest(), cached: both depend only on the descriptor and the
        fixed geometry, and a request reads every layer with the same descriptor."""
        try:
            digest = self._digests.get(desc)
        except TypeError:  # an unhashable field: validate() names it
            self.validate(desc)
            raise
        if digest is None:
            digest = self.validate(desc)
            if len(self._digests) >= 1024:
                self._digests.clear()
            self._digests[desc] = digest
        return digest

    def _check_live(self, desc: KvDescriptor, digest: int) -> None:
        """Region open, slot still this allocation (its secret and generation), not
        failed, and the descriptor exactly the one the owner published for it. Seqlock:
        what is read here belongs to the descriptor's generation only if the generation
        is unchanged after reading it (else a free + re-alloc slipped in between)."""
        u64, w = self._u64, self.geometry.slot_word(desc.slot)
        if u64[L.H_STATE] != L.REGION_LIVE:
            raise Unavailable(f"KV region {self.name} was closed by its owner")
        gen = u64[w + L.S_GENERATION]
        state, stored = u64[w + L.S_STATE], u64[w + L.S_DIGEST]
        secret = self._stored_secret(desc.slot)
        reason = self._reason(desc.slot) if state == L.SLOT_FAILED else ""
        if gen != desc.generation or state == L.SLOT_FREE or u64[w + L.S_GENERATION] != gen \
                or not same_secret(desc.secret, secret) or stored != digest:
            raise invalid_handle()
        if state == L.SLOT_FAILED:
            raise Unavailable(f"prefill failed: {reason}")

    def _check_after(self, desc: KvDescriptor) -> None:
        gen = self._u64[self.geometry.slot_word(desc.slot) + L.S_GENERATION]
        if gen != desc.generation:  # freed while we read: discard what was read
            raise invalid_handle()

    def _reason(self, slot: int) -> str:
        a, b = self.geometry.reason_range(slot)
        return L.decode_reason(bytes(self._u8[a:b]))

    def check(self, desc: KvDescriptor) -> None:
        """One-shot: raise unless `desc` is valid and current right now."""
        self._check_live(desc, self._validated_digest(desc))

    # -- waiting ----------------------------------------------------------------
    def _poll(self, desc: KvDescriptor, ready: Callable[[], bool], timeout_s: float,
              what: str) -> None:
        if not isinstance(timeout_s, (int, float)) or not timeout_s >= 0 or math.isinf(timeout_s):
            raise InvalidArgument(f"timeout_s={timeout_s!r}: every wait needs a finite bound")
        digest = self._validated_digest(desc)
        deadline = time.monotonic() + timeout_s
        delay, ev = self.poll_min_s, self.geometry.events_byte(desc.slot)
        while True:
            seen = self._u32[ev // 4]  # before the checks: a change after them wakes us
            self._check_live(desc, digest)
            if ready():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(f"{what} of slot {desc.slot} not ready after {timeout_s} s")
            if not (self._addr and futex.wait(self._addr + ev, seen, min(left, FUTEX_SLICE_S))):
                time.sleep(min(delay, left))  # no futex here: sleep with backoff
                delay = min(delay * 2, self.poll_max_s)

    def wait_layer(self, desc: KvDescriptor, layer: int, timeout_s: float) -> None:
        """Block (bounded) until `layer` is marked ready."""
        self._validated_digest(desc)
        desc.layer_span(layer)  # InvalidArgument for a layer the slot does not have
        idx = self.geometry.ready_byte(desc.slot, layer)
        self._poll(desc, lambda: self._u8[idx] != 0, timeout_s, f"layer {layer}")

    def wait_first_token(self, desc: KvDescriptor, timeout_s: float) -> int:
        """Block (bounded) until prefill published the first generated token."""
        self._validated_digest(desc)
        w = self.geometry.slot_word(desc.slot) + L.S_FIRST_TOKEN
        self._poll(desc, lambda: L.to_i64(self._u64[w]) >= 0, timeout_s, "first token")
        token = L.to_i64(self._u64[w])
        self._check_after(desc)
        return token

    # -- reading ----------------------------------------------------------------
    def _expected_checksum(self, desc: KvDescriptor, layer: int) -> int | None:
        if not desc.checksums:
            return None
        return self._u64[self.geometry.checksum_word(desc.slot, layer)]

    def read_layer(self, desc: KvDescriptor, layer: int, timeout_s: float) -> bytes:
        """A private copy of `layer`'s bytes once it is ready (see the module doc)."""
        self.wait_layer(desc, layer, timeout_s)
        _host_bytes(desc)
        want = self._expected_checksum(desc, layer)
        a, n = desc.layer_span(layer)
        data = bytes(self._u8[a:a + n])
        self._verify(desc, layer, data, want)
        return data

    def read_layer_into(self, desc: KvDescriptor, layer: int, out: Any, timeout_s: float) -> int:
        """Copy `layer` into the writable buffer `out` (bytearray, numpy array, CPU
        tensor's numpy()); returns the byte count."""
        dst = memoryview(out).cast("B")
        a, n = desc.layer_span(layer)
        if dst.readonly or len(dst) < n:
            raise InvalidArgument(f"layer {layer} needs a writable {n}-byte buffer, got {len(dst)}")
        self.wait_layer(desc, layer, timeout_s)
        _host_bytes(desc)
        want = self._expected_checksum(desc, layer)
        # numpy's copy releases the GIL (a memoryview slice assignment holds it): many
        # requests' ingest threads copy in parallel with the engine loop
        np.copyto(np.frombuffer(dst, np.uint8, n), np.frombuffer(self._u8, np.uint8, n, a))
        self._verify(desc, layer, dst[:n], want)
        return n

    @contextlib.contextmanager
    def layer(self, desc: KvDescriptor, layer: int, timeout_s: float) -> Iterator[memoryview]:
        """Zero-copy: a read-only view into shared memory, valid inside the block. The
        checksum is verified before, the generation after: on Aborted at exit, discard
        whatever was derived from the view."""
        self.wait_layer(desc, layer, timeout_s)
        _host_bytes(desc)
        a, n = desc.layer_span(layer)
        view = self._u8[a:a + n]
        try:
            self._verify(desc, layer, view, self._expected_checksum(desc, layer))
            yield view
        finally:
            view.release()
        self._check_after(desc)

    def _verify(self, desc: KvDescriptor, layer: int, data: Any, want: int | None) -> None:
        self._check_after(desc)
        if want is not None and xxhash.xxh3_64_intdigest(data) != want:
            raise DataLoss(f"layer {layer} of slot {desc.slot}: checksum mismatch "
                           f"(stored {want:#018x}, read {xxhash.xxh3_64_intdigest(data):#018x})")


def _host_bytes(desc: KvDescriptor) -> None:
    """After the capability checks: an on-device slot has no bytes in the region."""
    if desc.on_device:
        raise FailedPrecondition("this slot's KV is in the prefill GPU's memory (on_device): "
                                 "read it GPU to GPU (a decode that mapped the mirror)")


def _check_header(head: bytes, path: str, size: int) -> None:
    u64 = memoryview(head).cast("Q")
    if head[:8] != L.MAGIC:
        raise InvalidArgument(f"{path} is not a KV region (or not initialized yet)")
    if u64[L.H_VERSION] != L.VERSION:
        raise FailedPrecondition(f"{path} has region format version {u64[L.H_VERSION]}; "
                                 f"this reader speaks version {L.VERSION}")
    problems = L.Geometry.read_header(u64).problems(size)
    if problems:
        raise DataLoss(f"{path}: corrupt region header: {'; '.join(problems)}")
    if u64[L.H_STATE] != L.REGION_LIVE:
        raise Unavailable(f"KV region {path} was closed by its owner")


class ReaderPool:
    """One KvReader per region name for a long-lived consumer (the decode service):
    opening maps the file, so do it once per region, not per request. A reader whose
    region was closed by its owner, or whose segment is gone (a restarted prefill has a
    new name), is dropped and unmapped on the next get: a mapping of an unlinked segment
    would pin its memory for the consumer's lifetime."""

    def __init__(self, **poll: float) -> None:
        self._poll = poll
        self._readers: dict[str, KvReader] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> KvReader:
        key = name.lstrip("/")
        with self._lock:
            for other, reader in list(self._readers.items()):
                if reader.closed_by_owner or not os.path.exists(segment_path(other)):
                    del self._readers[other]
                    reader.close()
            reader = self._readers.get(key)
            if reader is None:
                reader = self._readers[key] = KvReader.open(name, **self._poll)
            return reader

    def mapped(self, name: str) -> bool:
        with self._lock:
            return name.lstrip("/") in self._readers

    def close(self) -> None:
        with self._lock:
            for reader in self._readers.values():
                reader.close()
            self._readers.clear()
