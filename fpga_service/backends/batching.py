"""Continuous batching for the `gpu` decode backend (opt-in: GpuBackend(max_batch > 1)).

One `BatchScheduler` owns one KV cache of `max_batch` rows x `max_positions` and one
thread. A session borrows a row (`acquire`), ingests its prompt's KV straight into it,
then `submit`s its first token; from then on every decode step of the thread runs ONE
`model.decode_step` over all rows in their decode phase, samples each row with its own
params and step index, and hands each token to its session through a queue.

Which rows a step computes: the prefix [0, hi) of the cache, hi = 1 + the highest
active row. `decode_attention` works on a contiguous prefix of rows, and gathering
scattered rows would copy their whole KV every layer, so instead rows are lent lowest
first (the prefix stays compact) and the idle rows inside the prefix ride along with
token 0 at the scratch position `max_positions - 1`. That position is never part of a
real sequence's visible KV: a prompt has at most max_positions - 1 tokens and the last
decode step writes position max_positions - 2. So an idle row (free, still ingesting,
or finished but not yet closed) is only ever written at its scratch slot, which no
ingest touches. Per step the host only fills two small preallocated index buffers.

Row ownership: the thread never frees a row it is computing. `release` (close() or an
abandoned iterator, from any thread) marks the row closed; if it is in the active set
the thread drops and frees it after the current step, without delivering that step's
token, so a freed row is never written by a later step except at its scratch slot.
"""

from __future__ import annotations

import heapq
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from engine.errors import Unavailable
from engine.generate import eos_id, is_stop
from engine.kv_cache import KVCache
from engine.loader import LoadedModel
from engine.sampling import sample

from .base import DecodeSpec

log = logging.getLogger("hybrid.decode")
DONE = object()  # queue sentinel: the row's sequence ended normally


@dataclass(eq=False)
class BatchRow:
    """One session's place in the batch. Fields below `out` are the thread's, except
    `closed`/`freed`, which change only under the scheduler's lock."""

    index: int
    out: queue.Queue = field(default_factory=queue.Queue)  # tokens, then DONE or an exception
    spec: DecodeSpec | None = None
    token: int = 0  # input token of the next step
    position: int = 0  # where that token's K/V goes
    step: int = 1  # generated index of the token the next step produces
    closed: bool = False
    freed: bool = False


