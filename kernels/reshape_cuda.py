"""CuPy RawKernels of the KV reshape (docs/hbm-layout.md): one for K, one for V, and
their inverses. Called through kernels/reshape.py when the tensors are on CUDA.

- Live tokens only: the grid covers n_blocks(T) blocks, not the model's max length.
- Zero-copy: kernels get raw device pointers of the torch tensors (`data_ptr()`).
  We do not go through `__cuda_array_interface__`/DLPack because CuPy may then
  synchronise with the producer's stream, which would serialise the copy stream with
  the compute stream and defeat the latency hiding.
- Streams: every launch goes on the given torch stream (default: torch's current one)
  through a cached CuPy handle of its raw pointer; dtype conversion and
  `.contiguous()` (if needed) run on the same stream. Tensors used on a stream other
  than the current one are `record_stream`ed so the caching allocator does not reuse
  them early.
- Launches: `pack_k` and `pack_v` are the two kernels of the source document;
  `pack_kv` runs both in one launch (grid z = 2), because at one layer of a 512-token
  prompt (2 MiB) launch overhead is a large part of the time; so does `pack_kv_vec`.
- Default kernel, `pack_kv_vec`: 16-byte vector loads and stores (8 fp16 / 4 fp32
  elements), each thread moving ROWS_PER_THREAD = 4 tile rows with all its loads issued
  before its stores; so a 32x32 tile takes 32 (fp16) or 64 (fp32) threads and a
  256-thread CTA packs 8 or 4 tiles; K and V CTAs in one launch (grid z). K is a pure
  gather (per load instruction a warp reads 8 token rows x 64 B and later writes 512
  contiguous bytes of a tile). V goes through shared memory: the tile is stored with its
  16-byte vectors XOR-swizzled by token group, so the transposed read (8 tokens of one
  dim per thread) hits 16 distinct banks per warp, then written as 512 contiguous bytes
  per warp. Used when the pointers are 16-byte aligned and the strides and head_dim are
  multiples of a vector (every engine cache qualifies). On an H200, one gpt2-medium
  layer at 512 tokens: 2.4 us of kernel time against 3.5 us for one element per thread
  and 1.4 us for cudaMemcpy of the same bytes (bench/bench_reshape.py).
- Fallback (`pack_k`, `pack_v`, `pack_kv`, the source document's two kernels): one CTA
  (32x8 threads) per tile moving one 2- or 4-byte element per thread and row, V staged
  in shared memory with a 33-element row pitch. Also the unpack kernels (tests, emulator
  side only, not on the hot path).
- Launch path (kernels/cuda_launch.py): the compiled kernels, the launch geometry and a
  CuPy stream handle per torch stream are cached, and the launch passes the stream
  explicitly, so a call does no context switching or object creation on CuPy's side
  (measured: the per-call cost of a 2 MiB layer from Python was 66 us with a fresh
  ExternalStream and device context per call).
- Pad lanes (kv_dim not a multiple of 32, docs/hbm-layout.md): every kernel takes
  `kv_dim`; the pack kernels write the last lane's elements past it as zero (no load),
  the unpack kernels skip them. pack_kv_vec needs no more: head_dim % EV == 0 makes
  kv_dim a whole number of 16-byte vectors, so a vector is all data or all pad.
- Conversion to the layout dtype happens before the kernel with `Tensor.to` (round to
  nearest even, as the CPU path and NumPy), so the kernels only move 2- or 4-byte words
  and agree with the reference bit for bit.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from engine.errors import InvalidArgument
from kernels.cuda_launch import compiled, cupy_stream, current_stream_ptr, stream_ptr
from kernels.hbm_layout import HbmLayout

_SRC = r"""
// elem_t is typedef'd in front of this source: unsigned short (fp16) or unsigned int (fp32).
// Geometry: lane j (32 elements of the kv row) lives on channel c = j / L, as local lane
// i = j - c*L; channels before c are full (L lanes), so channel c's chunk starts at
// element 2*n_blocks*1024*c*L; its K part holds n_blocks*lanes_c tiles, then the V part.
struct Tile { long long k; long long v; int e; };

