"""The GPU-to-GPU KV path: the prefill GPU's device mirror of the region payload, shared
with a decode process through CUDA IPC (docs/transport.md, "Device mirror").

Why this shape (issue 15): prefill already writes every layer into a slot while it
computes; on a GPU decoder the host bounce (D2H into the pinned slot, a host copy, an
H2D) is the whole cost of the hand-over. Here the slot's bytes stay in GPU memory: the
prefill service allocates ONE device buffer the size of the region's payload area and
ships a slot's layers into it (device-to-device on its own GPU, overlapped with compute
as before); the decode service opens that buffer once, at Attach, with
cudaIpcOpenMemHandle, and pulls a finished prompt with one peer copy (NVLink between two
GPUs, a plain device copy when both services share one). Readiness, the secret, leases
and the first token stay in the shared region's slot headers, so every check of the
host path (capability first, published digest, generation seqlock) still guards each
read. CUDA IPC rather than NCCL: no communicator to set up per pair, no collective
ordering between independent requests, nothing to do on the prefill side per transfer;
the decode pulls when it is ready (its own engine loop issues the copy).

Offsets: region offset `o` of a slot is byte `o - payload_offset` of the mirror.

CuPy does the IPC calls (torch has no public API for them); without CuPy or CUDA the
mirror is simply unavailable and every request takes the host path.
"""

from __future__ import annotations

import threading
from typing import Any

from engine.errors import FailedPrecondition, InvalidArgument

IPC_HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)
_LAZY_PEER = 1         # cudaIpcMemLazyEnablePeerAccess


def _cupy() -> Any:
    try:
        import cupy

        return cupy
    except Exception as e:  # not installed, or no usable CUDA driver
        raise FailedPrecondition(f"CUDA IPC needs CuPy: {e}") from None


def available() -> bool:
    """True when this process can export or open a device mirror (CUDA + CuPy)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        _cupy()
        return True
    except Exception:
        return False


def bus_id(device_index: int) -> str:
    """The PCI bus id of a CUDA device ("0000:1b:00.0"), the same in every process
    whatever CUDA_VISIBLE_DEVICES numbers it as."""
    return _cupy().cuda.runtime.deviceGetPCIBusId(device_index).lower()


def _as_tensor(ptr: int, nbytes: int, device_index: int, owner: Any) -> Any:
    """A torch uint8 tensor over raw device memory (zero copy, through DLPack), kept
    alive by `owner`; torch sees it on `device_index`."""
    import torch

    cp = _cupy()
    mem = cp.cuda.UnownedMemory(ptr, nbytes, owner, device_id=device_index)
    arr = cp.ndarray((nbytes,), dtype=cp.uint8, memptr=cp.cuda.MemoryPointer(mem, 0))
    with cp.cuda.Device(device_index):
        return torch.from_dlpack(arr)


class DeviceMirror:
    """The owner's side: a device buffer of `nbytes` on `device_index` (cudaMalloc, so
    its IPC handle names exactly this allocation), exported by `export()`."""

    def __init__(self, nbytes: int, device_index: int, payload_offset: int) -> None:
        cp = _cupy()
        if nbytes < 1:
            raise InvalidArgument(f"device mirror of {nbytes} bytes")
        self.nbytes, self.device_index, self.payload_offset = nbytes, device_index, payload_offset
        with cp.cuda.Device(device_index):
            self._ptr = cp.cuda.runtime.malloc(nbytes)
            try:
                self._handle = bytes(cp.cuda.runtime.ipcGetMemHandle(self._ptr))
                self.bus_id = bus_id(device_index)
                self.tensor = _as_tensor(self._ptr, nbytes, device_index, self)
            except BaseException:
                cp.cuda.runtime.free(self._ptr)
                raise
        self._lock = threading.Lock()

    def export(self) -> dict[str, Any]:
        """What PeerMirror.open takes: in the region header (KvRegion.attach_device);
        AttachReply.kv_device carries all but the handle."""
        return {"bus_id": self.bus_id, "ipc_handle": self._handle, "nbytes": self.nbytes,
                "payload_offset": self.payload_offset}

    def view(self, offset: int, length: int) -> Any:
        """The mirror's bytes for region range [offset, offset + length)."""
        return self.tensor[_span(offset, length, self.payload_offset, self.nbytes)]

    def describe(self) -> str:
        return f"cuda:{self.device_index} {self.bus_id} {self.nbytes >> 20} MiB"

    def close(self) -> None:
        """Free the buffer once no copy may still target it (the caller synchronized).
        Idempotent. Views still referenced must not be used after."""
        with self._lock:
            if self._ptr is None:
                return
            ptr, self._ptr, self.tensor = self._ptr, None, None
        cp = _cupy()
        with cp.cuda.Device(self.device_index):
            cp.cuda.runtime.deviceSynchronize()
            cp.cuda.runtime.free(ptr)


