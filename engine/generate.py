"""Single-process generation: prefill, then the decode loop shared with the `gpu`
decode backend (`decode_tokens`)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from engine.config import ModelConfig
from engine.cuda_graph import GraphDecoder, GraphPool
from engine.errors import InvalidArgument
from engine.kv_cache import KVCache
from engine.loader import LoadedModel
from engine.sampling import SamplingParams, sample
from engine.stop_text import StopStream

_POOLS_LOCK = threading.Lock()


@dataclass(frozen=True)
class GenerationResult:
    token_ids: list[int]  # generated ids only
    text: str
    finish_reason: str  # "eos" | "stop" | "length"
    timings: dict[str, float] = field(default_factory=dict)  # prefill_ms, decode_ms, total_ms


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


def eos_id(tokenizer, config: ModelConfig) -> int | None:
    """The id that ends a sequence: the tokenizer's, else the model config's."""
    eos = getattr(tokenizer, "eos_id", None)
    return eos if eos is not None else config.eos_token_id


def is_stop(token: int, eos_id: int | None, stop_ids: Iterable[int], ignore_eos: bool) -> str | None:
    if token == eos_id and not ignore_eos:
        return "eos"
    if token in stop_ids:
        return "stop"
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def graph_pool(lm: LoadedModel) -> GraphPool | None:
    """The model's pool of captured decode graphs (CUDA only; HYBRID_CUDA_GRAPHS=0 turns
    the fast path off)."""
    if lm.device.type != "cuda" or os.environ.get("HYBRID_CUDA_GRAPHS", "1") == "0":
        return None
    with _POOLS_LOCK:  # kept on the model so the pool lives and dies with its weights
        pool = getattr(lm.model, "_graph_pool", None)
        if pool is None:
            pool = GraphPool(lm.model, lm.config, lm.device, lm.dtype)
            lm.model._graph_pool = pool
        return pool


def eager_step(lm: LoadedModel):
    """The decode step outside a graph: the fused kernels (a private copy of their
    buffers) when the graph pool captures them, so a request that finds no free graph,
    or samples, computes exactly what a graphed one does (numerics must not depend on
    load); else model.decode_step. The fused step itself falls back to torch ops for
    caches it cannot take (a row of a batch cache)."""
    pool = graph_pool(lm)
    fused = getattr(pool, "fused", None)
    return fused.fork() if fused is not None else lm.model.decode_step


def new_cache(lm: LoadedModel, n_tokens: int, greedy: bool) -> tuple[KVCache, GraphDecoder | None]:
    """A KV cache for one request of n_tokens: a captured decoder's own cache when the
    fast path applies (greedy on CUDA and a graph is free), else a fresh cache. Return
    the decoder to `graph_pool(lm).release` when the request ends."""
    pool = graph_pool(lm) if greedy else None
    dec = pool.acquire(n_tokens) if pool is not None else None
    if dec is not None:
        return dec.cache, dec
    return KVCache(lm.config, 1, n_tokens, lm.device, lm.dtype), None


def _graph_tokens(dec: GraphDecoder, first_token: int, n_prompt: int, max_new_tokens: int,
                  eos: int | None, stop_ids: frozenset[int], ignore_eos: bool) -> Iterator[int]:
    for token in dec.run(first_token, n_prompt, max_new_tokens - 1):
        yield token
        if is_stop(token, eos, stop_ids, ignore_eos):
            return


def decode_tokens(
    lm: LoadedModel, cache: KVCache, first_token: int, n_prompt: int, max_new_tokens: int,
    params: SamplingParams, stop_ids: Iterable[int] = (), row: int = 0, ignore_eos: bool = False,
    graph: GraphDecoder | None = None,
) -> Iterator[int]:
    """Yield generated tokens 1..max_new_tokens-1 given cache row `row` filled for
    positions [0, n_prompt) and prefill's `first_token` (index 0). Stops after EOS
    (unless ignore_eos) or a stop id, yielding that token last; yields nothing if
    first_token already stops. `params` must carry its seed when sampling."""
    stop_ids = frozenset(stop_ids)
    eos = eos_id(lm.tokenizer, lm.config)
    if is_stop(first_token, eos, stop_ids, ignore_eos):
        return
    if graph is not None and params.greedy and graph.cache is cache:
        yield from _graph_tokens(graph, first_token, n_prompt, max_new_tokens, eos, stop_ids,
                                 ignore_eos)
        return
    view = cache.rows(row, 1) if row or cache.batch != 1 else cache
    step_fn = eager_step(lm)
    tokens = torch.tensor([first_token], dtype=torch.long, device=lm.device)
    positions = torch.tensor([n_prompt], dtype=torch.long, device=lm.device)
    for step in range(1, max_new_tokens):
        logits = step_fn(tokens, positions, view)
        nxt = sample(logits, params, step)
        token = int(nxt[0])  # the caller needs the id now: one sync per token
        yield token
        if is_stop(token, eos, stop_ids, ignore_eos):
            return
        tokens.copy_(nxt)
        positions.add_(1)


def generate(
    lm: LoadedModel, prompt_ids: list[int], max_new_tokens: int,
    params: SamplingParams = SamplingParams(), stop_ids: Iterable[int] = (),  # noqa: B008 - frozen
    on_token: Callable[[int], None] | None = None, ignore_eos: bool = False,
    stop: Iterable[str] = (),
) -> GenerationResult:
    """Greedy or sampled generation in this process. Ends at max_new_tokens, EOS (unless
    ignore_eos), a stop id (kept as the last token) or a stop string (engine.stop_text:
    the text ends before it; the tokens that made it are kept)."""
    check_request(lm.config, prompt_ids, max_new_tokens)
    text = StopStream(lm.tokenizer, stop) if stop else None
    params = params.with_seed()
    stop_ids = frozenset(stop_ids)
    n = len(prompt_ids)
    cache, graph = new_cache(lm, n + max_new_tokens, params.greedy)
    out: list[int] = []
    pieces: list[str] = []

    def take(tok: int) -> bool:  # True: a stop string completed
        out.append(tok)
        if on_token:
            on_token(tok)
        if text is None:
            return False
        piece, hit = text.push(tok)
        pieces.append(piece)
        return hit

    try:
        t0 = time.perf_counter()
        ids = torch.tensor(prompt_ids, dtype=torch.long, device=lm.device)
        first = int(sample(lm.model.prefill(ids, cache), params, 0)[0])
        t1 = time.perf_counter()
        if not take(first):
            for tok in decode_tokens(lm, cache, first, n, max_new_tokens, params, stop_ids,
                                     ignore_eos=ignore_eos, graph=graph):
                if take(tok):
                    break
        _sync(lm.device)
        t2 = time.perf_counter()
    finally:
        if graph is not None:
            graph_pool(lm).release(graph)
    eos = eos_id(lm.tokenizer, lm.config)
    reason = is_stop(out[-1], eos, stop_ids, ignore_eos) or "length"
    if text is not None:
        piece, hit = text.flush()
        pieces.append(piece)
        reason = "stop" if hit else reason
    timings = {"prefill_ms": (t1 - t0) * 1e3, "decode_ms": (t2 - t1) * 1e3, "total_ms": (t2 - t0) * 1e3}
    out_text = "".join(pieces) if text is not None else lm.tokenizer.decode(out)
    return GenerationResult(out, out_text, reason, timings)
