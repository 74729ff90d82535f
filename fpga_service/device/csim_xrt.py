"""A `pyxrt` whose "xclbin" is the C-simulation build of kernels/hls/hbm_decode.cpp.

`fpga-csim` (fpga_service/device/csim.py) is `XrtDevice` with this module in place of
XRT's pyxrt, so the XRT host sequence of docs/fpga-kernel-abi.md (device, load_xclbin,
kernel, one bo per channel in `group_id(c)`, write + sync, run + set_arg + start + wait,
sync back + read) drives the HLS kernel's own source, compiled by g++ (kernels.hls_build).

The names and buffer semantics are XRT's (src/python/pybind11/src/pyxrt.cpp); the test
double tests/fake_pyxrt shares them (enums, uuid, bo, run's argument checks) and swaps
only the kernel. Buffers keep a host copy and a device copy as XRT's normal buffer
objects do: the kernel
sees only bytes synced TO_DEVICE, the host sees the kernel's writes only after a
FROM_DEVICE sync. Both copies are zero pages until written. `run.start()` calls the
kernel synchronously through ctypes (the GIL is released during the call).
"""

from __future__ import annotations

import ctypes
import enum
import os
import uuid as _uuid

import numpy as np

N_HBM_ARGS = 32


class xclBOSyncDirection(enum.IntEnum):  # noqa: N801 - XRT's names
    XCL_BO_SYNC_BO_TO_DEVICE = 0
    XCL_BO_SYNC_BO_FROM_DEVICE = 1


class ert_cmd_state(enum.IntEnum):  # noqa: N801
    ERT_CMD_STATE_NEW = 1
    ERT_CMD_STATE_QUEUED = 2
    ERT_CMD_STATE_RUNNING = 3
    ERT_CMD_STATE_COMPLETED = 4
    ERT_CMD_STATE_ERROR = 5
    ERT_CMD_STATE_ABORT = 6
    ERT_CMD_STATE_SUBMITTED = 7
    ERT_CMD_STATE_TIMEOUT = 8
    ERT_CMD_STATE_NORESPONSE = 9


class uuid:  # noqa: N801
    def __init__(self, text: str) -> None:
        self._s = text

    def to_string(self) -> str:
        return self._s


class device:  # noqa: N801
    """The simulated card; index 0 only."""

    def __init__(self, which: int | str = 0) -> None:
        if which not in (0, "0"):
            raise RuntimeError(f"C simulation has one device, 0; not {which!r}")
        self.lib: ctypes.CDLL | None = None
        self.path = ""

    def load_xclbin(self, path: str) -> uuid:
        """`path` is the g++ build (kernels.hls_build.build_csim) instead of a bitstream."""
        if not os.path.isfile(path):
            raise RuntimeError(f"load_xclbin: {path}: No such file or directory")
        self.lib = ctypes.CDLL(path)
        self.path = path
        return uuid(str(_uuid.uuid5(_uuid.NAMESPACE_URL, path)))


class bo:  # noqa: N801
    class flags(enum.IntEnum):  # noqa: N801
        normal = 0
        cacheable = 1
        device_only = 2
        host_only = 3
        p2p = 4
        svm = 5

    def __init__(self, dev: device, size: int, flags: int, group: int) -> None:
        self.group = group
        self._host = np.zeros(size, np.uint8)   # calloc: pages are committed lazily
        self._dev = np.zeros(size, np.uint8)

    def size(self) -> int:
        return self._host.size

    def write(self, data, seek: int) -> None:
        src = np.frombuffer(memoryview(data).cast("B"), np.uint8)
        self._range(seek, src.size)
        self._host[seek : seek + src.size] = src

    def read(self, size: int, skip: int) -> np.ndarray:
        self._range(skip, size)
        return self._host[skip : skip + size].copy().view(np.int8)

    def sync(self, direction: xclBOSyncDirection, size: int | None = None,
             offset: int = 0) -> None:
        size = self._host.size - offset if size is None else size
        self._range(offset, size)
        if direction == xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE:
            self._dev[offset : offset + size] = self._host[offset : offset + size]
        else:
            self._host[offset : offset + size] = self._dev[offset : offset + size]

    def _range(self, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > self._host.size:
            raise RuntimeError(f"bo range [{offset}, {offset + size}) outside {self._host.size}")


class kernel:  # noqa: N801
    def __init__(self, dev: device, xclbin_uuid: uuid, name: str) -> None:
        if dev.lib is None:
            raise RuntimeError("kernel: no xclbin loaded")
        try:
            fn = getattr(dev.lib, f"{name}_csim")
        except AttributeError:
            raise RuntimeError(f"kernel {name!r} not found in {dev.path}") from None
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.name, self.fn = name, fn

    def group_id(self, arg: int) -> int:
        # HBM[c] for channel argument c; io and meta in HBM[0] (kernels/hls/hbm_decode.cfg)
        return arg if arg < N_HBM_ARGS else 0


class run:  # noqa: N801
    def __init__(self, k: kernel) -> None:
        self.kernel = k
        self.args: dict[int, object] = {}
        self._state = ert_cmd_state.ERT_CMD_STATE_NEW

    def set_arg(self, i: int, value) -> None:
        ok_int = isinstance(value, int) and not isinstance(value, bool) and -(2**31) <= value < 2**31
        if not (isinstance(value, bo) or ok_int):
            raise TypeError(f"set_arg(): incompatible function arguments: {i}, {value!r}")
        self.args[i] = value

    def start(self) -> None:
        a = self.args
        missing = [i for i in range(N_HBM_ARGS + 6) if i not in a]
        if missing:
            raise RuntimeError(f"run.start: arguments {missing} not set")
        ptrs = (ctypes.c_void_p * N_HBM_ARGS)(*(a[c]._dev.ctypes.data for c in range(N_HBM_ARGS)))
        self._state = ert_cmd_state.ERT_CMD_STATE_RUNNING
        self.kernel.fn(ptrs, a[32]._dev.ctypes.data, a[33]._dev.ctypes.data, *(a[i] for i in range(34, 38)))
        self._state = ert_cmd_state.ERT_CMD_STATE_COMPLETED

    def wait(self, timeout_ms: int = 0) -> ert_cmd_state:
        return self._state

    def state(self) -> ert_cmd_state:
        return self._state


for _f in bo.flags:  # pybind11's export_values(): pyxrt.bo.normal etc.
    setattr(bo, _f.name, _f)
