"""The modeled U55C time of one decode step: the cycle model of the `hbm_decode` kernel
(kernels/hls/hbm_decode.cpp), derived from its structure in docs/fpga-kernel.md.

Not calibrated: every term is a loop of the kernel as it is written, counted at its
initiation interval, with the HBM pseudo-channel rate (14.375 GB/s = 64-byte words per
cycle at the clock) bounding the burst readers and a few stated latencies (HBM first
beat, MAC pipeline, fp32 adder, write round trip). A function of the model dimensions,
the HBM element type, the context length and the clock (`CycleModel(clock_mhz=...)`).
docs/fpga-kernel.md tabulates its terms for gpt2-medium (tests/test_fpga_cycle_model.py
keeps table and code equal).

The source document's measured figure (DFX on a U55C, gpt2-medium: ~3.4 ms/token) is a
comparison row (`SOURCE_MS_PER_TOKEN`), not a parameter of this model. Synthesis has
not been run: a real bitstream's schedule (HLS reports, then a card) replaces all this.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from engine.config import ModelConfig
from kernels.hbm_layout import HbmLayout

PEAK_GBPS = 460.0                  # 32 pseudo-channels x 14.375 GB/s
CHANNEL_GBPS = 14.375
WORD_BYTES = 64                    # one 512-bit m_axi word
CLOCK_MHZ = 300.0                  # the kernel's clock target (v++ --kernel_frequency)
# Comparison row, not a knob: the source document measured ~3.4 ms/token for
# gpt2-medium on a U55C running DFX.
SOURCE_MS_PER_TOKEN = 3.4
SOURCE_MODEL = "gpt2-medium"
SOURCE_LABEL = "source (DFX on a U55C, gpt2-medium, measured)"
N_CH = 32
VEC = 32


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _rows_per_ch(out: int) -> int:
    """Rows of a split matrix in its fullest channel (channel 0): docs/hbm-layout.md."""
    return VEC * _cdiv(_cdiv(out, VEC), N_CH)


@dataclass(frozen=True)
class CycleModel:
    """Cycles of one `hbm_decode` step (docs/fpga-kernel.md, "Cycle count"). The
    latencies are the stated assumptions of the derivation, not fitted to anything."""

    clock_mhz: float = CLOCK_MHZ
    channel_gbps: float = CHANNEL_GBPS
    hbm_latency: int = 100      # cycles from a burst's address to its first beat
    mac_latency: int = 30       # MAC unit multiply + adder trees + partial-sum reduce
    fadd_latency: int = 5       # fp32 adder: the II of a loop-carried sum
    write_latency: int = 100    # a channel's kv-append write round trip

    @property
    def words_per_cycle(self) -> float:
        """64-byte words one pseudo-channel delivers per kernel cycle (0.749 at 300 MHz)."""
        return self.channel_gbps * 1e9 / WORD_BYTES / (self.clock_mhz * 1e6)

    def _stream(self, words: int) -> float:
        """Cycles to stream `words` through one port: HBM-bound below one word per cycle,
        else bound by the MAC unit's one word per cycle."""
        return words / min(1.0, self.words_per_cycle)

    # -- pieces of the kernel -----------------------------------------------------------
    def matvec(self, out: int, inp: int, bias: bool, eb: int) -> dict[str, float]:
        """`matvec<OUT, IN>`: x load into every MAC unit (IN), latency, the fullest
        channel's bias + weight words at the channel rate, then `mv_gather`'s tail: it
        reads the channels in order, so after channel 0's last row the other OUT - R rows
        come out one per cycle."""
        r = _rows_per_ch(out)
        words = _cdiv(r * inp * eb, WORD_BYTES) + (_cdiv(r * eb, WORD_BYTES) if bias else 0)
        return {"weights": self._stream(words), "x_load": inp,
                "mv_latency": self.hbm_latency + self.mac_latency, "mv_gather": out - r}

    def norm(self, d: int, layer_norm: bool, eb: int) -> float:
        """Gain (+ bias) load from channel 0, 2 (LayerNorm) or 1 (RMSNorm) loop-carried
        reductions at the fp32 adder latency, one pass applying it."""
        loads = (2 if layer_norm else 1) * (_cdiv(d * eb, WORD_BYTES) + self.hbm_latency)
        return loads + (2 if layer_norm else 1) * d * self.fadd_latency + d

    def attention(self, cfg: ModelConfig, layout: HbmLayout, n_ctx: int) -> dict[str, float]:
        """One layer's attention over n_ctx live tokens (nb = ceil(n_ctx/32) blocks)."""
        h, lpc = cfg.n_heads, layout.lanes_per_channel
        tile_words = VEC * VEC * layout.elem_bytes // WORD_BYTES
        nb = layout.n_blocks(max(n_ctx, 1))
        n = max(n_ctx, 1)
        return {
            "att_q": cfg.d_model,                                   # q broadcast
            # per (block, lane slot): clear the 32 x H partial sums (32), the K tile at
            # II=1 (prefetched by the reader), then 32 x H partial scores through the
            # 32-input adder tree; the burst's first beat once
            "att_scores": nb * lpc * (VEC + tile_words + VEC * h) + self.hbm_latency,
            "att_score_write": h * n,                               # scores[h][t], t <= p
            # softmax: max (1), exp + loop-carried sum (fadd latency), divide (1)
            "att_softmax": h * n * (2 + self.fadd_latency),
            # per block: H x 32 probabilities broadcast, then the V tiles at II=1
            "att_values": nb * (VEC * h + lpc * tile_words) + self.hbm_latency,
            # att_gather reads every channel's outputs in order: kv_dim_padded x group
            "att_gather": layout.kv_dim_padded * (cfg.n_heads // cfg.n_kv_heads),
        }

    def kv_append(self, layout: HbmLayout) -> float:
        """The 32 channel calls in sequence: per lane one K tile row (ROW_WORDS words) and
        32 V read-modify-writes at II=2; a write round trip per channel with lanes."""
        row_words = _cdiv(VEC * layout.elem_bytes, WORD_BYTES)
        channels = _cdiv(layout.n_lanes, layout.lanes_per_channel)
        return layout.n_lanes * (row_words + 2 * VEC) + channels * self.write_latency

    # -- one layer, one step --------------------------------------------------------------
    def _matvecs(self, cfg: ModelConfig) -> list[tuple[int, int, bool]]:
        d, f, kv, gpt2 = cfg.d_model, cfg.d_ff, cfg.kv_dim, cfg.family == "gpt2"
        mvs = [(d, d, gpt2), (kv, d, gpt2), (kv, d, gpt2), (d, d, gpt2)]   # q, k, v, o
        mvs += [(f, d, True)] if gpt2 else [(f, d, False), (f, d, False)]  # up | gate, up
        return mvs + [(d, f, gpt2)]                                        # down

    @functools.lru_cache(maxsize=64)  # noqa: B019 - frozen, hashable; few (config, layout)
    def layer_fixed(self, cfg: ModelConfig, layout: HbmLayout) -> dict[str, float]:
        """The per-layer terms that do not depend on the context length."""
        eb, gpt2 = layout.elem_bytes, cfg.family == "gpt2"
        out = {"weights": 0.0, "x_load": 0.0, "mv_latency": 0.0, "mv_gather": 0.0}
        for o, i, b in self._matvecs(cfg):
            for k, v in self.matvec(o, i, b, eb).items():
                out[k] += v
        out["norms"] = 2 * self.norm(cfg.d_model, gpt2, eb)
        # residual adds (2 x D) and GELU | SiLU(gate) * up (F); Llama: RoPE on q and k
        # (copy + rotate per head: 2 x (D + kv_dim))
        out["residual_act"] = 2 * cfg.d_model + cfg.d_ff
        if not gpt2:
            out["rope"] = 2 * (cfg.d_model + cfg.kv_dim)
        out["kv_append"] = self.kv_append(layout)
        return out

    def layer_cycles(self, cfg: ModelConfig, layout: HbmLayout, n_ctx: int) -> dict[str, float]:
        """Every term of one layer attending over n_ctx tokens, plus "attention" (the sum
        of the att_* terms) and "total"."""
        out = dict(self.layer_fixed(cfg, layout))
        att = self.attention(cfg, layout, n_ctx)
        out |= att
        out["attention"] = sum(att.values())
        out["total"] = sum(v for k, v in out.items() if not k.startswith("att_"))
        return out

    def step_cycles(self, cfg: ModelConfig, layout: HbmLayout, n_ctx: int) -> dict[str, float]:
        """Cycles of one decode step at n_ctx live tokens (a run of one step, as the
        decode service drives the kernel): layers, embedding, final norm, LM head, argmax,
        the io buffer's logits. "total" is their sum."""
        eb, d, vocab = layout.elem_bytes, cfg.d_model, cfg.vocab_size
        gpt2 = cfg.family == "gpt2"
        row = _cdiv(d * eb, WORD_BYTES) + self.hbm_latency           # read_row
        lm = self.matvec(vocab, d, False, eb)
        out = {
            "layers": cfg.n_layers * self.layer_cycles(cfg, layout, n_ctx)["total"],
            # token row (+ position row and the add for GPT-2); Llama: RoPE tables (HD)
            "embed": (2 * row + d) if gpt2 else (row + cfg.head_dim),
            "final_norm": self.norm(d, gpt2, eb),
            "lm_head": sum(lm.values()),
            "argmax": vocab,
            "io_logits": vocab,
        }
        out["total"] = sum(out.values())
        return out

    def streaming_cycles(self, cfg: ModelConfig, layout: HbmLayout, n_ctx: int) -> float:
        """The bound with every serial term removed: each channel streams its weights
        and its live KV tiles at the channel rate, nothing else."""
        eb = layout.elem_bytes
        per_layer = self.layer_fixed(cfg, layout)["weights"]
        tile_words = VEC * VEC * eb // WORD_BYTES
        kv = 2 * layout.n_blocks(max(n_ctx, 1)) * layout.lanes_per_channel * tile_words
        lm = self.matvec(cfg.vocab_size, cfg.d_model, False, eb)["weights"]
        return cfg.n_layers * (per_layer + self._stream(kv)) + lm

    def cycles_to_ms(self, cycles: float) -> float:
        return cycles / (self.clock_mhz * 1e3)

    # -- what the devices, `hybrid plan` and `hybrid bench` call ------------------------------
    def step_ms(self, config: ModelConfig, layout: HbmLayout, n_ctx: int) -> tuple[float, int]:
        """(modeled ms, bytes read from HBM) of one step that attends over n_ctx tokens."""
        ms = self.cycles_to_ms(self.step_cycles(config, layout, n_ctx)["total"])
        return ms, _weight_bytes(config, layout) + kv_bytes(layout, n_ctx)

    def describe(self, config: ModelConfig, layout: HbmLayout) -> str:
        return (f"derived cycle model of hbm_decode ({config.name}, {layout.dtype} HBM image, "
                f"{self.clock_mhz:g} MHz)")


# The name the devices and backends use (`bandwidth=` option): the derived model.
BandwidthModel = CycleModel


@functools.lru_cache(maxsize=64)
def _weight_bytes(config: ModelConfig, layout: HbmLayout) -> int:
    """Bytes of weights one step reads: every matrix, each vector once (every channel
    reads its own copy in parallel); embedding tables one row, except a tied table that
    is also the LM head."""
    total = 0
    for name, e in layout.weight_table(config).items():
        if name == "pos_emb" or (name == "tok_emb" and not config.tie_embeddings):
            total += e.row_elems * layout.elem_bytes
        elif e.kind == "replicated":
            total += e.channel_bytes(0)
        else:
            total += sum(e.channel_bytes(c) for c in range(layout.n_channels))
    return total


def kv_bytes(layout: HbmLayout, n_ctx: int) -> int:
    """Live K and V of every layer, in whole 32-token tiles (pad lanes included)."""
    blocks = layout.n_blocks(max(n_ctx, 1))
    return 2 * blocks * layout.n_lanes * layout.tile_bytes * layout.n_layers
