"""ModelConfig.from_hf on configs written by transformers' save_pretrained."""

import json

import pytest

from engine.config import PRESETS, ModelConfig, preset
from tests.helpers import make_tiny_gpt2, make_tiny_llama


def test_from_hf_gpt2(tmp_path):
    cfg = ModelConfig.from_hf(make_tiny_gpt2(tmp_path, vocab=300, n_positions=128))
    assert (cfg.family, cfg.vocab_size, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == ("gpt2", 300, 2, 4, 4)
    assert (cfg.d_model, cfg.d_ff, cfg.max_positions, cfg.head_dim) == (64, 256, 128, 16)
    assert cfg.tie_embeddings and cfg.eos_token_id == 299


def test_from_hf_llama_gqa(tmp_path):
    cfg = ModelConfig.from_hf(make_tiny_llama(tmp_path) / "config.json")
    assert (cfg.family, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.kv_dim) == ("llama", 4, 2, 16, 32)
    assert (cfg.d_ff, cfg.norm_eps, cfg.rope_theta, cfg.tie_embeddings) == (192, 1e-6, 10000.0, False)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)


def test_from_hf_rejects_unknown_family(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="unsupported model_type"):
        ModelConfig.from_hf(tmp_path)


def test_presets_shapes():
    assert preset("gpt2-medium").kv_bytes_per_token(2) == 2 * 24 * 1024 * 2
    assert PRESETS["llama-7b"].head_dim == 128
    with pytest.raises(ValueError, match="unknown preset"):
        preset("gpt5")
