"""Moving KV between slot form and the 32 HBM channel arrays (docs/hbm-layout.md).

What a decode device does with the layout, written once so the emulator, the XRT path
and the tests share it. `channels` is a sequence of 32 writable byte buffers (NumPy
uint8 arrays, bytearrays, mmaps), each one HBM pseudo-channel.

- `ingest_layer`: a packed layer from the slot -> channel c's K part at k_offset(area, l),
  its V part at v_offset(area, l) (whole blocks, so padding rows become zero);
- `write_token`: the decode datapath's append of one token's K and V rows;
- `gather_layer` / `read_layer`: the live prefix back to slot form / to [H, T, hd].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.errors import InvalidArgument
from kernels import reshape_ref
from kernels.hbm_layout import HbmLayout, KvArea


def _u8(buf) -> np.ndarray:
    return buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, np.uint8)


def _check(layout: HbmLayout, area: KvArea, layer: int, n_tokens: int, channels) -> None:
    if len(channels) != layout.n_channels:
        raise InvalidArgument(f"expected {layout.n_channels} channels, got {len(channels)}")
    if not 0 <= layer < layout.n_layers:
        raise InvalidArgument(f"layer {layer} outside [0, {layout.n_layers})")
    if not 0 < n_tokens <= area.capacity_tokens:
        raise InvalidArgument(f"{n_tokens} tokens outside the area's capacity {area.capacity_tokens}")


def _chunk_slices(channels: Sequence, layout: HbmLayout, area: KvArea, layer: int,
                  n_tokens: int):
    """Per channel holding KV: (channel array, slot K slice, slot V slice, channel K
    slice, channel V slice). Chunk c of the slot is [K part][V part], which go to
    k_offset(area, layer) and v_offset(area, layer) of channel c."""
    ko, vo = layout.k_offset(area, layer), layout.v_offset(area, layer)
    for c, (off, length) in enumerate(layout.channel_chunks(n_tokens)):
        if length:
            half = length // 2
            yield (_u8(channels[c]), slice(off, off + half), slice(off + half, off + length),
                   slice(ko, ko + half), slice(vo, vo + half))


def ingest_layer(channels: Sequence, layout: HbmLayout, area: KvArea, layer: int,
                 packed, n_tokens: int) -> None:
    """Write one packed layer (slot form, n_tokens live tokens) into the channels."""
    _check(layout, area, layer, n_tokens, channels)
    data = np.frombuffer(packed, np.uint8) if not isinstance(packed, np.ndarray) else packed
    if data.size != layout.layer_bytes(n_tokens):
        raise InvalidArgument(f"packed layer has {data.size} bytes, expected "
                              f"{layout.layer_bytes(n_tokens)} for {n_tokens} tokens")
    for ch, slot_k, slot_v, ch_k, ch_v in _chunk_slices(channels, layout, area, layer, n_tokens):
        ch[ch_k] = data[slot_k]
        ch[ch_v] = data[slot_v]


def gather_layer(channels: Sequence, layout: HbmLayout, area: KvArea, layer: int,
                 n_tokens: int) -> np.ndarray:
    """The live prefix of one layer, back in slot form (uint8[layer_bytes(n_tokens)])."""
    _check(layout, area, layer, n_tokens, channels)
    out = np.empty(layout.layer_bytes(n_tokens), np.uint8)
    for ch, slot_k, slot_v, ch_k, ch_v in _chunk_slices(channels, layout, area, layer, n_tokens):
        out[slot_k] = ch[ch_k]
        out[slot_v] = ch[ch_v]
    return out


def read_layer(channels: Sequence, layout: HbmLayout, area: KvArea, layer: int,
               n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(k, v) [n_kv_heads, n_tokens, head_dim] in the layout dtype, from the channels."""
    return reshape_ref.unpack_layer(gather_layer(channels, layout, area, layer, n_tokens),
                                    layout, n_tokens)


def write_token(channels: Sequence, layout: HbmLayout, area: KvArea, layer: int, token: int,
                k_row: np.ndarray, v_row: np.ndarray) -> None:
    """Append token `token`'s K and V rows ([kv_dim], converted to the layout dtype) the
    way the decode datapath does: one 32-element K tile row and one V tile column per lane."""
    _check(layout, area, layer, token + 1, channels)
    k_row = np.asarray(k_row).astype(layout.dtype).reshape(-1)
    v_row = np.asarray(v_row).astype(layout.dtype).reshape(-1)
    if k_row.size != layout.kv_dim or v_row.size != layout.kv_dim:
        raise InvalidArgument(f"k_row and v_row need {layout.kv_dim} elements")
    if layout.kv_pad:       # the last lane's pad elements are zeros
        k_row, v_row = (np.pad(x, (0, layout.kv_pad)) for x in (k_row, v_row))
    w, blk, r = layout.vec, token // layout.vec, token % layout.vec
    ko, vo = layout.k_offset(area, layer), layout.v_offset(area, layer)
    for c in range(layout.n_channels):
        first, lanes = layout.lane_range(c)
        if not lanes:
            continue
        ch = _u8(channels[c])
        half = area.capacity_tokens // w * lanes * layout.tile_bytes
        k_tiles = ch[ko:ko + half].view(layout.dtype).reshape(-1, w, w)
        v_tiles = ch[vo:vo + half].view(layout.dtype).reshape(-1, w, w)
        for i in range(lanes):
            lane = slice((first + i) * w, (first + i + 1) * w)
            k_tiles[blk * lanes + i, r, :] = k_row[lane]     # K tile row: [token][dim]
            v_tiles[blk * lanes + i, :, r] = v_row[lane]     # V tile column: [dim][token]