class BatchScheduler:
    def __init__(self, lm: LoadedModel, max_batch: int) -> None:
        self.lm, self.max_batch = lm, max_batch
        cfg = lm.config
        self.cache = KVCache(cfg, max_batch, cfg.max_positions, lm.device, lm.dtype)
        self.scratch = cfg.max_positions - 1
        self.eos = eos_id(lm.tokenizer, cfg)
        self._views = [self.cache.rows(0, n) for n in range(1, max_batch + 1)]
        self._init_index_buffers()
        self._free: list[int] = list(range(max_batch))  # a heap: lowest row first
        self._active: dict[int, BatchRow] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self.steps = 0  # decode steps run, and
        self.tokens = 0  # tokens they produced: tokens / steps = mean rows per step
        # Fault injection for tests: steps slow enough that concurrent requests overlap
        # even when a loaded machine staggers their arrival.
        self.fault_step_delay_s = float(os.environ.get("HYBRID_FAULT_STEP_DELAY_MS", 0)) / 1e3
        self._thread = threading.Thread(target=self._loop, name="decode-batch", daemon=True)
        self._thread.start()

    def _init_index_buffers(self) -> None:
        """Host (numpy-backed, pinned on CUDA) and device token/position buffers, reused
        by every step so a step allocates no index tensors of its own."""
        dev = self.lm.device
        pin = dev.type == "cuda"
        self._tok_host = torch.zeros(self.max_batch, dtype=torch.long, pin_memory=pin)
        self._pos_host = torch.zeros(self.max_batch, dtype=torch.long, pin_memory=pin)
        self._tok_np, self._pos_np = self._tok_host.numpy(), self._pos_host.numpy()
        if dev.type == "cpu":
            self._tok_dev, self._pos_dev = self._tok_host, self._pos_host
        else:
            self._tok_dev = torch.zeros(self.max_batch, dtype=torch.long, device=dev)
            self._pos_dev = torch.zeros(self.max_batch, dtype=torch.long, device=dev)

    # ---- called from session threads -------------------------------------------
    def acquire(self) -> BatchRow | None:
        """Lend the lowest free row, or None when all are busy (the caller falls back)."""
        with self._cond:
            if self._stopping or not self._free:
                return None
            return BatchRow(heapq.heappop(self._free))

    def rows_busy(self) -> int:
        with self._cond:
            return self.max_batch - len(self._free)

    def submit(self, row: BatchRow, spec: DecodeSpec, first_token: int) -> None:
        """Start decoding `row` (its KV for [0, spec.n_prompt) is in the cache)."""
        row.spec, row.token, row.position, row.step = spec, first_token, spec.n_prompt, 1
        with self._cond:
            if self._stopping:
                raise Unavailable("decode backend is shutting down")
            if row.closed:  # released before it started: end the iterator at once
                row.out.put(DONE)
                return
            self._active[row.index] = row
            self._cond.notify()

    def release(self, row: BatchRow) -> None:
        """Give the row back (idempotent, any thread). A row inside the running step is
        freed by the thread after that step."""
        with self._cond:
            row.closed = True
            if self._active.get(row.index) is not row:
                self._free_row(row)

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def _free_row(self, row: BatchRow) -> None:  # caller holds the lock
        if not row.freed:
            row.freed = True
            heapq.heappush(self._free, row.index)

    # ---- the thread ----------------------------------------------------------------
    def _loop(self) -> None:
        try:
            if self.lm.device.type == "cuda":
                # the cache's device has an index even when the model's is plain "cuda"
                torch.cuda.set_device(self.cache.k.device)
            self._serve()
        except BaseException as e:  # the thread must never die silently: no iterator hangs
            log.exception("batched decode thread failed")
            with self._cond:
                self._stopping = True   # later sessions get no row: they decode unbatched
            self._fail(None, Unavailable(f"batched decode stopped: {type(e).__name__}: {e}"))
            return
        self._fail(None, Unavailable("decode backend closed"))

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._active and not self._stopping:
                    self._cond.wait()  # idle: sleep until a submit or close
                if self._stopping:
                    return
                rows = sorted(self._active.values(), key=lambda r: r.index)
            try:
                if self.fault_step_delay_s:
                    time.sleep(self.fault_step_delay_s)
                tokens = self._step(rows)
            except Exception as e:  # fail this step's sessions, keep serving the others
                log.exception("batched decode step failed")
                self._fail(rows, e)
                continue
            self._deliver(rows, tokens)

    def _step(self, rows: list[BatchRow]) -> list[int | BaseException]:
        """One decode step over rows [0, hi); returns each given row's token (or the
        exception its sampling raised)."""
        hi = rows[-1].index + 1
        self._tok_np[:hi] = 0
        self._pos_np[:hi] = self.scratch  # idle rows write only their scratch slot
        for r in rows:
            self._tok_np[r.index], self._pos_np[r.index] = r.token, r.position
        if self._tok_dev is not self._tok_host:
            # non_blocking is safe: the host buffers change again only after this
            # step's tokens were read back, which waits for the copy
            self._tok_dev[:hi].copy_(self._tok_host[:hi], non_blocking=True)
            self._pos_dev[:hi].copy_(self._pos_host[:hi], non_blocking=True)
        with torch.inference_mode():
            logits = self.lm.model.decode_step(self._tok_dev[:hi], self._pos_dev[:hi],
                                               self._views[hi - 1])
            self.steps += 1
            return self._sample(logits, rows)

    @staticmethod
    def _sample(logits: torch.Tensor, rows: list[BatchRow]) -> list[int | BaseException]:
        # greedy rows: one argmax and one device->host sync for all of them
        greedy = (torch.argmax(logits, dim=-1).tolist()
                  if any(r.spec.sampling.greedy for r in rows) else None)
        out: list[int | BaseException] = []
        for r in rows:
            if r.spec.sampling.greedy:
                out.append(greedy[r.index])
                continue
            try:  # per-row params and step: the noise depends only on (seed, step)
                out.append(int(sample(logits[r.index], r.spec.sampling, r.step)[0]))
            except Exception as e:
                out.append(e)
        return out

    def _deliver(self, rows: list[BatchRow], tokens: list[int | BaseException]) -> None:
        with self._cond:
            for r, tok in zip(rows, tokens, strict=True):
                if r.closed:  # closed during the step: drop its token, free the row now
                    self._retire(r, DONE)  # ends an iterator still waiting on the queue
                    self._free_row(r)
                    continue
                if isinstance(tok, BaseException):
                    self._retire(r, tok)
                    continue
                r.out.put(tok)
                self.tokens += 1
                s = r.spec
                r.token, r.position, r.step = tok, r.position + 1, r.step + 1
                if (r.step >= s.max_new_tokens
                        or is_stop(tok, self.eos, s.stop_ids, s.ignore_eos)):
                    self._retire(r, DONE)

    def _retire(self, row: BatchRow, end: object) -> None:
        """Leave the active set (caller holds the lock); the row stays lent until its
        session releases it."""
        self._active.pop(row.index, None)
        row.out.put(end)

    def _fail(self, rows: list[BatchRow] | None, exc: BaseException) -> None:
        """End `rows` (all active rows when None) with `exc` so no iterator hangs."""
        with self._cond:
            for r in list(self._active.values()) if rows is None else rows:
                if self._active.get(r.index) is r:
                    self._retire(r, exc)
                    if r.closed:
                        self._free_row(r)
