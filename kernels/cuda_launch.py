"""CuPy RawKernel launches on torch's CUDA streams, shared by the KV reshape kernels
(kernels/reshape_cuda.py) and the fused decode kernels (kernels/decode_cuda.py).

- `compiled(code, options, device)`: the source compiled by NVRTC once per (source,
  options, device) and loaded on that device.
- `cupy_stream(ptr, device)`: CuPy's handle on a torch stream, by raw pointer, cached;
  a launch that passes it explicitly makes CuPy switch no context and build no object.
- `current_stream_ptr(device)` / `stream_ptr(stream, device)`: the raw pointer of
  torch's current stream, or of a given stream; during CUDA-graph capture that is the
  capture stream, so launches made with it are recorded in the graph.

CuPy is imported lazily: importing this module needs no GPU.
"""

from __future__ import annotations

import functools
import warnings

import torch


@functools.cache
def compiled(code: str, options: tuple[str, ...], device: int):
    """A cupy.RawModule of `code`, compiled (errors surface here) and loaded on `device`."""
    import cupy as cp

    with cp.cuda.Device(device):
        module = cp.RawModule(code=code, options=options)
        module.compile()
        return module


class _StreamRef:
    """A raw stream pointer in the CUDA stream protocol (what Stream.from_external takes)."""

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


@functools.lru_cache(maxsize=64)
def cupy_stream(ptr: int, device: int):
    """CuPy's handle on a torch stream: a wrapper of the raw pointer, so caching it by
    pointer stays right even when torch reuses the pointer for a new stream. CuPy 14
    deprecates ExternalStream for Stream.from_external; older CuPy has only the former."""
    import cupy as cp

    from_external = getattr(cp.cuda.Stream, "from_external", None)
    if from_external is not None:
        with cp.cuda.Device(device):
            stream = from_external(_StreamRef(ptr))
        if stream.ptr == ptr:
            return stream
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cp.cuda.ExternalStream(ptr, device)


def current_stream_ptr(device: int) -> int:
    """torch's current stream on `device` as a raw pointer. torch.cuda.current_stream()
    builds a Stream object (several microseconds); the raw getter is what torch's own
    compiler uses on its launch path."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(device) if raw is not None else torch.cuda.current_stream(device).cuda_stream


def stream_ptr(stream: torch.cuda.Stream | None, device: int) -> int:
    """The raw pointer of `stream`, or of the current stream when it is None."""
    return stream.cuda_stream if stream is not None else current_stream_ptr(device)
