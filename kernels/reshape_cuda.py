"""CuPy RawKernels of the KV reshape (docs/hbm-layout.md): one for K, one for V, and
their inverses. Called through kernels/reshape.py when the tensors are on CUDA.

- Live tokens only: the grid covers n_blocks(T) blocks, not the model's max length.
- Zero-copy: kernels get raw device pointers of the torch tensors (`data_ptr()`).
  We do not go through `__cuda_array_interface__`/DLPack because CuPy may then
  synchronise with the producer's stream, which would serialise the copy stream with
  the compute stream and defeat the latency hiding.
- Streams: every launch goes on the given torch stream (default: torch's current one)
  via `cupy.cuda.ExternalStream(stream.cuda_stream)`; dtype conversion and
  `.contiguous()` (if needed) run on the same stream. Tensors used on a stream other
  than the current one are `record_stream`ed so the caching allocator does not reuse
  them early.
- Launches: `pack_k` and `pack_v` are the two kernels of the source document;
  `pack_kv` runs both in one launch (grid z = 2), the default, because at one layer of
  a 512-token prompt (2 MiB) launch overhead is a large part of the time.
- Coalescing: one CTA (32x8 threads) per (token block, lane) = one 32x32 tile. K: each
  warp reads 32 consecutive elements of a token row (contiguous in head_dim) and writes
  one contiguous 64-byte tile row. V: the tile is staged in shared memory (33-element
  row pitch against bank conflicts) so both the read (along dims) and the transposed
  write (along tokens) are contiguous.
- Conversion to the layout dtype happens before the kernel with `Tensor.to` (round to
  nearest even, as the CPU path and NumPy), so the kernels only move 2- or 4-byte words
  and agree with the reference bit for bit.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from engine.errors import InvalidArgument
from kernels.hbm_layout import HbmLayout

_SRC = r"""
// elem_t is typedef'd in front of this source: unsigned short (fp16) or unsigned int (fp32).
// Geometry: lane j (32 elements of the kv row) lives on channel c = j / L, as local lane
// i = j - c*L; channels before c are full (L lanes), so channel c's chunk starts at
// element 2*n_blocks*1024*c*L; its K part holds n_blocks*lanes_c tiles, then the V part.
struct Tile { long long k; long long v; int e; };

__device__ __forceinline__ Tile tile_of(int j, int b, int n_lanes, int L, int n_blocks) {
    const int c = j / L;
    const int i = j - c * L;
    const int lanes_c = min(L, n_lanes - c * L);
    const long long chunk = 2LL * n_blocks * 1024LL * (long long)(c * L);
    Tile t;
    t.k = chunk + ((long long)b * lanes_c + i) * 1024LL;
    t.v = t.k + (long long)n_blocks * lanes_c * 1024LL;
    t.e = j * 32 + threadIdx.x;          // this thread's element of the kv row
    return t;
}

#define KV_PARAMS long long stride_h, long long stride_t, int n_tokens, int head_dim, \
                  int n_lanes, int L, int n_blocks
#define KV_ARGS stride_h, stride_t, n_tokens, head_dim, n_lanes, L, n_blocks

// K: one warp per tile row; reads 32 consecutive elements of a token's kv row, writes one
// contiguous 32-element row of the [token][dim] tile. Padding tokens are written as zero.
__device__ __forceinline__ void pack_k_tile(const elem_t* __restrict__ src,
                                            elem_t* __restrict__ dst, KV_PARAMS) {
    const int b = blockIdx.x, j = blockIdx.y;   // blocks on x: no 65535 limit
    const Tile t = tile_of(j, b, n_lanes, L, n_blocks);
    const int h = t.e / head_dim, d = t.e - h * head_dim;
    for (int r = threadIdx.y; r < 32; r += blockDim.y) {
        const int tok = b * 32 + r;
        elem_t x = 0;
        if (tok < n_tokens) x = src[h * stride_h + tok * stride_t + d];
        dst[t.k + r * 32 + threadIdx.x] = x;           // [token][dim]
    }
}

