"""Weights: read HF checkpoints, make synthetic ones, map names, fingerprint.

Synthetic weights are byte-identical in any process on any machine: each tensor comes
from numpy's PCG64 seeded with a SHA-256 of (generator version, seed, tensor name) and
only integer arithmetic plus one IEEE float32 multiply turns the raw 64-bit words into
values (no transcendental functions, whose last bits differ between CPUs). Each value is
an Irwin-Hall sum of four 16-bit uniforms: near-normal, mean 0, std 0.02 (GPT-2 init).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import xxhash

from engine.config import ModelConfig
from engine.errors import InvalidArgument

SYNTH_VERSION = 1
SYNTH_STD = 0.02
_IH_MEAN = 131070  # mean of the sum of four U{0..65535}: 4 * 32767.5
_IH_STD = float(np.sqrt(4 * (65536.0**2 - 1) / 12))
_CHUNK = 1 << 22

Progress = Callable[[int, int], None] | None


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"hybrid-synthetic/v{SYNTH_VERSION}/{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:16], "little")


def synthetic_normal(seed: int, name: str, n: int) -> np.ndarray:
    """n float32 values, std SYNTH_STD, identical on every machine for (seed, name)."""
    bitgen = np.random.PCG64(_tensor_seed(seed, name))
    scale = np.float32(SYNTH_STD / _IH_STD)
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, _CHUNK):
        raw = bitgen.random_raw(min(_CHUNK, n - start))
        s = (raw & 0xFFFF) + ((raw >> 16) & 0xFFFF) + ((raw >> 32) & 0xFFFF) + (raw >> 48)
        centered = s.astype(np.int64) - _IH_MEAN  # |x| < 2^18: exact in float32
        out[start : start + len(raw)] = centered.astype(np.float32) * scale
    return out


def synthetic_state_dict(
    shapes: dict[str, torch.Size], seed: int, progress: Progress = None,
    cast: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> dict[str, torch.Tensor]:
    """Weights for the given parameter names/shapes (our naming): matrices ~N(0, 0.02),
    1-D `weight`s (norm gains) ones, biases zeros; generated in fp32, each passed
    through `cast` (device/dtype) as soon as it exists."""
    out = {}
    for i, (name, shape) in enumerate(sorted(shapes.items())):
        if len(shape) >= 2:
            n = int(np.prod(shape))
            t = torch.from_numpy(synthetic_normal(seed, name, n)).view(shape)
        elif name.endswith("bias"):
            t = torch.zeros(shape)
        else:
            t = torch.ones(shape)
        out[name] = cast(t)
        if progress:
            progress(i + 1, len(shapes))
    return out


def synthetic_fingerprint(preset: str, seed: int) -> str:
    return hashlib.sha256(f"synthetic:{preset}:{seed}:v{SYNTH_VERSION}".encode()).hexdigest()[:32]


def fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """xxh3-128 over sorted (name, dtype, shape, bytes) of the *source* tensors."""
    h = xxhash.xxh3_128()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # buffer, no copy
    return h.hexdigest()


# ---- reading Hugging Face checkpoints ----------------------------------------------

def checkpoint_files(model_dir: Path) -> list[Path]:
    """The weight files of an HF directory: (sharded) safetensors first, else .bin."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = model_dir / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [model_dir / s for s in shards]
        if (model_dir / single).is_file():
            return [model_dir / single]
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found
    raise InvalidArgument(
        f"no weights in {model_dir}: expected *.safetensors (optionally sharded with an "
        "index json) or pytorch_model.bin"
    )


def read_checkpoint(files: Iterable[Path]) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd.update(load_file(str(f), device="cpu"))
        else:
            sd.update(torch.load(str(f), map_location="cpu", weights_only=True))
    return sd


_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def hf_to_ours(cfg: ModelConfig, source: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Map HF names to our modules' names. Returns (ours, used_source): the latter is
    the subset of source tensors the model consumes, under their source names (what
    the fingerprint covers, so .bin and .safetensors of the same weights agree)."""
    from engine.gpt2 import CONV1D_SUFFIXES

    prefix = "transformer." if cfg.family == "gpt2" else "model."
    ours, used = {}, {}
    for name, t in source.items():
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # tied: the embedding is the head
        key = name[len(prefix) :] if name.startswith(prefix) else name
        if cfg.family == "gpt2" and key.endswith(CONV1D_SUFFIXES):
            t = t.t().contiguous()  # Conv1D [in, out] -> Linear [out, in]
        ours[key] = t
        used[name] = source[name]
    return ours, used


def ours_to_hf(cfg: ModelConfig, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of hf_to_ours: our names/orientation -> a transformers state dict
    (for baselines and parity checks on synthetic weights)."""
    from engine.gpt2 import CONV1D_SUFFIXES

    prefix = "transformer." if cfg.family == "gpt2" else "model."
    hf = {}
    for key, t in ours.items():
        if cfg.family == "gpt2" and key.endswith(CONV1D_SUFFIXES):
            t = t.t().contiguous()
        hf[key if key == "lm_head.weight" else prefix + key] = t
    if cfg.tie_embeddings:
        hf["lm_head.weight"] = hf[prefix + ("wte.weight" if cfg.family == "gpt2" else "embed_tokens.weight")]
    return hf


def check_names(expected: dict[str, torch.Size], got: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    bad = [n for n in expected if n in got and tuple(got[n].shape) != tuple(expected[n])]
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"missing {missing[:4]}")
        if extra:
            parts.append(f"unexpected {extra[:4]}")
        if bad:
            parts.append(f"wrong shape {[(n, tuple(got[n].shape)) for n in bad[:4]]}")
        raise InvalidArgument("checkpoint does not match its config.json: " + "; ".join(parts))
