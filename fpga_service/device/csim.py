"""`fpga-csim`: the HLS kernel's own C++ source (kernels/hls/hbm_decode.cpp), compiled by
g++ for C simulation, behind the XRT host code.

`CsimDevice` is `XrtDevice` with `fpga_service.device.csim_xrt` in place of pyxrt and the
g++ build in place of the xclbin, so the host sequence of docs/fpga-kernel-abi.md, the
ABI and the kernel are exercised together on any machine with a C++17 compiler.

The kernel is built per model (its dimensions are compile-time constants, as in a
bitstream), so the device "loads its bitstream" when the model is loaded: `open()` only
checks that a compiler exists; `load_model` builds (or finds in the cache) the library
for (config, dtype), then runs XrtDevice's open sequence and load.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.config import ModelConfig
from engine.errors import FailedPrecondition, Unavailable
from fpga_service.device.bandwidth import BandwidthModel
from fpga_service.device.base import CHANNEL_BYTES, HbmBuffer
from fpga_service.device.xrt import XrtDevice


class CsimDevice(XrtDevice):
    name = "fpga-csim"
    pyxrt_module = "fpga_service.device.csim_xrt"

    def __init__(self, channel_bytes: int = CHANNEL_BYTES,
                 bandwidth: BandwidthModel | None = None) -> None:
        super().__init__("", 0, channel_bytes, bandwidth)

    def open(self) -> None:
        from kernels.hls_build import compiler

        try:
            compiler()
        except FailedPrecondition as e:
            raise Unavailable(str(e)) from None

    def load_model(self, config: ModelConfig, dtype: str, chunks: Sequence) -> HbmBuffer:
        from kernels.hls_build import build_csim

        if self._kernel is None:
            self.xclbin = str(build_csim(config, dtype))  # FailedPrecondition if g++ fails
            XrtDevice.open(self)
        return super().load_model(config, dtype, chunks)
