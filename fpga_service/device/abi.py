"""The decode kernel's ABI: argument indices, the io buffer and the meta buffer.

Documented for bitstream builders in docs/fpga-kernel-abi.md; the emulator, the XRT
host code and the fake pyxrt of the tests all go through these helpers, so the three
agree by construction on where every byte sits.

Scalars are int32 only: pyxrt's `run.set_arg` binds Python ints to a C `int`, so
anything >= 2**31 (or a float) cannot be passed as a scalar. 64-bit values (per-channel
offsets) travel in the io buffer instead.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

from engine.errors import InvalidArgument

N_HBM_ARGS = 32
ARG_IO = 32
ARG_META = 33
ARG_N_STEPS = 34
ARG_POSITION = 35
ARG_TOKEN = 36
ARG_KV_CAPACITY = 37
N_ARGS = 38

IO_MAGIC = 0x3130304F49424D48  # "HMBIO001" little-endian
MAX_STEPS = 1024
_HDR = struct.Struct("<q32qqqq")  # magic, kv_base[32], status, steps_done, reserved
OFF_TOKENS = _HDR.size
OFF_LOGITS = OFF_TOKENS + 8 * MAX_STEPS
STATUS_IDLE, STATUS_OK = 0, 1
STATUS_BAD_ARGS, STATUS_KV_FULL = -1, -2
INT32_MAX = 2**31 - 1


def io_bytes(vocab: int) -> int:
    return -(-(OFF_LOGITS + 4 * vocab) // 4096) * 4096


def check_scalar(name: str, value: int) -> int:
    """The set_arg rule: a non-negative int that fits a C int."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= INT32_MAX:
        raise InvalidArgument(f"kernel scalar {name}={value!r} must be an int in [0, 2**31)")
    return value


def pack_io_header(kv_base: list[int]) -> bytes:
    if len(kv_base) != N_HBM_ARGS:
        raise InvalidArgument(f"need {N_HBM_ARGS} KV base offsets, got {len(kv_base)}")
    return _HDR.pack(IO_MAGIC, *kv_base, STATUS_IDLE, 0, 0)


@dataclass(frozen=True)
class IoView:
    """Zero-copy views of an io buffer's bytes (a uint8 numpy array)."""

    raw: np.ndarray

    def header(self) -> tuple[int, list[int], int, int]:
        vals = _HDR.unpack_from(self.raw, 0)
        return vals[0], list(vals[1:33]), vals[33], vals[34]

    def set_result(self, status: int, steps_done: int) -> None:
        struct.pack_into("<qq", self.raw, 8 * 33, status, steps_done)

    def tokens(self) -> np.ndarray:
        return self.raw[OFF_TOKENS:OFF_LOGITS].view(np.int64)

    def logits(self, vocab: int) -> np.ndarray:
        return self.raw[OFF_LOGITS : OFF_LOGITS + 4 * vocab].view(np.float32)


def encode_meta(meta: dict) -> bytes:
    """The meta buffer: 8-byte length, then the kernel spec as JSON (model dims, HBM
    element dtype, where each weight tensor sits). A real bitstream has these baked in
    at synthesis; the emulator reads them from here so one kernel serves every model."""
    blob = json.dumps(meta, sort_keys=True).encode()
    return struct.pack("<q", len(blob)) + blob


def decode_meta(raw: np.ndarray | bytes) -> dict:
    buf = bytes(raw[:8])
    (n,) = struct.unpack("<q", buf)
    if not 0 < n <= len(raw) - 8:
        raise InvalidArgument(f"meta buffer holds no kernel spec (length field {n})")
    return json.loads(bytes(raw[8 : 8 + n]))
