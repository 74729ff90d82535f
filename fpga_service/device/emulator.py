"""The software U55C: 32 HBM channels in host memory and the emulated decode kernel.

Each channel is one zero-initialised uint8 array of the channel's size; numpy asks the
OS for zeroed pages, so only the bytes written take RAM (a 124M model in fp32 uses
~0.5 GB of the 16 GiB address space). HBM here is the host copy: `sync` only checks the
range, since the kernel runs on the same bytes (docs/fpga-emulator.md).
"""

from __future__ import annotations

import numpy as np

from engine.errors import FailedPrecondition
from fpga_service.device import abi
from fpga_service.device.bandwidth import BandwidthModel
from fpga_service.device.base import CHANNEL_BYTES, HbmDevice
from fpga_service.device.kernel import forget, run_kernel


class EmulatorDevice(HbmDevice):
    name = "fpga-emulator"

    def __init__(self, channel_bytes: int = CHANNEL_BYTES,
                 bandwidth: BandwidthModel | None = None) -> None:
        super().__init__(channel_bytes, bandwidth)
        self.channels: list[np.ndarray] = []
        self._io = np.zeros(0, np.uint8)
        self._meta = np.zeros(0, np.uint8)

    def open(self) -> None:
        if not self.channels:
            self.channels = [np.zeros(self.channel_bytes, np.uint8) for _ in range(self.n_channels)]

    def close(self) -> None:
        if self.channels:
            forget(self.channels)
        self.channels = []
        self.weights = None

    def _mem(self, channel: int, offset: int, size: int) -> np.ndarray:
        if not self.channels:
            raise FailedPrecondition("emulated U55C is not open")
        self._check_range(channel, offset, size)
        return self.channels[channel][offset : offset + size]

    def write(self, channel: int, offset: int, data) -> None:
        src = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8).reshape(-1)
        self._mem(channel, offset, src.size)[:] = src

    def sync(self, channel: int, offset: int, size: int) -> None:
        self._mem(channel, offset, size)

    def read(self, channel: int, offset: int, size: int) -> bytes:
        return self._mem(channel, offset, size).tobytes()

    def _configure(self, meta: bytes, io_size: int) -> None:
        self._meta = np.frombuffer(bytearray(meta), np.uint8)
        self._io = np.zeros(io_size, np.uint8)

    def _launch(self, io_header: bytes, scalars: dict[int, int], timeout_s: float) -> np.ndarray:
        self._io[: len(io_header)] = np.frombuffer(io_header, np.uint8)
        run_kernel(self.channels, self._io, self._meta,
                   n_steps=scalars[abi.ARG_N_STEPS], position=scalars[abi.ARG_POSITION],
                   token=scalars[abi.ARG_TOKEN], kv_capacity=scalars[abi.ARG_KV_CAPACITY])
        return self._io
