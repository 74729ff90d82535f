"""Paged decode attention as CuPy RawKernels ("flash decoding" over block tables).

Contract (that of engine.paged_kv.paged_attention_ref): one query token per row,
  q       [B, H, D]       fp16 / bf16 / fp32; rows may be strided (q a view into a
                          [B, 3*d] qkv buffer): q.stride(2) == 1, q.stride(1) == D
  k_pool  [n_slots, Hkv, D] contiguous, q's dtype (v_pool alike); token position p of
                          row b lives in slot tables[b, p // bs] * bs + p % bs
  tables  [B, W] int32    block tables (contiguous rows)
  ctx_lens [B] int32      row b attends to positions [0, ctx_lens[b])
  -> out  [B, H * D]      in q's dtype; softmax(q . K^T / sqrt(D)) V per head, query head
                          h reading KV head h // (H / Hkv) (GQA)

Two launches per call, both reading ctx_lens and tables from device memory, so the
launch shape depends only on (B, W) and a CUDA graph replays them for any contexts:

  paged_attn_partial  grid (H, n_splits, B), THREADS threads. CTA (h, s, b) reduces the
        chunk [s*chunk, min((s+1)*chunk, ctx_len)) of row b for query head h to a partial
        ws[b, h, s] = (o[D], m, z): m the chunk's max score (in log2 units: scores are
        scaled by log2(e)/sqrt(D) so exp2 serves), z = sum 2^(score - m), o = sum
        2^(score - m) v. A chunk past ctx_len writes an empty partial (o = 0, m = -inf,
        z = 0). Query heads are the fastest grid dimension, so the G heads sharing a KV
        head (GQA) run side by side and their re-reads of its K/V can hit L2.
  paged_attn_merge    grid (H, B), D threads: out[b, h] = sum_s 2^(m_s - M) o_s /
        sum_s 2^(m_s - M) z_s over the ceil(ctx_len / chunk) splits that row has.

Inside a partial CTA, a group of NV = D / VEC threads owns one position (each thread one
16-byte vector of its K and V rows); the THREADS / NV groups take consecutive positions,
and each thread loads PPT positions' K and V vectors at once (a "tile" of PPT * PP
positions), so a tile costs one memory round trip. Each group keeps its own online
softmax state across tiles (no barrier inside the loop); the groups are merged once at
the end through shared memory. fp32 accumulation throughout. A row with ctx_len <= 0
gets zeros (the reference would give NaN).

The workspace and the output buffer belong to the PagedAttention object and are reused
by every call (every layer): the returned tensor is overwritten by the next call, and
two graphs replayed concurrently on different streams need one object each (`fork`).
HYBRID_PAGED_KERNEL=0 turns the kernel off (paged_attention_for returns None).
"""

from __future__ import annotations

import copy
import functools
import math
import os
import warnings

import numpy as np
import torch

from engine.paged_kv import BLOCK_SIZE, PagedBatch, paged_attention_ref
from kernels.cuda_launch import compiled, cupy_stream, current_stream_ptr

