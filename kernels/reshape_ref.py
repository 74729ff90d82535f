"""NumPy reference of the KV reshape (docs/hbm-layout.md): readable, tile by tile.

The torch path (kernels/reshape.py) and the CuPy kernels (kernels/reshape_cuda.py) must
produce exactly these bytes. Inputs are NumPy float16/float32 arrays; they are
converted to the layout dtype with `astype` (IEEE round to nearest even). A bf16 torch
tensor converts to float32 exactly first (`t.float().numpy()`).
"""

from __future__ import annotations

import numpy as np

from engine.errors import InvalidArgument, ResourceExhausted
from kernels.hbm_layout import HbmLayout


def check_kv_shape(shape: tuple[int, ...], layout: HbmLayout,
                   capacity_tokens: int | None = None) -> int:
    """Validate one layer's k/v shape [n_kv_heads, T, head_dim]; returns T."""
    if len(shape) != 3 or shape[0] != layout.n_kv_heads or shape[2] != layout.head_dim:
        raise InvalidArgument(
            f"expected k, v of shape [n_kv_heads={layout.n_kv_heads}, T, "
            f"head_dim={layout.head_dim}], got {list(shape)}")
    n_tokens = shape[1]
    if n_tokens < 1:
        raise InvalidArgument("a layer needs at least one token")
    limit = layout.max_tokens if capacity_tokens is None else capacity_tokens
    if n_tokens > limit:
        raise ResourceExhausted(
            f"{n_tokens} tokens exceed the HBM KV capacity of {limit} tokens per channel "
            f"({layout.model}, {layout.dtype}, {layout.channel_bytes >> 20} MiB channels)")
    return n_tokens


def _token_rows(x: np.ndarray, layout: HbmLayout) -> np.ndarray:
    """[n_kv_heads, T, head_dim] -> [n_blocks*32, kv_dim_padded] in the layout dtype, zero
    padded: tokens past T (the last block) and elements past kv_dim (the last lane)."""
    n_tokens = x.shape[1]
    with np.errstate(over="ignore"):    # out-of-range values become inf, as in torch
        rows = x.astype(layout.dtype).transpose(1, 0, 2).reshape(n_tokens, layout.kv_dim)
    padded = np.zeros((layout.n_blocks(n_tokens) * layout.vec, layout.kv_dim_padded),
                      layout.dtype)
    padded[:n_tokens, :layout.kv_dim] = rows
    return padded


def pack_layer(k: np.ndarray, v: np.ndarray, layout: HbmLayout,
               capacity_tokens: int | None = None) -> np.ndarray:
    """k, v [n_kv_heads, T, head_dim] -> uint8[layer_bytes(T)]: the 32 channel chunks."""
    if k.shape != v.shape:
        raise InvalidArgument(f"k {list(k.shape)} and v {list(v.shape)} differ")
    if k.dtype not in (np.float16, np.float32) or v.dtype != k.dtype:
        raise InvalidArgument(f"k, v must both be float16 or float32 (bf16 via float32), got "
                              f"{k.dtype}, {v.dtype}")
    n_tokens = check_kv_shape(k.shape, layout, capacity_tokens)
    kr, vr = _token_rows(k, layout), _token_rows(v, layout)
    w, nb = layout.vec, layout.n_blocks(n_tokens)
    out = np.zeros(layout.layer_bytes(n_tokens), np.uint8)
    for c, (off, length) in enumerate(layout.channel_chunks(n_tokens)):
        first, lanes = layout.lane_range(c)
        if lanes == 0:
            continue
        k_tiles = np.empty((nb, lanes, w, w), layout.dtype)
        v_tiles = np.empty((nb, lanes, w, w), layout.dtype)
        for b in range(nb):
            for i in range(lanes):
                block = (slice(b * w, (b + 1) * w), slice((first + i) * w, (first + i + 1) * w))
                k_tiles[b, i] = kr[block]        # [token][dim]
                v_tiles[b, i] = vr[block].T      # [dim][token]
        half = length // 2
        out[off:off + half] = k_tiles.reshape(-1).view(np.uint8)
        out[off + half:off + length] = v_tiles.reshape(-1).view(np.uint8)
    return out


def unpack_layer(buf: np.ndarray | bytes | memoryview, layout: HbmLayout,
                 n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse: one packed layer -> (k, v) [n_kv_heads, n_tokens, head_dim], layout dtype."""
    data = np.frombuffer(buf, np.uint8)
    if data.size != layout.layer_bytes(n_tokens):
        raise InvalidArgument(
            f"packed layer has {data.size} bytes, expected {layout.layer_bytes(n_tokens)} "
            f"for {n_tokens} tokens")
    w, nb = layout.vec, layout.n_blocks(n_tokens)
    kr = np.zeros((nb * w, layout.kv_dim_padded), layout.dtype)
    vr = np.zeros_like(kr)
    for c, (off, length) in enumerate(layout.channel_chunks(n_tokens)):
        first, lanes = layout.lane_range(c)
        if lanes == 0:
            continue
        half = length // 2
        k_tiles = data[off:off + half].view(layout.dtype).reshape(nb, lanes, w, w)
        v_tiles = data[off + half:off + length].view(layout.dtype).reshape(nb, lanes, w, w)
        for b in range(nb):
            for i in range(lanes):
                block = (slice(b * w, (b + 1) * w), slice((first + i) * w, (first + i + 1) * w))
                kr[block] = k_tiles[b, i]
                vr[block] = v_tiles[b, i].T
    shape = (n_tokens, layout.n_kv_heads, layout.head_dim)
    k = kr[:n_tokens, :layout.kv_dim].reshape(shape).transpose(1, 0, 2).copy()
    v = vr[:n_tokens, :layout.kv_dim].reshape(shape).transpose(1, 0, 2).copy()
    return k, v
