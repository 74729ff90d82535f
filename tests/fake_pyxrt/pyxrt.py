"""A fake `pyxrt` (tests only) with the real module's names and behaviour.

Mirrors XRT's src/python/pybind11/src/pyxrt.cpp: `device(index|bdf)`,
`device.load_xclbin(path) -> uuid`, `kernel(device, uuid, name)`, `kernel.group_id(arg)`,
`bo(device, size, flags, group)`, `bo.write(buffer, offset)`, `bo.read(size, offset)`,
`bo.sync(direction, size, offset)`, `run(kernel)`, `run.set_arg(i, bo|int)`, `run.start()`,
`run.wait(timeout_ms) -> ert_cmd_state`, and the kernel call form that silently drops
arguments it cannot cast. Buffers keep a host copy and a device copy: a kernel sees only
bytes synced TO_DEVICE, the host sees kernel output only after a FROM_DEVICE sync.

The enums, uuid, buffer objects and run's argument checks are those of
fpga_service/device/csim_xrt.py (the C-simulation pyxrt): one model of XRT's API. Here
the kernel run executes the emulator's decode kernel on the device copies, so the XRT
host code is exercised end to end. Knobs for failure tests live in `FAULTS`; `CALLS`
records the API use.
"""

from __future__ import annotations

import os
import uuid as _uuid

from fpga_service.device import csim_xrt
from fpga_service.device.csim_xrt import ert_cmd_state, uuid, xclBOSyncDirection  # noqa: F401

XCL_BO_FLAGS_NONE = 0
FAULTS: dict[str, object] = {"no_device": False, "state": None}
CALLS: list[str] = []  # what the host code did, for tests that check the API use


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


class bo(csim_xrt.bo):  # noqa: N801 - XRT's buffer semantics, sync calls recorded
    def sync(self, direction: xclBOSyncDirection, size: int | None = None,
             offset: int = 0) -> None:
        super().sync(direction, size, offset)
        CALLS.append(f"sync:{int(direction)}")


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


class run(csim_xrt.run):  # noqa: N801 - XRT's argument checks; the emulator's kernel
    def set_arg(self, i: int, value) -> None:
        super().set_arg(i, value)  # pybind11: no overload takes a float or a too-big int
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