_SRC = r"""
// Prepended by cuda_source(): ELEM_F32 / ELEM_BF16 (neither: fp16), HEAD_DIM,
// BLOCK_SIZE, VEC (elements per 16 bytes), NV (= HEAD_DIM / VEC), PP (= THREADS / NV
// positions per pass), PPT (positions per thread per tile), THREADS.
#ifdef ELEM_F32
typedef float act_t;
__device__ __forceinline__ float ld(act_t x) { return x; }
__device__ __forceinline__ act_t st(float f) { return f; }
#else
typedef unsigned short act_t;
#ifndef PAGED_ATTN_HOST_HELPERS   // the g++ test shim brings its own conversions
__device__ __forceinline__ float ld(act_t h) {
#ifdef ELEM_BF16
    return __uint_as_float(((unsigned)h) << 16);
#else
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
#endif
}
__device__ __forceinline__ act_t st(float f) {
    unsigned short h;
#ifdef ELEM_BF16
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
    return h;
}
#endif
#endif

// The VEC values of one 16-byte vector, as floats.
__device__ __forceinline__ void unpack(const uint4 u, float* f) {
#ifdef ELEM_F32
    f[0] = __uint_as_float(u.x); f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z); f[3] = __uint_as_float(u.w);
#else
    f[0] = ld(u.x & 0xffffu); f[1] = ld(u.x >> 16); f[2] = ld(u.y & 0xffffu); f[3] = ld(u.y >> 16);
    f[4] = ld(u.z & 0xffffu); f[5] = ld(u.z >> 16); f[6] = ld(u.w & 0xffffu); f[7] = ld(u.w >> 16);
#endif
}

// blk[i] = the table entry of position t + i*PP (0 past t_end: never dereferenced).
__device__ __forceinline__ void table_entries(const int* __restrict__ table, int t, int t_end,
                                              int* blk) {
#pragma unroll
    for (int i = 0; i < PPT; ++i) {
        const int p = t + i * PP;
        blk[i] = p < t_end ? table[p / BLOCK_SIZE] : 0;
    }
}

// One (query head h, chunk s, row b) per CTA; see the module docstring. Thread
// (r = tid / NV, c = tid % NV) owns dims [c*VEC, (c+1)*VEC) of positions
// t0 + i*PP + r, i < PPT, of each tile t0. ws: [B, H, gridDim.y, HEAD_DIM + 2] floats.
extern "C" __global__ void __launch_bounds__(THREADS) paged_attn_partial(
        const act_t* __restrict__ q, long long q_stride, const act_t* __restrict__ k_pool,
        const act_t* __restrict__ v_pool, const int* __restrict__ tables,
        const int* __restrict__ ctx_lens, float* __restrict__ ws, int H, int Hkv, int W,
        int chunk, float scale_log2) {
    __shared__ float part[PP * HEAD_DIM];            // each group's rescaled o
    __shared__ float grp_m[PP], grp_z[PP];
    const int h = blockIdx.x, s = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, r = tid / NV, c = tid - r * NV;
    const float ninf = __int_as_float(0xff800000);   // -inf (NVRTC has no math.h)
    float* o = ws + (((long long)b * H + h) * gridDim.y + s) * (HEAD_DIM + 2);
    const int t_begin = s * chunk;
    const int t_end = min(min(t_begin + chunk, ctx_lens[b]), W * BLOCK_SIZE);
    if (t_begin >= t_end) {                           // uniform per CTA: an empty chunk
        for (int d = tid; d < HEAD_DIM; d += THREADS) o[d] = 0.f;
        if (tid == 0) { o[HEAD_DIM] = ninf; o[HEAD_DIM + 1] = 0.f; }
        return;
    }
    const int kvh = h / (H / Hkv);
    float qf[VEC];
    unpack(reinterpret_cast<const uint4*>(q + b * q_stride + h * HEAD_DIM)[c], qf);
#pragma unroll
    for (int j = 0; j < VEC; ++j) qf[j] *= scale_log2;
    const int* table = tables + (long long)b * W;
    const act_t* kb = k_pool + (long long)kvh * HEAD_DIM + c * VEC;
    const act_t* vb = v_pool + (long long)kvh * HEAD_DIM + c * VEC;
    float m = ninf, z = 0.f, acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = 0.f;
    int blk[PPT];                                     // table entries of this tile's positions
    table_entries(table, t_begin + r, t_end, blk);
    for (int t0 = t_begin; t0 < t_end; t0 += PPT * PP) {
        // all PPT positions' K and V first: one memory round trip per tile
        uint4 kv[PPT], vv[PPT];
#pragma unroll
        for (int i = 0; i < PPT; ++i) {
            const int t = t0 + i * PP + r;
            kv[i] = make_uint4(0u, 0u, 0u, 0u);       // dead positions: zeros, never NaN
            vv[i] = kv[i];
            if (t < t_end) {
                const long long slot = (long long)blk[i] * BLOCK_SIZE + t % BLOCK_SIZE;
                kv[i] = *reinterpret_cast<const uint4*>(kb + slot * Hkv * HEAD_DIM);
                vv[i] = *reinterpret_cast<const uint4*>(vb + slot * Hkv * HEAD_DIM);
            }
        }
        // the next tile's table entries travel with this tile's K/V, so its K/V loads
        // need not wait for a table read first
        table_entries(table, t0 + PPT * PP + r, t_end, blk);
        float sc[PPT];
#pragma unroll
        for (int i = 0; i < PPT; ++i) {
            float kf[VEC];
            unpack(kv[i], kf);
            float dot = 0.f;
#pragma unroll
            for (int j = 0; j < VEC; ++j) dot += qf[j] * kf[j];
            sc[i] = dot;
        }
        // the NV lanes of a group hold partial dots of one position: after the xor
        // butterfly every lane has the whole score (NV divides 32: inside one warp)
#pragma unroll
        for (int off = NV / 2; off > 0; off >>= 1) {
#pragma unroll
            for (int i = 0; i < PPT; ++i) sc[i] += __shfl_xor_sync(0xffffffffu, sc[i], off);
        }
        float mt = m;
#pragma unroll
        for (int i = 0; i < PPT; ++i)
            if (t0 + i * PP + r < t_end) mt = fmaxf(mt, sc[i]);
        const float alpha = m == mt ? 1.f : exp2f(m - mt);   // m = mt = -inf: no NaN
        z *= alpha;
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] *= alpha;
#pragma unroll
        for (int i = 0; i < PPT; ++i) {
            const float e = t0 + i * PP + r < t_end ? exp2f(sc[i] - mt) : 0.f;
            float vf[VEC];
            unpack(vv[i], vf);
            z += e;
#pragma unroll
            for (int j = 0; j < VEC; ++j) acc[j] += e * vf[j];
        }
        m = mt;
    }
    // merge the PP groups: rescale each to the CTA's max, sum through shared memory
    if (c == 0) { grp_m[r] = m; grp_z[r] = z; }
    __syncthreads();
    float mx = ninf;
    for (int g = 0; g < PP; ++g) mx = fmaxf(mx, grp_m[g]);
    const float f = m == ninf ? 0.f : exp2f(m - mx);  // a group with no live position
#pragma unroll
    for (int j = 0; j < VEC; ++j) part[r * HEAD_DIM + c * VEC + j] = acc[j] * f;
    __syncthreads();
    for (int d = tid; d < HEAD_DIM; d += THREADS) {
        float sum = 0.f;
        for (int g = 0; g < PP; ++g) sum += part[g * HEAD_DIM + d];
        o[d] = sum;
    }
    if (tid == 0) {
        float zs = 0.f;
        for (int g = 0; g < PP; ++g)
            if (grp_m[g] != ninf) zs += grp_z[g] * exp2f(grp_m[g] - mx);
        o[HEAD_DIM] = mx;
        o[HEAD_DIM + 1] = zs;
    }
}

// out[b * out_stride + h * HEAD_DIM + d] from the n = ceil(ctx_len / chunk) partials of
// (b, h); every one of them is non-empty, so each m_s is finite. HEAD_DIM threads, one
// per d; the (m, z) reads are the same address for all threads (broadcast).
extern "C" __global__ void __launch_bounds__(HEAD_DIM) paged_attn_merge(
        const float* __restrict__ ws, const int* __restrict__ ctx_lens,
        act_t* __restrict__ out, long long out_stride, int H, int W, int n_splits, int chunk) {
    const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
    const int ctx = min(ctx_lens[b], W * BLOCK_SIZE);
    const int n = ctx > 0 ? (ctx + chunk - 1) / chunk : 0;
    const float* w = ws + ((long long)b * H + h) * n_splits * (HEAD_DIM + 2);
    float mx = __int_as_float(0xff800000);
    for (int s = 0; s < n; ++s) mx = fmaxf(mx, w[s * (HEAD_DIM + 2) + HEAD_DIM]);
    float z = 0.f, acc = 0.f;
#pragma unroll 4
    for (int s = 0; s < n; ++s) {
        const float* p = w + s * (HEAD_DIM + 2);
        const float e = exp2f(p[HEAD_DIM] - mx);
        z += e * p[HEAD_DIM + 1];
        acc += e * p[d];
    }
    out[b * out_stride + h * HEAD_DIM + d] = st(n > 0 ? acc / z : 0.f);
}
"""