// V: the same coalesced read into shared memory, then a coalesced write of the
// transposed [dim][token] tile. Must be the last thing its kernel does (see the tests'
// CPU shim, where __syncthreads() returns from this function in the first phase).
__device__ __forceinline__ void pack_v_tile(const elem_t* __restrict__ src,
                                            elem_t* __restrict__ dst, elem_t (*s)[33],
                                            KV_PARAMS) {
    const int b = blockIdx.x, j = blockIdx.y;   // blocks on x: no 65535 limit
    const Tile t = tile_of(j, b, n_lanes, L, n_blocks);
    const int h = t.e / head_dim, d = t.e - h * head_dim;
    for (int r = threadIdx.y; r < 32; r += blockDim.y) {
        const int tok = b * 32 + r;
        elem_t x = 0;
        if (tok < n_tokens) x = src[h * stride_h + tok * stride_t + d];
        s[r][threadIdx.x] = x;                          // s[token][dim]
    }
    __syncthreads();
    for (int dim = threadIdx.y; dim < 32; dim += blockDim.y)
        dst[t.v + dim * 32 + threadIdx.x] = s[threadIdx.x][dim];   // [dim][token]
}

extern "C" __global__ void pack_k(const elem_t* __restrict__ src, elem_t* __restrict__ dst,
                                  KV_PARAMS) {
    pack_k_tile(src, dst, KV_ARGS);
}

extern "C" __global__ void pack_v(const elem_t* __restrict__ src, elem_t* __restrict__ dst,
                                  KV_PARAMS) {
    __shared__ elem_t s[32][33];
    pack_v_tile(src, dst, s, KV_ARGS);
}

// Both in one launch (gridDim.z = 2: z = 0 runs the K kernel's CTAs, z = 1 the V
// kernel's): half the launch overhead for the per-layer hand-off. Same bytes.
extern "C" __global__ void pack_kv(const elem_t* __restrict__ k_src,
                                   const elem_t* __restrict__ v_src,
                                   elem_t* __restrict__ dst, KV_PARAMS) {
    __shared__ elem_t s[32][33];
    if (blockIdx.z == 0) pack_k_tile(k_src, dst, KV_ARGS);
    else pack_v_tile(v_src, dst, s, KV_ARGS);
}

extern "C" __global__ void unpack_k(const elem_t* __restrict__ src, elem_t* __restrict__ dst,
        long long stride_h, long long stride_t, int n_tokens, int head_dim,
        int n_lanes, int L, int n_blocks) {
    const int b = blockIdx.x, j = blockIdx.y;   // blocks on x: no 65535 limit
    const Tile t = tile_of(j, b, n_lanes, L, n_blocks);
    const int h = t.e / head_dim, d = t.e - h * head_dim;
    for (int r = threadIdx.y; r < 32; r += blockDim.y) {
        const int tok = b * 32 + r;
        if (tok < n_tokens) dst[h * stride_h + tok * stride_t + d] = src[t.k + r * 32 + threadIdx.x];
    }
}

extern "C" __global__ void unpack_v(const elem_t* __restrict__ src, elem_t* __restrict__ dst,
        long long stride_h, long long stride_t, int n_tokens, int head_dim,
        int n_lanes, int L, int n_blocks) {
    __shared__ elem_t s[32][33];
    const int b = blockIdx.x, j = blockIdx.y;   // blocks on x: no 65535 limit
    const Tile t = tile_of(j, b, n_lanes, L, n_blocks);
    const int h = t.e / head_dim, d = t.e - h * head_dim;
    for (int dim = threadIdx.y; dim < 32; dim += blockDim.y)
        s[dim][threadIdx.x] = src[t.v + dim * 32 + threadIdx.x];   // s[dim][token]
    __syncthreads();
    for (int r = threadIdx.y; r < 32; r += blockDim.y) {
        const int tok = b * 32 + r;
        if (tok < n_tokens) dst[h * stride_h + tok * stride_t + d] = s[threadIdx.x][r];
    }
}
"""

_ELEM_T = {"float16": "unsigned short", "float32": "unsigned int"}
_TORCH = {"float16": torch.float16, "float32": torch.float32}
_BLOCK = (32, 8, 1)


KERNELS = ("pack_k", "pack_v", "unpack_k", "unpack_v", "pack_kv")


def cuda_source(dtype: str) -> str:
    """The kernels' CUDA C++ source for a layout dtype (tests also compile it on the CPU)."""
    return f"typedef {_ELEM_T[dtype]} elem_t;\n" + _SRC


