"""GPU: the CuPy RawKernels == the NumPy reference bit for bit at gpt2-medium and
llama-7b layer shapes, on a given stream; LayerShipper orders its copy after compute.

Run on a GPU machine: PYTHONPATH=. python -m pytest -q -m cuda tests/cuda
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import preset
from engine.errors import InvalidArgument
from kernels import reshape, reshape_cuda, reshape_ref
from kernels.comm import CudaShipment, LayerShipper
from kernels.hbm_layout import HbmLayout

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
SHAPES = ["gpt2-medium", "llama-7b"]
TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@pytest.fixture(scope="module")
def cupy():
    cp = pytest.importorskip("cupy")
    assert reshape.cupy_available()
    return cp


@pytest.fixture(autouse=True)
def _kernels_really_ran():
    yield
    # reshape.py falls back to the torch path if a CuPy kernel fails: here that is a bug
    assert reshape.cuda_kernel_error() is None, reshape.cuda_kernel_error()


def _layer(name: str, n_tokens: int, src: str, seed: int = 0, max_len: int | None = None):
    """k, v as the engine hands them over: views [H, T, hd] of a [H, max_len, hd] cache."""
    cfg = preset(name)
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (cfg.n_kv_heads, max_len or n_tokens, cfg.head_dim)
    k = torch.randn(shape, generator=g, device="cuda").to(TORCH[src])
    v = torch.randn(shape, generator=g, device="cuda").to(TORCH[src])
    return cfg, k[:, :n_tokens], v[:, :n_tokens]


def _ref(k: torch.Tensor, v: torch.Tensor, layout: HbmLayout) -> np.ndarray:
    def host(x):
        return (x.float() if x.dtype == torch.bfloat16 else x).cpu().numpy()
    return reshape_ref.pack_layer(host(k), host(v), layout)


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("n_tokens", [1, 31, 32, 33, 511, 512, 1024])
@pytest.mark.parametrize("src,dst", [("float16", "float16"), ("float32", "float16"),
                                     ("bfloat16", "float16"), ("float32", "float32")])
def test_cupy_pack_equals_reference(cupy, name, n_tokens, src, dst) -> None:
    cfg, k, v = _layer(name, n_tokens, src, seed=n_tokens, max_len=2048)
    layout = HbmLayout.kv_only(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, dst)
    got = reshape.pack_layer(k, v, layout)
    assert got.is_cuda
    assert np.array_equal(got.cpu().numpy(), _ref(k, v, layout))
    torch_path = reshape.pack_layer(k, v, layout, force_torch=True)
    assert torch.equal(torch_path, got)
    for kernel in ("vec", "fused", "separate"):       # every CuPy kernel, not only "auto"
        assert torch.equal(reshape.pack_layer(k, v, layout, kernel=kernel), got), kernel
    k2, v2 = reshape.unpack_layer(got, layout, n_tokens)
    assert torch.equal(k2, k.to(TORCH[dst])) and torch.equal(v2, v.to(TORCH[dst]))


@pytest.mark.parametrize("shape", [(3, 16), (3, 20), (5, 24), (25, 40), (1, 8)])
@pytest.mark.parametrize("n_tokens", [1, 33, 512])
@pytest.mark.parametrize("dst", ["float16", "float32"])
def test_cupy_pack_pad_lanes(cupy, shape, n_tokens, dst) -> None:
    """kv_dim not a multiple of 32 (docs/hbm-layout.md, "Pad lanes"): every kernel that
    applies writes the pad elements as zero over a dirty buffer and never reads past
    kv_dim (pack_kv_vec only where head_dim is whole 16-byte vectors); unpack skips them."""
    n_kv_heads, head_dim = shape
    layout = HbmLayout.kv_only(2, n_kv_heads, head_dim, dst)
    assert layout.kv_pad
    g = torch.Generator(device="cuda").manual_seed(n_tokens)
    cache = torch.randn((2, n_kv_heads, 600, head_dim), generator=g, device="cuda").to(TORCH[dst])
    k, v = cache[0, :, :n_tokens], cache[1, :, :n_tokens]        # strided cache views
    want = _ref(k, v, layout)
    n = layout.layer_bytes(n_tokens)
    vec = reshape_cuda.vec_ok(layout, (k.stride(0), k.stride(1)), k, v,
                              torch.empty(n, dtype=torch.uint8, device="cuda"))
    assert vec == (head_dim % (16 // layout.elem_bytes) == 0)
    for kernel in ("fused", "separate", *(("vec",) if vec else ())):
        out = torch.full((n,), 0xAB, dtype=torch.uint8, device="cuda")
        reshape.pack_layer(k, v, layout, out=out, kernel=kernel)
        assert np.array_equal(out.cpu().numpy(), want), kernel
    k2, v2 = reshape.unpack_layer(out, layout, n_tokens)
    assert torch.equal(k2, k) and torch.equal(v2, v)


@pytest.mark.parametrize("name", SHAPES)
def test_kernels_run_on_the_given_stream(cupy, name) -> None:
    cfg, k, v = _layer(name, 300, "float16", seed=3)
    layout = HbmLayout.kv_only(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = torch.empty(layout.layer_bytes(300), dtype=torch.uint8, device="cuda")
    torch.cuda._sleep(20_000_000)          # keep the default stream busy: must not matter
    reshape.pack_layer(k, v, layout, out=out, stream=side)
    side.synchronize()
    assert np.array_equal(out.cpu().numpy(), _ref(k, v, layout))


def test_misaligned_operands_fall_back_to_the_element_kernel(cupy) -> None:
    cfg, k, v = _layer("gpt2-medium", 64, "float16", seed=5)
    layout = HbmLayout.kv_only(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
    n = layout.layer_bytes(64)
    buf = torch.empty(n + 16, dtype=torch.uint8, device="cuda")
    out = buf[2:2 + n]                       # 2-byte aligned: fp16 stores fine, uint4 not
    assert not reshape_cuda.vec_ok(layout, (k.stride(0), k.stride(1)), k, v, out)
    reshape.pack_layer(k, v, layout, out=out)
    assert np.array_equal(out.cpu().numpy(), _ref(k, v, layout))
    with pytest.raises(InvalidArgument, match="16-byte"):
        reshape.pack_layer(k, v, layout, out=out, kernel="vec")


def test_streams_alternate(cupy) -> None:
    """The cached CuPy stream handles follow whichever torch stream is passed."""
    cfg, k, v = _layer("gpt2-medium", 96, "float16", seed=6)
    layout = HbmLayout.kv_only(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
    want = _ref(k, v, layout)
    streams = [torch.cuda.Stream() for _ in range(3)]
    outs = []
    for i in range(9):
        s = streams[i % 3]
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            out = torch.empty(layout.layer_bytes(96), dtype=torch.uint8, device="cuda")
        torch.cuda._sleep(1_000_000)
        outs.append((s, reshape.pack_layer(k, v, layout, out=out, stream=s)))
    for s, out in outs:
        s.synchronize()
        assert np.array_equal(out.cpu().numpy(), want)


def test_odd_channel_split_gpt2_xl(cupy) -> None:
    cfg, k, v = _layer("gpt2-xl", 77, "float16", seed=9)      # 50 lanes: L = 2, 25 channels
    layout = HbmLayout.kv_only(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
    assert np.array_equal(reshape.pack_layer(k, v, layout).cpu().numpy(), _ref(k, v, layout))


def test_layer_shipper_converts_bf16_to_fp16(cupy) -> None:
    cfg, k, v = _layer("llama-7b", 100, "bfloat16", seed=4, max_len=256)
    shipper = LayerShipper.for_model(cfg, "hbm", "float16", device="cuda")
    dest = torch.empty(shipper.layer_bytes(100), dtype=torch.uint8).pin_memory()
    shipper.ship(0, k, v, dest).wait(timeout_s=30.0)
    assert np.array_equal(dest.numpy(), _ref(k, v, shipper.layout))


@pytest.mark.parametrize("kind", ["hbm", "dense"])
def test_layer_shipper_overlaps_and_orders_after_compute(cupy, kind) -> None:
    cfg = preset("gpt2-medium")
    n_tokens, n_layers = 512, cfg.n_layers
    shipper = LayerShipper.for_model(cfg, kind, "float16", device="cuda", timing=True)
    per = shipper.layer_bytes(n_tokens)
    slot = torch.zeros(n_layers * per, dtype=torch.uint8).pin_memory()
    src = [_layer("gpt2-medium", n_tokens, "float16", seed=i)[1:] for i in range(n_layers)]
    cache = torch.zeros(n_layers, 2, cfg.n_kv_heads, 1024, cfg.head_dim,
                        dtype=torch.float16, device="cuda")
    handles = []
    for i in range(n_layers):
        # "compute" of layer i on the compute stream (layer 0: long enough to observe
        # that ship() returns while its copy still waits) ...
        torch.cuda._sleep(50_000_000 if i == 0 else 2_000_000)
        cache[i, 0, :, :n_tokens].copy_(src[i][0])     # ... which then writes K and V
        cache[i, 1, :, :n_tokens].copy_(src[i][1])
        k, v = cache[i, 0, :, :n_tokens], cache[i, 1, :, :n_tokens]
        handles.append(shipper.ship(i, k, v, slot[i * per:(i + 1) * per]))
        if i == 0:
            assert not handles[0].query()   # asynchronous: queued behind the compute
    assert all(isinstance(h, CudaShipment) for h in handles)
    for i, h in enumerate(handles):
        h.wait(timeout_s=30.0)
        assert h.query() and h.elapsed_ms() > 0.0
        data = slot[i * per:(i + 1) * per].numpy()
        if kind == "hbm":
            assert np.array_equal(data, _ref(src[i][0], src[i][1], shipper.layout)), i
        else:
            want = torch.cat([src[i][0].reshape(-1), src[i][1].reshape(-1)]).cpu()
            assert np.array_equal(data, want.view(torch.uint8).numpy()), i
    assert shipper.in_flight == 0
    shipper.close()
