"""A fake `pyxrt` (tests only) with the real module's names and behaviour.

Mirrors XRT's src/python/pybind11/src/pyxrt.cpp: `device(index|bdf)`,
`device.load_xclbin(path) -> uuid`, `kernel(device, uuid, name)`, `kernel.group_id(arg)`,
`bo(device, size, flags, group)`, `bo.write(buffer, offset)`, `bo.read(size, offset)`,
`bo.sync(direction, size, offset)`, `run(kernel)`, `run.set_arg(i, bo|int)`, `run.start()`,
`run.wait(timeout_ms) -> ert_cmd_state`, and the kernel call form that silently drops
arguments it cannot cast. Buffers keep a host copy and a device copy: a kernel sees only
bytes synced TO_DEVICE, the host sees kernel output only after a FROM_DEVICE sync.

The kernel run executes the emulator's decode kernel on the device copies, so the XRT
host code is exercised end to end. Knobs for failure tests live in `FAULTS`.
"""

from __future__ import annotations

import enum
import os
import uuid as _uuid

import numpy as np

XCL_BO_FLAGS_NONE = 0
FAULTS: dict[str, object] = {"no_device": False, "state": None}
CALLS: list[str] = []  # what the host code did, for tests that check the API use


class xclBOSyncDirection(enum.IntEnum):  # noqa: N801 - the real name
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
    def __init__(self, which: int | str = 0) -> None:
        if FAULTS["no_device"] or (isinstance(which, int) and which != 0):
            raise RuntimeError(f"No devices found ({which!r})")
        self.which = which
        self.xclbin: str | None = None

    def load_xclbin(self, path: str) -> uuid:
        if not os.path.isfile(path):
            raise RuntimeError(f"load_xclbin: {path}: No such file or directory")
        self.xclbin = path
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
        CALLS.append(f"sync:{int(direction)}")
        if direction == xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE:
            self._dev[offset : offset + size] = self._host[offset : offset + size]
        else:
            self._host[offset : offset + size] = self._dev[offset : offset + size]

    def _range(self, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > self._host.size:
            raise RuntimeError(f"bo range [{offset}, {offset + size}) outside {self._host.size}")


class kernel:  # noqa: N801
    def __init__(self, dev: device, xclbin_uuid: uuid, name: str) -> None:
        if dev.xclbin is None:
            raise RuntimeError("kernel: no xclbin loaded")
        if name != "hbm_decode":
            raise RuntimeError(f"kernel {name!r} not found in xclbin")
        self.name = name

    def group_id(self, arg: int) -> int:
        # HBM[c] for the 32 channel arguments; io and meta share bank 32 (PLRAM).
        from fpga_service.device.abi import N_HBM_ARGS

        return arg if arg < N_HBM_ARGS else N_HBM_ARGS

    def __call__(self, *args) -> run:
        # The real call form: each argument is tried as bo, then int; others vanish.
        CALLS.append("kernel.__call__")
        r = run(self)
        for i, a in enumerate(args):
            if isinstance(a, bo) or (isinstance(a, int) and -(2**31) <= a < 2**31):
                r.set_arg(i, a)
        r.start()
        return r


class run:  # noqa: N801
    def __init__(self, k: kernel) -> None:
        self.kernel = k
        self.args: dict[int, object] = {}
        self._state = ert_cmd_state.ERT_CMD_STATE_NEW

    def set_arg(self, i: int, value) -> None:
        if isinstance(value, bo) or isinstance(value, int) and not isinstance(value, bool) and -(2**31) <= value < 2**31:
            self.args[i] = value
        else:  # pybind11: no overload takes a float or an int beyond a C int
            raise TypeError(f"set_arg(): incompatible function arguments: {i}, {value!r}")
        CALLS.append(f"set_arg:{i}")

    def start(self) -> None:
        CALLS.append("start")
        forced = FAULTS["state"]
        if forced is not None:
            self._state = forced
            return
        from fpga_service.device.kernel import run_kernel

        a = self.args
        channels = [a[c]._dev for c in range(32)]
        try:
            run_kernel(channels, a[32]._dev, a[33]._dev, n_steps=a[34], position=a[35],
                       token=a[36], kv_capacity=a[37])
            self._state = ert_cmd_state.ERT_CMD_STATE_COMPLETED
        except Exception:  # a crashed datapath reports ERROR, as hardware would
            self._state = ert_cmd_state.ERT_CMD_STATE_ERROR

    def wait(self, timeout_ms: int = 0) -> ert_cmd_state:
        CALLS.append(f"wait:{timeout_ms}")
        return self._state

    def state(self) -> ert_cmd_state:
        return self._state


for _f in bo.flags:  # pybind11's export_values(): pyxrt.bo.normal etc.
    setattr(bo, _f.name, _f)
