"""GPT-2 in plain torch, numerically matching Hugging Face's GPT2LMHeadModel.

Learned positions, pre-LayerNorm blocks, GELU (tanh approximation), lm_head tied to the
token embedding. Parameter names follow HF's (without the `transformer.` prefix); HF
stores c_attn/c_proj/c_fc as Conv1D [in, out], the loader transposes them into these
nn.Linear [out, in] weights.
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.attention import DecodeIndex, decode_attention, prefill_attention, store_prefill_kv
from engine.config import ModelConfig
from engine.errors import InvalidArgument
from engine.kv_cache import KVCache

Spans = list[tuple[int, int]]  # [start, end) of each prompt's tokens in a packed batch

# HF Conv1D weights ([in, out]) that the loader must transpose into nn.Linear ([out, in])
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> q, k, v each [B, H, T, D]."""
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).split(self.n_heads * self.head_dim, dim=-1)
        return tuple(z.view(b, t, self.n_heads, self.head_dim).transpose(1, 2) for z in (q, k, v))

    def prefill(self, x, cache: KVCache, layer: int, row: int, on_layer) -> torch.Tensor:
        q, k, v = self._qkv(x)
        store_prefill_kv(cache, layer, k, v, row, on_layer)
        y = prefill_attention(q, k, v, 1)  # [1, H, T, D]
        return self.c_proj(y.transpose(1, 2).reshape(x.shape))

    def prefill_packed(self, x, spans: Spans, layer: int, on_layer) -> torch.Tensor:
        q, k, v = self._qkv(x)  # [1, H, N, D] over all packed prompts
        y = packed_attention(q, k, v, spans, 1, layer, on_layer)
        return self.c_proj(y.transpose(1, 2).reshape(x.shape))

    def decode(self, x, idx: DecodeIndex, cache: KVCache, layer: int) -> torch.Tensor:
        q, k, v = self._qkv(x[:, None, :])  # x [B, d] -> [B, H, 1, D]
        y = decode_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], idx, cache, layer)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.c_proj = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def prefill(self, x, cache, layer, row, on_layer):
        x = x + self.attn.prefill(self.ln_1(x), cache, layer, row, on_layer)
        return x + self.mlp(self.ln_2(x))

    def prefill_packed(self, x, spans: Spans, layer: int, on_layer):
        x = x + self.attn.prefill_packed(self.ln_1(x), spans, layer, on_layer)
        return x + self.mlp(self.ln_2(x))

    def decode(self, x, idx, cache, layer):
        x = x + self.attn.decode(self.ln_1(x), idx, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_positions, cfg.d_model)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.ln_f(x), self.wte.weight).float()  # tied lm_head; fp32 out

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, cache: KVCache, row: int = 0, on_layer=None) -> torch.Tensor:
        """ids LongTensor[T] -> last-position logits [vocab] fp32; fills cache row `row`."""
        pos = torch.arange(ids.shape[0], device=ids.device)
        x = (self.wte(ids) + self.wpe(pos))[None]  # [1, T, d]
        for i, block in enumerate(self.h):
            x = block.prefill(x, cache, i, row, on_layer)
        return self._logits(x[0, -1])

    @torch.no_grad()
    def prefill_packed(self, ids: list[torch.Tensor], on_layer=None) -> torch.Tensor:
        """Several prompts in one forward: ids [LongTensor[T_i]] -> last-position logits
        [n, vocab] fp32. Tokens are packed as [1, N, d] (positions restart at 0 for each
        prompt) so the Linear/MLP/LayerNorm work runs once; attention runs per prompt.
        `on_layer(layer, i, k, v)` gets prompt i's k, v [Hkv, T_i, D]. No KV cache."""
        flat, pos, spans = pack_prompts(ids)
        x = (self.wte(flat) + self.wpe(pos))[None]  # [1, N, d]
        for i, block in enumerate(self.h):
            x = block.prefill_packed(x, spans, i, on_layer)
        return self._last_logits(x, spans)

    def _last_logits(self, x: torch.Tensor, spans: Spans) -> torch.Tensor:
        return last_logits(self._logits, x, spans)

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                    batch=None) -> torch.Tensor:
        """tokens, positions LongTensor[B] -> logits [B, vocab] fp32. With a paged cache
        (engine.paged_kv.PagedKVCache) `batch` is the step's PagedBatch."""
        x = self.wte(tokens) + self.wpe(positions)  # [B, d]
        idx = batch if batch is not None else DecodeIndex.build(positions, cache)
        for i, block in enumerate(self.h):
            x = block.decode(x, idx, cache, i)
        return self._logits(x)


# The two helpers below serve Llama too (engine.llama imports them); their natural home
# is engine/attention.py.
def last_logits(logits_fn, x: torch.Tensor, spans: Spans) -> torch.Tensor:
    """[n, vocab]: logits of each packed prompt's last position. One prompt runs the
    very ops of prefill() (x[0, -1]), so it stays bit-identical."""
    if len(spans) == 1:
        return logits_fn(x[0, -1])[None]
    return logits_fn(x[0, [end - 1 for _, end in spans]])


def pack_prompts(ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, Spans]:
    """[LongTensor[T_i]] -> (tokens [N], positions [N], spans). Positions are built on the
    host and copied once: one transfer instead of a kernel per prompt."""
    if not ids:
        raise InvalidArgument("prefill_packed needs at least one prompt")
    lens = [int(t.shape[0]) for t in ids]
    ends = list(itertools.accumulate(lens))
    spans = [(e - n, e) for e, n in zip(ends, lens, strict=True)]
    if len(ids) == 1:
        return ids[0], torch.arange(lens[0], device=ids[0].device), spans
    pos = torch.cat([torch.arange(n) for n in lens]).to(ids[0].device)
    return torch.cat(ids), pos, spans


MASKED_MAX_TOKENS = 8192  # one masked SDPA up to this many packed tokens (mask: N^2 bools)


@functools.lru_cache(maxsize=4)
def _block_causal(spans: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    """[N, N] bool: token i may attend to token j iff both are in one prompt and j <= i."""
    lens = torch.tensor([e - s for s, e in spans])
    seg = torch.repeat_interleave(torch.arange(len(spans)), lens)
    idx = torch.arange(int(lens.sum()))
    mask = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])
    return mask.to(device)


def packed_attention(q, k, v, spans: Spans, n_rep: int, layer: int, on_layer) -> torch.Tensor:
    """q [1, H, N, D], k, v [1, Hkv, N, D] of packed prompts -> [1, H, N, D], causal within
    each prompt. Every prompt's hook runs before any attention, so the copies of this
    layer's KV start as early as they can. One prompt: plain causal SDPA (bit-identical to
    `prefill`). Several: ONE SDPA with a block-diagonal causal mask: it computes N^2
    scores instead of sum(T_i^2), but a loop of one SDPA per prompt was launch-bound
    (measured on an H200: 32 prompts of 64 tokens, gpt2-medium: 768 attention calls made
    the forward 48 ms)."""
    if on_layer is not None:
        for i, (s, e) in enumerate(spans):
            on_layer(layer, i, k[0, :, s:e], v[0, :, s:e])
    if len(spans) == 1:
        return prefill_attention(q, k, v, n_rep)
    if q.shape[2] <= MASKED_MAX_TOKENS:
        if n_rep > 1:  # GQA: each KV head serves n_rep query heads
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        mask = _block_causal(tuple(spans), q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    outs = [prefill_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], n_rep) for s, e in spans]
    return torch.cat(outs, dim=2)
