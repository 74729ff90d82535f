"""Cross-process wake-ups on a u32 word of the shared region (Linux futex).

The owner bumps a slot's event counter after every state change (layer ready, first
token, failed, freed) and wakes waiters; a reader sleeps in FUTEX_WAIT on the value it
last saw, so it wakes ~10 µs after mark_ready instead of at its next poll, and burns no
CPU meanwhile. Shared (non-private) futexes key on the file page, so this works between
processes, on read-only mappings, and across containers sharing /dev/shm. Where the
syscall is unavailable (other arch, seccomp) callers fall back to sleeping.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import platform

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine())
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_OK_ERRNOS = {errno.EAGAIN, errno.ETIMEDOUT, errno.EINTR}  # value changed / timeout / signal
_libc = ctypes.CDLL(None, use_errno=True) if _SYS_FUTEX is not None else None


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def available() -> bool:
    return _libc is not None


def address(mm: mmap.mmap) -> int:
    """Base address of a mapping (read-only ones too); valid while it stays mapped."""
    import numpy as np
    arr = np.frombuffer(mm, dtype=np.uint8)
    try:
        return int(arr.ctypes.data)
    finally:
        del arr  # drop the buffer export at once: it would block mmap.close()


def wait(addr: int, seen: int, timeout_s: float) -> bool:
    """Sleep until the u32 at `addr` is woken, differs from `seen`, or `timeout_s`
    passes. False when futexes are unusable here (then the caller sleeps instead)."""
    if _libc is None:
        return False
    secs = max(0.0, timeout_s)
    ts = _Timespec(int(secs), int((secs % 1.0) * 1e9))
    rc = _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAIT, ctypes.c_uint32(seen),
                       ctypes.byref(ts), None, 0)
    return rc == 0 or ctypes.get_errno() in _OK_ERRNOS


def wake(addr: int) -> None:
    """Wake every process waiting on the u32 at `addr` (best effort)."""
    if _libc is not None:
        _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAKE, ctypes.c_int(2**31 - 1),
                      None, None, 0)
