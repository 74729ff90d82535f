"""Fused decode kernels (CuPy RawKernels) for one token of one sequence (batch 1).

Why: a GPT-2 decode step in torch is ~418 small kernels (LayerNorm, cuBLAS GEMV with a
bias, GELU, residual adds, index_put, a masked SDPA over the whole cache bucket). The
profile (docs/performance.md) put the GEMVs at 27% of the copy bandwidth and the ~300
other kernels at half of the step. These kernels do the same step in 5 launches per
layer (plus embedding and the argmax):

  ln_gemv      y = act(W . LN(x) + b) (+ residual): LayerNorm (optional) recomputed by
               every CTA from the 1-4K input vector in shared memory, then one warp per
               output row streaming W's row with 16-byte loads, fp32 accumulation.
  attn_partial split-K attention: CTAs per (head, chunk of positions) append this
               token's K/V at `positions[0]` and reduce softmax(q.K^T * scale) V over the
               live positions [0, pos] only (pos is read on the device, so the launch
               shape stays fixed inside a CUDA graph); the last CTA of a head merges.
  embed        x = wte[token] + wpe[position]; clears the step's argmax accumulator.
  argmax_token the greedy token from the argmax the logits GEMV accumulated.

Tried and dropped (bench/bench_decode.py, H200): loading each lane's weight vectors
into registers before the LayerNorm (lower occupancy, 5-10% slower), L2 prefetch of the
next kernel's weights (within noise), split-K GEMV (no gain; on cold 2-8 MB matrices
this GEMV runs at 0.6-1.7 TB/s, on par with cuBLAS, about half a same-size copy).

Rounding follows the torch path (values pass through the activation dtype where torch
stores a tensor: LayerNorm output, GEMV output before GELU, GELU output, residual sum,
logits before the fp32 cast), so results stay within a few fp16 ulps of it; the
reductions are not in cuBLAS's order, so they are not bit-identical.

Activations and weights: fp16 or bf16 (compiled per dtype); K % 8 == 0 and contiguous
rows. Launches take a raw stream pointer (the caller's current torch stream), which is
what CUDA-graph capture records.
"""

from __future__ import annotations

import numpy as np

from kernels.cuda_launch import compiled, cupy_stream