def kernel_geometry(layout: HbmLayout, n_tokens: int, engine_strides: tuple[int, int]):
    """(grid, block, scalar args) of one launch: one CTA per (token block, lane) tile.
    engine_strides: (head, token) strides of the engine-side tensor, in elements."""
    nb = layout.n_blocks(n_tokens)
    scalars = (np.int64(engine_strides[0]), np.int64(engine_strides[1]), np.int32(n_tokens),
               np.int32(layout.head_dim), np.int32(layout.n_lanes),
               np.int32(layout.lanes_per_channel), np.int32(nb))
    return (nb, layout.n_lanes, 1), _BLOCK, scalars   # x: token blocks, y: lanes


@functools.cache
def _kernels(dtype: str) -> dict:
    import cupy as cp

    code = cuda_source(dtype)
    return {name: cp.RawKernel(code, name) for name in KERNELS}


def _stream(device: torch.device, stream: torch.cuda.Stream | None) -> torch.cuda.Stream:
    return stream if stream is not None else torch.cuda.current_stream(device)


def _launch(calls: list[tuple[str, tuple[torch.Tensor, ...], int]], layout: HbmLayout,
            n_tokens: int, engine_strides: tuple[int, int], stream: torch.cuda.Stream) -> None:
    """Launch each (kernel name, pointer operands, grid z) on `stream`, in order."""
    import cupy as cp

    kern = _kernels(layout.dtype)
    (gx, gy, _), block, scalars = kernel_geometry(layout, n_tokens, engine_strides)
    device = calls[0][1][0].device
    with cp.cuda.Device(device.index), cp.cuda.ExternalStream(stream.cuda_stream):
        for name, tensors, gz in calls:
            ptrs = tuple(np.uint64(t.data_ptr()) for t in tensors)
            kern[name]((gx, gy, gz), block, (*ptrs, *scalars))


def _keep_alive(stream: torch.cuda.Stream, *tensors: torch.Tensor) -> None:
    if stream != torch.cuda.current_stream(tensors[0].device):
        for t in tensors:
            t.record_stream(stream)


def _engine_operand(x: torch.Tensor, layout: HbmLayout) -> torch.Tensor:
    x = x.to(_TORCH[layout.dtype])
    return x if x.stride(2) == 1 else x.contiguous()


def pack_layer(k: torch.Tensor, v: torch.Tensor, layout: HbmLayout, *, out: torch.Tensor,
               stream: torch.cuda.Stream | None = None, fused: bool = True) -> torch.Tensor:
    """CUDA pack; `out` is a contiguous uint8 tensor of layout.layer_bytes(T) on k's device.
    Shapes are checked by kernels.reshape.pack_layer. Returns `out` (ready on `stream`).
    fused: one launch of pack_kv instead of pack_k then pack_v (same bytes)."""
    if out.device != k.device or out.data_ptr() % layout.elem_bytes:
        raise InvalidArgument("out must be on k's device and aligned to the element size")
    stream = _stream(k.device, stream)
    n_tokens = k.shape[1]
    with torch.cuda.stream(stream):
        kk, vv = _engine_operand(k, layout), _engine_operand(v, layout)
        if kk.stride() != vv.stride():
            kk, vv = kk.contiguous(), vv.contiguous()
    _keep_alive(stream, k, v, kk, vv, out)
    calls = [("pack_kv", (kk, vv, out), 2)] if fused else \
        [("pack_k", (kk, out), 1), ("pack_v", (vv, out), 1)]
    _launch(calls, layout, n_tokens, (kk.stride(0), kk.stride(1)), stream)
    return out


def unpack_layer(data: torch.Tensor, layout: HbmLayout, n_tokens: int, *,
                 stream: torch.cuda.Stream | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA unpack of a contiguous uint8 packed layer -> (k, v) [H, T, hd], layout dtype."""
    if data.data_ptr() % layout.elem_bytes:
        raise InvalidArgument("packed layer must be aligned to the element size")
    stream = _stream(data.device, stream)
    shape = (layout.n_kv_heads, n_tokens, layout.head_dim)
    with torch.cuda.stream(stream):
        k = torch.empty(shape, dtype=_TORCH[layout.dtype], device=data.device)
        v = torch.empty_like(k)
    _keep_alive(stream, data)
    calls = [("unpack_k", (data, k), 1), ("unpack_v", (data, v), 1)]
    _launch(calls, layout, n_tokens, (k.stride(0), k.stride(1)), stream)
    return k, v