__device__ __forceinline__ Tile tile_of(int j, int b, int n_lanes, int L, int n_blocks,
                                        int x = threadIdx.x) {
    const int c = j / L;
    const int i = j - c * L;
    const int lanes_c = min(L, n_lanes - c * L);
    const long long chunk = 2LL * n_blocks * 1024LL * (long long)(c * L);
    Tile t;
    t.k = chunk + ((long long)b * lanes_c + i) * 1024LL;
    t.v = t.k + (long long)n_blocks * lanes_c * 1024LL;
    t.e = j * 32 + x;                    // this thread's element of the kv row
    return t;
}

// kv_dim = n_kv_heads * head_dim; n_lanes = ceil(kv_dim / 32): elements kv_dim .. 32*n_lanes-1
// of the last lane are pad (written as zero, never read from the engine tensor).
#define KV_PARAMS long long stride_h, long long stride_t, int n_tokens, int head_dim, \
                  int n_lanes, int L, int n_blocks, int kv_dim
#define KV_ARGS stride_h, stride_t, n_tokens, head_dim, n_lanes, L, n_blocks, kv_dim

// K: one warp per tile row; reads 32 consecutive elements of a token's kv row, writes one
// contiguous 32-element row of the [token][dim] tile. Padding tokens are written as zero.
// This thread's element of row r (token b*32 + r) of its tile; zero past the live tokens
// and in pad lanes.
__device__ __forceinline__ elem_t tile_elem(const elem_t* __restrict__ src, const Tile& t,
                                            int b, int r, KV_PARAMS) {
    const int tok = b * 32 + r, h = t.e / head_dim, d = t.e - h * head_dim;
    return tok < n_tokens && t.e < kv_dim ? src[h * stride_h + tok * stride_t + d] : (elem_t)0;
}

__device__ __forceinline__ void pack_k_tile(const elem_t* __restrict__ src,
                                            elem_t* __restrict__ dst, KV_PARAMS) {
    const int b = blockIdx.x, j = blockIdx.y;   // blocks on x: no 65535 limit
    const Tile t = tile_of(j, b, n_lanes, L, n_blocks);
    for (int r = threadIdx.y; r < 32; r += blockDim.y)
        dst[t.k + r * 32 + threadIdx.x] = tile_elem(src, t, b, r, KV_ARGS);   // [token][dim]
}

// V: the same coalesced read into shared memory, then a coalesced write of the
// transposed [dim][token] tile. Must be the last thing its kernel does (see the tests'
// CPU shim, where __syncthreads() returns from this function in the first phase).
__device__ __forceinline__ void pack_v_tile(const elem_t* __restrict__ src,
                                            elem_t* __restrict__ dst, elem_t (*s)[33],
                                            KV_PARAMS) {
    const int b = blockIdx.x, j = blockIdx.y;   // blocks on x: no 65535 limit
    const Tile t = tile_of(j, b, n_lanes, L, n_blocks);
    for (int r = threadIdx.y; r < 32; r += blockDim.y)
        s[r][threadIdx.x] = tile_elem(src, t, b, r, KV_ARGS);              // s[token][dim]
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
        int n_lanes, int L, int n_blocks, int kv_dim) {
    const int b = blockIdx.x, j = blockIdx.y;   // blocks on x: no 65535 limit
    const Tile t = tile_of(j, b, n_lanes, L, n_blocks);
    const int h = t.e / head_dim, d = t.e - h * head_dim;
    if (t.e >= kv_dim) return;                  // pad lane element: not in the engine tensor
    for (int r = threadIdx.y; r < 32; r += blockDim.y) {
        const int tok = b * 32 + r;
        if (tok < n_tokens) dst[h * stride_h + tok * stride_t + d] = src[t.k + r * 32 + threadIdx.x];
    }
}

extern "C" __global__ void unpack_v(const elem_t* __restrict__ src, elem_t* __restrict__ dst,
        long long stride_h, long long stride_t, int n_tokens, int head_dim,
        int n_lanes, int L, int n_blocks, int kv_dim) {
    __shared__ elem_t s[32][33];
    const int b = blockIdx.x, j = blockIdx.y;   // blocks on x: no 65535 limit
    const Tile t = tile_of(j, b, n_lanes, L, n_blocks);
    const int h = t.e / head_dim, d = t.e - h * head_dim;
    for (int dim = threadIdx.y; dim < 32; dim += blockDim.y)
        s[dim][threadIdx.x] = src[t.v + dim * 32 + threadIdx.x];   // s[dim][token]
    __syncthreads();
    for (int r = threadIdx.y; r < 32; r += blockDim.y) {
        const int tok = b * 32 + r;
        if (tok < n_tokens && t.e < kv_dim)     // not a pad lane element
            dst[h * stride_h + tok * stride_t + d] = s[threadIdx.x][r];
    }
}

