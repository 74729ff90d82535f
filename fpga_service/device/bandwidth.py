"""The modeled U55C time of one decode step (docs/fpga-emulator.md explains and calibrates).

Decode at batch 1 is bandwidth-bound: every step streams all weight matrices plus the
live KV once. The 32 channels stream in parallel, so each tensor takes as long as its
fullest channel needs at 14.375 GB/s (32 x 14.375 = 460 GB/s, the card's peak); an
efficiency factor covers what the datapath loses to refresh, bank switching and
pipeline bubbles, and a fixed per-layer overhead covers the non-streaming work
(LayerNorm, softmax, residual, kernel control) that DFX-style datapaths serialise.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import ModelConfig
from kernels.hbm_layout import HbmLayout

PEAK_GBPS = 460.0
CHANNEL_GBPS = 14.375
# Calibrated so gpt2-medium (fp16, 24 layers, ~710 MB of weights per step) models at
# 3.38 / 3.46 / 3.56 ms/token at 64 / 256 / 512 context tokens, around the
# source's measured ~3.4 ms/token (DFX on the U55C).
DEFAULT_EFFICIENCY = 0.55
DEFAULT_LAYER_OVERHEAD_US = 20.0


@dataclass(frozen=True)
class BandwidthModel:
    peak_gbps: float = PEAK_GBPS
    channel_gbps: float = CHANNEL_GBPS
    efficiency: float = DEFAULT_EFFICIENCY
    layer_overhead_us: float = DEFAULT_LAYER_OVERHEAD_US

    def weight_read_s(self, config: ModelConfig, layout: HbmLayout) -> tuple[float, int]:
        """(seconds, bytes) to stream every weight a step touches. Embedding tables are
        read one row each, except a tied table that doubles as the LM head."""
        secs, total = 0.0, 0
        for name, e in layout.weight_table(config).items():
            if name == "pos_emb" or (name == "tok_emb" and not config.tie_embeddings):
                nbytes = e.row_elems * layout.elem_bytes
                secs += nbytes / (self.channel_gbps * 1e9)
                total += nbytes
                continue
            per_channel = [e.channel_bytes(c) for c in range(layout.n_channels)]
            if e.kind == "replicated":  # each channel reads its own copy: count one
                per_channel = [per_channel[0]]
            secs += max(per_channel) / (self.channel_gbps * 1e9)
            total += sum(per_channel)
        return secs, total

    def kv_read_s(self, layout: HbmLayout, n_ctx: int) -> tuple[float, int]:
        """Read the live K and V of every layer (whole 32-token tiles) and write one token."""
        blocks = layout.n_blocks(max(n_ctx, 1))
        per_channel = 2 * blocks * layout.lanes_per_channel * layout.tile_bytes * layout.n_layers
        total = 2 * blocks * layout.n_lanes * layout.tile_bytes * layout.n_layers
        return per_channel / (self.channel_gbps * 1e9), total

    def step_ms(self, config: ModelConfig, layout: HbmLayout, n_ctx: int) -> tuple[float, int]:
        """(modeled ms, bytes read) of one step that attends over n_ctx tokens."""
        ws, wb = self.weight_read_s(config, layout)
        ks, kb = self.kv_read_s(layout, n_ctx)
        stream_s = max(ws + ks, (wb + kb) / (self.peak_gbps * 1e9))
        ms = stream_s / self.efficiency * 1e3 + config.n_layers * self.layer_overhead_us / 1e3
        return ms, wb + kb
