"""The HBM device over pyxrt: a real Alveo U55C running the `hbm_decode` kernel.

pyxrt ships with XRT (`source /opt/xilinx/xrt/setup.sh`), not PyPI, so it is imported
only in `open()`; a missing module, device or xclbin raises `Unavailable` with a message
that names what is missing, so the decode service reports NOT_SERVING instead of dying.

One buffer object per HBM channel, each placed in the bank the kernel's argument c is
connected to (`kernel.group_id(c)`). Normal buffer objects have a host shadow of the same
size: 32 x 512 MiB is 16 GiB of host memory, so `channel_bytes` can be lowered to what
the model and the expected KV need. Runs go through `pyxrt.run` + `set_arg`: the
kernel's call form silently drops arguments it cannot cast (floats, ints >= 2**31).
The ABI is docs/fpga-kernel-abi.md (fpga_service/device/abi.py).
"""

from __future__ import annotations

import importlib
import os

import numpy as np

from engine.errors import DeadlineExceeded, FailedPrecondition, HybridError, Unavailable
from fpga_service.device import abi
from fpga_service.device.bandwidth import BandwidthModel
from fpga_service.device.base import CHANNEL_BYTES, HbmDevice

KERNEL_NAME = "hbm_decode"


class XrtDevice(HbmDevice):
    name = "fpga-xrt"
    pyxrt_module = "pyxrt"  # fpga-csim swaps in fpga_service.device.csim_xrt

    def __init__(self, xclbin: str | None = None, device: int | str = 0,
                 channel_bytes: int = CHANNEL_BYTES, bandwidth: BandwidthModel | None = None,
                 kernel_name: str = KERNEL_NAME) -> None:
        super().__init__(channel_bytes, bandwidth)
        self.xclbin = xclbin or os.environ.get("HYBRID_XCLBIN", "")
        self.device_id = device
        self.kernel_name = kernel_name
        self._xrt = None
        self._dev = self._kernel = None
        self._bos: list = []
        self._io = self._meta = None

    # -- lifecycle -------------------------------------------------------------------
    def open(self) -> None:
        if self._kernel is not None:
            return
        try:
            xrt = importlib.import_module(self.pyxrt_module)
        except ImportError as e:
            raise Unavailable(
                "fpga-xrt needs XRT's Python binding `pyxrt`, which is not importable "
                f"({e}); install XRT and `source /opt/xilinx/xrt/setup.sh`, or use the "
                "fpga-emu backend") from None
        if not self.xclbin or not os.path.isfile(self.xclbin):
            where = (f"{self.xclbin} not found" if self.xclbin else
                     "none given: set HYBRID_XCLBIN to its path (docker compose: put "
                     "hbm_decode.xclbin in HYBRID_XCLBIN_DIR, default ./xclbin)")
            raise Unavailable(f"fpga-xrt needs an xclbin built to docs/fpga-kernel-abi.md; "
                              f"{where}")
        try:
            self._dev = xrt.device(self.device_id)
        except Exception as e:
            raise Unavailable(f"no Alveo device {self.device_id!r} (index or BDF): {e}") from None
        try:
            uuid = self._dev.load_xclbin(self.xclbin)
            self._kernel = xrt.kernel(self._dev, uuid, self.kernel_name)
        except Exception as e:
            raise Unavailable(f"cannot load kernel {self.kernel_name!r} from {self.xclbin}: {e}") from None
        self._xrt = xrt
        self._bos = [self._bo(self.channel_bytes, c) for c in range(self.n_channels)]

    def close(self) -> None:
        # Buffer objects, kernel and device are released when their last reference goes.
        self._bos, self._io, self._meta = [], None, None
        self._kernel = self._dev = None
        self.weights = None

    def _bo(self, size: int, arg: int):
        xrt = self._xrt
        return xrt.bo(self._dev, size, xrt.bo.normal, self._kernel.group_id(arg))

    def _sync(self, bo, to_device: bool, size: int, offset: int) -> None:
        d = self._xrt.xclBOSyncDirection
        bo.sync(d.XCL_BO_SYNC_BO_TO_DEVICE if to_device else d.XCL_BO_SYNC_BO_FROM_DEVICE,
                size, offset)

    def _channel(self, channel: int, offset: int, size: int):
        if not self._bos:
            raise FailedPrecondition("fpga-xrt device is not open")
        self._check_range(channel, offset, size)
        return self._bos[channel]

    # -- memory ----------------------------------------------------------------------
    def write(self, channel: int, offset: int, data) -> None:
        mv = memoryview(data)
        self._channel(channel, offset, mv.nbytes).write(mv, offset)

    def sync(self, channel: int, offset: int, size: int) -> None:
        self._sync(self._channel(channel, offset, size), True, size, offset)

    def read(self, channel: int, offset: int, size: int) -> bytes:
        bo = self._channel(channel, offset, size)
        self._sync(bo, False, size, offset)
        return np.asarray(bo.read(size, offset)).tobytes()

    # -- kernel ----------------------------------------------------------------------
    def _configure(self, meta: bytes, io_size: int) -> None:
        self._meta = self._bo(-(-len(meta) // 4096) * 4096, abi.ARG_META)
        self._meta.write(meta, 0)
        self._sync(self._meta, True, len(meta), 0)
        self._io = self._bo(io_size, abi.ARG_IO)
        self._io_size = io_size

    def _launch(self, io_header: bytes, scalars: dict[int, int], timeout_s: float) -> np.ndarray:
        xrt = self._xrt
        self._io.write(io_header, 0)
        self._sync(self._io, True, len(io_header), 0)
        run = xrt.run(self._kernel)
        for c, bo in enumerate(self._bos):
            run.set_arg(c, bo)
        run.set_arg(abi.ARG_IO, self._io)
        run.set_arg(abi.ARG_META, self._meta)
        for i in sorted(scalars):
            run.set_arg(i, abi.check_scalar(f"arg{i}", scalars[i]))
        try:
            run.start()
            state = run.wait(max(1, int(timeout_s * 1000)))
        except Exception as e:  # XRT raises on a dead device or a bad argument
            raise HybridError(f"{self.kernel_name} run failed: {e}") from None
        done = xrt.ert_cmd_state.ERT_CMD_STATE_COMPLETED
        if state != done:
            name = getattr(state, "name", str(state))
            if name == "ERT_CMD_STATE_TIMEOUT":
                raise DeadlineExceeded(f"{self.kernel_name} did not finish in {timeout_s:.1f} s")
            raise HybridError(f"{self.kernel_name} ended in state {name}, not COMPLETED")
        self._sync(self._io, False, self._io_size, 0)
        return np.asarray(self._io.read(self._io_size, 0)).view(np.uint8)
