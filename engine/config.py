"""Model configuration: one frozen dataclass for the GPT-2 and Llama families.

Presets give real shapes (weights may be synthetic); `from_hf` reads a Hugging Face
config.json. Everything downstream (KV cache, HBM layout, services) is sized from this.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

Family = Literal["gpt2", "llama"]


@dataclass(frozen=True)
class ModelConfig:
    name: str
    family: Family
    vocab_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_ff: int
    max_positions: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} not divisible by n_kv_heads {self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_dim(self) -> int:
        """Width of one token's K (or V) in one layer: n_kv_heads * head_dim."""
        return self.n_kv_heads * self.head_dim

    def kv_bytes_per_token(self, elem_bytes: int = 2) -> int:
        """Bytes of K and V of one token over all layers."""
        return 2 * self.n_layers * self.kv_dim * elem_bytes

    def with_name(self, name: str) -> ModelConfig:
        return replace(self, name=name)

    @classmethod
    def from_hf(cls, path: str | Path, name: str | None = None) -> ModelConfig:
        """Build from a Hugging Face config.json (file or the directory holding it)."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        cfg = json.loads(p.read_text())
        name = name or str(p.parent)
        model_type = cfg.get("model_type", "")
        if model_type == "gpt2":
            return _gpt2_from_hf(cfg, name)
        if model_type in ("llama", "mistral"):
            return _llama_from_hf(cfg, name)
        raise ValueError(f"unsupported model_type {model_type!r} in {p} (supported: gpt2, llama)")


def _eos(cfg: dict) -> int | None:
    eos = cfg.get("eos_token_id")
    if isinstance(eos, list):  # some configs list several; the first is the canonical one
        eos = eos[0] if eos else None
    return eos


def _gpt2_from_hf(cfg: dict, name: str) -> ModelConfig:
    d = cfg["n_embd"]
    return ModelConfig(
        name=name,
        family="gpt2",
        vocab_size=cfg["vocab_size"],
        n_layers=cfg["n_layer"],
        n_heads=cfg["n_head"],
        n_kv_heads=cfg["n_head"],
        d_model=d,
        d_ff=cfg.get("n_inner") or 4 * d,
        max_positions=cfg["n_positions"],
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=True,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=_eos(cfg),
    )


def _llama_from_hf(cfg: dict, name: str) -> ModelConfig:
    n_heads = cfg["num_attention_heads"]
    d = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or d // n_heads
    if head_dim * n_heads != d:
        raise ValueError(f"head_dim {head_dim} * n_heads {n_heads} != hidden_size {d}: unsupported")
    if cfg.get("rope_scaling"):
        raise ValueError("rope_scaling is not supported")
    return ModelConfig(
        name=name,
        family="llama",
        vocab_size=cfg["vocab_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        d_model=d,
        d_ff=cfg["intermediate_size"],
        max_positions=cfg.get("max_position_embeddings", 2048),
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=_eos(cfg),
    )


def _gpt2(name: str, n_layers: int, d: int, heads: int, vocab: int = 50257, pos: int = 1024):
    return ModelConfig(
        name=name, family="gpt2", vocab_size=vocab, n_layers=n_layers, n_heads=heads,
        n_kv_heads=heads, d_model=d, d_ff=4 * d, max_positions=pos, norm_eps=1e-5,
        tie_embeddings=True, bos_token_id=50256 if vocab == 50257 else None,
        eos_token_id=50256 if vocab == 50257 else None,
    )


PRESETS: dict[str, ModelConfig] = {
    "gpt2": _gpt2("gpt2", 12, 768, 12),
    "gpt2-medium": _gpt2("gpt2-medium", 24, 1024, 16),  # the source document's model
    "gpt2-large": _gpt2("gpt2-large", 36, 1280, 20),
    "gpt2-xl": _gpt2("gpt2-xl", 48, 1600, 25),
    "llama-7b": ModelConfig(
        name="llama-7b", family="llama", vocab_size=32000, n_layers=32, n_heads=32,
        n_kv_heads=32, d_model=4096, d_ff=11008, max_positions=4096, norm_eps=1e-5,
        rope_theta=10000.0, tie_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
    # Tiny shapes for tests and the CPU demo. Vocab 320 >= 256 bytes + specials, so the
    # byte-level tokenizer of synthetic models covers it.
    "tiny-gpt2": _gpt2("tiny-gpt2", 2, 64, 4, vocab=320, pos=256),
    "tiny-llama": ModelConfig(
        name="tiny-llama", family="llama", vocab_size=320, n_layers=2, n_heads=4,
        n_kv_heads=2, d_model=64, d_ff=176, max_positions=256, norm_eps=1e-6,
        tie_embeddings=False, bos_token_id=None, eos_token_id=None,
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