KERNELS = ("paged_attn_partial", "paged_attn_merge")
THREADS = 128
HEAD_DIMS = (32, 64, 128, 256)
TILE_TARGET = 64   # positions per tile: 32 KB of K+V in flight per CTA at D = 128 fp16
MAX_PPT = 8        # positions per thread per tile: 2 * 8 16-byte vectors in registers
CTA_BUDGET = 8192  # bound on B * H * n_splits: empty CTAs (chunks past ctx) still cost
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
_DEFINE = {"float16": "", "bfloat16": "#define ELEM_BF16\n", "float32": "#define ELEM_F32\n"}
LOG2E = 1.4426950408889634


def supported(dtype: str, head_dim: int) -> bool:
    """The kernels take `head_dim` in HEAD_DIMS whose row is at most 32 16-byte vectors
    (one group of lanes per position must fit in a warp): all of them for 16-bit types,
    up to 128 for fp32."""
    return dtype in _ITEMSIZE and head_dim in HEAD_DIMS \
        and head_dim * _ITEMSIZE[dtype] // 16 <= 32


def _check(dtype: str, head_dim: int) -> None:
    if not supported(dtype, head_dim):
        raise ValueError(f"paged attention kernels take float16/bfloat16 (head_dim in "
                         f"{HEAD_DIMS}) or float32 (head_dim <= 128), not {dtype} {head_dim}")


