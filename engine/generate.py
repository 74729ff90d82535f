"""Single-process generation through the engine loop (engine/llm_engine.py), the same
core the decode service runs: `hybrid generate --local` and the benchmarks."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from engine.config import ModelConfig
from engine.errors import InvalidArgument
from engine.loader import LoadedModel
from engine.sampling import SamplingParams
from engine.sequence import eos_id, is_stop
from engine.stop_text import StopStream

__all__ = ["GenerationResult", "check_request", "eos_id", "generate", "is_stop", "local_engine"]
_ENGINES_LOCK = threading.Lock()


@dataclass(frozen=True)
class GenerationResult:
    token_ids: list[int]  # generated ids only
    text: str
    finish_reason: str  # "eos" | "stop" | "length"
    timings: dict[str, float] = field(default_factory=dict)  # ttft_ms, decode_ms, total_ms


def check_request(cfg: ModelConfig, prompt_ids: list[int], max_new_tokens: int) -> None:
    """Raise InvalidArgument (one clear line) for a request the model cannot serve."""
    if not prompt_ids:
        raise InvalidArgument("empty prompt: give a prompt or --prompt-ids")
    if max_new_tokens < 1:
        raise InvalidArgument(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    bad = [i for i in prompt_ids if not 0 <= i < cfg.vocab_size]
    if bad:
        raise InvalidArgument(
            f"token id {bad[0]} outside the vocabulary [0, {cfg.vocab_size}) of {cfg.name}")
    total = len(prompt_ids) + max_new_tokens
    if total > cfg.max_positions:
        raise InvalidArgument(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
            f"exceeds the model's {cfg.max_positions} positions")


def local_engine(lm: LoadedModel, max_batch: int | None = None):
    """The model's in-process engine loop, made on first use and kept with the weights
    (HYBRID_LOCAL_MAX_BATCH rows, default 16)."""
    from engine.llm_engine import DecodeEngine

    with _ENGINES_LOCK:
        eng = getattr(lm.model, "_engine", None)
        if eng is None:
            n = max_batch or int(os.environ.get("HYBRID_LOCAL_MAX_BATCH", "16"))
            eng = DecodeEngine(lm, max_batch=n)
            lm.model._engine = eng
        return eng


def generate(
    lm: LoadedModel, prompt_ids: list[int], max_new_tokens: int,
    params: SamplingParams = SamplingParams(), stop_ids: Iterable[int] = (),  # noqa: B008 - frozen
    on_token: Callable[[int], None] | None = None, ignore_eos: bool = False,
    stop: Iterable[str] = (),
) -> GenerationResult:
    """Greedy or sampled generation in this process. Ends at max_new_tokens, EOS (unless
    ignore_eos), a stop id (kept as the last token) or a stop string (engine.stop_text:
    the text ends before it; the tokens that made it are kept). Thread-safe: concurrent
    calls share the model's engine loop and decode in one batch."""
    check_request(lm.config, prompt_ids, max_new_tokens)
    text = StopStream(lm.tokenizer, stop) if stop else None
    stop_ids = frozenset(stop_ids)
    out: list[int] = []
    pieces: list[str] = []
    t0 = time.perf_counter()
    t1 = t0
    req = local_engine(lm).submit(prompt_ids, max_new_tokens, params, ignore_eos, stop_ids)
    for tok in req:
        if not out:
            t1 = time.perf_counter()
        out.append(tok)
        if on_token:
            on_token(tok)
        if text is not None:
            piece, hit = text.push(tok)
            pieces.append(piece)
            if hit:
                req.cancel()
                break
    t2 = time.perf_counter()
    reason = is_stop(out[-1], eos_id(lm.tokenizer, lm.config), stop_ids, ignore_eos) or "length"
    if text is not None:
        piece, hit = text.flush()
        pieces.append(piece)
        reason = "stop" if hit else reason
    timings = {"prefill_ms": (t1 - t0) * 1e3, "decode_ms": (t2 - t1) * 1e3,
               "total_ms": (t2 - t0) * 1e3}
    out_text = "".join(pieces) if text is not None else lm.tokenizer.decode(out)
    return GenerationResult(out, out_text, reason, timings)
