"""Attention shared by the model families: causal prefill and static-shape decode.

Prefill uses torch's scaled_dot_product_attention (causal). Decode attends over the
whole preallocated cache length with a mask built from `positions`, so every decode
step has the same shapes whatever the sequence lengths: no `.item()`, no value-dependent
allocation, ready for CUDA-graph capture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.kv_cache import KVCache


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_rep: int
) -> torch.Tensor:
    """q [1, H, T, D], k/v [1, Hkv, T, D] -> [1, H, T, D], causal."""
    if n_rep > 1:  # GQA: each KV head serves n_rep query heads
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def store_prefill_kv(
    cache: KVCache, layer: int, k: torch.Tensor, v: torch.Tensor, row: int, on_layer
) -> None:
    """k, v [1, Hkv, T, D]: write into the cache, then hand them to the per-layer hook
    (the seam the prefill service uses to ship layer l while layer l+1 computes)."""
    cache.write_layer(layer, k[0], v[0], row=row, start=0)
    if on_layer is not None:
        on_layer(layer, k[0], v[0])


@dataclass(frozen=True)
class DecodeIndex:
    """Per-step indices shared by every layer, built once per decode step (not once per
    layer: that saved ~3 kernels per layer in the CUDA graph)."""

    positions: torch.Tensor  # [B] where each row's new token goes
    rows: torch.Tensor  # [B] 0..B-1
    visible: torch.Tensor  # [B, 1, 1, L] cache slots each row may attend to

    @staticmethod
    def build(positions: torch.Tensor, cache: KVCache) -> DecodeIndex:
        slots = torch.arange(cache.max_len, device=positions.device)
        visible = (slots[None, :] <= positions[:, None])[:, None, None, :]
        return DecodeIndex(positions, torch.arange(positions.shape[0], device=positions.device),
                           visible)


def decode_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    idx: DecodeIndex,
    cache: KVCache,
    layer: int,
) -> torch.Tensor:
    """One token per sequence. q [B, H, D], k_new/v_new [B, Hkv, D].

    A paged cache (engine.paged_kv, `idx` a PagedBatch) writes and reads through the
    block tables instead.

    Writes k_new, v_new at `idx.positions` of rows 0..B-1, then attends over the full
    cache length with slots beyond each row's position masked out. Returns [B, H * D]."""
    if getattr(idx, "paged", False):
        return cache.attend(q, k_new, v_new, idx, layer)
    b, h, d = q.shape
    hkv = k_new.shape[1]
    k_cache = cache.k[layer, :b]  # [B, Hkv, L, D]
    v_cache = cache.v[layer, :b]
    k_cache[idx.rows, :, idx.positions] = k_new.to(k_cache.dtype)  # index_put: no host sync
    v_cache[idx.rows, :, idx.positions] = v_new.to(v_cache.dtype)
    # The G query heads sharing a KV head ride as SDPA's "query length": one fused
    # attention kernel per layer (flash/mem-efficient on CUDA) instead of ~6 small ones.
    qg = q.view(b, hkv, h // hkv, d)  # [B, Hkv, G, D]
    out = F.scaled_dot_product_attention(
        qg, k_cache.to(q.dtype), v_cache.to(q.dtype), attn_mask=idx.visible)  # [B, Hkv, G, D]
    return out.reshape(b, h * d)
