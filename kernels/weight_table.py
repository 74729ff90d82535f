"""Where every weight tensor lives in the 32 HBM channels (docs/hbm-layout.md, "Weights").

This module knows only shapes, never data: `weight_specs(config)` lists the logical
tensors of a model family, each oriented [out, in] (the FPGA datapath computes
y[out] = W[out, in] . x[in] row by row), and `build_table` places them. Packing the
bytes is kernels/weights_image.py; the KV half of the map is kernels/hbm_layout.py.

Placement rules (the "why" is in the spec):
- matrices ("split"): rows split in whole 32-row vectors over the channels, contiguous
  blocks: channel c holds rows [c*R, min((c+1)*R, out)) with R = 32*ceil(ceil(out/32)/32),
  row-major (each row's `in` elements contiguous). Embedding tables are matrices too.
- vectors ("replicated": biases, norm weights): a full copy in every channel.
- every tensor starts at the same byte offset in all 32 channels, 64-byte aligned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine.config import ModelConfig
from engine.errors import InvalidArgument

N_CHANNELS = 32
VEC = 32                 # elements per vector: one 512-bit AXI beat of fp16
ENTRY_ALIGN = 64         # bytes: every tensor starts on an AXI beat
ELEM_BYTES = {"float16": 2, "float32": 4}

Kind = Literal["split", "replicated"]


def split_rows(n: int, n_channels: int = N_CHANNELS, vec: int = VEC) -> list[tuple[int, int]]:
    """(start, stop) of the rows (or KV lanes' elements) channel c owns, for all c.

    Whole vectors of `vec` rows in contiguous blocks, so every channel produces whole
    32-element output vectors; trailing channels may own nothing."""
    vectors = -(-n // vec)
    per = -(-vectors // n_channels) * vec
    return [(min(c * per, n), min((c + 1) * per, n)) for c in range(n_channels)]


@dataclass(frozen=True)
class TensorSpec:
    name: str                  # logical name, e.g. "layers.3.attn.k.weight"
    shape: tuple[int, ...]     # [out, in] for matrices, [n] for vectors

    @property
    def kind(self) -> Kind:
        return "split" if len(self.shape) == 2 else "replicated"


@dataclass(frozen=True)
class WeightEntry:
    """One tensor's place: the same `offset` in every channel; channel c holds
    `rows[c] = (start, stop)` of a split matrix, or the whole vector."""

    name: str
    kind: Kind
    shape: tuple[int, ...]
    dtype: str
    offset: int
    rows: tuple[tuple[int, int], ...]

    @property
    def row_elems(self) -> int:
        return self.shape[1] if self.kind == "split" else self.shape[0]

    def channel_shape(self, c: int) -> tuple[int, ...]:
        if self.kind == "replicated":
            return self.shape
        start, stop = self.rows[c]
        return (stop - start, self.shape[1])

    def channel_bytes(self, c: int) -> int:
        n = 1
        for d in self.channel_shape(c):
            n *= d
        return n * ELEM_BYTES[self.dtype]


def _gpt2_specs(cfg: ModelConfig) -> list[TensorSpec]:
    d, f, kv = cfg.d_model, cfg.d_ff, cfg.kv_dim
    specs = [TensorSpec("tok_emb", (cfg.vocab_size, d)), TensorSpec("pos_emb", (cfg.max_positions, d))]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        specs += [
            TensorSpec(p + "ln1.weight", (d,)), TensorSpec(p + "ln1.bias", (d,)),
            TensorSpec(p + "attn.q.weight", (d, d)), TensorSpec(p + "attn.q.bias", (d,)),
            TensorSpec(p + "attn.k.weight", (kv, d)), TensorSpec(p + "attn.k.bias", (kv,)),
            TensorSpec(p + "attn.v.weight", (kv, d)), TensorSpec(p + "attn.v.bias", (kv,)),
            TensorSpec(p + "attn.o.weight", (d, d)), TensorSpec(p + "attn.o.bias", (d,)),
            TensorSpec(p + "ln2.weight", (d,)), TensorSpec(p + "ln2.bias", (d,)),
            TensorSpec(p + "mlp.up.weight", (f, d)), TensorSpec(p + "mlp.up.bias", (f,)),
            TensorSpec(p + "mlp.down.weight", (d, f)), TensorSpec(p + "mlp.down.bias", (d,)),
        ]
    specs += [TensorSpec("ln_f.weight", (d,)), TensorSpec("ln_f.bias", (d,))]
    if not cfg.tie_embeddings:
        specs.append(TensorSpec("lm_head.weight", (cfg.vocab_size, d)))
    return specs


def _llama_specs(cfg: ModelConfig) -> list[TensorSpec]:
    d, f, kv, qd = cfg.d_model, cfg.d_ff, cfg.kv_dim, cfg.n_heads * cfg.head_dim
    specs = [TensorSpec("tok_emb", (cfg.vocab_size, d))]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        specs += [
            TensorSpec(p + "attn_norm.weight", (d,)),
            TensorSpec(p + "attn.q.weight", (qd, d)),
            TensorSpec(p + "attn.k.weight", (kv, d)),
            TensorSpec(p + "attn.v.weight", (kv, d)),
            TensorSpec(p + "attn.o.weight", (d, qd)),
            TensorSpec(p + "mlp_norm.weight", (d,)),
            TensorSpec(p + "mlp.gate.weight", (f, d)),
            TensorSpec(p + "mlp.up.weight", (f, d)),
            TensorSpec(p + "mlp.down.weight", (d, f)),
        ]
    specs.append(TensorSpec("norm.weight", (d,)))
    if not cfg.tie_embeddings:
        specs.append(TensorSpec("lm_head.weight", (cfg.vocab_size, d)))
    return specs


def weight_specs(config: ModelConfig) -> list[TensorSpec]:
    """The logical tensors of `config`'s family, in image order."""
    if config.family == "gpt2":
        return _gpt2_specs(config)
    if config.family == "llama":
        return _llama_specs(config)
    raise InvalidArgument(f"no HBM weight layout for model family {config.family!r}")


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def build_table(config: ModelConfig, dtype: str) -> tuple[dict[str, WeightEntry], int]:
    """Place every tensor; returns (table, bytes used per channel, unaligned)."""
    if dtype not in ELEM_BYTES:
        raise InvalidArgument(f"HBM dtype must be one of {sorted(ELEM_BYTES)}, got {dtype!r}")
    table: dict[str, WeightEntry] = {}
    offset = 0
    for spec in weight_specs(config):
        if spec.kind == "split":
            rows = tuple(split_rows(spec.shape[0]))
        else:
            rows = tuple((0, spec.shape[0]) for _ in range(N_CHANNELS))
        entry = WeightEntry(spec.name, spec.kind, spec.shape, dtype, offset, rows)
        table[spec.name] = entry
        # channel 0 always holds the largest share, so its size sets the stride
        offset = _align(offset + entry.channel_bytes(0), ENTRY_ALIGN)
    return table, offset
