"""The dense slot layout (what a GPU decoder ingests; protos KV_LAYOUT_DENSE).

Per layer: K [n_kv_heads, T, head_dim] then V of the same shape, contiguous, in the slot
dtype (float16, bfloat16 or float32), live tokens only. Conversion is `Tensor.to`
(round to nearest even).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import ModelConfig
from engine.errors import InvalidArgument
from kernels.reshape import TORCH_DTYPES, as_byte_tensor


@dataclass(frozen=True)
class DenseLayout:
    n_layers: int
    n_kv_heads: int
    head_dim: int
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.dtype not in TORCH_DTYPES:
            raise InvalidArgument(
                f"dense layout dtype must be one of {sorted(TORCH_DTYPES)}, got {self.dtype!r}")

    @classmethod
    def for_model(cls, config: ModelConfig, dtype: str = "float16") -> DenseLayout:
        return cls(config.n_layers, config.n_kv_heads, config.head_dim, dtype)

    @property
    def elem_bytes(self) -> int:
        return torch.empty((), dtype=TORCH_DTYPES[self.dtype]).element_size()

    def half_bytes(self, n_tokens: int) -> int:
        return self.n_kv_heads * n_tokens * self.head_dim * self.elem_bytes

    def layer_bytes(self, n_tokens: int) -> int:
        """Size of one layer's K then V for n_tokens live tokens."""
        return 2 * self.half_bytes(n_tokens)


def _check(k: torch.Tensor, v: torch.Tensor, layout: DenseLayout) -> int:
    want = (layout.n_kv_heads, layout.head_dim)
    if k.shape != v.shape or k.dim() != 3 or (k.shape[0], k.shape[2]) != want or k.shape[1] < 1:
        raise InvalidArgument(
            f"expected k, v of shape [n_kv_heads={want[0]}, T>=1, head_dim={want[1]}], got "
            f"{list(k.shape)} and {list(v.shape)}")
    return k.shape[1]


def pack_dense(k: torch.Tensor, v: torch.Tensor, layout: DenseLayout, *,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """k, v [n_kv_heads, T, head_dim] -> uint8[layer_bytes(T)] (K then V) on k's device."""
    n_tokens = _check(k, v, layout)
    nbytes = layout.layer_bytes(n_tokens)
    if out is None:
        out = torch.empty(nbytes, dtype=torch.uint8, device=k.device)
    elif out.dtype != torch.uint8 or out.numel() != nbytes or not out.is_contiguous():
        raise InvalidArgument(f"out must be a contiguous uint8 tensor of {nbytes} bytes")
    typed = out.view(TORCH_DTYPES[layout.dtype]).view(2, *k.shape)
    typed[0].copy_(k)
    typed[1].copy_(v)
    return out


def unpack_dense(buf, layout: DenseLayout, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse: (k, v) views [n_kv_heads, n_tokens, head_dim] in the slot dtype."""
    data = as_byte_tensor(buf)
    if data.numel() != layout.layer_bytes(n_tokens):
        raise InvalidArgument(
            f"dense layer has {data.numel()} bytes, expected {layout.layer_bytes(n_tokens)} "
            f"for {n_tokens} tokens")
    typed = data.view(TORCH_DTYPES[layout.dtype]).view(2, layout.n_kv_heads, n_tokens,
                                                       layout.head_dim)
    return typed[0], typed[1]
