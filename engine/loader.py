"""`load_model(spec, device, dtype, progress)`: model + tokenizer + fingerprint.

spec is one of
- a local Hugging Face directory (config.json + *.safetensors or pytorch_model.bin),
- a hub id (only where the machine is online; otherwise a clear error saying what to do),
- `synthetic:<preset>[:seed]`: seeded random weights of a preset's shape (seed 0).
"""

from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from engine import weights as W
from engine.config import PRESETS, ModelConfig
from engine.errors import InvalidArgument, NotFound, Unavailable
from engine.tokenizer import Tokenizer, load_tokenizer

SYNTHETIC = "synthetic:"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class LoadedModel:
    spec: str
    config: ModelConfig
    model: nn.Module
    tokenizer: Tokenizer
    fingerprint: str
    synthetic: bool
    device: torch.device
    dtype: torch.dtype


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' = cuda when a GPU is available, else cpu; cpu, cuda, cuda:N as given."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InvalidArgument(f"bad device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgument(f"device {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidArgument(f"device {device!r}: only {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise InvalidArgument(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' = float32 on CPU, float16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InvalidArgument(f"unknown dtype {dtype!r}: use float32, float16 or bfloat16")
    return DTYPES[dtype]


def build_model(cfg: ModelConfig) -> nn.Module:
    from engine.gpt2 import GPT2
    from engine.llama import Llama

    return {"gpt2": GPT2, "llama": Llama}[cfg.family](cfg)


def parse_synthetic(spec: str) -> tuple[str, int]:
    parts = spec[len(SYNTHETIC) :].split(":")
    name = parts[0]
    if name not in PRESETS or len(parts) > 2:
        raise InvalidArgument(
            f"unknown model {spec!r}: synthetic presets are {', '.join(sorted(PRESETS))} "
            "(synthetic:<preset>[:seed])"
        )
    try:
        seed = int(parts[1]) if len(parts) == 2 else 0
    except ValueError:
        raise InvalidArgument(f"bad seed in {spec!r}: must be an integer") from None
    if seed < 0:
        raise InvalidArgument(f"bad seed in {spec!r}: must be >= 0")
    return name, seed


def load_model(
    spec: str, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
    progress: bool | W.Progress = False,
) -> LoadedModel:
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    report = _progress_printer() if progress is True else (progress or None)

    def cast(t: torch.Tensor) -> torch.Tensor:  # per tensor: peak memory ~ one model
        return t.to(device=dev, dtype=dt if t.is_floating_point() else t.dtype)

    if spec.startswith(SYNTHETIC):
        cfg, sd, fp, model_dir = _synthetic(spec, cast, report)
    else:
        cfg, sd, fp, model_dir = _checkpoint(spec, cast, report)
    model = build_model_meta(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    model = model.eval().requires_grad_(False)
    tok = load_tokenizer(model_dir, cfg.vocab_size, cfg.eos_token_id)
    return LoadedModel(spec, cfg, model, tok, fp, model_dir is None, dev, dt)


def _shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in build_model_meta(cfg).state_dict().items()}


def _synthetic(spec: str, cast, report):
    name, seed = parse_synthetic(spec)
    cfg = PRESETS[name]
    sd = W.synthetic_state_dict(_shapes(cfg), seed, report, cast)
    return cfg, sd, W.synthetic_fingerprint(name, seed), None


def _checkpoint(spec: str, cast, report):
    model_dir = resolve_model_dir(spec)
    cfg = _config_from_dir(model_dir)
    shapes = _shapes(cfg)
    source = W.read_checkpoint(W.checkpoint_files(model_dir))
    ours, used = W.hf_to_ours(cfg, source)
    W.check_names(shapes, ours)
    fp = W.fingerprint(used)  # over source bytes, before any cast
    del source, used
    sd = {}
    for i, name in enumerate(sorted(ours)):
        sd[name] = cast(ours.pop(name))
        if report:
            report(i + 1, len(shapes))
    return cfg, sd, fp, model_dir


def peek_config(spec: str) -> ModelConfig | None:
    """The config of a synthetic preset or local directory without loading weights
    (None for a hub id), so requests can be checked before a slow load."""
    if spec.startswith(SYNTHETIC):
        return PRESETS[parse_synthetic(spec)[0]]
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        return _config_from_dir(path)
    return None


def build_model_meta(cfg: ModelConfig) -> nn.Module:
    """Shapes only: real tensors arrive through load_state_dict(assign=True), so a
    large model is never initialised twice."""
    with torch.device("meta"):
        return build_model(cfg)


def _config_from_dir(model_dir: Path) -> ModelConfig:
    try:
        return ModelConfig.from_hf(model_dir, name=model_dir.name)
    except (KeyError, ValueError) as e:
        raise InvalidArgument(f"unsupported config.json in {model_dir}: {e}") from None


def resolve_model_dir(spec: str) -> Path:
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InvalidArgument(f"{spec} has no config.json: not a Hugging Face model directory")
        return path
    if spec.startswith(("/", ".", "~")) or os.sep in spec and path.parent.exists():
        raise NotFound(f"no model directory at {spec}")
    if not _HUB_ID.fullmatch(spec):
        raise InvalidArgument(f"unknown model {spec!r}: pass a local directory, a hub id or synthetic:<preset>")
    return _download(spec)


def _offline_hint(spec: str, why: str) -> str:
    return (f"cannot fetch {spec!r} from the Hugging Face hub ({why}): pass a local model "
            f"directory (config.json + *.safetensors) or synthetic:<preset> "
            f"(presets: {', '.join(sorted(PRESETS))})")


def _download(spec: str) -> Path:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise Unavailable(_offline_hint(spec, "HF_HUB_OFFLINE is set"))
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        raise Unavailable(_offline_hint(spec, "this machine is offline")) from None
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise Unavailable(_offline_hint(spec, "huggingface_hub is not installed")) from None
    try:
        return Path(snapshot_download(spec, allow_patterns=[
            "config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json"]))
    except Exception as e:  # noqa: BLE001 - hub errors come in many classes
        raise NotFound(f"cannot fetch {spec!r} from the hub: {type(e).__name__}: {e}") from None


def _progress_printer():
    def report(done: int, total: int) -> None:
        sys.stderr.write(f"\rloading weights: {done}/{total} tensors")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return report
