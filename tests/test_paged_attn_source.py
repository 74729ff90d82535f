"""The paged decode attention kernels' own CUDA source (kernels/paged_attn_cuda.py),
compiled for the CPU with g++ and run CTA by CTA, equals engine.paged_kv's torch
reference; PagedAttention drives that build through a fake CuPy (launch grids, argument
order and C types); plus the launch geometry, the source through nvcc when present, and
the factory's opt-outs. No GPU needed (tests/cuda/test_paged_attn_cuda.py runs the real
kernels).

The shim runs each CTA's threads as cooperative fibers (ucontext): a fiber runs until
`__syncthreads()` and yields; when every thread of the CTA has yielded, the next round
resumes them all, so shared memory behaves as on the GPU. `__shfl_xor_sync` is a
barrier too: each thread posts its value, yields, then reads its partner's (two
alternating buffers, so a fast thread's next post cannot overwrite a value still to be
read). A CTA whose threads leave at different barrier counts is reported as an error
(on the GPU that would hang or be undefined). The fp16/bf16 conversions, PTX `cvt` on
the GPU, are g++'s _Float16 and round-to-nearest-even bf16 here.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from engine.config import preset
from engine.paged_kv import NULL_BLOCK, PagedBatch, paged_attention_ref
from kernels import paged_attn_cuda as pa

_SHIM = r"""
#include <ucontext.h>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
using std::min;
struct Dim3 { unsigned x, y, z; };
static Dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__
#define __launch_bounds__(n)
struct uint4 { unsigned x, y, z, w; };
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
    return uint4{x, y, z, w};
}
static inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }

// ---- fibers: one per CUDA thread of the CTA being run
static const int SHIM_THREADS = 256;
static const size_t SHIM_STACK = 1 << 16;
static ucontext_t shim_main, shim_fiber[SHIM_THREADS];
static char* shim_stack[SHIM_THREADS];
static bool shim_done[SHIM_THREADS];
static int shim_cur, shim_turn[SHIM_THREADS];
static float shim_xchg[2][SHIM_THREADS];
static void (*shim_body)();

static void shim_yield() { swapcontext(&shim_fiber[shim_cur], &shim_main); }
#define __syncthreads() shim_yield()
static float __shfl_xor_sync(unsigned, float v, int lane_mask) {
    const int me = shim_cur, buf = shim_turn[me]++ & 1;
    shim_xchg[buf][me] = v;
    shim_yield();
    return shim_xchg[buf][me ^ lane_mask];
}
static void shim_entry() { shim_body(); shim_done[shim_cur] = true; }

// Runs the current CTA (blockIdx set) with blockDim.x threads; false if its threads
// leave at different barriers.
static bool shim_run_block() {
    const int n = (int)blockDim.x;
    for (int i = 0; i < n; ++i) {
        if (!shim_stack[i]) shim_stack[i] = (char*)malloc(SHIM_STACK);
        getcontext(&shim_fiber[i]);
        shim_fiber[i].uc_stack.ss_sp = shim_stack[i];
        shim_fiber[i].uc_stack.ss_size = SHIM_STACK;
        shim_fiber[i].uc_link = &shim_main;
        makecontext(&shim_fiber[i], shim_entry, 0);
        shim_done[i] = false;
        shim_turn[i] = 0;
    }
    for (;;) {
        int finished = 0;
        for (int i = 0; i < n; ++i) {
            shim_cur = i;
            threadIdx = Dim3{(unsigned)i, 0u, 0u};
            swapcontext(&shim_main, &shim_fiber[i]);
            finished += shim_done[i];
        }
        if (finished == n) return true;
        if (finished) return false;
    }
}