@functools.cache
def tile_geometry(head_dim: int, dtype: str = "float16") -> tuple[int, int, int, int]:
    """(VEC, NV, PP, PPT): elements per 16-byte vector, threads per position (one vector
    each), positions per pass of the CTA, positions per thread per tile."""
    _check(dtype, head_dim)
    vec = 16 // _ITEMSIZE[dtype]
    nv = head_dim // vec
    pp = THREADS // nv
    return vec, nv, pp, max(1, min(MAX_PPT, TILE_TARGET // pp))


def tile_positions(head_dim: int, dtype: str = "float16") -> int:
    """Positions one CTA loads per memory round trip (64 for every supported shape but
    fp32 D=128 and 16-bit D=256: 32)."""
    _, _, pp, ppt = tile_geometry(head_dim, dtype)
    return pp * ppt


@functools.lru_cache(maxsize=1024)
def split_geometry(width_tokens: int, head_dim: int, dtype: str = "float16",
                   row_heads: int = 1) -> tuple[int, int]:
    """(chunk, n_splits) for a block table of `width_tokens` positions and `row_heads`
    = B * H (row, query head) pairs: chunk is a whole number of tiles and n_splits *
    chunk covers the width. Short chunks (one tile, 64 positions) give small batches
    many CTAs; when B * H * n_splits would pass CTA_BUDGET, chunks grow, since a launch
    has CTAs for the whole width and most of them find an empty chunk when contexts are
    short; large batches have parallelism enough from B * H alone."""
    tile = tile_positions(head_dim, dtype)
    max_splits = max(1, CTA_BUDGET // max(1, row_heads))
    tiles = max(1, -(-width_tokens // (tile * max_splits)))
    chunk = tile * tiles
    return chunk, max(1, -(-width_tokens // chunk))


def cuda_source(dtype: str, head_dim: int, block_size: int = BLOCK_SIZE) -> str:
    """The CUDA source for K/V/q of `dtype` ("float16", "bfloat16", "float32"), one
    head_dim and block size (compile-time: the loops unroll, divisions become shifts)."""
    vec, nv, pp, ppt = tile_geometry(head_dim, dtype)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    defines = (f"#define HEAD_DIM {head_dim}\n#define BLOCK_SIZE {block_size}\n"
               f"#define VEC {vec}\n#define NV {nv}\n#define PP {pp}\n#define PPT {ppt}\n"
               f"#define THREADS {THREADS}\n")
    return _DEFINE[dtype] + defines + _SRC


def workspace_floats(n_heads: int, head_dim: int, max_batch: int, width_tokens: int,
                     dtype: str = "float16") -> int:
    """Floats of workspace any call with B <= max_batch rows and a table of at most
    `width_tokens` positions needs: B * H * n_splits partials of D + 2 floats, n_splits
    bounded by the tiles of the width and by split_geometry's CTA budget (a narrower
    table can have more splits than the widest, so bound, do not evaluate)."""
    tiles = -(-width_tokens // tile_positions(head_dim, dtype))
    most = max(b * min(tiles, max(1, CTA_BUDGET // (b * n_heads)))
               for b in range(1, max_batch + 1))
    return most * n_heads * (head_dim + 2)


class PagedAttention:
    """Paged decode attention on the CuPy kernels for one (dtype, device, head shape,
    max batch, table width, block size). Call it like paged_attention_ref (module
    docstring); inputs it cannot take go to paged_attention_ref (`fallbacks` counts)."""

    def __init__(self, dtype: torch.dtype, device: torch.device | str | int, n_heads: int,
                 n_kv_heads: int, head_dim: int, max_batch: int, table_width: int,
                 block_size: int = BLOCK_SIZE) -> None:
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"unsupported dtype {dtype}")
        self.dtype_name = DTYPE_NAMES[dtype]
        _check(self.dtype_name, head_dim)
        if n_heads % n_kv_heads or max_batch < 1 or table_width < 1:
            raise ValueError(f"bad shape: H={n_heads} Hkv={n_kv_heads} max_batch={max_batch} "
                             f"table_width={table_width}")
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"paged attention kernels run on CUDA, not {device}")
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", self.index)
        self.dtype, self.head_dim = dtype, head_dim
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.max_batch, self.table_width, self.block_size = max_batch, table_width, block_size
        self.vec = 16 // _ITEMSIZE[self.dtype_name]
        self.scale_log2 = np.float32(LOG2E / math.sqrt(head_dim))
        module = compiled(cuda_source(self.dtype_name, head_dim, block_size),
                          ("--use_fast_math",), self.index)
        self._partial = module.get_function("paged_attn_partial")
        self._merge = module.get_function("paged_attn_merge")
        self.fallbacks = 0
        self._buffers()

    def _buffers(self) -> None:
        n = workspace_floats(self.n_heads, self.head_dim, self.max_batch,
                             self.table_width * self.block_size, self.dtype_name)
        self.work = torch.zeros(n, dtype=torch.float32, device=self.device)
        self.out = torch.zeros(self.max_batch, self.n_heads * self.head_dim, dtype=self.dtype,
                               device=self.device)

    def fork(self) -> PagedAttention:
        """The same kernels with a workspace and output of its own (a graph replayed on
        another stream must not share them)."""
        other = copy.copy(self)
        other._buffers()
        return other

    def fits(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
             batch: PagedBatch, block_size: int) -> bool:
        """Whether the kernels take these inputs (layouts, dtypes, sizes, 16-byte
        alignment of the vector loads)."""
        h, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        tables, ctx = batch.tables, batch.ctx_lens
        pools_ok = all(p.dtype == self.dtype and p.device == self.device and p.is_contiguous()
                       and p.dim() == 3 and p.shape[1:] == (hkv, d) and p.data_ptr() % 16 == 0
                       for p in (k_pool, v_pool))
        return (pools_ok and block_size == self.block_size and q.dtype == self.dtype
                and q.device == self.device and q.dim() == 3 and q.shape[1:] == (h, d)
                and q.shape[0] <= self.max_batch and q.stride(2) == 1 and q.stride(1) == d
                and q.stride(0) % self.vec == 0 and q.data_ptr() % 16 == 0
                and tables.dtype == torch.int32 and tables.device == self.device
                and tables.dim() == 2 and tables.shape[0] == q.shape[0]
                and tables.shape[1] <= self.table_width and tables.is_contiguous()
                and ctx.dtype == torch.int32 and ctx.device == self.device
                and ctx.dim() == 1 and ctx.shape[0] >= q.shape[0] and ctx.stride(0) == 1)

    @torch.no_grad()
    def __call__(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                 batch: PagedBatch, block_size: int = BLOCK_SIZE) -> torch.Tensor:
        """[B, H * D] in q's dtype: a view of this object's output buffer, valid until
        the next call."""
        if not self.fits(q, k_pool, v_pool, batch, block_size):
            self.fallbacks += 1
            return paged_attention_ref(q, k_pool, v_pool, batch.tables, batch.ctx_lens,
                                       block_size)
        b, w, h = q.shape[0], batch.tables.shape[1], self.n_heads
        if b == 0:
            return self.out[:0]
        chunk, n_splits = split_geometry(w * self.block_size, self.head_dim, self.dtype_name,
                                         b * h)
        # torch's current stream: the capture stream while a CUDA graph is recorded
        stream = cupy_stream(current_stream_ptr(self.index), self.index)
        i32 = np.int32
        self._partial((h, n_splits, b), (THREADS,),
                      (q.data_ptr(), np.int64(q.stride(0)), k_pool.data_ptr(), v_pool.data_ptr(),
                       batch.tables.data_ptr(), batch.ctx_lens.data_ptr(), self.work.data_ptr(),
                       i32(h), i32(self.n_kv_heads), i32(w), i32(chunk), self.scale_log2),
                      stream=stream)
        self._merge((h, b), (self.head_dim,),
                    (self.work.data_ptr(), batch.ctx_lens.data_ptr(), self.out.data_ptr(),
                     np.int64(self.out.stride(0)), i32(h), i32(w), i32(n_splits), i32(chunk)),
                    stream=stream)
        return self.out[:b]


def paged_attention_for(config, dtype: torch.dtype, device: torch.device | str,
                        max_batch: int, table_width: int,
                        block_size: int = BLOCK_SIZE) -> PagedAttention | None:
    """A PagedAttention for `config` (engine.config.ModelConfig) when it applies (CUDA,
    CuPy importable, a dtype and head_dim the kernels take, not turned off by
    HYBRID_PAGED_KERNEL=0), else None: the caller keeps paged_attention_ref. Kernels that
    fail to compile are reported as a RuntimeWarning and give None."""
    if os.environ.get("HYBRID_PAGED_KERNEL", "1") == "0":
        return None
    device = torch.device(device)
    name = DTYPE_NAMES.get(dtype)
    if device.type != "cuda" or name is None or not supported(name, config.head_dim):
        return None
    from kernels.reshape import cupy_available

    if not cupy_available():   # an install without the [gpu] extra: torch ops, no noise
        return None
    try:
        return PagedAttention(dtype, device, config.n_heads, config.n_kv_heads,
                              config.head_dim, max_batch, table_width, block_size)
    except Exception as exc:   # NVRTC cannot target this GPU, ...
        warnings.warn(f"paged attention kernels unavailable, using torch ops: "
                      f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
        return None
