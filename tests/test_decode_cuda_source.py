"""The fused decode kernels' source and launch geometry, checked without a GPU: the CUDA
source compiles (nvcc, when the machine has it), every grid covers its rows and
positions, and the fused path stays off where it cannot run. tests/cuda/test_fused_decode.py
checks the kernels' results on a GPU."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from kernels import decode_cuda as dc


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_source_compiles(tmp_path, dtype):
    src = tmp_path / "k.cu"
    src.write_text(dc.cuda_source(dtype))
    out = subprocess.run(["nvcc", "-arch=sm_90", "--use_fast_math", "-ptx", "-o",
                          str(tmp_path / "k.ptx"), str(src)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    ptx = (tmp_path / "k.ptx").read_text()
    for name in dc.KERNELS:
        assert f".entry {name}(" in ptx


def test_unknown_dtype_refused():
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        dc.cuda_source("float32")


@pytest.mark.parametrize("n", [1, 7, 8, 1024, 3072, 4096, 50257])
def test_gemv_grid_covers_every_row_once(n):
    grid, rpw = dc.gemv_grid(n)
    per_cta = dc.WARPS * rpw
    assert grid * per_cta >= n > (grid - 1) * per_cta
    assert grid <= 1024 or rpw == 1


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("length", [1, 31, 64, 1000, 1024, 4096])
def test_attention_chunks_cover_the_cache(head_dim, length):
    chunk, splits = dc.attn_split(length, head_dim)
    assert chunk == dc.THREADS // (head_dim // 8)      # one position per D/8 threads
    assert chunk * splits >= length > chunk * (splits - 1)


def test_fused_step_off_on_cpu_and_when_disabled(tmp_path, monkeypatch):
    from engine.fused_decode import fused_step_for
    from engine.loader import load_model
    from tests.helpers import make_tiny_gpt2

    lm = load_model(str(make_tiny_gpt2(tmp_path)), device="cpu", dtype="float32")
    assert fused_step_for(lm.model) is None
    monkeypatch.setenv("HYBRID_FUSED_DECODE", "0")
    assert fused_step_for(lm.model) is None
