"""The CUDA kernels' own source, compiled for the CPU with g++ and run block by block,
equals the NumPy reference: checks the index math of kernels/reshape_cuda.py on
machines without a GPU (the H100 run in tests/cuda checks the real thing).

The shim runs every CTA's threads (32x8, or 256 for pack_kv_vec) one after another,
twice: in phase 0
`__syncthreads()` returns, so all threads fill shared memory first; phase 1 repeats
that (same values) and goes on past the barrier. Kernels without a barrier are
idempotent, so the repeat is harmless.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest

from kernels import reshape_ref
from kernels.hbm_layout import HbmLayout
from kernels.reshape_cuda import (
    KERNELS,
    ROWS_PER_THREAD,
    cuda_source,
    kernel_geometry,
    vec_geometry,
)

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

_SHIM = r"""
#include <algorithm>
struct Dim3 { int x, y, z; };
static Dim3 threadIdx, blockIdx, blockDim;
static int shim_phase;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__
#define __syncthreads() do { if (shim_phase == 0) return; } while (0)
struct uint4 { unsigned x, y, z, w; };
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
    return uint4{x, y, z, w};
}
using std::min;
"""

_DRIVER = r"""
typedef void (*kernel_fn)(const elem_t*, elem_t*, long long, long long, int, int, int, int, int,
                          int);
