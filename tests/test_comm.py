"""LayerShipper on the CPU and the dense layout: bytes land in the slot view, handles
are done, bad destinations are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import preset
from engine.errors import InvalidArgument
from kernels import reshape_ref
from kernels.comm import Done, LayerShipper, make_layout
from kernels.dense import DenseLayout, pack_dense, unpack_dense
from kernels.hbm_layout import HbmLayout


def _layer(cfg, n_tokens, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.n_kv_heads, n_tokens, cfg.head_dim)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("kind", ["hbm", "dense"])
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_ship_all_layers_into_a_slot(kind: str, name: str) -> None:
    cfg, n_tokens = preset(name), 37
    shipper = LayerShipper.for_model(cfg, kind, "float16")
    per_layer = shipper.layer_bytes(n_tokens)
    slot = torch.zeros(64 + cfg.n_layers * per_layer, dtype=torch.uint8)   # a header first
    layers = [_layer(cfg, n_tokens, seed) for seed in range(cfg.n_layers)]
    for i, (k, v) in enumerate(layers):
        dest = slot[64 + i * per_layer:64 + (i + 1) * per_layer]
        handle = shipper.ship(i, k, v, dest)
        assert isinstance(handle, Done) and handle.query()
        handle.wait(timeout_s=1.0)
        assert handle.elapsed_ms() >= 0.0
    assert slot[:64].eq(0).all()
    for i, (k, v) in enumerate(layers):
        data = slot[64 + i * per_layer:64 + (i + 1) * per_layer].numpy()
        if kind == "hbm":
            want = reshape_ref.pack_layer(k.numpy(), v.numpy(), shipper.layout)
            assert np.array_equal(data, want)
        else:
            k2, v2 = unpack_dense(data, shipper.layout, n_tokens)
            assert torch.equal(k2, k.half()) and torch.equal(v2, v.half())
    shipper.close()


def test_odd_slot_offset_goes_through_a_copy() -> None:
    cfg = preset("tiny-llama")
    shipper = LayerShipper(HbmLayout.for_model(cfg, "float32"))
    k, v = _layer(cfg, 5, 1)
    n = shipper.layer_bytes(5)
    region = torch.zeros(n + 1, dtype=torch.uint8)
    shipper.ship(0, k, v, region[1:])
    assert np.array_equal(region[1:].numpy(), reshape_ref.pack_layer(k.numpy(), v.numpy(), shipper.layout))


def test_dense_layout_dtypes_and_sizes() -> None:
    cfg = preset("tiny-gpt2")
    for dtype, elem in (("float16", 2), ("bfloat16", 2), ("float32", 4)):
        lay = DenseLayout.for_model(cfg, dtype)
        assert lay.layer_bytes(10) == 2 * cfg.n_kv_heads * 10 * cfg.head_dim * elem
        k, v = _layer(cfg, 10, 3)
        buf = pack_dense(k, v, lay)
        k2, v2 = unpack_dense(bytes(buf.numpy()), lay, 10)
        assert torch.equal(k2, k.to(k2.dtype)) and torch.equal(v2, v.to(v2.dtype))
        half = lay.half_bytes(10)
        assert torch.equal(buf[:half].view(k2.dtype).view(k.shape), k.to(k2.dtype))


def test_bad_destinations_and_layouts() -> None:
    cfg = preset("tiny-gpt2")
    shipper = LayerShipper.for_model(cfg, "hbm", "float16")
    k, v = _layer(cfg, 4, 0)
    with pytest.raises(InvalidArgument, match="1-D uint8 tensor of 8192 bytes for 4 tokens"):
        shipper.ship(0, k, v, torch.zeros(100, dtype=torch.uint8))
    with pytest.raises(InvalidArgument, match="uint8"):
        shipper.ship(0, k, v, torch.zeros(8192 // 4, dtype=torch.float32))
    with pytest.raises(InvalidArgument, match="unknown KV layout"):
        make_layout("paged", cfg, "float16")
    with pytest.raises(InvalidArgument, match="dtype"):
        make_layout("dense", cfg, "int8")
    with pytest.raises(InvalidArgument, match="n_kv_heads"):
        pack_dense(k[:1], v[:1], DenseLayout.for_model(cfg))
