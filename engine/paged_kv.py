"""Paged KV memory for decode: one pool of fixed-size blocks shared by every sequence.

Layout (per layer, K and V alike): `[n_slots, n_kv_heads, head_dim]` with
`n_slots = n_blocks * block_size`; token position p of a sequence lives in slot
`table[p // block_size] * block_size + p % block_size`, where `table` is that
sequence's block table. A token's K (or V) for one layer is one contiguous row of
n_kv_heads * head_dim elements, so the decode step writes all new tokens with one
`index_copy_` and attention reads whole head vectors.

Block 0 is never lent: it is the scratch block that padded rows of a CUDA-graph bucket
write to and read from, so a padded row can never touch a live sequence's KV.

`PagedBatch` is the per-step metadata a decode step reads (static device buffers when
the step is captured in a CUDA graph). `decode_attention` in engine/attention.py sends
paged caches here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.config import ModelConfig

BLOCK_SIZE = 16
NULL_BLOCK = 0


def blocks_for(n_tokens: int, block_size: int = BLOCK_SIZE) -> int:
    return -(-n_tokens // block_size)


def table_width(config: ModelConfig, block_size: int = BLOCK_SIZE) -> int:
    """Block-table columns: every position a sequence can reach (max_positions tokens)
    plus the one-token lookahead a self-advancing step may write past its last token."""
    return blocks_for(config.max_positions + 1, block_size)


@dataclass(frozen=True)
class PagedBatch:
    """Per-step decode metadata for B rows. All on the cache's device.

    positions [B] int64  where each row's new token goes
    slots     [B] int64  the pool slot of that position (block table lookup)
    tables    [B, W] int32 block tables (unused columns = NULL_BLOCK)
    ctx_lens  [B] int32  tokens each row attends to, this one included (= position + 1)
    """

    positions: torch.Tensor
    slots: torch.Tensor
    tables: torch.Tensor
    ctx_lens: torch.Tensor
    paged: bool = True  # tells engine.attention.decode_attention which path to take


class PagedKVCache:
    """`.k`, `.v`: [n_layers, n_slots, n_kv_heads, head_dim]; slot s of block b is
    b * block_size + (s % block_size)."""

    def __init__(self, config: ModelConfig, n_blocks: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, block_size: int = BLOCK_SIZE) -> None:
        if n_blocks < 2:
            raise ValueError(f"a paged cache needs >= 2 blocks (block 0 is scratch), got {n_blocks}")
        self.config, self.n_blocks, self.block_size = config, n_blocks, block_size
        shape = (config.n_layers, n_blocks * block_size, config.n_kv_heads, config.head_dim)
        # zeros, not empty: padded rows read the scratch block, which must be finite
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.attention_kernel = None  # set by the model runner: kernels.paged_attn_cuda

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def slots_of(self, blocks: list[int], start: int, n: int) -> torch.Tensor:
        """Pool slots of positions [start, start + n) of a sequence with these blocks."""
        pos = torch.arange(start, start + n)
        table = torch.tensor(blocks, dtype=torch.long)
        return (table[pos // self.block_size] * self.block_size + pos % self.block_size).to(
            self.device)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [n_kv_heads, T, head_dim] (any device/dtype) into `slots` [T]."""
        self.k[layer].index_copy_(0, slots, k.transpose(0, 1).to(self.k.device, self.k.dtype))
        self.v[layer].index_copy_(0, slots, v.transpose(0, 1).to(self.v.device, self.v.dtype))

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of `slots` as [n_kv_heads, T, head_dim] (tests, debugging)."""
        return self.k[layer, slots].transpose(0, 1), self.v[layer, slots].transpose(0, 1)

    def attend(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
               batch: PagedBatch, layer: int) -> torch.Tensor:
        """One token per row: q [B, H, D], k_new/v_new [B, Hkv, D]. Writes the new K/V at
        `batch.slots`, then attends over each row's first ctx_lens positions through its
        block table. Returns [B, H * D]."""
        kl, vl = self.k[layer], self.v[layer]
        kl.index_copy_(0, batch.slots, k_new.to(kl.dtype))
        vl.index_copy_(0, batch.slots, v_new.to(vl.dtype))
        if self.attention_kernel is not None:
            return self.attention_kernel(q, kl, vl, batch, self.block_size)
        return paged_attention_ref(q, kl, vl, batch.tables, batch.ctx_lens, self.block_size)


def paged_attention_ref(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                        tables: torch.Tensor, ctx_lens: torch.Tensor,
                        block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """Reference paged decode attention in torch ops (CPU, and CUDA without CuPy).

    q [B, H, D]; k_pool/v_pool [n_slots, Hkv, D]; tables [B, W] int; ctx_lens [B] int.
    Gathers each row's whole table width (static shapes: capturable in a CUDA graph) and
    masks positions >= ctx_len. Returns [B, H * D] in q's dtype."""
    b, h, d = q.shape
    hkv = k_pool.shape[1]
    width = tables.shape[1] * block_size
    offs = torch.arange(block_size, device=q.device)
    slots = (tables.long()[:, :, None] * block_size + offs).reshape(b, width)  # [B, L]
    k = k_pool[slots].permute(0, 2, 1, 3).to(q.dtype)  # [B, Hkv, L, D]
    v = v_pool[slots].permute(0, 2, 1, 3).to(q.dtype)
    visible = (torch.arange(width, device=q.device)[None, :] < ctx_lens.long()[:, None])
    qg = q.view(b, hkv, h // hkv, d)  # GQA: the G query heads of a KV head as query length
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=visible[:, None, None, :])
    return out.reshape(b, h * d)