static bool shim_run_grid(Dim3 grid, unsigned threads, void (*body)()) {
    gridDim = grid;
    blockDim = Dim3{threads, 1u, 1u};
    shim_body = body;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = Dim3{x, y, z};
                if (!shim_run_block()) return false;
            }
    return true;
}
"""

_HALF = r"""
#define PAGED_ATTN_HOST_HELPERS
static inline float ld(unsigned short h) { _Float16 f; memcpy(&f, &h, 2); return (float)f; }
static inline unsigned short st(float f) {
    _Float16 h = (_Float16)f; unsigned short r; memcpy(&r, &h, 2); return r;
}
"""

_BF16 = r"""
#define PAGED_ATTN_HOST_HELPERS
static inline float ld(unsigned short h) { return __uint_as_float((unsigned)h << 16); }
static inline unsigned short st(float f) {
    unsigned u = __float_as_uint(f);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
"""

# Entry points taking a launch as CuPy makes it: grid, block, then the kernel's own
# arguments in the kernel's order (so a fake CuPy function can forward a launch as is).
_DRIVER = r"""
static struct {
    const act_t *q, *k, *v; long long q_stride, out_stride; const int *tables, *ctx;
    const float* ws_in; float* ws; act_t* out; int H, Hkv, W, chunk, n_splits; float scale;
} A;

extern "C" int run_partial(unsigned gx, unsigned gy, unsigned gz, unsigned threads,
                           const act_t* q, long long q_stride, const act_t* k, const act_t* v,
                           const int* tables, const int* ctx, float* ws, int H, int Hkv, int W,
                           int chunk, float scale) {
    A = {};
    A.q = q; A.q_stride = q_stride; A.k = k; A.v = v; A.tables = tables; A.ctx = ctx;
    A.ws = ws; A.H = H; A.Hkv = Hkv; A.W = W; A.chunk = chunk; A.scale = scale;
    return shim_run_grid(Dim3{gx, gy, gz}, threads, [] {
        paged_attn_partial(A.q, A.q_stride, A.k, A.v, A.tables, A.ctx, A.ws, A.H, A.Hkv, A.W,
                           A.chunk, A.scale);
    });
}

extern "C" int run_merge(unsigned gx, unsigned gy, unsigned gz, unsigned threads,
                         const float* ws, const int* ctx, act_t* out, long long out_stride,
                         int H, int W, int n_splits, int chunk) {
    A = {};
    A.ws_in = ws; A.ctx = ctx; A.out = out; A.out_stride = out_stride; A.H = H; A.W = W;
    A.n_splits = n_splits; A.chunk = chunk;
    return shim_run_grid(Dim3{gx, gy, gz}, threads, [] {
        paged_attn_merge(A.ws_in, A.ctx, A.out, A.out_stride, A.H, A.W, A.n_splits, A.chunk);
    });
}
"""

BS = 16
TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ATOL = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 1e-5}   # ~2 ulps of |out| <= 1
RTOL = {"float16": 1e-3, "bfloat16": 8e-3, "float32": 1e-6}     # ~1 ulp: |out| > 2
BUILDS = (("float16", 32), ("float16", 64), ("bfloat16", 64), ("float32", 32),
          ("float16", 128), ("bfloat16", 256))

needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def _build(tmp_dir, dtype: str, head_dim: int) -> ctypes.CDLL:
    helpers = {"float16": _HALF, "bfloat16": _BF16, "float32": ""}[dtype]
    # the dtype flag first: the shim's conversions and the source both read it
    src = pa.cuda_source(dtype, head_dim, BS)
    flag, body = src.split("\n", 1) if src.startswith("#define ELEM") else ("", src)
    (tmp_dir / "k.cpp").write_text(flag + "\n" + _SHIM + helpers + body + _DRIVER)
    cmd = ["g++", "-O1", "-std=c++17", "-fno-strict-aliasing", "-shared", "-fPIC", "-o",
           str(tmp_dir / "k.so"), str(tmp_dir / "k.cpp")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lib = ctypes.CDLL(str(tmp_dir / "k.so"))
    ptr, i32, i64, u32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_uint
    grid = [u32] * 4
    lib.run_partial.argtypes = grid + [ptr, i64, ptr, ptr, ptr, ptr, ptr, i32, i32, i32, i32,
                                       ctypes.c_float]
    lib.run_merge.argtypes = grid + [ptr, ptr, ptr, i64, i32, i32, i32, i32]
    return lib


@pytest.fixture(scope="module")
def libs(tmp_path_factory) -> dict[tuple[str, int], ctypes.CDLL]:
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    dirs = {key: tmp_path_factory.mktemp(f"{key[0]}_{key[1]}") for key in BUILDS}
    with ThreadPoolExecutor(4) as pool:   # g++ runs in parallel; ~1 s each
        futures = {key: pool.submit(_build, d, *key) for key, d in dirs.items()}
    return {key: f.result() for key, f in futures.items()}


@dataclasses.dataclass
class Case:
    q: torch.Tensor          # [B, H, D] strided view into a [B, 3 * H * D] buffer
    k: torch.Tensor          # pools as the reference sees them
    v: torch.Tensor
    k_dev: torch.Tensor      # pools as the kernel sees them: NaN in every slot no live
    v_dev: torch.Tensor      # position maps to, so a stray read shows
    tables: torch.Tensor
    ctx_lens: torch.Tensor


def make_case(dtype: str, b: int, h: int, hkv: int, d: int, width_blocks: int,
              ctx_lens: list[int], seed: int = 0, q_scale: float = 1.0) -> Case:
    g = torch.Generator().manual_seed(seed)
    dt = TORCH[dtype]
    n_blocks = b * width_blocks + 3
    k = torch.randn(n_blocks * BS, hkv, d, generator=g).to(dt)
    v = torch.randn(n_blocks * BS, hkv, d, generator=g).to(dt)
    # scattered blocks (never block 0, the scratch block): a random permutation
    perm = torch.randperm(n_blocks - 1, generator=g)[: b * width_blocks] + 1
    tables = perm.view(b, width_blocks).to(torch.int32).clone()
    live = torch.zeros(n_blocks * BS, dtype=torch.bool)
    for row, n in enumerate(ctx_lens):
        n = min(max(n, 0), width_blocks * BS)
        tables[row, -(-n // BS):] = NULL_BLOCK             # unused columns, as the engine
        pos = torch.arange(n)
        live[tables[row, pos // BS].long() * BS + pos % BS] = True
    buf = torch.full((b, 3 * h * d), float("nan")).to(dt)  # q reads stay inside q's part
    buf[:, h * d: 2 * h * d] = (q_scale * torch.randn(b, h * d, generator=g)).to(dt)
    q = buf[:, h * d: 2 * h * d].view(b, h, d)
    nan = torch.tensor(float("nan"), dtype=dt)
    mask = live[:, None, None]
    return Case(q, k, v, torch.where(mask, k, nan), torch.where(mask, v, nan), tables,
                torch.tensor(ctx_lens, dtype=torch.int32))


def run_kernels(lib, case: Case, dtype: str, geometry: tuple[int, int] | None = None,
                out_pad: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H*D] as float32, workspace [B, H, n_splits, D + 2])."""
    b, h, d = case.q.shape
    w = case.tables.shape[1]
    chunk, n_splits = geometry or pa.split_geometry(w * BS, d, dtype, b * h)
    ws = torch.full((b, h, n_splits, d + 2), float("nan"))
    out = torch.full((b, h * d + out_pad), 7.0).to(TORCH[dtype])   # a wider row: out_stride
    scale = pa.LOG2E / math.sqrt(d)
    assert lib.run_partial(h, n_splits, b, pa.THREADS, case.q.data_ptr(), case.q.stride(0),
                           case.k_dev.data_ptr(), case.v_dev.data_ptr(), case.tables.data_ptr(),
                           case.ctx_lens.data_ptr(), ws.data_ptr(), h, case.k.shape[1], w, chunk,
                           scale) == 1, "barrier divergence in paged_attn_partial"
    assert lib.run_merge(h, b, 1, d, ws.data_ptr(), case.ctx_lens.data_ptr(), out.data_ptr(),
                         out.stride(0), h, w, n_splits, chunk) == 1
    assert torch.all(out[:, h * d:].float() == 7.0), "merge wrote past its row"
    return out[:, : h * d].float(), ws


def reference(case: Case) -> torch.Tensor:
    return paged_attention_ref(case.q.float(), case.k.float(), case.v.float(), case.tables,
                               case.ctx_lens, BS)


WIDTH = 9                                       # blocks: 144 positions, 3 chunks of 64
CTX = [WIDTH * BS, 1, 15, 16, 17, 100, 64, 33]  # rows take the first B of these


@needs_gxx
@pytest.mark.parametrize("dtype,d", BUILDS[:5])
@pytest.mark.parametrize("h,hkv", [(8, 2), (4, 4)])
@pytest.mark.parametrize("b", [1, 3, 8])
def test_kernels_match_reference(libs, dtype, d, h, hkv, b):
    case = make_case(dtype, b, h, hkv, d, WIDTH, CTX[:b], seed=b * 100 + d + h)
    got, ws = run_kernels(libs[dtype, d], case, dtype)
    torch.testing.assert_close(got, reference(case), atol=ATOL[dtype], rtol=RTOL[dtype])
    assert not ws.isnan().any()                   # every CTA wrote its partial, even empty ones


@needs_gxx
@pytest.mark.parametrize("dtype,d", [("float16", 64), ("float32", 32), ("bfloat16", 256)])
@pytest.mark.parametrize("tiles", [2, 1.25, 3])  # chunks of several tiles (and a ragged one)
def test_multi_tile_chunks(libs, dtype, d, tiles):
    """Chunks longer than one tile: the online softmax rescales across tiles."""
    chunk = int(tiles * pa.tile_positions(d, dtype))
    case = make_case(dtype, 3, 4, 2, d, WIDTH, [WIDTH * BS, 100, 77], seed=7, q_scale=3.0)
    got, _ = run_kernels(libs[dtype, d], case, dtype, (chunk, -(-WIDTH * BS // chunk)))
    torch.testing.assert_close(got, reference(case), atol=ATOL[dtype], rtol=RTOL[dtype])


@needs_gxx
def test_peaked_scores_stay_finite(libs):
    """Large scores (q x 30): exp2 of (score - running max) must not overflow."""
    case = make_case("float16", 3, 8, 2, 64, WIDTH, [144, 100, 17], seed=3, q_scale=30.0)
    got, _ = run_kernels(libs["float16", 64], case, "float16")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, reference(case), atol=2e-3, rtol=2e-3)


@needs_gxx
def test_empty_chunks_and_edge_lengths(libs):
    """Chunks past ctx_len hold (0, -inf, 0); ctx_len 0 gives zeros; a ctx_len past the
    table's width attends to the whole width."""
    d, h = 32, 4
    case = make_case("float16", 3, h, 2, d, WIDTH, [1, 0, WIDTH * BS], seed=5)
    case.ctx_lens[2] = WIDTH * BS + 40        # clamped to the width
    got, ws = run_kernels(libs["float16", d], case, "float16")
    chunk, n_splits = pa.split_geometry(WIDTH * BS, d, "float16", 3 * h)
    assert n_splits > 1
    assert torch.all(ws[0, :, 1:, d] == float("-inf")) and torch.all(ws[0, :, 1:, d + 1] == 0)
    assert torch.all(ws[0, :, 1:, :d] == 0)
    assert torch.all(ws[1, :, :, d] == float("-inf"))
    assert torch.all(got[1] == 0)
    case.ctx_lens[2] = WIDTH * BS
    want = reference(case)
    torch.testing.assert_close(got[[0, 2]], want[[0, 2]], atol=2e-3, rtol=0)


# The C types of the kernels' parameters as CuPy passes them (Python int -> int64).
SIGNATURES = {"paged_attn_partial": ["i8", "i8", "i8", "i8", "i8", "i8", "i8", "i4", "i4", "i4",
                                     "i4", "f4"],
              "paged_attn_merge": ["i8", "i8", "i8", "i8", "i4", "i4", "i4", "i4"]}


class _FakeKernel:
    """A cupy.RawKernel stand-in that checks each argument's C type (what CuPy would put
    in the parameter buffer) and runs the launch on the g++ build."""

    def __init__(self, fn, signature: list[str]) -> None:
        self.fn, self.signature = fn, signature

    def __call__(self, grid, block, args, stream=None, shared_mem=0) -> None:
        kinds = [np.asarray(a).dtype.str[1:] for a in args]
        assert kinds == self.signature, (kinds, self.signature)
        grid = tuple(grid) + (1,) * (3 - len(grid))    # CuPy takes 1- to 3-D grids
        assert len(block) == 1
        assert self.fn(*grid, *block, *[a.item() if hasattr(a, "item") else a
                                        for a in args]) == 1


class _FakeModule:
    def __init__(self, lib, code: str) -> None:
        self.lib, self.code = lib, code

    def get_function(self, name: str) -> _FakeKernel:
        entry = {"paged_attn_partial": "run_partial", "paged_attn_merge": "run_merge"}[name]
        return _FakeKernel(getattr(self.lib, entry), SIGNATURES[name])


@needs_gxx
@pytest.mark.parametrize("dtype,d,h,hkv", [("float16", 64, 8, 2), ("float32", 32, 4, 4)])
def test_paged_attention_launches_the_kernels_it_compiled(libs, monkeypatch, dtype, d, h, hkv):
    """PagedAttention end to end on the g++ build behind a fake CuPy: its launch grids,
    argument order and C types, workspace strides and output buffer."""
    lib = libs[dtype, d]
    modules = []

    def fake_compiled(code, options, device):
        modules.append(_FakeModule(lib, code))
        return modules[-1]

    monkeypatch.setattr(pa, "compiled", fake_compiled)
    monkeypatch.setattr(pa, "cupy_stream", lambda ptr, device: None)
    monkeypatch.setattr(pa, "current_stream_ptr", lambda device: 0)
    real_zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, device=None, **k: real_zeros(*a, **k))
    attn = pa.PagedAttention(TORCH[dtype], "cuda:0", h, hkv, d, max_batch=8, table_width=WIDTH)
    monkeypatch.setattr(torch, "zeros", real_zeros)
    attn.device = torch.device("cpu")                 # its buffers are on the CPU here
    assert modules[0].code == pa.cuda_source(dtype, d, BS)
    for b, seed in ((3, 1), (1, 2), (8, 3)):          # one object, batch sizes vary
        case = make_case(dtype, b, h, hkv, d, WIDTH, CTX[:b], seed=seed)
        zeros = torch.zeros(b, dtype=torch.long)
        batch = PagedBatch(zeros, zeros, case.tables, case.ctx_lens)
        got = attn(case.q, case.k_dev, case.v_dev, batch, BS)
        assert attn.fallbacks == 0 and got.data_ptr() == attn.out.data_ptr()
        assert got.shape == (b, h * d) and got.dtype == TORCH[dtype]
        torch.testing.assert_close(got.float(), reference(case), atol=ATOL[dtype],
                                   rtol=RTOL[dtype])
    narrow = make_case(dtype, 2, h, hkv, d, 3, [40, 2], seed=4)   # a narrower table
    zeros = torch.zeros(2, dtype=torch.long)
    got = attn(narrow.q, narrow.k_dev, narrow.v_dev,
               PagedBatch(zeros, zeros, narrow.tables, narrow.ctx_lens), BS)
    torch.testing.assert_close(got.float(), reference(narrow), atol=ATOL[dtype],
                               rtol=RTOL[dtype])
    assert attn.fallbacks == 0
    wide = make_case(dtype, 2, h, hkv, d, WIDTH + 1, [40, 2], seed=5)   # too wide: torch
    got = attn(wide.q, wide.k, wide.v, PagedBatch(zeros, zeros, wide.tables, wide.ctx_lens), BS)
    assert attn.fallbacks == 1
    torch.testing.assert_close(got.float(), reference(wide), atol=ATOL[dtype],
                               rtol=RTOL[dtype])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("d", pa.HEAD_DIMS)
def test_tile_geometry(dtype, d):
    if not pa.supported(dtype, d):
        with pytest.raises(ValueError):
            pa.tile_geometry(d, dtype)
        return
    vec, nv, pp, ppt = pa.tile_geometry(d, dtype)
    assert vec * nv == d and 32 % nv == 0 and nv * pp == pa.THREADS
    assert 1 <= ppt <= pa.MAX_PPT and pp * ppt == pa.tile_positions(d, dtype)


@pytest.mark.parametrize("width", [16, 144, 1040, 4128, 32784])
@pytest.mark.parametrize("row_heads", [1, 12, 32, 256, 2048, 16384])
@pytest.mark.parametrize("d", [64, 128])
def test_split_geometry_covers_the_width(width, row_heads, d):
    chunk, n = pa.split_geometry(width, d, "float16", row_heads)
    tile = pa.tile_positions(d, "float16")
    assert chunk % tile == 0
    assert chunk * n >= width > chunk * (n - 1)
    assert row_heads * n <= max(pa.CTA_BUDGET, row_heads)   # empty CTAs stay bounded
    if row_heads * -(-width // tile) <= pa.CTA_BUDGET:
        assert chunk == tile                                # small launches: one tile each


@pytest.mark.parametrize("h,d,max_batch,width", [(16, 64, 64, 1040), (32, 128, 7, 4128),
                                                 (4, 32, 300, 144)])
def test_workspace_fits_every_call(h, d, max_batch, width):
    floats = pa.workspace_floats(h, d, max_batch, width)
    for b in range(1, max_batch + 1):
        for w in range(BS, width + 1, BS):                  # narrower tables too
            _, n = pa.split_geometry(w, d, "float16", b * h)
            assert b * h * n * (d + 2) <= floats, (b, w)


def test_source_refuses_unsupported_shapes():
    with pytest.raises(ValueError):
        pa.cuda_source("float16", 80)
    with pytest.raises(ValueError):
        pa.cuda_source("float32", 256)
    with pytest.raises(ValueError):
        pa.cuda_source("int8", 64)


def test_factory_declines_where_the_kernel_cannot_run(monkeypatch):
    cfg = preset("gpt2-medium")
    assert pa.paged_attention_for(cfg, torch.float16, "cpu", 8, 65) is None
    odd = dataclasses.replace(preset("tiny-llama"), d_model=320)            # head_dim 80
    assert pa.paged_attention_for(odd, torch.float16, "cuda", 8, 17) is None
    assert pa.paged_attention_for(cfg, torch.int8, "cuda", 8, 65) is None
    monkeypatch.setattr("kernels.reshape.cupy_available", lambda: False)
    assert pa.paged_attention_for(cfg, torch.float16, "cuda", 8, 65) is None
    monkeypatch.setenv("HYBRID_PAGED_KERNEL", "0")
    assert pa.paged_attention_for(cfg, torch.float16, "cuda", 8, 65) is None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("dtype,d", [("float16", 32), ("float16", 128), ("bfloat16", 256),
                                     ("float32", 128)])
def test_source_compiles_for_the_gpu(tmp_path, dtype, d):
    """The exact source the GPU compiles (NVRTC there; nvcc here): the smallest and the
    largest tile shapes of each element size."""
    src, ptx = tmp_path / "k.cu", tmp_path / "k.ptx"
    src.write_text(pa.cuda_source(dtype, d))
    out = subprocess.run(["nvcc", "-arch=sm_90", "--use_fast_math", "-ptx", "-o", str(ptx),
                          str(src)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert all(f".entry {name}(" in ptx.read_text() for name in pa.KERNELS)
