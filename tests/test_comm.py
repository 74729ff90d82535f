"""LayerShipper and BatchShipper on the CPU and the dense layout: bytes land in the slot
views, handles are done, bad destinations are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import preset
from engine.errors import InvalidArgument
from kernels import reshape_ref
from kernels.comm import BatchShipper, Done, LayerShipper, ShipTarget, kv_pair_view, make_layout
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


# ---- BatchShipper: one layer of every prompt of a packed batch per call ---------------
def _packed_kv(cfg, lens, seed, fused=True):
    """Per prompt (k, v) [Hkv, T_i, D] as the packed forwards hand them to on_layer:
    GPT-2 slices one fused qkv output (k, v share a storage), Llama has separate k, v."""
    g = torch.Generator().manual_seed(seed)
    n, h, d = sum(lens), cfg.n_kv_heads, cfg.head_dim
    if fused:
        qkv = torch.randn(1, n, 3 * h * d, generator=g)
        _, k, v = (z.view(1, n, h, d).transpose(1, 2) for z in qkv.split(h * d, dim=-1))
    else:
        k = torch.randn(1, n, h, d, generator=g).transpose(1, 2)
        v = torch.randn(1, h, n, d, generator=g)
    out, s = [], 0
    for t in lens:
        out.append((k[0, :, s:s + t], v[0, :, s:s + t]))
        s += t
    return out


def _want(layout, k, v):
    if isinstance(layout, DenseLayout):
        return pack_dense(k, v, layout).numpy()
    return reshape_ref.pack_layer(k.numpy(), v.numpy(), layout)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("whole_slot", [True, False])
def test_batch_ship_lands_every_prompt_in_its_slot(fused: bool, whole_slot: bool) -> None:
    cfg, lens = preset("tiny-gpt2"), [8, 1, 37]
    kinds = [("dense", "float16"), ("hbm", "float16"), ("dense", "float32")]
    layouts = [make_layout(kind, cfg, dt) for kind, dt in kinds]
    slots, targets, pos = [], [], 64
    arena = torch.zeros(1 << 20, dtype=torch.uint8)
    for lay, t in zip(layouts, lens, strict=True):
        per = lay.layer_bytes(t)
        slot = arena[pos:pos + cfg.n_layers * per]
        pos += cfg.n_layers * per + 64
        views = [slot[i * per:(i + 1) * per] for i in range(cfg.n_layers)]
        target = (ShipTarget.from_slot(lay, t, slot, cfg.n_layers) if whole_slot
                  else ShipTarget(lay, t, views))
        assert target.n_layers == cfg.n_layers and (target.typed is not None) == (lay is not layouts[1])
        slots.append(views)
        targets.append(target)
    shipper = BatchShipper()
    layers = [_packed_kv(cfg, lens, seed, fused) for seed in range(cfg.n_layers)]
    for layer, kvs in enumerate(layers):
        if fused:
            pair = kv_pair_view(*kvs[0])
            assert pair is not None and torch.equal(pair[0], kvs[0][0]) and torch.equal(pair[1], kvs[0][1])
        else:
            assert kv_pair_view(*kvs[0]) is None
        handle = shipper.ship(layer, [(tg, k, v) for tg, (k, v) in zip(targets, kvs, strict=True)])
        assert isinstance(handle, Done) and handle.query() and handle.elapsed_ms() >= 0
    for i, lay in enumerate(layouts):
        for layer, kvs in enumerate(layers):
            assert np.array_equal(slots[i][layer].numpy(), _want(lay, *kvs[i]))
    assert arena[:64].eq(0).all()
    shipper.close()


def test_batch_ship_odd_slot_offset_goes_through_a_copy() -> None:
    cfg = preset("tiny-gpt2")
    shipper = BatchShipper()
    for kind in ("dense", "hbm"):
        lay = make_layout(kind, cfg, "float32")
        per = lay.layer_bytes(5)
        arena = torch.zeros(cfg.n_layers * per + 1, dtype=torch.uint8)
        target = ShipTarget.from_slot(lay, 5, arena[1:], cfg.n_layers)
        assert target.typed is None and not target.aligned
        (k, v), = _packed_kv(cfg, [5], 3)
        shipper.ship(1, [(target, k, v)])
        assert np.array_equal(arena[1 + per:].numpy(), _want(lay, k, v))


def test_batch_ship_refuses_what_does_not_fit() -> None:
    cfg = preset("tiny-gpt2")
    lay = make_layout("dense", cfg, "float32")
    per = lay.layer_bytes(5)
    slot = torch.zeros(cfg.n_layers * per, dtype=torch.uint8)
    target = ShipTarget.from_slot(lay, 5, slot, cfg.n_layers)
    (k, v), = _packed_kv(cfg, [1], 0)  # one token: a typed copy would broadcast it
    with pytest.raises(InvalidArgument, match="k, v must be"):
        BatchShipper().ship(0, [(target, k, v)])
    (k, v), = _packed_kv(cfg, [5], 0)
    with pytest.raises(InvalidArgument, match="out of range"):
        BatchShipper().ship(cfg.n_layers, [(target, k, v)])
    assert slot.eq(0).all()
    with pytest.raises(InvalidArgument, match="1-D uint8 tensor"):
        ShipTarget(lay, 5, [torch.zeros(per + 1, dtype=torch.uint8)])
    with pytest.raises(InvalidArgument, match="slot must be"):
        ShipTarget.from_slot(lay, 5, slot[1:], cfg.n_layers)
