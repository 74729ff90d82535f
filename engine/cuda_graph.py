"""The fast decode path: one decode step captured in a CUDA graph that advances itself.

Eager decode of a 24-layer model launches ~400 small kernels per token from Python and
is CPU-bound (7-10 ms/token on an H200). Here the whole step (embedding, all layers,
lm_head, greedy argmax, position += 1, token written to an output ring) is captured
once per (model, cache length) and replayed. The host never waits per token: it queues
`chunk` replays, then an async copy of their tokens into pinned memory, and only reads
the previous chunk while the GPU runs the next one. EOS is therefore seen up to one
chunk late; the extra tokens are discarded (they never exceed the cache, whose length
bounds the loop).

Greedy only: sampled decoding draws step-keyed noise on the host (engine.sampling) and
stays on the eager path, so both paths give the tokens of single-process generation.
"""

from __future__ import annotations

import threading
import warnings
from collections import deque
from collections.abc import Iterator

import torch

from engine.fused_decode import fused_step_for
from engine.kv_cache import KVCache

# Cache lengths are rounded up to one of these buckets, so a few graphs serve all requests.
MIN_BUCKET = 64


def bucket_len(n_tokens: int, max_positions: int) -> int:
    """Smallest power of two >= n_tokens (at least MIN_BUCKET), capped at max_positions."""
    length = MIN_BUCKET
    while length < n_tokens:
        length *= 2
    return min(length, max_positions)


class GraphDecoder:
    """A self-advancing greedy decode step for batch 1 over its own KV cache.

    Owns `cache` (length `max_len`): fill rows [0, n_prompt) (prefill or ingest), then
    call `run`. Not thread-safe: one request at a time (see GraphPool)."""

    def __init__(self, model: torch.nn.Module, cache: KVCache, step_fn=None) -> None:
        if cache.device.type != "cuda" or cache.batch != 1:
            raise ValueError("GraphDecoder needs a batch-1 KV cache on a CUDA device")
        self.model, self.cache = model, cache
        # step_fn: model.decode_step or a torch.compile'd version of it (fused pointwise ops)
        self.step_fn = step_fn or model.decode_step
        dev = cache.device
        self.tokens = torch.zeros(1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(1, dtype=torch.long, device=dev)
        self.index = torch.zeros(1, dtype=torch.long, device=dev)  # where the next token goes
        self.out = torch.zeros(cache.max_len + 1, dtype=torch.long, device=dev)
        self.host_out = torch.zeros(cache.max_len + 1, dtype=torch.long).pin_memory()
        self.graph = self._capture()

    def _step(self) -> None:
        logits = self.step_fn(self.tokens, self.positions, self.cache)
        greedy = getattr(self.step_fn, "greedy", None)    # the fused step's own argmax
        nxt = greedy() if greedy is not None else torch.argmax(logits, dim=-1)
        self.tokens.copy_(nxt)
        self.positions.add_(1)
        self.out.index_copy_(0, self.index, nxt)
        self.index.add_(1)

    def _capture(self) -> torch.cuda.CUDAGraph:
        # Warm-up on a side stream (cuBLAS handles, workspaces) with the cache saved and
        # restored: the warm-up step writes K/V at position 0.
        k0, v0 = self.cache.k[:, :, :, :1].clone(), self.cache.v[:, :, :, :1].clone()
        side = torch.cuda.Stream(self.cache.device)
        side.wait_stream(torch.cuda.current_stream(self.cache.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.positions.zero_()  # every warm-up step writes position 0 only
                self._step()
        torch.cuda.current_stream(self.cache.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA call (a second engine in this process, a
        # pool thread polling an event) must not invalidate this thread's capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._step()
        self.cache.k[:, :, :, :1].copy_(k0)
        self.cache.v[:, :, :, :1].copy_(v0)
        return graph

    @torch.no_grad()
    def run(self, first_token: int, n_prompt: int, n_steps: int, chunk: int = 16) -> Iterator[int]:
        """Yield up to `n_steps` greedy tokens following `first_token` at position
        n_prompt. The consumer may stop iterating at any time (EOS)."""
        if n_prompt + n_steps > self.cache.max_len:
            raise ValueError(f"{n_prompt} + {n_steps} tokens exceed the graph's cache "
                             f"length {self.cache.max_len}")
        self.tokens.fill_(first_token)
        self.positions.fill_(n_prompt)
        self.index.fill_(0)
        pending: deque[tuple[int, int, torch.cuda.Event]] = deque()
        done = 0
        while done < n_steps or pending:
            if done < n_steps:
                n = min(chunk, n_steps - done)
                for _ in range(n):
                    self.graph.replay()
                self.host_out[done : done + n].copy_(self.out[done : done + n], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record()
                pending.append((done, n, ev))
                done += n
            if len(pending) > 1 or done >= n_steps:
                start, n, ev = pending.popleft()
                ev.synchronize()
                yield from self.host_out[start : start + n].tolist()


class GraphPool:
    """Captured decoders per cache-length bucket, lent one request at a time."""

    def __init__(self, model: torch.nn.Module, config, device: torch.device,
                 dtype: torch.dtype, per_bucket: int = 2) -> None:
        self.model, self.config, self.device, self.dtype = model, config, device, dtype
        self.per_bucket = per_bucket
        self.fused = fused_step_for(model)   # None: the torch ops of model.decode_step
        self._free: dict[int, list[GraphDecoder]] = {}
        self._made: dict[int, int] = {}
        self._lock = threading.Lock()

    def acquire(self, n_tokens: int) -> GraphDecoder | None:
        """A decoder whose cache holds n_tokens, or None when all of its bucket are
        lent (the caller then decodes eagerly)."""
        length = bucket_len(n_tokens, self.config.max_positions)
        if length < n_tokens:
            return None
        with self._lock:
            free = self._free.setdefault(length, [])
            if free:
                return free.pop()
            if self._made.get(length, 0) >= self.per_bucket:
                return None
            self._made[length] = self._made.get(length, 0) + 1
        try:
            cache = KVCache(self.config, 1, length, self.device, self.dtype)
            return self._decoder(cache)
        except (RuntimeError, torch.OutOfMemoryError):
            # Capture can fail (memory, an op that cannot be captured): the request
            # still runs, eagerly; the slot in this bucket is given back.
            with self._lock:
                self._made[length] -= 1
            return None

    def _decoder(self, cache: KVCache) -> GraphDecoder:
        """A graph of the fused step when there is one, else of model.decode_step. A
        fused capture that fails turns the fused path off for this pool (reported)."""
        if self.fused is not None:
            try:
                return GraphDecoder(self.model, cache, step_fn=self.fused.fork())
            except Exception as exc:
                warnings.warn(f"fused decode capture failed, using torch ops: "
                              f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
                self.fused = None
        return GraphDecoder(self.model, cache)

    def release(self, dec: GraphDecoder) -> None:
        with self._lock:
            self._free.setdefault(dec.cache.max_len, []).append(dec)