// ---- 16-byte vector kernel (the default) ----------------------------------------------
// EV elements per 16-byte vector, VPR vectors per 32-element tile row. Each thread moves
// RPT rows (RPT vectors, all loads issued before any store: bytes in flight per thread),
// so a tile takes TV threads and a 256-thread CTA packs TPC tiles. Tiles are numbered
// g = b * n_lanes + j (lanes fastest): the tiles of one CTA read neighbouring parts of
// the same token rows. RPT is set by the launcher (-DRPT), 1 when compiled without it.
#ifndef RPT
#define RPT 1
#endif
#define EV (16 / (int)sizeof(elem_t))
#define VPR (32 / EV)
#define RSTEP (32 / RPT)
#define TV (RSTEP * VPR)
#define TPC (256 / TV)
union Vec { uint4 u; elem_t e[EV]; };

__device__ __forceinline__ uint4 load_vec(const elem_t* __restrict__ src, int tok, int e,
                                          KV_PARAMS) {
    // padding rows and pad lane elements are zero; kv_dim % EV == 0 (head_dim % EV == 0),
    // so a vector is all data or all pad
    if (tok >= n_tokens || e >= kv_dim) return make_uint4(0u, 0u, 0u, 0u);
    const int h = e / head_dim, d = e - h * head_dim;   // head_dim % EV == 0: one head
    return *reinterpret_cast<const uint4*>(src + h * stride_h + (long long)tok * stride_t + d);
}

// grid (ceil(n_blocks * n_lanes / TPC), 1, 2), block 256: z = 0 packs K, z = 1 packs V.
extern "C" __global__ void pack_kv_vec(const elem_t* __restrict__ k_src,
                                       const elem_t* __restrict__ v_src,
                                       elem_t* __restrict__ dst, KV_PARAMS) {
    __shared__ __align__(16) elem_t s[TPC][32][32];
    const int slot = threadIdx.x / TV, w = threadIdx.x - slot * TV;
    const int g = blockIdx.x * TPC + slot;
    const bool valid = g < n_blocks * n_lanes;       // the last CTA may have spare slots
    const int b = valid ? g / n_lanes : 0, j = valid ? g - b * n_lanes : 0;
    const int r0 = w / VPR, q = w - r0 * VPR;        // first tile row (token), vector
    const Tile t = tile_of(j, b, n_lanes, L, n_blocks, 0);
    const elem_t* src = blockIdx.z == 0 ? k_src : v_src;
    uint4 x[RPT];
    for (int i = 0; i < RPT; ++i)                    // rows r0, r0 + RSTEP, ...
        x[i] = valid ? load_vec(src, b * 32 + r0 + i * RSTEP, j * 32 + q * EV, KV_ARGS)
                     : make_uint4(0u, 0u, 0u, 0u);
    if (blockIdx.z == 0) {                           // K: [token][dim], a straight gather
        if (valid)
            for (int i = 0; i < RPT; ++i)
                *reinterpret_cast<uint4*>(dst + t.k + (r0 + i * RSTEP) * 32 + q * EV) = x[i];
        return;                                      // uniform per CTA: no barrier below
    }
    // V: s[token][vector q ^ token group]: the swizzle spreads the column reads below.
    for (int i = 0; i < RPT; ++i) {
        const int r = r0 + i * RSTEP;
        *reinterpret_cast<uint4*>(&s[slot][r][(q ^ (r / EV)) * EV]) = x[i];
    }
    __syncthreads();
    // Now output rows dim = r0 + i*RSTEP ([dim][token]), tokens q*EV .. q*EV + EV-1.
    for (int i = 0; i < RPT; ++i) {
        const int dim = r0 + i * RSTEP, col = ((dim / EV) ^ q) * EV + (dim - (dim / EV) * EV);
        Vec o;
        for (int k = 0; k < EV; ++k) o.e[k] = s[slot][q * EV + k][col];
        if (valid) *reinterpret_cast<uint4*>(dst + t.v + dim * 32 + q * EV) = o.u;
    }
}
"""

_ELEM_T = {"float16": "unsigned short", "float32": "unsigned int"}
_TORCH = {"float16": torch.float16, "float32": torch.float32}
_BLOCK = (32, 8, 1)
_VEC_THREADS = 256
VEC_BYTES = 16
ROWS_PER_THREAD = 4      # pack_kv_vec's RPT: measured best of 1, 2, 4, 8 on an H200

KERNELS = ("pack_k", "pack_v", "unpack_k", "unpack_v", "pack_kv", "pack_kv_vec")


def cuda_source(dtype: str) -> str:
    """The kernels' CUDA C++ source for a layout dtype (tests also compile it on the CPU)."""
    return f"typedef {_ELEM_T[dtype]} elem_t;\n" + _SRC


