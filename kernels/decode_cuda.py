"""Fused decode kernels (CuPy RawKernels) for one token of one sequence (batch 1).

Why: a GPT-2 decode step in torch is ~418 small kernels (LayerNorm, cuBLAS GEMV with a
bias, GELU, residual adds, index_put, a masked SDPA over the whole cache bucket). The
profile (docs/performance.md) put the GEMVs at 27% of the copy bandwidth and the ~300
other kernels at half of the step. These kernels do the same step in 5 launches per
layer:

  ln_gemv      y = act(W . LN(x) + b) (+ residual): LayerNorm (optional) recomputed by
               every CTA from the 1-4K input vector in shared memory, then one warp per
               output row streaming W's row with 16-byte loads, fp32 accumulation.
  attn_decode  one CTA per query head: appends this token's K/V at `positions[0]`, then
               softmax(q.K^T * scale) V over the live positions [0, pos] only (read from
               device memory, so the launch shape stays fixed inside a CUDA graph).
  embed        x = wte[token] + wpe[position].

Rounding follows the torch path (values pass through the activation dtype where torch
stores a tensor: LayerNorm output, GEMV output before GELU, GELU output, residual sum,
logits before the fp32 cast), so results stay within a few fp16 ulps of it; the
reductions are not in cuBLAS's order, so they are not bit-identical.

Activations and weights: fp16 or bf16 (compiled per dtype); K % 8 == 0 and contiguous
rows. Launches take a raw stream pointer (the caller's current torch stream), which is
what CUDA-graph capture records.
"""

from __future__ import annotations

import functools

import numpy as np

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

// y[n] = act(W[n, :] . xn + b[n]) (+ res[n]), xn = LayerNorm(x; ln_w, ln_b, eps) when ln_w
// is given, else x. One warp per row, `rpw` consecutive rows per warp, 8 warps per CTA.
// act: 0 none, 1 GELU (tanh). out_f32: write fp32 (the logits) instead of `out`.
// Dynamic shared memory: K floats.
extern "C" __global__ void ln_gemv(const act_t* __restrict__ x, const act_t* __restrict__ ln_w,
        const act_t* __restrict__ ln_b, float eps, const act_t* __restrict__ W,
        const act_t* __restrict__ b, const act_t* res, act_t* out, float* __restrict__ out_f32,
        int K, int N, int act, int rpw) {
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
        for (int i = lane; i < K8; i += 32) {
            const uint4 w = row[i];
            const float4 xa = xs4[2 * i], xb = xs4[2 * i + 1];
            acc += ld(w.x & 0xffff) * xa.x + ld(w.x >> 16) * xa.y
                 + ld(w.y & 0xffff) * xa.z + ld(w.y >> 16) * xa.w
                 + ld(w.z & 0xffff) * xb.x + ld(w.z >> 16) * xb.y
                 + ld(w.w & 0xffff) * xb.z + ld(w.w >> 16) * xb.w;
        }
        acc = warp_sum(acc);
        if (lane == 0) {
            float y = rnd(acc + (b ? ld(b[n]) : 0.f));
            if (out_f32) { out_f32[n] = y; continue; }
            if (act == 1) y = rnd(gelu_tanh(y));
            if (res) y = ld(res[n]) + y;
            out[n] = st(y);
        }
    }
}