_SRC = r"""
typedef unsigned short act_t;
__device__ __forceinline__ float ld(act_t h) {
#ifdef ACT_BF16
    return __uint_as_float(((unsigned)h) << 16);
#else
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
#endif
}
__device__ __forceinline__ act_t st(float f) {
    unsigned short h;
#ifdef ACT_BF16
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
    return h;
}
__device__ __forceinline__ float rnd(float f) { return ld(st(f)); }   // torch stores here

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// All threads of the (256-thread) block get the sum / max. `red` holds 8 floats.
__device__ float block_sum(float v, float* red) {
    v = warp_sum(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float t = 0.f;
    for (int i = 0; i < (int)(blockDim.x >> 5); ++i) t += red[i];
    return t;
}
__device__ float block_max(float v, float* red) {
    v = warp_max(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float t = __int_as_float(0xff800000);   // -inf (NVRTC has no math.h)
    for (int i = 0; i < (int)(blockDim.x >> 5); ++i) t = fmaxf(t, red[i]);
    return t;
}
__device__ __forceinline__ float gelu_tanh(float x) {
    return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

__device__ __forceinline__ float dot8(const uint4 w, const float4 xa, const float4 xb) {
    return ld(w.x & 0xffff) * xa.x + ld(w.x >> 16) * xa.y + ld(w.y & 0xffff) * xa.z
         + ld(w.y >> 16) * xa.w + ld(w.z & 0xffff) * xb.x + ld(w.z >> 16) * xb.y
         + ld(w.w & 0xffff) * xb.z + ld(w.w >> 16) * xb.w;
}

// Greedy argmax fused into the logits GEMV: one 64-bit atomicMax per row of a key that
// orders by value (float bits made monotonic), then by *lower* row index, as
// torch.argmax returns the first maximum.
__device__ __forceinline__ unsigned long long argmax_key(float y, int n) {
    unsigned u = __float_as_uint(y);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((unsigned long long)u << 32) | (0xffffffffu - (unsigned)n);
}

// y[n] = act(W[n, :] . xn + b[n]) (+ res[n]), xn = LayerNorm(x; ln_w, ln_b, eps) when ln_w
// is given, else x. With out_f32 and amax, also the argmax over y (see argmax_key).
// One warp per row, `rpw` consecutive rows per warp, 8 warps per CTA; a lane streams
// 16-byte vectors of the row (4 in flight). act: 0 none, 1 GELU (tanh). out_f32: write
// fp32 (the logits) instead of `out`; `res` may alias `out`. Dynamic smem: K floats.
extern "C" __global__ void __launch_bounds__(256) ln_gemv(const act_t* __restrict__ x,
        const act_t* __restrict__ ln_w, const act_t* __restrict__ ln_b, float eps,
        const act_t* __restrict__ W, const act_t* __restrict__ b, const act_t* res, act_t* out,
        float* __restrict__ out_f32, unsigned long long* amax, int K, int N, int act, int rpw) {
    extern __shared__ float4 xs4[];
    float* xs = reinterpret_cast<float*>(xs4);
    __shared__ float red[8];
    for (int k = threadIdx.x; k < K; k += blockDim.x) xs[k] = ld(x[k]);
    if (ln_w) {
        __syncthreads();
        float s = 0.f;
        for (int k = threadIdx.x; k < K; k += blockDim.x) s += xs[k];
        const float mean = block_sum(s, red) / K;
        float q = 0.f;
        for (int k = threadIdx.x; k < K; k += blockDim.x) { float d = xs[k] - mean; q += d * d; }
        const float rstd = rsqrtf(block_sum(q, red) / K + eps);
        for (int k = threadIdx.x; k < K; k += blockDim.x)
            xs[k] = rnd((xs[k] - mean) * rstd * ld(ln_w[k]) + (ln_b ? ld(ln_b[k]) : 0.f));
    }
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, K8 = K >> 3;
    const int n0 = (blockIdx.x * (blockDim.x >> 5) + warp) * rpw;
    for (int r = 0; r < rpw; ++r) {
        const int n = n0 + r;
        if (n >= N) break;
        const uint4* row = reinterpret_cast<const uint4*>(W + (long long)n * K);
        float acc = 0.f;
#pragma unroll 4
        for (int i = lane; i < K8; i += 32) acc += dot8(row[i], xs4[2 * i], xs4[2 * i + 1]);
        acc = warp_sum(acc);
        if (lane == 0) {
            float y = rnd(acc + (b ? ld(b[n]) : 0.f));
            if (out_f32) {
                out_f32[n] = y;
                if (amax) atomicMax(amax, argmax_key(y, n));
                continue;
            }
            if (act == 1) y = rnd(gelu_tanh(y));
            if (res) y = ld(res[n]) + y;
            out[n] = st(y);
        }
    }
}

__device__ void combine_if_last(float* ws, int* counters, act_t* out, int D, int S);

// Split-K decode attention ("flash decoding"). Grid (H, S), 256 threads: CTA (h, s)
// takes the C = 256 / (D/8) positions [s*C, min((s+1)*C, pos+1)) of KV head h / (H/Hkv),
// pos = positions[0] (read on the device, so a CUDA graph replays it for any position;
// chunks past pos only check in). Each group of D/8 threads owns one position: its q, K
// and V 16-byte vectors are loaded at once, so the kernel waits on memory one time.
// qkv holds q at q_off, k at k_off, v at v_off (head-major, D each); kc/vc: this layer's
// cache of row 0, [Hkv, L, D]. CTA (h, 0) of each KV head's first query head appends
// this token's K/V at pos; position pos is read from qkv by everyone, so no CTA reads a
// cache row another is writing. Writes ws[h][s] = (o[D], m, z): m the chunk's max score,
// z = sum exp(score - m), o = sum exp(score - m) v; the last CTA of a head merges them
// into out (combine_if_last). D % 8 == 0 and 32 % (D/8) == 0.
extern "C" __global__ void __launch_bounds__(256) attn_partial(const act_t* __restrict__ qkv,
        act_t* kc, act_t* vc, const long long* __restrict__ positions, float* ws,
        int* counters, act_t* out, int H, int Hkv, int D, int L, float scale, int q_off,
        int k_off, int v_off) {
    __shared__ float part[256 * 8];               // (C rows) x D partial outputs
    __shared__ float red[8];
    const int h = blockIdx.x, s = blockIdx.y, S = gridDim.y, g = H / Hkv, kvh = h / g;
    const int D8 = D >> 3, C = blockDim.x / D8, rw = threadIdx.x / D8, c = threadIdx.x - rw * D8;
    const int pos = (int)positions[0];
    const int t0 = s * C, t1 = min(t0 + C, pos + 1), t = t0 + rw;
    float* o = ws + ((long long)h * S + s) * (D + 2);
    act_t* kh = kc + (long long)kvh * L * D;
    act_t* vh = vc + (long long)kvh * L * D;
    const act_t* knew = qkv + k_off + kvh * D;
    const act_t* vnew = qkv + v_off + kvh * D;
    if (s == 0 && h % g == 0)
        for (int d = threadIdx.x; d < D; d += blockDim.x) {
            kh[(long long)pos * D + d] = knew[d];
            vh[(long long)pos * D + d] = vnew[d];
        }
    const float ninf = __int_as_float(0xff800000);
    if (t0 >= t1) {                                   // uniform per CTA: an empty chunk
        for (int d = threadIdx.x; d < D; d += blockDim.x) o[d] = 0.f;   // (0 * garbage = NaN)
        if (threadIdx.x == 0) { o[D] = ninf; o[D + 1] = 0.f; }
        combine_if_last(ws, counters, out, D, S);
        return;
    }
    const bool live = t < t1;
    const uint4 qv = reinterpret_cast<const uint4*>(qkv + q_off + h * D)[c];
    uint4 kv = make_uint4(0u, 0u, 0u, 0u), vv = kv;
    if (live) {
        kv = reinterpret_cast<const uint4*>(t == pos ? knew : kh + (long long)t * D)[c];
        vv = reinterpret_cast<const uint4*>(t == pos ? vnew : vh + (long long)t * D)[c];
    }
    const float4 qa = make_float4(ld(qv.x & 0xffff), ld(qv.x >> 16), ld(qv.y & 0xffff), ld(qv.y >> 16));
    const float4 qb = make_float4(ld(qv.z & 0xffff), ld(qv.z >> 16), ld(qv.w & 0xffff), ld(qv.w >> 16));
    float p = dot8(kv, qa, qb);
    for (int off = D8 >> 1; off; off >>= 1) p += __shfl_xor_sync(0xffffffffu, p, off);
    p = live ? p * scale : ninf;
    const float m = block_max(p, red);
    const float e = live ? __expf(p - m) : 0.f;
    const float z = block_sum(c == 0 ? e : 0.f, red);
    part[rw * D + c * 8 + 0] = e * ld(vv.x & 0xffff); part[rw * D + c * 8 + 1] = e * ld(vv.x >> 16);
    part[rw * D + c * 8 + 2] = e * ld(vv.y & 0xffff); part[rw * D + c * 8 + 3] = e * ld(vv.y >> 16);
    part[rw * D + c * 8 + 4] = e * ld(vv.z & 0xffff); part[rw * D + c * 8 + 5] = e * ld(vv.z >> 16);
    part[rw * D + c * 8 + 6] = e * ld(vv.w & 0xffff); part[rw * D + c * 8 + 7] = e * ld(vv.w >> 16);
    __syncthreads();
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float sum = 0.f;
        for (int r = 0; r < C; ++r) sum += part[r * D + d];
        o[d] = sum;
    }
    if (threadIdx.x == 0) { o[D] = m; o[D + 1] = z; }
    combine_if_last(ws, counters, out, D, S);
}

// The last CTA of head h to finish (an atomic count per head, reset for the next step)
// merges the chunks: out[h*D + d] = sum_s e_s o_s[d] / sum_s e_s z_s, e_s = exp(m_s - max m)
// (0 for empty chunks). One thread per chunk reads (m_s, z_s); then 256 / D groups of D
// threads split the chunks, so the loads are issued in parallel, not one chunk at a
// time. Saves a second launch per layer. Partials are read past L1 (__ldcg): other CTAs
// wrote them. S <= 256; D divides 256.
__device__ void combine_if_last(float* ws, int* counters, act_t* out, int D, int S) {
    __shared__ int last;
    __shared__ float es[256], cpart[256], red[8];
    __threadfence();                                  // this thread's partial is visible,
    __syncthreads();                                  // and so is the whole CTA's
    if (threadIdx.x == 0) last = atomicAdd(&counters[blockIdx.x], 1) == S - 1;
    __syncthreads();
    if (!last) return;                                // uniform per CTA
    __threadfence();
    const float* w = ws + (long long)blockIdx.x * S * (D + 2);
    const int tid = threadIdx.x;
    const float ninf = __int_as_float(0xff800000);
    const float ms = tid < S ? __ldcg(w + tid * (D + 2) + D) : ninf;
    const float zs = tid < S ? __ldcg(w + tid * (D + 2) + D + 1) : 0.f;
    const float mx = block_max(ms, red);
    const float e = zs > 0.f ? __expf(ms - mx) : 0.f;
    es[tid] = e;
    const float z = block_sum(e * zs, red);          // its barriers publish es[]
    const int groups = blockDim.x / D, grp = tid / D, d = tid - grp * D;
    float sum = 0.f;
#pragma unroll 8
    for (int s = grp; s < S; s += groups) sum += es[s] * __ldcg(w + s * (D + 2) + d);
    cpart[tid] = sum;
    __syncthreads();
    if (tid < D) {
        float o = 0.f;
        for (int g = 0; g < groups; ++g) o += cpart[g * D + tid];
        out[blockIdx.x * D + tid] = st(o / z);
    }
    if (tid == 0) counters[blockIdx.x] = 0;
}

// x[d] = wte[token][d] + wpe[position][d] (token, position from device memory). The
// step's first kernel, so it also clears the argmax accumulator of this step's logits.
extern "C" __global__ void embed(const long long* __restrict__ tokens,
        const long long* __restrict__ positions, const act_t* __restrict__ wte,
        const act_t* __restrict__ wpe, act_t* __restrict__ x, int D,
        unsigned long long* amax) {
    if (amax && blockIdx.x == 0 && threadIdx.x == 0) *amax = 0ull;
    const long long tok = tokens[0], p = positions[0];
    for (int d = blockIdx.x * blockDim.x + threadIdx.x; d < D; d += gridDim.x * blockDim.x)
        x[d] = st(ld(wte[tok * D + d]) + ld(wpe[p * D + d]));
}

// The greedy token from the fused argmax key (1 thread).
extern "C" __global__ void argmax_token(const unsigned long long* __restrict__ amax,
                                        long long* __restrict__ token) {
    token[0] = (long long)(0xffffffffu - (unsigned)(amax[0] & 0xffffffffull));
}
"""

