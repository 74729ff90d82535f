"""A preallocated KV cache: one tensor for K, one for V, over all layers.

Shapes are fixed at construction so a decode step never allocates and can later be
captured in a CUDA graph. Row b holds sequence b; position p of a row holds the K/V of
the token at position p.
"""

from __future__ import annotations

import torch

from engine.config import ModelConfig


class KVCache:
    """`.k`, `.v`: [n_layers, batch, n_kv_heads, max_len, head_dim]."""

    def __init__(
        self,
        config: ModelConfig,
        batch: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        _kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        if batch < 1 or max_len < 1:
            raise ValueError(f"KVCache needs batch >= 1 and max_len >= 1, got {batch}, {max_len}")
        self.config = config
        if _kv is not None:  # a view over another cache's storage (see rows())
            self.k, self.v = _kv
        else:
            shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.head_dim)
            # zeros, not empty: masked-out slots must hold finite numbers (0 * NaN = NaN)
            self.k = torch.zeros(shape, device=device, dtype=dtype)
            self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def write_layer(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, row: int = 0, start: int = 0
    ) -> None:
        """Store k, v [n_kv_heads, T, head_dim] at positions [start, start+T) of `row`
        (cast to the cache's dtype/device on write)."""
        t = k.shape[1]
        if start < 0 or start + t > self.max_len:
            raise ValueError(f"positions [{start}, {start + t}) outside cache length {self.max_len}")
        self.k[layer, row, :, start : start + t].copy_(k)
        self.v[layer, row, :, start : start + t].copy_(v)

    def rows(self, start: int, n: int = 1) -> KVCache:
        """A cache sharing this one's storage for rows [start, start+n): lets a decode
        loop drive one sequence of a batched cache as its row 0."""
        return KVCache(
            self.config, n, self.max_len,
            _kv=(self.k[:, start : start + n], self.v[:, start : start + n]),
        )

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
