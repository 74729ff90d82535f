"""Slot form <-> HBM channels: ingest, decode-time token append, read back."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import InvalidArgument
from kernels import hbm_io, reshape_ref
from kernels.hbm_layout import HbmLayout, KvAllocator


def _channels(layout: HbmLayout, size: int) -> list[np.ndarray]:
    return [np.full(size, 0xFF, np.uint8) for _ in range(layout.n_channels)]   # dirty HBM


@pytest.mark.parametrize("shape", [(25, 64), (2, 16), (16, 64), (8, 128), (3, 16), (5, 20)])
def test_ingest_append_read(shape) -> None:
    """Also widths with a padded last lane ((3, 16), (5, 20)): appends write its pad
    elements as zeros over dirty HBM, as the reshape does."""
    n_kv_heads, head_dim = shape
    layout = HbmLayout("t", 3, n_kv_heads, head_dim, "float32", weights_bytes=5000,
                       channel_bytes=4 << 20)
    alloc = KvAllocator(layout)
    alloc.alloc(40)                                      # another request before ours
    area = alloc.alloc(70)                               # capacity 96
    channels = _channels(layout, layout.channel_bytes)
    rng = np.random.default_rng(1)
    total = 70
    k = rng.standard_normal((n_kv_heads, total, head_dim)).astype(np.float32)
    v = rng.standard_normal((n_kv_heads, total, head_dim)).astype(np.float32)
    n_prompt, layer = 33, 2
    packed = reshape_ref.pack_layer(k[:, :n_prompt], v[:, :n_prompt], layout)
    hbm_io.ingest_layer(channels, layout, area, layer, memoryview(packed.tobytes()), n_prompt)
    assert np.array_equal(hbm_io.gather_layer(channels, layout, area, layer, n_prompt), packed)
    # decode appends tokens 33..69 one at a time, as the datapath would
    for t in range(n_prompt, total):
        hbm_io.write_token(channels, layout, area, layer, t,
                           k[:, t].reshape(-1), v[:, t].reshape(-1))
    k2, v2 = hbm_io.read_layer(channels, layout, area, layer, total)
    assert np.array_equal(k2, k) and np.array_equal(v2, v)
    # full blocks written by appends are byte-identical to what prefill would have shipped
    full = 64
    want = reshape_ref.pack_layer(k[:, :full], v[:, :full], layout)
    assert np.array_equal(hbm_io.gather_layer(channels, layout, area, layer, full), want)
    # and every element sits where the spec's formula says
    rows = k.transpose(1, 0, 2).reshape(total, -1)
    for t, e in ((0, 0), (40, layout.kv_dim - 1), (69, 5)):
        c, off = layout.kv_address(area, layer, "k", t, e)
        assert channels[c][off:off + 4].view(np.float32)[0] == rows[t, e]


def test_ingest_zeroes_block_padding_and_leaves_other_layers() -> None:
    layout = HbmLayout.kv_only(2, 1, 32)
    area = KvAllocator(layout).alloc(64)
    channels = _channels(layout, area.offset + area.nbytes)
    k = np.ones((1, 3, 32), np.float16)
    hbm_io.ingest_layer(channels, layout, area, 0, reshape_ref.pack_layer(k, k, layout), 3)
    ko = layout.k_offset(area, 0)
    tile = channels[0][ko:ko + 2048].view(np.float16).reshape(32, 32)
    assert (tile[:3] == 1).all() and (tile[3:] == 0).all()
    assert (channels[0][layout.k_offset(area, 1):] == 0xFF).all()        # layer 1 untouched
    assert all((ch == 0xFF).all() for ch in channels[1:])                # 1 lane: channel 0 only


def test_bad_calls() -> None:
    layout = HbmLayout.kv_only(2, 1, 32)
    area = KvAllocator(layout).alloc(32)
    channels = _channels(layout, area.offset + area.nbytes)
    with pytest.raises(InvalidArgument, match="layer 2"):
        hbm_io.gather_layer(channels, layout, area, 2, 1)
    with pytest.raises(InvalidArgument, match="capacity 32"):
        hbm_io.write_token(channels, layout, area, 0, 32, np.zeros(32), np.zeros(32))
    with pytest.raises(InvalidArgument, match="expected 32 channels"):
        hbm_io.read_layer(channels[:3], layout, area, 0, 1)
    with pytest.raises(InvalidArgument, match="expected 4096"):
        hbm_io.ingest_layer(channels, layout, area, 0, b"\0" * 8, 1)