KERNELS = ("ln_gemv", "attn_partial", "embed", "argmax_token")
THREADS = 256
WARPS = THREADS // 32


def cuda_source(dtype: str) -> str:
    """The CUDA source for activations of `dtype` ("float16" or "bfloat16")."""
    if dtype not in ("float16", "bfloat16"):
        raise ValueError(f"fused decode kernels take float16 or bfloat16, not {dtype}")
    return ("#define ACT_BF16\n" if dtype == "bfloat16" else "") + _SRC


def attn_split(cache_len: int, head_dim: int) -> tuple[int, int]:
    """(chunk, splits) of attn_partial: one position per D/8 threads of a 256-thread CTA
    (32 positions at head_dim 64), as many chunks as cover the cache length."""
    chunk = THREADS // (head_dim // 8)
    return chunk, -(-cache_len // chunk)


def gemv_grid(n_rows: int, target_ctas: int = 1024) -> tuple[int, int]:
    """(CTAs, rows per warp): about `target_ctas` CTAs of 8 warps, whole rows per warp."""
    rpw = max(1, -(-n_rows // (target_ctas * WARPS)))
    return -(-n_rows // (rpw * WARPS)), rpw


class Launcher:
    """Binds the compiled kernels of one dtype and device to a stream (by pointer)."""

    def __init__(self, dtype: str, device: int) -> None:
        self.device = device
        module = compiled(cuda_source(dtype), ("--use_fast_math",), device)
        self.fn = {name: module.get_function(name) for name in KERNELS}

    def __call__(self, name: str, grid: int | tuple[int, ...], args: tuple, stream_ptr: int,
                 smem: int = 0) -> None:
        grid = grid if isinstance(grid, tuple) else (grid,)
        self.fn[name](grid, (THREADS,), args, shared_mem=smem,
                      stream=cupy_stream(stream_ptr, self.device))


F32 = np.float32
I32 = np.int32