def _scalars(layout: HbmLayout, n_tokens: int, engine_strides: tuple[int, int]) -> tuple:
    return (np.int64(engine_strides[0]), np.int64(engine_strides[1]), np.int32(n_tokens),
            np.int32(layout.head_dim), np.int32(layout.n_lanes),
            np.int32(layout.lanes_per_channel), np.int32(layout.n_blocks(n_tokens)),
            np.int32(layout.kv_dim))


# Geometries are cached: a prefill ships every layer with the same (layout, T, strides),
# and building NumPy scalars costs microseconds per call on the launch path.
@functools.lru_cache(maxsize=1024)
def kernel_geometry(layout: HbmLayout, n_tokens: int, engine_strides: tuple[int, int]):
    """(grid, block, scalar args) of one launch of the element kernels: one CTA per
    (token block, lane) tile. engine_strides: (head, token) strides of the engine-side
    tensor, in elements."""
    grid = (layout.n_blocks(n_tokens), layout.n_lanes, 1)    # x: token blocks, y: lanes
    return grid, _BLOCK, _scalars(layout, n_tokens, engine_strides)


@functools.lru_cache(maxsize=1024)
def vec_geometry(layout: HbmLayout, n_tokens: int, engine_strides: tuple[int, int],
                 rows_per_thread: int = ROWS_PER_THREAD):
    """(grid, block, scalar args) of one pack_kv_vec launch compiled with
    -DRPT=rows_per_thread: 256 threads per CTA, a tile per 32*32*E/(16*RPT) threads,
    grid z = 2 (K CTAs, then V CTAs)."""
    per_cta = _VEC_THREADS * VEC_BYTES * rows_per_thread // (32 * 32 * layout.elem_bytes)
    tiles = layout.n_blocks(n_tokens) * layout.n_lanes
    grid = (-(-tiles // per_cta), 1, 2)
    return grid, (_VEC_THREADS, 1, 1), _scalars(layout, n_tokens, engine_strides)


def vec_ok(layout: HbmLayout, strides: tuple[int, int], *tensors: torch.Tensor) -> bool:
    """Whether pack_kv_vec may run: 16-byte aligned pointers, and strides and head_dim in
    whole vectors (so no vector straddles a head or a misaligned address)."""
    ev = VEC_BYTES // layout.elem_bytes
    return (all(t.data_ptr() % VEC_BYTES == 0 for t in tensors)
            and strides[0] % ev == 0 and strides[1] % ev == 0 and layout.head_dim % ev == 0)


@functools.cache
def _function(dtype: str, device: int, name: str):
    """One kernel of the source for `dtype`, compiled (with pack_kv_vec's RPT) once."""
    return compiled(cuda_source(dtype), (f"-DRPT={ROWS_PER_THREAD}",), device).get_function(name)


def _launch(calls: list[tuple[str, tuple[torch.Tensor, ...]]], dtype: str, geometry,
            sp: int, device: int) -> None:
    """Launch each (kernel name, pointer operands) with `geometry` = (grid, block, scalars)
    on the stream whose raw pointer is `sp`, in order. The stream is passed to the
    launch, so CuPy switches no context; pointers go as Python ints (64-bit to CuPy)."""
    grid, block, scalars = geometry
    cp_stream = cupy_stream(sp, device)
    for name, tensors in calls:
        ptrs = tuple(t.data_ptr() for t in tensors)
        _function(dtype, device, name)(grid, block, (*ptrs, *scalars), stream=cp_stream)


def _keep_alive(stream: torch.cuda.Stream | None, device: int, *tensors: torch.Tensor) -> None:
    """Tensors used on a stream other than the current one: tell the caching allocator."""
    if stream is not None and stream.cuda_stream != current_stream_ptr(device):
        for t in tensors:
            t.record_stream(stream)


def _operands(k: torch.Tensor, v: torch.Tensor, layout: HbmLayout,
              stream: torch.cuda.Stream | None) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v in the layout dtype with unit dim stride and equal strides. Conversions run on
    `stream`; the usual case (an fp16 engine cache) needs none and costs no stream switch."""
    dt = _TORCH[layout.dtype]
    if k.dtype == dt and v.dtype == dt and k.stride(2) == 1 and k.stride() == v.stride():
        return k, v
    with torch.cuda.stream(stream):      # None: the current stream
        kk, vv = k.to(dt), v.to(dt)
        if kk.stride(2) != 1 or kk.stride() != vv.stride():
            kk, vv = kk.contiguous(), vv.contiguous()
    return kk, vv


def pack_layer(k: torch.Tensor, v: torch.Tensor, layout: HbmLayout, *, out: torch.Tensor,
               stream: torch.cuda.Stream | None = None, kernel: str = "auto") -> torch.Tensor:
    """CUDA pack; `out` is a contiguous uint8 tensor of layout.layer_bytes(T) on k's device.
    Shapes are checked by kernels.reshape.pack_layer. Returns `out` (ready on `stream`,
    default: the current stream).
    kernel: "auto" (pack_kv_vec when vec_ok, else pack_kv), or one of "vec", "fused"
    (pack_kv), "separate" (pack_k then pack_v) to measure or test a specific kernel."""
    if out.device != k.device or out.data_ptr() % layout.elem_bytes:
        raise InvalidArgument("out must be on k's device and aligned to the element size")
    device = k.device.index
    kk, vv = _operands(k, v, layout, stream)
    _keep_alive(stream, device, k, v, kk, vv, out)
    sp = stream_ptr(stream, device)
    strides = (kk.stride(0), kk.stride(1))
    n_tokens = k.shape[1]
    if kernel in ("auto", "vec"):
        if vec_ok(layout, strides, kk, vv, out):
            _launch([("pack_kv_vec", (kk, vv, out))], layout.dtype,
                    vec_geometry(layout, n_tokens, strides), sp, device)
            return out
        if kernel == "vec":
            raise InvalidArgument("pack_kv_vec needs 16-byte aligned operands and strides")
        kernel = "fused"
    (gx, gy, _), block, scalars = kernel_geometry(layout, n_tokens, strides)
    if kernel == "fused":
        calls = [("pack_kv", (kk, vv, out))]
        geometry = ((gx, gy, 2), block, scalars)
    elif kernel == "separate":
        calls = [("pack_k", (kk, out)), ("pack_v", (vv, out))]
        geometry = ((gx, gy, 1), block, scalars)
    else:
        raise InvalidArgument(f"unknown kernel {kernel!r}")
    _launch(calls, layout.dtype, geometry, sp, device)
    return out


def unpack_layer(data: torch.Tensor, layout: HbmLayout, n_tokens: int, *,
                 stream: torch.cuda.Stream | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA unpack of a contiguous uint8 packed layer -> (k, v) [H, T, hd], layout dtype."""
    if data.data_ptr() % layout.elem_bytes:
        raise InvalidArgument("packed layer must be aligned to the element size")
    device = data.device.index
    shape = (layout.n_kv_heads, n_tokens, layout.head_dim)
    with torch.cuda.stream(stream):
        k = torch.empty(shape, dtype=_TORCH[layout.dtype], device=data.device)
        v = torch.empty_like(k)
    _keep_alive(stream, device, data)
    _launch([("unpack_k", (data, k)), ("unpack_v", (data, v))], layout.dtype,
            kernel_geometry(layout, n_tokens, (k.stride(0), k.stride(1))),
            stream_ptr(stream, device), device)
    return k, v
