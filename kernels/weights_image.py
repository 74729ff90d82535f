"""The weights part of the 32 HBM channels (docs/hbm-layout.md, "Weights").

`pack_weights(config, state_dict, layout)` reads the model's tensors through a name
mapping (logical name -> source name, or a function of the state dict), orients every
matrix [out, in], converts to the layout dtype and cuts it by output rows into the
channels; `WeightsImage` holds the 32 byte arrays plus the table the emulator and the
XRT loader use. `WeightsImage.tensor(name)` reassembles a tensor (the inverse).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from engine.config import ModelConfig
from engine.errors import InvalidArgument
from kernels.hbm_layout import HbmLayout
from kernels.weight_table import WeightEntry

Source = str | Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
_TORCH = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class WeightsImage:
    layout: HbmLayout
    table: dict[str, WeightEntry]
    channels: list[np.ndarray]          # per channel: uint8[layout.weights_bytes]

    def channel_view(self, name: str, c: int) -> np.ndarray:
        """Channel c's share of `name` as a typed array ([rows_c, in] or [n]); no copy."""
        e = self.table[name]
        nbytes = e.channel_bytes(c)
        raw = self.channels[c][e.offset:e.offset + nbytes]
        return raw.view(e.dtype).reshape(e.channel_shape(c))

    def tensor(self, name: str) -> np.ndarray:
        """The whole tensor reassembled from the channels (split) or channel 0 (replicated)."""
        e = self.table[name]
        if e.kind == "replicated":
            return self.channel_view(name, 0).copy()
        return np.concatenate([self.channel_view(name, c) for c in range(len(self.channels))])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.channels)


def _hf_prefix(state_dict: Mapping[str, torch.Tensor], candidates: tuple[str, ...]) -> str:
    for p in candidates:
        if any(k.startswith(p) for k in state_dict):
            return p
    return ""


def hf_gpt2_names(config: ModelConfig, state_dict: Mapping[str, torch.Tensor]) -> dict[str, Source]:
    """GPT-2 naming of Hugging Face (`transformer.` prefix optional, Conv1D weights [in, out])
    and of engine/gpt2.py (same names, nn.Linear weights [out, in]); q, k, v are fused in
    `c_attn`. The orientation is read off c_attn's shape ([d, 3d] = Conv1D), once for the
    whole state dict, because square matrices cannot tell."""
    pre = _hf_prefix(state_dict, ("transformer.",))
    d = config.d_model
    c_attn = state_dict.get(pre + "h.0.attn.c_attn.weight")
    conv1d = c_attn is None or tuple(c_attn.shape) == (d, 3 * d)
    names: dict[str, Source] = {"tok_emb": pre + "wte.weight", "pos_emb": pre + "wpe.weight",
                                "ln_f.weight": pre + "ln_f.weight", "ln_f.bias": pre + "ln_f.bias"}

    def oriented(key: str) -> Callable:
        return (lambda sd: sd[key].t()) if conv1d else (lambda sd: sd[key])

    def part(key: str, i: int) -> Callable:
        def get(sd: Mapping[str, torch.Tensor]) -> torch.Tensor:
            w = sd[key]
            if w.dim() == 1:
                return w[i * d:(i + 1) * d]
            return w[:, i * d:(i + 1) * d].t() if conv1d else w[i * d:(i + 1) * d]
        return get

    for layer in range(config.n_layers):
        h, p = f"{pre}h.{layer}.", f"layers.{layer}."
        for i, n in enumerate("qkv"):
            names[p + f"attn.{n}.weight"] = part(h + "attn.c_attn.weight", i)
            names[p + f"attn.{n}.bias"] = part(h + "attn.c_attn.bias", i)
        for ours, theirs in (("attn.o", "attn.c_proj"), ("mlp.up", "mlp.c_fc"),
                             ("mlp.down", "mlp.c_proj")):
            names[p + ours + ".weight"] = oriented(h + theirs + ".weight")
            names[p + ours + ".bias"] = h + theirs + ".bias"
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            names[p + ours + ".weight"] = h + theirs + ".weight"
            names[p + ours + ".bias"] = h + theirs + ".bias"
    return names


def hf_llama_names(config: ModelConfig, state_dict: Mapping[str, torch.Tensor]) -> dict[str, Source]:
    """Llama naming of Hugging Face (`model.` prefix) and engine/llama.py (no prefix);
    weights are [out, in] in both."""
    pre = _hf_prefix(state_dict, ("model.",))
    names: dict[str, Source] = {"tok_emb": pre + "embed_tokens.weight",
                                "norm.weight": pre + "norm.weight", "lm_head.weight": "lm_head.weight"}
    pairs = {"attn_norm.weight": "input_layernorm.weight",
             "mlp_norm.weight": "post_attention_layernorm.weight"}
    pairs |= {f"attn.{n}.weight": f"self_attn.{n}_proj.weight" for n in "qkvo"}
    pairs |= {f"mlp.{n}.weight": f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
    for layer in range(config.n_layers):
        for ours, theirs in pairs.items():
            names[f"layers.{layer}.{ours}"] = f"{pre}layers.{layer}.{theirs}"
    return names


HF_NAMES = {"gpt2": hf_gpt2_names, "llama": hf_llama_names}


def _resolve(name: str, state_dict: Mapping[str, torch.Tensor],
             names: Mapping[str, Source]) -> torch.Tensor:
    src = names.get(name, name)
    try:
        return src(state_dict) if callable(src) else state_dict[src]
    except KeyError as exc:
        raise InvalidArgument(
            f"state_dict has no tensor for weight {name!r} (looked up {exc.args[0]!r}); "
            f"pass names= to map the engine's parameter names") from None


def _convert(name: str, t: torch.Tensor, entry: WeightEntry) -> np.ndarray:
    if tuple(t.shape) != entry.shape:
        raise InvalidArgument(f"weight {name!r} has shape {list(t.shape)}, expected "
                              f"{list(entry.shape)} ([out, in])")
    t = t.detach().to("cpu")
    out = t.to(_TORCH[entry.dtype]).contiguous()
    narrowed = out.element_size() < t.element_size() or t.dtype == torch.bfloat16
    if narrowed and not bool(torch.isfinite(out).all()) and bool(torch.isfinite(t).all()):
        raise InvalidArgument(f"weight {name!r} overflows {entry.dtype} (|x| > 65504)")
    return out.numpy()


def pack_weights(config: ModelConfig, state_dict: Mapping[str, torch.Tensor],
                 layout: HbmLayout, names: Mapping[str, Source] | None = None) -> WeightsImage:
    """Build the weights part of all 32 channels.

    `names` maps logical names (kernels.weight_table.weight_specs) to the state dict's;
    unmapped names are looked up as they are, then in the family's Hugging Face naming."""
    table = layout.weight_table(config)
    lookup: dict[str, Source] = dict(HF_NAMES[config.family](config, state_dict))
    lookup.update({n: n for n in table if n in state_dict})
    lookup.update(names or {})
    channels = [np.zeros(layout.weights_bytes, np.uint8) for _ in range(layout.n_channels)]
    for name, entry in table.items():
        arr = _convert(name, _resolve(name, state_dict, lookup), entry)
        for c, dst in enumerate(channels):
            part = arr if entry.kind == "replicated" else arr[entry.rows[c][0]:entry.rows[c][1]]
            raw = np.ascontiguousarray(part).reshape(-1).view(np.uint8)
            dst[entry.offset:entry.offset + raw.size] = raw
    return WeightsImage(layout, table, channels)
