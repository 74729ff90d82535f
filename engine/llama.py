"""Llama in plain torch, numerically matching Hugging Face's LlamaForCausalLM.

RMSNorm (fp32 inside), rotary embeddings in HF's rotate_half convention, SwiGLU MLP,
grouped-query attention (n_kv_heads <= n_heads). Parameter names follow HF's (without
the `model.` prefix), so a checkpoint loads by name.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.attention import DecodeIndex, decode_attention, prefill_attention, store_prefill_kv
from engine.config import ModelConfig
from engine.gpt2 import Spans, last_logits, pack_prompts, packed_attention
from engine.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """positions [...] -> cos, sin [..., head_dim], computed in fp32 as HF does."""
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    freqs = positions.float()[..., None] * inv_freq  # [..., D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # HF rotate_half
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.d_model, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, d, bias=False)

    def _qkv(self, x: torch.Tensor, cos, sin):
        """x [B, T, d] -> q [B, H, T, D], k, v [B, Hkv, T, D] (q, k rotated)."""
        b, t, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(b, t, self.cfg.n_heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.cfg.n_kv_heads, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.cfg.n_kv_heads, hd).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def prefill(self, x, cos, sin, cache: KVCache, layer: int, row: int, on_layer):
        q, k, v = self._qkv(x, cos, sin)
        store_prefill_kv(cache, layer, k, v, row, on_layer)
        y = prefill_attention(q, k, v, self.cfg.n_heads // self.cfg.n_kv_heads)
        return self.o_proj(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))

    def prefill_packed(self, x, cos, sin, spans: Spans, layer: int, on_layer):
        q, k, v = self._qkv(x, cos, sin)  # over all packed prompts; RoPE is per token
        y = packed_attention(q, k, v, spans, self.cfg.n_heads // self.cfg.n_kv_heads,
                             layer, on_layer)
        return self.o_proj(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))

    def decode(self, x, cos, sin, idx: DecodeIndex, cache: KVCache, layer: int):
        q, k, v = self._qkv(x[:, None, :], cos, sin)  # cos/sin [B, 1, 1, D]
        return self.o_proj(decode_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], idx, cache, layer))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def prefill(self, x, cos, sin, cache, layer, row, on_layer):
        x = x + self.self_attn.prefill(self.input_layernorm(x), cos, sin, cache, layer, row, on_layer)
        return x + self.mlp(self.post_attention_layernorm(x))

    def prefill_packed(self, x, cos, sin, spans: Spans, layer: int, on_layer):
        x = x + self.self_attn.prefill_packed(self.input_layernorm(x), cos, sin, spans, layer,
                                              on_layer)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode(self, x, cos, sin, idx, cache, layer):
        x = x + self.self_attn.decode(self.input_layernorm(x), cos, sin, idx, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens.weight if self.config.tie_embeddings else self.lm_head.weight
        return F.linear(self.norm(x), w).float()

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype):
        return rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, dtype)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, cache: KVCache, row: int = 0, on_layer=None) -> torch.Tensor:
        """ids LongTensor[T] -> last-position logits [vocab] fp32; fills cache row `row`."""
        x = self.embed_tokens(ids)[None]  # [1, T, d]
        cos, sin = self._rope(torch.arange(ids.shape[0], device=ids.device), x.dtype)  # [T, D]
        for i, block in enumerate(self.layers):
            x = block.prefill(x, cos, sin, cache, i, row, on_layer)
        return self._logits(x[0, -1])

    @torch.no_grad()
    def prefill_packed(self, ids: list[torch.Tensor], on_layer=None) -> torch.Tensor:
        """Several prompts in one forward: ids [LongTensor[T_i]] -> last-position logits
        [n, vocab] fp32. Tokens are packed as [1, N, d] (positions restart at 0 for each
        prompt) so the projections, norms and MLP run once; attention runs per prompt.
        `on_layer(layer, i, k, v)` gets prompt i's k, v [Hkv, T_i, D]. No KV cache."""
        flat, pos, spans = pack_prompts(ids)
        x = self.embed_tokens(flat)[None]  # [1, N, d]
        cos, sin = self._rope(pos, x.dtype)  # [N, D]
        for i, block in enumerate(self.layers):
            x = block.prefill_packed(x, cos, sin, spans, i, on_layer)
        return last_logits(self._logits, x, spans)

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                    batch=None) -> torch.Tensor:
        """tokens, positions LongTensor[B] -> logits [B, vocab] fp32. With a paged cache
        (engine.paged_kv.PagedKVCache) `batch` is the step's PagedBatch."""
        x = self.embed_tokens(tokens)  # [B, d]
        cos, sin = self._rope(positions, x.dtype)  # [B, D]
        cos, sin = cos[:, None, None, :], sin[:, None, None, :]  # broadcast over heads, T=1
        idx = batch if batch is not None else DecodeIndex.build(positions, cache)
        for i, block in enumerate(self.layers):
            x = block.decode(x, cos, sin, idx, cache, i)
        return self._logits(x)
