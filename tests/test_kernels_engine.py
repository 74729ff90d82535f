"""kernels/ with the real engine: prefill's on_layer hook ships each layer through the
LayerShipper into a slot buffer; the decode side's ingest into the 32 channels gives
back exactly the engine's KV cache; pack_weights reads the engine's own parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.kv_cache import KVCache
from engine.loader import load_model
from kernels import hbm_io
from kernels.comm import LayerShipper
from kernels.dense import unpack_dense
from kernels.hbm_layout import KvAllocator
from kernels.weights_image import pack_weights


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def lm(request):
    return load_model(f"synthetic:{request.param}")


def _prefill_shipping(lm, kind: str, dtype: str, n_tokens: int = 45):
    cfg = lm.config
    shipper = LayerShipper.for_model(cfg, kind, dtype)
    per = shipper.layer_bytes(n_tokens)
    slot = torch.zeros(cfg.n_layers * per, dtype=torch.uint8)
    seen: list[int] = []

    def on_layer(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        handle = shipper.ship(layer, k, v, slot[layer * per:(layer + 1) * per])
        handle.wait(timeout_s=5.0)
        seen.append(layer)

    ids = torch.randint(0, cfg.vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(2))
    cache = KVCache(cfg, 1, 64, dtype=torch.float32)
    lm.model.prefill(ids, cache, on_layer=on_layer)
    assert seen == list(range(cfg.n_layers))
    return shipper, slot, per, cache


def test_prefill_to_hbm_channels_and_back(lm) -> None:
    n_tokens = 45
    shipper, slot, per, cache = _prefill_shipping(lm, "hbm", "float32", n_tokens)
    layout = shipper.layout
    area = KvAllocator(layout).alloc(n_tokens + 20)
    channels = [np.zeros(area.offset + area.nbytes, np.uint8) for _ in range(32)]
    for layer in range(lm.config.n_layers):
        hbm_io.ingest_layer(channels, layout, area, layer,
                            slot[layer * per:(layer + 1) * per].numpy(), n_tokens)
    for layer in range(lm.config.n_layers):
        k, v = hbm_io.read_layer(channels, layout, area, layer, n_tokens)
        assert np.array_equal(k, cache.k[layer, 0, :, :n_tokens].numpy())
        assert np.array_equal(v, cache.v[layer, 0, :, :n_tokens].numpy())


def test_prefill_dense_fp16_slot(lm) -> None:
    n_tokens = 45
    shipper, slot, per, cache = _prefill_shipping(lm, "dense", "float16", n_tokens)
    for layer in range(lm.config.n_layers):
        k, v = unpack_dense(slot[layer * per:(layer + 1) * per], shipper.layout, n_tokens)
        assert torch.equal(k, cache.k[layer, 0, :, :n_tokens].half())
        assert torch.equal(v, cache.v[layer, 0, :, :n_tokens].half())


def test_pack_weights_reads_engine_parameters(lm) -> None:
    from kernels.hbm_layout import HbmLayout

    cfg, sd = lm.config, lm.model.state_dict()
    img = pack_weights(cfg, sd, HbmLayout.for_model(cfg, "float32"))
    if cfg.family == "gpt2":
        d = cfg.d_model
        pairs = {"tok_emb": sd["wte.weight"], "layers.1.attn.v.weight": sd["h.1.attn.c_attn.weight"][2 * d:],
                 "layers.0.mlp.down.weight": sd["h.0.mlp.c_proj.weight"],
                 "layers.0.attn.o.weight": sd["h.0.attn.c_proj.weight"]}
    else:
        pairs = {"tok_emb": sd["embed_tokens.weight"], "lm_head.weight": sd["lm_head.weight"],
                 "layers.1.attn.k.weight": sd["layers.1.self_attn.k_proj.weight"],
                 "layers.0.mlp_norm.weight": sd["layers.0.post_attention_layernorm.weight"]}
    for name, want in pairs.items():
        assert np.array_equal(img.tensor(name), want.numpy()), name


def test_through_the_shared_region(lm) -> None:
    """The prefill side ships into KvRegion.layer_view; the decode side reads the slot
    with KvReader and ingests it into HBM channels."""
    from transport.reader import KvReader
    from transport.region import KvRegion

    cfg, n_tokens = lm.config, 40
    shipper = LayerShipper.for_model(cfg, "hbm", "float16")
    per = shipper.layer_bytes(n_tokens)
    region = KvRegion.create(4 << 20, 2, cfg.n_layers, lease_s=30.0, cuda_register=False)
    try:
        desc = region.alloc(per * cfg.n_layers, cfg.n_layers, layout="hbm", dtype="float16",
                            n_tokens=n_tokens, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim)
        cache = KVCache(cfg, 1, 64)

        def on_layer(layer, k, v):
            shipper.ship(layer, k, v, region.layer_view(desc, layer)).wait(timeout_s=5.0)
            region.mark_ready(desc, layer)

        ids = torch.arange(n_tokens) % cfg.vocab_size
        lm.model.prefill(ids, cache, on_layer=on_layer)
        reader = KvReader.attach(region)
        layout = shipper.layout
        area = KvAllocator(layout).alloc(n_tokens)
        channels = [np.zeros(area.offset + area.nbytes, np.uint8) for _ in range(32)]
        for layer in range(cfg.n_layers):
            data = reader.read_layer(desc, layer, timeout_s=5.0)
            hbm_io.ingest_layer(channels, layout, area, layer, data, n_tokens)
            k, _ = hbm_io.read_layer(channels, layout, area, layer, n_tokens)
            assert np.array_equal(k, cache.k[layer, 0, :, :n_tokens].half().numpy())
        region.free(desc)
    finally:
        region.close()
