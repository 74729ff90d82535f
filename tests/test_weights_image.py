"""pack_weights: Hugging Face state dicts of tiny GPT-2 / Llama models land in the
channels where the table says, oriented [out, in], and come back out unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import ModelConfig, preset
from engine.errors import InvalidArgument
from kernels.hbm_layout import HbmLayout
from kernels.weights_image import pack_weights

transformers = pytest.importorskip("transformers")


def _hf_gpt2(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    hf = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_positions,
                                 n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(hf).state_dict()


def _hf_llama(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    hf = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_positions)
    torch.manual_seed(0)
    sd = transformers.LlamaForCausalLM(hf).state_dict()
    for key in sd:   # HF initialises norms to ones: make them distinguishable
        if "norm" in key:
            sd[key] = torch.randn_like(sd[key])
    return sd


def test_gpt2_image_matches_hf_tensors() -> None:
    cfg = preset("tiny-gpt2")
    sd = _hf_gpt2(cfg)
    layout = HbmLayout.for_model(cfg, "float32")
    img = pack_weights(cfg, sd, layout)
    assert len(img.channels) == 32 and all(ch.size == layout.weights_bytes for ch in img.channels)
    d = cfg.d_model
    c_attn = sd["transformer.h.1.attn.c_attn.weight"]          # Conv1D: [in, 3*out]
    assert np.array_equal(img.tensor("layers.1.attn.k.weight"), c_attn[:, d:2 * d].t().numpy())
    assert np.array_equal(img.tensor("layers.1.attn.v.bias"),
                          sd["transformer.h.1.attn.c_attn.bias"][2 * d:].numpy())
    assert np.array_equal(img.tensor("layers.0.mlp.down.weight"),
                          sd["transformer.h.0.mlp.c_proj.weight"].t().numpy())
    assert np.array_equal(img.tensor("tok_emb"), sd["transformer.wte.weight"].numpy())
    # rows of a split matrix: channel 1 holds rows 32..63 of mlp.up ([256, 64])
    up = sd["transformer.h.0.mlp.c_fc.weight"].t()
    assert np.array_equal(img.channel_view("layers.0.mlp.up.weight", 1), up[32:64].numpy())
    assert img.channel_view("layers.0.attn.q.weight", 2).shape == (0, 64)   # 64 rows: 2 channels
    # vectors are replicated in every channel at the same offset
    ln = sd["transformer.h.0.ln_2.bias"].numpy()
    assert all(np.array_equal(img.channel_view("layers.0.ln2.bias", c), ln) for c in range(32))


def test_gpt2_engine_naming_gives_the_same_image() -> None:
    """engine/gpt2.py keeps HF names without `transformer.` and stores nn.Linear [out, in]."""
    cfg = preset("tiny-gpt2")
    sd = _hf_gpt2(cfg)
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    engine_sd = {k.removeprefix("transformer."): (v.t().contiguous() if k.endswith(conv1d) else v)
                 for k, v in sd.items() if k.startswith("transformer.")}
    layout = HbmLayout.for_model(cfg, "float32")
    a, b = pack_weights(cfg, sd, layout), pack_weights(cfg, engine_sd, layout)
    assert all(np.array_equal(x, y) for x, y in zip(a.channels, b.channels, strict=True))
    assert np.array_equal(b.tensor("layers.0.attn.o.weight"),
                          engine_sd["h.0.attn.c_proj.weight"].numpy())   # square: not transposed


def test_llama_image_fp16_and_byte_placement() -> None:
    cfg = preset("tiny-llama")
    sd = _hf_llama(cfg)
    layout = HbmLayout.for_model(cfg, "float16")
    img = pack_weights(cfg, sd, layout)
    table = layout.weight_table(cfg)
    for name, key in (("layers.1.attn.k.weight", "model.layers.1.self_attn.k_proj.weight"),
                      ("layers.0.mlp.gate.weight", "model.layers.0.mlp.gate_proj.weight"),
                      ("norm.weight", "model.norm.weight"), ("lm_head.weight", "lm_head.weight")):
        assert np.array_equal(img.tensor(name), sd[key].half().numpy()), name
    # raw bytes: row 40 of mlp.up ([176, 64]) is row 8 of channel 1, at the table's offset
    e = table["layers.0.mlp.up.weight"]
    assert e.rows[1] == (32, 64) and e.rows[5] == (160, 176) and e.rows[6] == (176, 176)
    start = e.offset + 8 * 64 * 2
    raw = img.channels[1][start:start + 128].view(np.float16)
    assert np.array_equal(raw, sd["model.layers.0.mlp.up_proj.weight"][40].half().numpy())
    # engine/llama.py: the same names without `model.`
    engine = pack_weights(cfg, {k.removeprefix("model."): v for k, v in sd.items()}, layout)
    assert all(np.array_equal(x, y) for x, y in zip(img.channels, engine.channels, strict=True))


def test_name_mapping_errors_and_overflow() -> None:
    cfg = preset("tiny-llama")
    sd = _hf_llama(cfg)
    layout = HbmLayout.for_model(cfg, "float16")
    # the engine's own names can be mapped in; a logical name present as-is is used directly
    renamed = {"emb": sd.pop("model.embed_tokens.weight")}
    img = pack_weights(cfg, {**sd, **renamed}, layout, names={"tok_emb": "emb"})
    assert np.array_equal(img.tensor("tok_emb"), renamed["emb"].half().numpy())
    with pytest.raises(InvalidArgument, match="no tensor for weight 'tok_emb'"):
        pack_weights(cfg, sd, layout)
    sd["model.embed_tokens.weight"] = renamed["emb"]
    sd["model.norm.weight"] = torch.full((cfg.d_model,), 1e6)
    with pytest.raises(InvalidArgument, match="'norm.weight' overflows float16"):
        pack_weights(cfg, sd, layout)
    sd["model.norm.weight"] = torch.ones(cfg.d_model + 1)
    with pytest.raises(InvalidArgument, match=r"shape \[65\], expected \[64\]"):
        pack_weights(cfg, sd, layout)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_odd_kv_width_images(family) -> None:
    """kv_dim not a multiple of 32 (GPT-2 3 heads of 16: 48; Llama 3 KV heads of 20: 60):
    the image stores the real rows only, and the channel holding rows [32j, 32j+32) of
    attn.k / attn.v is the channel holding KV lane j (its pad elements have no rows)."""
    from dataclasses import replace

    if family == "gpt2":
        cfg = replace(preset("tiny-gpt2"), d_model=48, n_heads=3, n_kv_heads=3, d_ff=192)
        sd, key = _hf_gpt2(cfg), None
    else:
        cfg = replace(preset("tiny-llama"), d_model=120, n_heads=6, n_kv_heads=3, d_ff=176)
        sd, key = _hf_llama(cfg), "model.layers.1.self_attn.v_proj.weight"
    layout = HbmLayout.for_model(cfg, "float32")
    assert layout.kv_pad > 0
    img = pack_weights(cfg, sd, layout)
    table = layout.weight_table(cfg)
    for name in ("layers.1.attn.k.weight", "layers.1.attn.v.weight"):
        e = table[name]
        assert e.shape == (cfg.kv_dim, cfg.d_model)
        for c in range(32):
            first, lanes = layout.lane_range(c)
            assert e.rows[c] == (min(32 * first, cfg.kv_dim), min(32 * (first + lanes), cfg.kv_dim))
    if key:
        assert np.array_equal(img.tensor("layers.1.attn.v.weight"), sd[key].numpy())
    else:
        d = cfg.d_model
        c_attn = sd["transformer.h.1.attn.c_attn.weight"]
        assert np.array_equal(img.tensor("layers.1.attn.v.weight"), c_attn[:, 2 * d:].t().numpy())