// which: index in KERNELS; 4 = pack_kv, 5 = pack_kv_vec (src2 = V source)
extern "C" void launch(int which, int gx, int gy, int gz, int bx_, int by_, const void* src,
                       const void* src2, void* dst, long long sh, long long st, int n_tokens,
                       int head_dim, int n_lanes, int L, int nb, int kvd) {
    kernel_fn fns[4] = {pack_k, pack_v, unpack_k, unpack_v};
    blockDim = Dim3{bx_, by_, 1};
    for (int bz = 0; bz < gz; ++bz)
    for (int by = 0; by < gy; ++by)
        for (int bx = 0; bx < gx; ++bx) {
            blockIdx = Dim3{bx, by, bz};
            for (shim_phase = 0; shim_phase < 2; ++shim_phase)
                for (int ty = 0; ty < blockDim.y; ++ty)
                    for (int tx = 0; tx < blockDim.x; ++tx) {
                        threadIdx = Dim3{tx, ty, 0};
                        if (which == 5)
                            pack_kv_vec((const elem_t*)src, (const elem_t*)src2, (elem_t*)dst,
                                        sh, st, n_tokens, head_dim, n_lanes, L, nb, kvd);
                        else if (which == 4)
                            pack_kv((const elem_t*)src, (const elem_t*)src2, (elem_t*)dst, sh,
                                    st, n_tokens, head_dim, n_lanes, L, nb, kvd);
                        else
                            fns[which]((const elem_t*)src, (elem_t*)dst, sh, st, n_tokens,
                                       head_dim, n_lanes, L, nb, kvd);
                    }
        }
}
"""


RPTS = (1, 4, 8)


@pytest.fixture(scope="module")
def libs(tmp_path_factory) -> dict[str, ctypes.CDLL]:
    """One library per (dtype, rows per thread of pack_kv_vec)."""
    out = {}
    for dtype in ("float16", "float32"):
        for rpt in RPTS:
            d = tmp_path_factory.mktemp(f"{dtype}_{rpt}")
            (d / "k.cpp").write_text(_SHIM + f"#define RPT {rpt}\n" + cuda_source(dtype) + _DRIVER)
            cmd = ["g++", "-O1", "-fno-strict-aliasing", "-shared", "-fPIC", "-o",
                   str(d / "k.so"), str(d / "k.cpp")]
            subprocess.run(cmd, check=True, capture_output=True)
            out[dtype, rpt] = ctypes.CDLL(str(d / "k.so"))
    return out


def _run(lib, name: str, src: np.ndarray, dst: np.ndarray, layout: HbmLayout, n_tokens: int,
         strides: tuple[int, int], src2: np.ndarray | None = None, rpt: int = 1) -> None:
    if name == "pack_kv_vec":
        (gx, gy, gz), block, scalars = vec_geometry(layout, n_tokens, strides, rpt)
    else:
        (gx, gy, gz), block, scalars = kernel_geometry(layout, n_tokens, strides)
    ll, i32, ptr = ctypes.c_longlong, ctypes.c_int, ctypes.c_void_p
    args = [ll(int(scalars[0])), ll(int(scalars[1]))] + [i32(int(s)) for s in scalars[2:]]
    gz = 2 if name == "pack_kv" else gz
    lib.launch(i32(KERNELS.index(name)), i32(gx), i32(gy), i32(gz), i32(block[0]),
               i32(block[1]), ptr(src.ctypes.data),
               ptr(0 if src2 is None else src2.ctypes.data), ptr(dst.ctypes.data), *args)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_source_compiles_for_the_gpu(tmp_path, dtype):
    """The same source through nvcc (what NVRTC compiles on the GPU machine)."""
    src = tmp_path / "k.cu"
    src.write_text(f"#define RPT {ROWS_PER_THREAD}\n" + cuda_source(dtype))
    out = subprocess.run(["nvcc", "-arch=sm_90", "-ptx", "-o", str(tmp_path / "k.ptx"), str(src)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    ptx = (tmp_path / "k.ptx").read_text()
    assert all(f".entry {name}(" in ptx for name in KERNELS)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("shape,n_tokens", [((16, 64), 33), ((2, 16), 1), ((1, 32), 64),
                                            ((25, 64), 45), ((40, 32), 97), ((4, 128), 31),
                                            # kv_dim not a multiple of 32: a padded last lane
                                            ((3, 16), 33), ((3, 20), 40), ((5, 24), 70),
                                            ((1, 8), 5), ((35, 40), 36)])
def test_compiled_kernels_match_reference(libs, dtype, shape, n_tokens) -> None:
    n_kv_heads, head_dim = shape
    layout = HbmLayout.kv_only(2, n_kv_heads, head_dim, dtype)
    rng = np.random.default_rng(n_tokens)
    cache = rng.standard_normal((2, n_kv_heads, n_tokens + 7, head_dim)).astype(dtype)
    k, v = cache[0, :, :n_tokens], cache[1, :, :n_tokens]     # strided engine views
    strides = (k.strides[0] // k.itemsize, k.strides[1] // k.itemsize)
    want = reshape_ref.pack_layer(k, v, layout)
    out = np.full(layout.layer_bytes(n_tokens), 0xAB, np.uint8)    # padding must be written
    lib = libs[dtype, 1]
    _run(lib, "pack_k", cache[0], out, layout, n_tokens, strides)
    _run(lib, "pack_v", cache[1], out, layout, n_tokens, strides)
    assert np.array_equal(out, want)
    fused = np.full_like(out, 0xCD)
    _run(lib, "pack_kv", cache[0], fused, layout, n_tokens, strides, src2=cache[1])
    assert np.array_equal(fused, want)
    if head_dim % (16 // np.dtype(dtype).itemsize) == 0:     # the vector kernel's condition
        for rpt in RPTS:
            vec = np.full_like(out, 0xEF)
            _run(libs[dtype, rpt], "pack_kv_vec", cache[0], vec, layout, n_tokens, strides,
                 src2=cache[1], rpt=rpt)
            assert np.array_equal(vec, want), rpt
    k2 = np.zeros((n_kv_heads, n_tokens, head_dim), dtype)
    v2 = np.zeros_like(k2)
    dense = (n_tokens * head_dim, head_dim)
    _run(lib, "unpack_k", out, k2, layout, n_tokens, dense)
    _run(lib, "unpack_v", out, v2, layout, n_tokens, dense)
    assert np.array_equal(k2, k) and np.array_equal(v2, v)
