"""What the engine loop does with its batch each iteration (engine/llm_engine.py keeps
the public API, the command queue, admission and the thread): local prefills in packed
batches, moving ready sequences into batch rows, launching a step and reading the
previous one back (one step of lookahead on a pipelined runner), delivering tokens and
ending sequences. Everything here runs on the loop thread; `_end` (the engine's) takes
the lock to give memory back.
"""

from __future__ import annotations

import logging

from engine.errors import HybridError
from engine.sequence import DONE, SeqState, Sequence, is_stop

log = logging.getLogger("hybrid.engine")


class StepFailed(HybridError):
    """A decode step raised: its sequences end with INTERNAL."""


def failure(e: BaseException, what: str) -> HybridError:
    """The error a sequence ends with: ours as they are (they carry their status),
    anything else as a StepFailed (INTERNAL) naming what failed."""
    return e if isinstance(e, HybridError) else StepFailed(f"{what}: {type(e).__name__}: {e}")


class BatchSteps:
    """Mixed into DecodeEngine: needs `runner`, `running`, `_ready`, `_pending`, `_cond`,
    `eos`, `_touched`, `_end(seq, end)` and `_admit_waiting()` from it."""

    def _begin(self, seq: Sequence, first: int, deliver: bool) -> None:
        self.runner.kv_written(seq)  # its first step must see the KV just written
        seq.token, seq.position, seq.step, seq.n_out = first, seq.req.n_prompt, 1, 1
        if deliver:
            seq.out.put(first)
            self._touched.append(seq)
        r = seq.req
        if r.max_new_tokens <= 1 or is_stop(first, self.eos, r.stop_ids, r.ignore_eos):
            self._finish(seq, DONE)
            return
        seq.state = SeqState.READY
        self._ready.append(seq)

    PREFILL_TOKENS = 8192  # per packed forward: bounds how long decode steps wait

    def _prefill(self, cmds: list[tuple]) -> None:
        """Local prompts, batched: packed forwards of up to PREFILL_TOKENS tokens."""
        live = [(seq, ids) for _, seq, ids in cmds
                if seq.state is SeqState.INGESTING and not seq.cancelled]
        while live:
            n, total = 0, 0
            while n < len(live) and (n == 0 or total + len(live[n][1]) <= self.PREFILL_TOKENS):
                total += len(live[n][1])
                n += 1
            batch, live = live[:n], live[n:]
            try:
                firsts = self.runner.prefill([s for s, _ in batch], [ids for _, ids in batch])
            except Exception as e:
                log.exception("engine: prefill of %d prompts failed", len(batch))
                for s, _ in batch:
                    self._finish(s, failure(e, "prefill"))
                continue
            for (s, _), first in zip(batch, firsts, strict=True):
                self._begin(s, first, deliver=True)

    def _schedule(self) -> None:
        self.running = [s for s in self.running if not s.cancelled]
        while self._ready and len(self.running) < self.max_batch:
            s = self._ready.popleft()
            if s.cancelled:
                continue  # its cancel command finishes it
            self.runner.before_step(s)
            s.state = SeqState.RUNNING
            self.running.append(s)

    def _step(self) -> None:
        """Launch a step for the running rows; with a pipelined runner, read the
        previous step's tokens back while this one runs on the device (one step of
        lookahead: a row that hits EOS has run one extra step, whose token is dropped
        and whose KV slot was reserved for it)."""
        greedy = all(s.req.params.greedy for s in self.running)
        if self._pending is not None and not (self.runner.pipelined and greedy):
            self._collect()  # sampled rows need this step's logits before the next one
        rows = [s for s in self.running if s.n_out + s.inflight < s.req.max_new_tokens]
        if not rows:  # every row waits only for its last token
            self._collect()
            return
        try:
            launched = self.runner.launch(rows)
        except Exception as e:
            log.exception("decode step failed (%d rows)", len(rows))
            self._collect()
            for s in rows:
                self._finish(s, StepFailed(f"decode step failed: {type(e).__name__}: {e}"))
            return
        for s in rows:
            s.inflight += 1
        self._collect()
        self._pending = (rows, launched)
        if not (self.runner.pipelined and greedy):
            self._collect()

    def _collect(self) -> None:
        """Read back the step in flight (if any) and deliver its tokens."""
        if self._pending is None:
            return
        rows, launched = self._pending
        self._pending = None
        try:
            tokens = self.runner.collect(launched)
        except Exception as e:
            log.exception("decode step failed (%d rows)", len(rows))
            tokens = [StepFailed(f"decode step failed: {type(e).__name__}: {e}")] * len(rows)
            self.runner.reset()
        for s, tok in zip(rows, tokens, strict=True):
            s.inflight -= 1
            if s.state is SeqState.FINISHED:
                self._release_if_done(s)  # ended while the step ran: drop its token
            elif isinstance(tok, BaseException):
                self._finish(s, failure(tok, "decode"))
            else:
                self._deliver(s, tok)

    def _release_if_done(self, s: Sequence) -> None:
        if s.release_later and not s.inflight:
            s.release_later = False
            with self._cond:
                self.runner.release(s)
                self._admit_waiting()

    def _deliver(self, s: Sequence, tok: int) -> None:
        s.out.put(tok)
        self._touched.append(s)
        s.n_out += 1
        r = s.req
        if s.n_out >= r.max_new_tokens or is_stop(tok, self.eos, r.stop_ids, r.ignore_eos):
            self._finish(s, DONE)
            return
        s.token, s.position, s.step = tok, s.position + 1, s.step + 1

    def _finish(self, seq: Sequence, end: object) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq.state is SeqState.READY and seq in self._ready:
            self._ready.remove(seq)
        with self._cond:
            self._end(seq, end)