class PeerMirror:
    """The consumer's side: a prefill's mirror opened in this process on our device
    (`device_index`). Peer access is enabled lazily by CUDA; `open` refuses a mirror our
    device cannot reach (no P2P between the two GPUs: the host path then serves)."""

    def __init__(self, ptr: int, nbytes: int, payload_offset: int, device_index: int,
                 bus_id: str) -> None:
        self._ptr, self.nbytes, self.payload_offset = ptr, nbytes, payload_offset
        self.device_index, self.bus_id = device_index, bus_id
        self.tensor = _as_tensor(ptr, nbytes, device_index, self)
        self._lock = threading.Lock()
        self._users, self._closing = 0, False

    @classmethod
    def open(cls, exported: Any, device_index: int) -> PeerMirror:
        """`exported`: a pb.KvDevice (or the dict `DeviceMirror.export` makes)."""
        get = exported.get if isinstance(exported, dict) else lambda k: getattr(exported, k)
        handle, nbytes = bytes(get("ipc_handle")), int(get("nbytes"))
        if len(handle) != IPC_HANDLE_BYTES or nbytes < 1:
            raise InvalidArgument(f"kv_device: a {IPC_HANDLE_BYTES}-byte IPC handle and a "
                                  f"size are needed, got {len(handle)} bytes, size {nbytes}")
        cp = _cupy()
        rt = cp.cuda.runtime
        theirs = str(get("bus_id")).lower()
        try:
            peer = rt.deviceGetByPCIBusId(theirs)
        except Exception as e:
            raise FailedPrecondition(f"prefill GPU {theirs} is not visible here: {e}") from None
        if peer != device_index and not rt.deviceCanAccessPeer(device_index, peer):
            raise FailedPrecondition(f"no peer access from cuda:{device_index} to {theirs}")
        with cp.cuda.Device(device_index):
            ptr = rt.ipcOpenMemHandle(handle, _LAZY_PEER)
            mapped = _bytes_to_allocation_end(ptr)
        try:
            # The size comes from the prefill's reply: a wrong one (a bug, a hostile
            # peer) would let views read past the mapping, an illegal address that
            # poisons this process's CUDA context. The driver knows the real size.
            if mapped is not None and nbytes > mapped:
                raise InvalidArgument(f"kv_device: the prefill says {nbytes} bytes, its "
                                      f"mapped allocation has {mapped}")
            return cls(ptr, nbytes, int(get("payload_offset")), device_index, theirs)
        except BaseException:
            with cp.cuda.Device(device_index):
                rt.ipcCloseMemHandle(ptr)
            raise

    def acquire(self) -> None:
        """A request starts reading: the mapping stays until its `release`, even if
        `close` (a re-attach to a restarted prefill) comes first."""
        with self._lock:
            if self._ptr is None or self._closing:
                raise FailedPrecondition("the prefill's device mirror is no longer mapped "
                                         "here (the prefill restarted)")
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._closing and self._users == 0
        if last:
            self._unmap()

    def view(self, offset: int, length: int) -> Any:
        if self.tensor is None:
            raise FailedPrecondition("the prefill's device mirror was closed here")
        return self.tensor[_span(offset, length, self.payload_offset, self.nbytes)]

    def close(self) -> None:
        """Unmap once no request reads from it any more (idempotent)."""
        with self._lock:
            self._closing = True
            if self._users:
                return
        self._unmap()

    def _unmap(self) -> None:
        with self._lock:
            if self._ptr is None:
                return
            ptr, self._ptr, self.tensor = self._ptr, None, None
        cp = _cupy()
        with cp.cuda.Device(self.device_index):
            cp.cuda.runtime.ipcCloseMemHandle(ptr)


def _bytes_to_allocation_end(ptr: int) -> int | None:
    """Bytes from `ptr` to the end of the allocation it lies in (the driver's
    cuMemGetAddressRange, on the current context); None where it cannot be asked."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    if lib.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size),
                                   ctypes.c_uint64(ptr)) != 0:
        return None
    return base.value + size.value - ptr


def _span(offset: int, length: int, payload_offset: int, nbytes: int) -> slice:
    start = offset - payload_offset
    if start < 0 or length < 1 or start + length > nbytes:
        raise InvalidArgument(f"region bytes [{offset}, {offset + length}) are outside the "
                              f"device mirror [{payload_offset}, {payload_offset + nbytes})")
    return slice(start, start + length)
