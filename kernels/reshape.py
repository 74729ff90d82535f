"""Torch path of the KV reshape (docs/hbm-layout.md), on any device.

`pack_layer` turns one layer's engine-layout K, V ([n_kv_heads, T, head_dim], any float
dtype, any device, live tokens only) into the slot form of the HBM layout: a uint8
tensor of `layout.layer_bytes(T)` holding the 32 channel chunks back to back.
On CUDA with CuPy importable it runs the RawKernels of kernels/reshape_cuda.py; the
two paths and the NumPy reference (kernels/reshape_ref.py) agree bit for bit.

Channels own contiguous lane blocks, all of `lanes_per_channel` lanes except possibly
the last used one, so the full channels are one strided copy per K and V:
  rows [b, r, j, d] (block, token in block, lane, dim) viewed as [b, r, c, i, d]
  K chunk of channel c = [b, i, r, d],   V chunk = [b, i, d, r].
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

from engine.errors import InvalidArgument
from kernels.hbm_layout import HbmLayout
from kernels.reshape_ref import check_kv_shape

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@functools.cache
def cupy_available() -> bool:
    try:
        import cupy  # noqa: F401
    except Exception:  # ImportError, or a CuPy built for another CUDA
        return False
    return True


# Set when the CuPy kernels failed once (e.g. NVRTC cannot target this GPU): from then on
# the torch path runs, which produces the same bytes. `cuda_kernel_error()` reports it.
_CUPY_ERROR: list[str] = []


def cuda_kernel_error() -> str | None:
    """Why the CuPy kernels were disabled in this process, or None."""
    return _CUPY_ERROR[0] if _CUPY_ERROR else None


def _use_cuda_kernels(x: torch.Tensor, force_torch: bool) -> bool:
    return x.is_cuda and not force_torch and not _CUPY_ERROR and cupy_available()


def _cuda_failed(exc: Exception) -> None:
    _CUPY_ERROR.append(f"{type(exc).__name__}: {exc}")
    warnings.warn(f"CuPy reshape kernels disabled, using the torch path: {_CUPY_ERROR[0]}",
                  RuntimeWarning, stacklevel=3)


def _out_buffer(out: torch.Tensor | None, nbytes: int, device: torch.device,
                elem_bytes: int) -> torch.Tensor:
    if out is None:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    if out.data_ptr() % elem_bytes:
        raise InvalidArgument(f"out must start on a {elem_bytes}-byte boundary (typed stores)")
    if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() != nbytes or not out.is_contiguous():
        raise InvalidArgument(
            f"out must be a contiguous uint8 tensor of {nbytes} bytes, got "
            f"{out.dtype} {list(out.shape)}")
    return out


def _padded_rows(x: torch.Tensor, layout: HbmLayout) -> torch.Tensor:
    """[H, T, hd] -> [n_blocks, 32, n_lanes, 32] in the layout dtype, zero-padded tokens
    (the last block) and pad elements (the last lane, when kv_dim % 32 != 0)."""
    n_tokens = x.shape[1]
    nb, w = layout.n_blocks(n_tokens), layout.vec
    rows = x.to(TORCH_DTYPES[layout.dtype]).permute(1, 0, 2).reshape(n_tokens, layout.kv_dim)
    if layout.kv_pad:
        full = rows.new_zeros(nb * w, layout.kv_dim_padded)
        full[:n_tokens, :layout.kv_dim] = rows
        rows = full
    elif nb * w != n_tokens:
        rows = torch.cat([rows, rows.new_zeros(nb * w - n_tokens, layout.kv_dim)])
    return rows.view(nb, w, layout.n_lanes, w)


def _pack_torch(k: torch.Tensor, v: torch.Tensor, layout: HbmLayout,
                out: torch.Tensor) -> torch.Tensor:
    n_tokens = k.shape[1]
    nb, w, big = layout.n_blocks(n_tokens), layout.vec, layout.lanes_per_channel
    kx, vx = _padded_rows(k, layout), _padded_rows(v, layout)
    typed = out.view(TORCH_DTYPES[layout.dtype])
    n_full, rem = divmod(layout.n_lanes, big)
    half = nb * big * w * w
    if n_full:
        dst = typed[:n_full * 2 * half].view(n_full, 2, nb, big, w, w)
        src_k = kx[:, :, :n_full * big].reshape(nb, w, n_full, big, w)
        src_v = vx[:, :, :n_full * big].reshape(nb, w, n_full, big, w)
        dst[:, 0].copy_(src_k.permute(2, 0, 3, 1, 4))     # [c, b, i, r, d]
        dst[:, 1].copy_(src_v.permute(2, 0, 3, 4, 1))     # [c, b, i, d, r]
    if rem:
        base, h2 = n_full * 2 * half, nb * rem * w * w
        typed[base:base + h2].view(nb, rem, w, w).copy_(kx[:, :, n_full * big:].permute(0, 2, 1, 3))
        typed[base + h2:base + 2 * h2].view(nb, rem, w, w).copy_(
            vx[:, :, n_full * big:].permute(0, 2, 3, 1))
    return out


def pack_layer(k: torch.Tensor, v: torch.Tensor, layout: HbmLayout, *,
               out: torch.Tensor | None = None, stream: torch.cuda.Stream | None = None,
               capacity_tokens: int | None = None, force_torch: bool = False,
               kernel: str = "auto") -> torch.Tensor:
    """k, v [n_kv_heads, T, head_dim] -> uint8[layout.layer_bytes(T)] on k's device.

    `out`: optional destination (contiguous uint8, exactly layer_bytes(T)); `stream`: the
    CUDA stream for the CuPy kernels (default: torch's current stream). Raises
    InvalidArgument on bad shapes, ResourceExhausted beyond the capacity (default: the
    layout's max tokens per channel). `kernel` (CUDA only): which CuPy kernel, see
    kernels.reshape_cuda.pack_layer ("auto": the 16-byte vector kernel when aligned)."""
    if k.shape != v.shape or k.device != v.device:
        raise InvalidArgument(f"k {list(k.shape)} on {k.device} and v {list(v.shape)} on "
                              f"{v.device} must match")
    if k.dtype not in TORCH_DTYPES.values() or v.dtype != k.dtype:
        raise InvalidArgument(f"k, v must both be float16, bfloat16 or float32, got {k.dtype}, {v.dtype}")
    n_tokens = check_kv_shape(tuple(k.shape), layout, capacity_tokens)
    dst = _out_buffer(out, layout.layer_bytes(n_tokens), k.device, layout.elem_bytes)
    if _use_cuda_kernels(k, force_torch):
        from kernels import reshape_cuda
        try:
            return reshape_cuda.pack_layer(k, v, layout, out=dst, stream=stream, kernel=kernel)
        except InvalidArgument:
            raise
        except Exception as exc:   # compile / launch failure: same bytes from torch
            _cuda_failed(exc)
    if k.is_cuda and stream is not None:      # torch path on the GPU, still on `stream`
        with torch.cuda.stream(stream):
            return _pack_torch(k, v, layout, dst)
    return _pack_torch(k, v, layout, dst)


def as_byte_tensor(buf: torch.Tensor | np.ndarray | bytes | bytearray | memoryview) -> torch.Tensor:
    """A 1-D uint8 tensor over `buf` (copied when it is a read-only Python buffer)."""
    if isinstance(buf, torch.Tensor):
        if buf.dtype != torch.uint8:
            raise InvalidArgument(f"packed layer must be uint8, got {buf.dtype}")
        return buf.reshape(-1)
    arr = np.frombuffer(buf, np.uint8)
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def _unpack_torch(data: torch.Tensor, layout: HbmLayout, n_tokens: int):
    nb, w, big = layout.n_blocks(n_tokens), layout.vec, layout.lanes_per_channel
    typed = data.view(TORCH_DTYPES[layout.dtype])
    kx = typed.new_empty(nb, w, layout.n_lanes, w)
    vx = typed.new_empty(nb, w, layout.n_lanes, w)
    n_full, rem = divmod(layout.n_lanes, big)
    half = nb * big * w * w
    if n_full:
        src = typed[:n_full * 2 * half].view(n_full, 2, nb, big, w, w)
        shape = (nb, w, n_full * big, w)
        kx[:, :, :n_full * big] = src[:, 0].permute(1, 3, 0, 2, 4).reshape(shape)
        vx[:, :, :n_full * big] = src[:, 1].permute(1, 4, 0, 2, 3).reshape(shape)
    if rem:
        base, h2 = n_full * 2 * half, nb * rem * w * w
        kx[:, :, n_full * big:] = typed[base:base + h2].view(nb, rem, w, w).permute(0, 2, 1, 3)
        vx[:, :, n_full * big:] = typed[base + h2:base + 2 * h2].view(nb, rem, w, w).permute(0, 3, 1, 2)

    def back(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(nb * w, layout.kv_dim_padded)[:n_tokens, :layout.kv_dim]
        return rows.reshape(n_tokens, layout.n_kv_heads, layout.head_dim).permute(1, 0, 2).contiguous()

    return back(kx), back(vx)


def unpack_layer(buf, layout: HbmLayout, n_tokens: int, *,
                 stream: torch.cuda.Stream | None = None,
                 force_torch: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of pack_layer: (k, v) [n_kv_heads, n_tokens, head_dim] in the layout
    dtype, on the buffer's device. `buf`: uint8 tensor, NumPy array, bytes, memoryview."""
    data = as_byte_tensor(buf)
    if data.numel() != layout.layer_bytes(n_tokens):
        raise InvalidArgument(
            f"packed layer has {data.numel()} bytes, expected {layout.layer_bytes(n_tokens)} "
            f"for {n_tokens} tokens")
    if not data.is_contiguous():
        data = data.contiguous()
    if _use_cuda_kernels(data, force_torch):
        from kernels import reshape_cuda
        try:
            return reshape_cuda.unpack_layer(data, layout, n_tokens, stream=stream)
        except InvalidArgument:
            raise
        except Exception as exc:
            _cuda_failed(exc)
    if data.is_cuda and stream is not None:
        with torch.cuda.stream(stream):
            return _unpack_torch(data, layout, n_tokens)
    return _unpack_torch(data, layout, n_tokens)