// One CTA (256 threads) per query head h; KV head h / (H / Hkv). qkv holds q at q_off,
// k at k_off, v at v_off (head-major, D each). kc/vc: this layer's cache of row 0,
// [Hkv, L, D]. Writes k, v of this token at pos = positions[0] (one CTA per KV head), then
// out[h*D:(h+1)*D] = softmax(scale * q.K[0..pos]) V[0..pos]; position pos is read from qkv,
// so no CTA reads a cache row another CTA is writing. D % 8 == 0, D <= 256.
// Dynamic shared memory: (L + D + 256 * 8 / D * D ... ) floats, see attn_smem_bytes.
extern "C" __global__ void attn_decode(const act_t* __restrict__ qkv, act_t* kc, act_t* vc,
        const long long* __restrict__ positions, act_t* __restrict__ out, int H, int Hkv,
        int D, int L, float scale, int q_off, int k_off, int v_off) {
    extern __shared__ float4 sm4[];
    float* sm = reinterpret_cast<float*>(sm4);
    float* qs = sm;                 // D
    float* part = qs + D;           // (256 / (D/8)) x D partial outputs
    float* scores = part + 256 * 8; // L
    __shared__ float red[8];
    const int h = blockIdx.x, g = H / Hkv, kvh = h / g;
    const int pos = (int)positions[0];
    act_t* kh = kc + (long long)kvh * L * D;
    act_t* vh = vc + (long long)kvh * L * D;
    const act_t* knew = qkv + k_off + kvh * D;
    const act_t* vnew = qkv + v_off + kvh * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        qs[d] = ld(qkv[q_off + h * D + d]);
        if (h % g == 0) { kh[(long long)pos * D + d] = knew[d]; vh[(long long)pos * D + d] = vnew[d]; }
    }
    __syncthreads();
    // Scores: one key per thread (16-byte loads of its row), keys tid, tid + 256, ...
    const int D8 = D >> 3;
    float m = __int_as_float(0xff800000);
    for (int t = threadIdx.x; t <= pos; t += blockDim.x) {
        const uint4* kr = reinterpret_cast<const uint4*>(t == pos ? knew : kh + (long long)t * D);
        float s = 0.f;
        for (int i = 0; i < D8; ++i) {
            const uint4 w = kr[i];
            const float* q = qs + 8 * i;
            s += ld(w.x & 0xffff) * q[0] + ld(w.x >> 16) * q[1] + ld(w.y & 0xffff) * q[2]
               + ld(w.y >> 16) * q[3] + ld(w.z & 0xffff) * q[4] + ld(w.z >> 16) * q[5]
               + ld(w.w & 0xffff) * q[6] + ld(w.w >> 16) * q[7];
        }
        s *= scale;
        scores[t] = s;
        m = fmaxf(m, s);
    }
    m = block_max(m, red);
    float z = 0.f;
    for (int t = threadIdx.x; t <= pos; t += blockDim.x) {
        const float e = __expf(scores[t] - m);
        scores[t] = e;
        z += e;
    }
    z = block_sum(z, red);      // its barriers also publish scores[] to every thread
    // P.V: D8 threads cover one V row (16 bytes each); 256 / D8 rows at a time.
    const int rows = blockDim.x / D8, rw = threadIdx.x / D8, c = threadIdx.x - rw * D8;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (rw < rows) {
        for (int t = rw; t <= pos; t += rows) {
            const uint4 w = reinterpret_cast<const uint4*>(t == pos ? vnew : vh + (long long)t * D)[c];
            const float p = scores[t];
            acc[0] += p * ld(w.x & 0xffff); acc[1] += p * ld(w.x >> 16);
            acc[2] += p * ld(w.y & 0xffff); acc[3] += p * ld(w.y >> 16);
            acc[4] += p * ld(w.z & 0xffff); acc[5] += p * ld(w.z >> 16);
            acc[6] += p * ld(w.w & 0xffff); acc[7] += p * ld(w.w >> 16);
        }
        for (int j = 0; j < 8; ++j) part[rw * D + c * 8 + j] = acc[j];
    }
    __syncthreads();
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float o = 0.f;
        for (int r = 0; r < rows; ++r) o += part[r * D + d];
        out[h * D + d] = st(o / z);
    }
}

// x[d] = wte[token][d] + wpe[position][d] (token, position from device memory).
extern "C" __global__ void embed(const long long* __restrict__ tokens,
        const long long* __restrict__ positions, const act_t* __restrict__ wte,
        const act_t* __restrict__ wpe, act_t* __restrict__ x, int D) {
    const long long tok = tokens[0], p = positions[0];
    for (int d = blockIdx.x * blockDim.x + threadIdx.x; d < D; d += gridDim.x * blockDim.x)
        x[d] = st(ld(wte[tok * D + d]) + ld(wpe[p * D + d]));
}
"""

KERNELS = ("ln_gemv", "attn_decode", "embed")
THREADS = 256
WARPS = THREADS // 32


def cuda_source(dtype: str) -> str:
    """The CUDA source for activations of `dtype` ("float16" or "bfloat16")."""
    if dtype not in ("float16", "bfloat16"):
        raise ValueError(f"fused decode kernels take float16 or bfloat16, not {dtype}")
    return ("#define ACT_BF16\n" if dtype == "bfloat16" else "") + _SRC


@functools.cache
def _function(dtype: str, device: int, name: str):
    import cupy as cp

    with cp.cuda.Device(device):
        module = cp.RawModule(code=cuda_source(dtype), options=("--use_fast_math",))
        return module.get_function(name)


def attn_smem_bytes(head_dim: int, max_len: int) -> int:
    """Dynamic shared memory of attn_decode: q, the partial outputs, the scores."""
    return 4 * (head_dim + THREADS * 8 + max_len)


def gemv_grid(n_rows: int, target_ctas: int = 1024) -> tuple[int, int]:
    """(CTAs, rows per warp): about `target_ctas` CTAs of 8 warps, whole rows per warp."""
    rpw = max(1, -(-n_rows // (target_ctas * WARPS)))
    return -(-n_rows // (rpw * WARPS)), rpw


class Launcher:
    """Binds the compiled kernels of one dtype and device to a stream (by pointer)."""

    def __init__(self, dtype: str, device: int) -> None:
        from kernels.reshape_cuda import _cupy_stream

        self._stream = _cupy_stream
        self.device = device
        self.fn = {name: _function(dtype, device, name) for name in KERNELS}

    def __call__(self, name: str, grid: int, args: tuple, stream_ptr: int, smem: int = 0) -> None:
        self.fn[name]((grid,), (THREADS,), args, shared_mem=smem,
                      stream=self._stream(stream_ptr, self.device))


F32 = np.float32
I32 = np.int32
