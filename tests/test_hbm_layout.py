"""The spec's numbers (docs/hbm-layout.md, worked example) checked against the code."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import preset
from engine.errors import InvalidArgument, ResourceExhausted
from kernels.hbm_layout import CHANNEL_BYTES, HbmLayout, KvAllocator, KvArea
from kernels.weight_table import split_rows


@pytest.fixture(scope="module")
def medium() -> HbmLayout:
    return HbmLayout.for_model(preset("gpt2-medium"))


def test_gpt2_medium_kv_geometry(medium: HbmLayout) -> None:
    assert (medium.n_lanes, medium.lanes_per_channel, medium.tile_bytes) == (32, 1, 2048)
    assert [medium.lane_range(c) for c in (0, 5, 31)] == [(0, 1), (5, 1), (31, 1)]
    chunks = medium.channel_chunks(512)
    assert chunks[0] == (0, 65536) and chunks[7] == (7 * 65536, 65536)
    assert medium.half_chunk_bytes(0, 512) == 32 * 1024
    assert medium.layer_bytes(512) == 2_097_152 == 2 * 512 * 1024 * 2
    assert medium.layer_bytes(33) == 262_144 and medium.channel_chunks(33)[3][1] == 8192
    assert sum(n for _, n in chunks) == medium.layer_bytes(512)


def test_gpt2_medium_weights(medium: HbmLayout) -> None:
    table = medium.weight_table(preset("gpt2-medium"))
    tok = table["tok_emb"]
    assert tok.offset == 0 and tok.rows[0] == (0, 1600) and tok.rows[31] == (49600, 50257)
    assert tok.channel_bytes(0) == 3_276_800 and tok.channel_shape(31) == (657, 1024)
    assert table["pos_emb"].offset == 3_276_800 and table["pos_emb"].rows[1] == (32, 64)
    assert table["layers.0.ln1.weight"].offset == 3_342_336
    assert table["layers.0.ln1.weight"].kind == "replicated"
    assert table["layers.0.attn.q.weight"].offset == 3_346_432
    assert table["ln_f.bias"].offset == 22_857_728
    assert "lm_head.weight" not in table  # tied
    assert medium.weights_bytes == medium.kv_base == 22_859_776
    total = sum(e.channel_bytes(c) for e in table.values() if e.kind == "split" for c in range(32))
    assert total == 709_003_264


def test_gpt2_medium_area_and_capacity(medium: HbmLayout) -> None:
    cap = medium.capacity_tokens(512 + 512)
    assert cap == 1024 and medium.layer_region_bytes(cap) == 131_072
    area = KvArea(medium.kv_base, cap, medium.kv_area_bytes(cap))
    assert area.nbytes == 3_145_728
    assert medium.k_offset(area, 0) == 22_859_776 and medium.v_offset(area, 0) == 22_925_312
    assert medium.k_offset(area, 1) == 22_990_848
    assert area.offset + area.nbytes == 26_005_504
    assert medium.kv_address(area, 0, "k", 33, 70) == (2, 22_861_900)
    assert medium.bytes_per_block == 98_304
    assert medium.max_tokens == 167_296 == (CHANNEL_BYTES - 22_859_776) // 98_304 * 32


def test_other_presets() -> None:
    llama = HbmLayout.for_model(preset("llama-7b"))
    assert (llama.n_lanes, llama.lanes_per_channel, llama.weights_bytes) == (128, 4, 426_254_336)
    assert llama.layer_bytes(512) == 8 * 2**20 and llama.max_tokens == 6720
    assert llama.lane_range(1) == (4, 4)  # one whole 128-dim head per channel
    xl = HbmLayout.for_model(preset("gpt2-xl"))
    assert xl.lanes_per_channel == 2 and xl.lane_range(24) == (48, 2) and xl.lane_range(25) == (50, 0)
    assert xl.max_tokens == 33_888
    assert HbmLayout.for_model(preset("gpt2")).max_tokens == 343_488
    with pytest.raises(ResourceExhausted, match="llama-7b"):
        HbmLayout.for_model(preset("llama-7b"), "float32")


def test_tiny_models_leave_channels_empty() -> None:
    lay = HbmLayout.for_model(preset("tiny-llama"))   # kv_dim 32: one lane
    assert lay.n_lanes == 1 and lay.lane_range(0) == (0, 1) and lay.lane_range(1) == (1, 0)
    chunks = lay.channel_chunks(33)
    assert chunks[0] == (0, 2 * 2 * 2048) and all(n == 0 for _, n in chunks[1:])


def test_bad_shapes_and_dtypes() -> None:
    with pytest.raises(InvalidArgument, match="dtype"):
        HbmLayout.kv_only(2, 2, 16, "bfloat16")
    with pytest.raises(InvalidArgument, match="positive"):
        HbmLayout.kv_only(2, 0, 16)


def test_pad_lanes_when_kv_dim_is_not_a_multiple_of_32() -> None:
    """3 heads of 16 (kv_dim 48): 2 lanes, the second half pad; 25 heads of 40 (kv_dim
    1000): 32 lanes, 24 pad elements in lane 31. Pad bytes count everywhere a
    lane does (sizes, capacity), and pad elements have no address."""
    lay = HbmLayout.kv_only(2, 3, 16)
    assert (lay.kv_dim, lay.kv_dim_padded, lay.kv_pad, lay.n_lanes) == (48, 64, 16, 2)
    assert lay.lane_range(0) == (0, 1) and lay.lane_range(1) == (1, 1) and lay.lane_range(2) == (2, 0)
    assert lay.layer_bytes(33) == 2 * 2 * 2 * 2048 and lay.bytes_per_block == 2 * 2 * 2048
    area = KvArea(0, 64, lay.kv_area_bytes(64))
    assert lay.kv_address(area, 1, "k", 40, 47) == (1, lay.k_offset(area, 1) + (1 * 1024 + 8 * 32 + 15) * 2)
    with pytest.raises(InvalidArgument, match="outside"):
        lay.kv_address(area, 1, "k", 40, 48)       # a pad element
    wide = HbmLayout.kv_only(2, 25, 40)
    assert (wide.n_lanes, wide.kv_pad, wide.lanes_per_channel) == (32, 24, 1)
    # a model config with such a width builds its layout (it was refused before)
    odd = replace(preset("tiny-gpt2"), name="odd", d_model=48, n_heads=3, n_kv_heads=3, d_ff=192)
    assert HbmLayout.for_model(odd, "float32").kv_pad == 16


# sha256[:16] of reshape_ref.pack_layer bytes (1, 33 and 100 tokens), of kv_address for
# every element at 4 tokens, and of lane_range / max_tokens / bytes_per_block, computed
# with the layout as it was before pad lanes existed: widths that are multiples of 32
# keep exactly that layout.
_GOLDEN = {
    (16, 64, "float16"): "33f3c6df97b10783", (16, 64, "float32"): "8995185b4ba2090a",
    (2, 16, "float16"): "22218b1e326b31cd", (2, 16, "float32"): "897acb19fbcd40d1",
    (25, 64, "float16"): "f6d44e6fe1db8451", (25, 64, "float32"): "445397a2b1c0547f",
    (40, 32, "float16"): "d56b8b309d9f0474", (40, 32, "float32"): "4048193c4973e892",
    (4, 128, "float16"): "3e83164eec504da7", (4, 128, "float32"): "3e75e08890c29f4e",
    (1, 32, "float16"): "ca023597e87a2b2b", (1, 32, "float32"): "3d5983a6f641ead2",
}


@pytest.mark.parametrize("key", sorted(_GOLDEN))
def test_multiples_of_32_keep_the_unpadded_layout_byte_for_byte(key) -> None:
    import hashlib

    import numpy as np

    from kernels import reshape_ref

    h, d, dtype = key
    lay = HbmLayout.kv_only(2, h, d, dtype)
    assert lay.kv_pad == 0 and lay.kv_dim_padded == lay.kv_dim
    hs = hashlib.sha256()
    for t in (1, 33, 100):
        x = ((np.arange(h * t * d) * 37) % 251 - 125).astype(np.float32) / 16
        k, v = x.reshape(h, t, d).astype(dtype), (-x).reshape(h, t, d).astype(dtype)
        hs.update(reshape_ref.pack_layer(k, v, lay).tobytes())
    area = KvArea(lay.kv_base + 4096, 128, lay.kv_area_bytes(128))
    for e in range(lay.kv_dim):
        for t in (0, 31, 33, 127):
            hs.update(repr((lay.kv_address(area, 1, "k", t, e),
                            lay.kv_address(area, 1, "v", t, e))).encode())
    hs.update(repr([lay.lane_range(c) for c in range(32)]
                   + [lay.max_tokens, lay.bytes_per_block]).encode())
    assert hs.hexdigest()[:16] == _GOLDEN[key]


def test_split_rows_covers_every_row_once() -> None:
    for n in (1, 20, 64, 176, 1000, 1600, 11008, 50257):
        spans = split_rows(n)
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
        assert all((stop - start) % 32 == 0 for start, stop in spans[:-1] if stop < n)


def test_kv_address_matches_chunk_geometry(medium: HbmLayout) -> None:
    area = KvArea(medium.kv_base, 64, medium.kv_area_bytes(64))
    ch, off = medium.kv_address(area, 3, "v", 63, 1023)
    assert ch == 31
    # last element of channel 31's V half of layer 3: tile 1, d 31, r 31
    assert off == medium.v_offset(area, 3) + (1 * 1024 + 31 * 32 + 31) * 2


def test_allocator_limits_and_reuse(medium: HbmLayout) -> None:
    alloc = KvAllocator(medium)
    assert alloc.free_tokens == medium.max_tokens
    a = alloc.alloc(1000)
    assert a.offset == medium.kv_base and a.capacity_tokens == 1024
    with pytest.raises(ResourceExhausted, match="limit of 167296 tokens per channel"):
        alloc.alloc(medium.max_tokens)
    b = alloc.alloc(medium.max_tokens - 1024)
    assert alloc.free_tokens == 0
    alloc.free(a)
    assert alloc.alloc(1024).offset == medium.kv_base
    alloc.free(b)
    with pytest.raises(InvalidArgument, match="double free"):
        alloc.free(b)
    with pytest.raises(InvalidArgument, match="not allocated here"):   # a forged area
        alloc.free(KvArea(medium.kv_base + 98_304, 32, 98_304))
    assert alloc.live == 1
    with pytest.raises(ResourceExhausted, match="167296 tokens"):
        medium.check_area(CHANNEL_BYTES - 4096, 32)


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(1, 3000)), max_size=40))
def test_allocator_never_overlaps(ops) -> None:
    lay = HbmLayout("t", 2, 2, 16, "float16", weights_bytes=10_000, channel_bytes=1 << 20)
    alloc, live = KvAllocator(lay), []
    for do_alloc, n in ops:
        if do_alloc or not live:
            try:
                live.append(alloc.alloc(n))
            except ResourceExhausted as exc:      # full or fragmented
                assert f"limit of {lay.max_tokens} tokens" in str(exc)
        else:
            alloc.free(live.pop(n % len(live)))
        spans = sorted((a.offset, a.offset + a.nbytes) for a in live)
        assert all(lay.kv_base <= s < e <= lay.channel_bytes for s, e in spans)
        assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:], strict=False))
        used = sum(a.capacity_tokens for a in live)
        assert used + alloc.free_tokens == lay.max_tokens
    for a in live:
        alloc.free(a)
    assert alloc.free_tokens == lay.max_tokens and alloc.live == 0
