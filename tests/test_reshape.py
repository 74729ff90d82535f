"""KV reshape: NumPy reference == torch path bit for bit; pack/unpack identity; the spec's
address formula; capacity and shape errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import ModelConfig, preset
from engine.errors import InvalidArgument, ResourceExhausted
from kernels import reshape, reshape_ref
from kernels.hbm_layout import HbmLayout, KvArea

TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
         "float64": torch.float64}
TOKENS = [1, 31, 32, 33, 511, 512]


@st.composite
def kv_shapes(draw):
    if draw(st.booleans()):
        # any width: kv_dim % 32 != 0 gives a zero-padded last lane
        head_dim = draw(st.sampled_from([8, 16, 20, 24, 40, 64, 80]))
        return draw(st.integers(1, 40)), head_dim
    head_dim = draw(st.sampled_from([16, 32, 64, 128]))
    # n_kv_heads such that kv_dim is a multiple of 32; up to 96 lanes so some layouts
    # have several lanes per channel and a partly filled last channel
    step = max(1, 32 // head_dim)
    n_kv_heads = step * draw(st.integers(1, max(1, 24 * 64 // (head_dim * step))))
    return n_kv_heads, head_dim


def _kv(n_kv_heads: int, n_tokens: int, head_dim: int, src_dtype: str, scale: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n_kv_heads, n_tokens, head_dim, generator=g, dtype=torch.float64) * scale
    v = torch.randn(n_kv_heads, n_tokens, head_dim, generator=g, dtype=torch.float64) * scale
    return k.to(TORCH[src_dtype]), v.to(TORCH[src_dtype])


def _np(x: torch.Tensor) -> np.ndarray:
    return (x.float() if x.dtype == torch.bfloat16 else x).numpy()   # bf16 -> fp32 is exact


def _expect(x: torch.Tensor, dtype: str) -> torch.Tensor:
    return x.to(TORCH[dtype])


def _gqa_config(n_kv_heads: int, head_dim: int, group: int) -> ModelConfig:
    n_heads = n_kv_heads * group             # group query heads share one KV head
    return ModelConfig("h", "llama", 64, 2, n_heads=n_heads, n_kv_heads=n_kv_heads,
                       d_model=n_heads * head_dim, d_ff=64, max_positions=1024,
                       tie_embeddings=False)


@settings(max_examples=60, deadline=None)
@given(shape=kv_shapes(), group=st.sampled_from([1, 2, 4]),
       n_tokens=st.one_of(st.sampled_from(TOKENS), st.integers(1, 600)),
       src=st.sampled_from(["float32", "float16", "bfloat16"]),
       dst=st.sampled_from(["float16", "float32"]),
       scale=st.sampled_from([1.0, 1e-6, 3e4]), seed=st.integers(0, 2**16))
def test_reference_equals_torch_and_roundtrips(shape, group, n_tokens, src, dst, scale, seed):
    n_kv_heads, head_dim = shape
    layout = HbmLayout.for_model(_gqa_config(n_kv_heads, head_dim, group), dst)
    assert layout.kv_dim == n_kv_heads * head_dim
    k, v = _kv(n_kv_heads, n_tokens, head_dim, src, scale, seed)
    ref = reshape_ref.pack_layer(_np(k), _np(v), layout)
    got = reshape.pack_layer(k, v, layout)
    assert got.dtype == torch.uint8 and got.numel() == layout.layer_bytes(n_tokens)
    assert np.array_equal(ref, got.numpy())
    k2, v2 = reshape.unpack_layer(got, layout, n_tokens)
    assert torch.equal(k2, _expect(k, dst)) and torch.equal(v2, _expect(v, dst))
    k3, v3 = reshape_ref.unpack_layer(ref, layout, n_tokens)
    assert np.array_equal(k3, k2.numpy()) and np.array_equal(v3, v2.numpy())


@pytest.mark.parametrize("name", ["gpt2-medium", "llama-7b", "gpt2-xl", "tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("n_tokens", [1, 33, 512])
def test_presets(name: str, n_tokens: int) -> None:
    cfg = preset(name)
    layout = HbmLayout.kv_only(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
    k, v = _kv(cfg.n_kv_heads, n_tokens, cfg.head_dim, "float32", 1.0, 7)
    got = reshape.pack_layer(k, v, layout).numpy()
    assert np.array_equal(reshape_ref.pack_layer(k.numpy(), v.numpy(), layout), got)
    k2, v2 = reshape.unpack_layer(memoryview(got.tobytes()), layout, n_tokens)
    assert torch.equal(k2, k.half()) and torch.equal(v2, v.half())


def test_gqa_config() -> None:
    cfg = ModelConfig("gqa", "llama", 320, 2, n_heads=8, n_kv_heads=2, d_model=256, d_ff=512,
                      max_positions=256, tie_embeddings=False)
    layout = HbmLayout.for_model(cfg, "float32")
    assert layout.n_lanes == 2 and layout.kv_dim == 64     # 2 kv heads x 32, not 8 heads
    k, v = _kv(2, 70, 32, "float32", 1.0, 3)
    buf = reshape.pack_layer(k, v, layout)
    assert torch.equal(reshape.unpack_layer(buf, layout, 70)[0], k)


def test_max_tokens_fit_and_one_more_overflows() -> None:
    # shrink the channel so "max" is small: 2 layers x 1 lane x 2 KiB x 2 = 8 KiB per block
    layout = HbmLayout("tiny", 2, 2, 16, "float16", 0, channel_bytes=1 << 20)
    assert layout.max_tokens == 4096
    k, v = _kv(2, 4096, 16, "float16", 1.0, 1)
    got = reshape.pack_layer(k, v, layout)
    assert np.array_equal(reshape_ref.pack_layer(k.numpy(), v.numpy(), layout), got.numpy())
    k1, v1 = _kv(2, 4097, 16, "float16", 1.0, 1)
    for pack in (reshape.pack_layer, lambda a, b, lay: reshape_ref.pack_layer(a.numpy(), b.numpy(), lay)):
        with pytest.raises(ResourceExhausted, match="capacity of 4096 tokens per channel"):
            pack(k1, v1, layout)
    with pytest.raises(ResourceExhausted, match="capacity of 100 tokens"):
        reshape.pack_layer(k[:, :101], v[:, :101], layout, capacity_tokens=100)


def test_padding_is_zero_and_chunks_match_spec() -> None:
    layout = HbmLayout.kv_only(1, 4, 16)      # 2 lanes: channels 0 and 1
    k = torch.ones(4, 33, 16)
    buf = reshape.pack_layer(k, k, layout).numpy()
    (o0, n0), (o1, n1) = layout.channel_chunks(33)[:2]
    k_tiles = buf[o0:o0 + n0 // 2].view(np.float16).reshape(2, 1, 32, 32)
    assert (k_tiles[0] == 1).all() and (k_tiles[1, 0, 0] == 1).all() and (k_tiles[1, 0, 1:] == 0).all()
    v_tiles = buf[o0 + n0 // 2:o0 + n0].view(np.float16).reshape(2, 1, 32, 32)
    assert (v_tiles[1, 0, :, 0] == 1).all() and (v_tiles[1, 0, :, 1:] == 0).all()
    assert o1 == n0 and all(n == 0 for _, n in layout.channel_chunks(33)[2:])


@pytest.mark.parametrize("shape", [(16, 64), (32, 128), (25, 64), (2, 16), (3, 16), (25, 40)])
def test_ingest_by_spec_formula(shape) -> None:
    """Write slot chunks to HBM as the decode side does; every element sits where
    HbmLayout.kv_address (the spec's formula) says."""
    n_kv_heads, head_dim = shape
    layout = HbmLayout.kv_only(3, n_kv_heads, head_dim)
    n_tokens, layer = 45, 2
    area = KvArea(layout.kv_base + 4096, 64, layout.kv_area_bytes(64))
    k, v = _kv(n_kv_heads, n_tokens, head_dim, "float32", 1.0, 5)
    buf = reshape.pack_layer(k, v, layout).numpy()
    hbm = [np.zeros(area.offset + area.nbytes, np.uint8) for _ in range(32)]
    for c, (off, n) in enumerate(layout.channel_chunks(n_tokens)):
        ko, vo = layout.k_offset(area, layer), layout.v_offset(area, layer)
        hbm[c][ko:ko + n // 2] = buf[off:off + n // 2]
        hbm[c][vo:vo + n // 2] = buf[off + n // 2:off + n]
    rows = {"k": k.half().permute(1, 0, 2).reshape(n_tokens, -1),
            "v": v.half().permute(1, 0, 2).reshape(n_tokens, -1)}
    rng = np.random.default_rng(0)
    for _ in range(300):
        which, t, e = rng.choice(["k", "v"]), int(rng.integers(n_tokens)), int(rng.integers(layout.kv_dim))
        c, off = layout.kv_address(area, layer, which, t, e)
        assert hbm[c][off:off + 2].view(np.float16)[0] == rows[which][t, e].numpy()


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_pad_lane_elements_are_zero(dtype) -> None:
    """3 KV heads of 20 (kv_dim 60): lane 1 holds elements 32..59 and 4 pad elements,
    zero in every K row and V column whatever was in the output buffer before."""
    layout = HbmLayout.kv_only(1, 3, 20, dtype)
    k, v = torch.ones(3, 40, 20) * 2, torch.ones(3, 40, 20) * 3
    out = torch.full((layout.layer_bytes(40),), 0xFF, dtype=torch.uint8)
    buf = reshape.pack_layer(k, v, layout, out=out).numpy()
    assert np.array_equal(buf, reshape_ref.pack_layer(k.numpy(), v.numpy(), layout))
    (_, n0), (o1, n1) = layout.channel_chunks(40)[:2]
    assert o1 == n0 == n1 and all(n == 0 for _, n in layout.channel_chunks(40)[2:])
    k_tiles = buf[o1:o1 + n1 // 2].view(dtype).reshape(2, 32, 32)      # [block][token][dim]
    v_tiles = buf[o1 + n1 // 2:o1 + n1].view(dtype).reshape(2, 32, 32)  # [block][dim][token]
    assert (k_tiles[0, :, :28] == 2).all() and (k_tiles[:, :, 28:] == 0).all()
    assert (v_tiles[0, :28, :] == 3).all() and (v_tiles[:, 28:, :] == 0).all()
    assert (k_tiles[1, 8:] == 0).all()                                  # tokens 40..63
    k2, v2 = reshape.unpack_layer(buf, layout, 40)
    assert torch.equal(k2, k.to(TORCH[dtype])) and torch.equal(v2, v.to(TORCH[dtype]))


def test_strided_cache_view_and_out_buffer() -> None:
    layout = HbmLayout.kv_only(2, 4, 32, "float32")
    cache = torch.randn(2, 1, 4, 128, 32)          # [layers, batch, heads, max_len, hd]
    k, v = cache[0, 0, :, :50], cache[1, 0, :, :50]
    assert not k.is_contiguous()
    out = torch.full((layout.layer_bytes(50),), 7, dtype=torch.uint8)
    assert reshape.pack_layer(k, v, layout, out=out) is out
    assert np.array_equal(out.numpy(), reshape_ref.pack_layer(k.numpy(), v.numpy(), layout))


def test_bad_input_errors() -> None:
    layout = HbmLayout.kv_only(2, 4, 16)
    k = torch.zeros(4, 8, 16)
    with pytest.raises(InvalidArgument, match="n_kv_heads=4"):
        reshape.pack_layer(k[:3], k[:3], layout)
    with pytest.raises(InvalidArgument, match="must match"):
        reshape.pack_layer(k, k[:, :4], layout)
    with pytest.raises(InvalidArgument, match="float16, bfloat16 or float32"):
        reshape.pack_layer(k.double(), k.double(), layout)
    with pytest.raises(InvalidArgument, match="float16 or float32"):
        reshape_ref.pack_layer(k.double().numpy(), k.double().numpy(), layout)
    with pytest.raises(InvalidArgument, match="at least one token"):
        reshape_ref.pack_layer(k[:, :0].numpy(), k[:, :0].numpy(), layout)
    with pytest.raises(InvalidArgument, match="contiguous uint8 tensor of"):
        reshape.pack_layer(k, k, layout, out=torch.empty(3, dtype=torch.uint8))
    with pytest.raises(InvalidArgument, match="2-byte boundary"):
        reshape.pack_layer(k, k, layout, out=torch.empty(8193, dtype=torch.uint8)[1:])
    with pytest.raises(InvalidArgument, match="expected 8192"):
        reshape.unpack_layer(b"\0" * 10, layout, 8)
    with pytest.raises(InvalidArgument, match="expected 8192"):
        reshape_ref.unpack_layer(b"\0" * 10, layout, 8)
