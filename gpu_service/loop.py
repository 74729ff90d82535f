"""The prefill engine loop: ONE thread owns all device work of the prefill service.

Why: with a thread per request, several threads issued CUDA work at once and prefills
ran one after another anyway, so TTFT under load was the sum of everyone's prefills
(../shared/docs/design.md, "one engine loop per service"). Here the loop takes every
waiting prompt (up to `max_batch` prompts and `max_batch_tokens` tokens, oldest first)
into one packed forward (`PrefillRunner.run_batch`), so a burst of N requests costs
about one prefill instead of N.

Contract:
- RPC handlers (on the asyncio loop) validate, allocate the slot, then `submit_async`
  a job and await its future, which the loop thread resolves through
  `call_soon_threadsafe`. A handler whose client went away calls `cancel(job)`: a
  queued job is removed and fails with Cancelled at once, without running; a running
  one stops shipping its layers at the next one (the rest of its batch is unaffected).
- Every job is settled exactly once: its PrefillResult, Cancelled, or the error of a
  batch that failed as a whole (then the loop goes on with the next batch). A failed
  job is settled only after every copy into its slot has landed: the handler that
  allocated the slot frees it.
- The loop never dies silently: if its thread ends for any reason other than
  `close()`, the jobs in flight, the queued ones and every later one fail with
  Unavailable. `close()` stops the thread (bounded join) and fails what is left with
  Unavailable.
- Threads: only the loop thread issues CUDA work (forward, reshape kernels, the
  BatchShipper copy stream, sampling). ONE helper thread for the whole loop (the
  runner's ReadyPublisher, started on the first CUDA batch; none on CPU, where copies
  are synchronous and layers are marked inline) waits on each layer's copy event and
  marks that layer ready for every prompt of the batch; it only waits on CUDA events
  and writes the slot headers in host memory. Waiting on an event from another thread
  is safe because this process never captures a CUDA graph (during a capture, another
  thread's event query could invalidate it). FetchKv reads host memory only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
from collections import Counter, deque
from typing import Any

import torch

from engine.errors import Unavailable, is_fatal_device_error
from engine.gil import short_gil_switch
from engine.sampling import SamplingParams
from transport import metrics as prom

from .runner import Cancelled, Outcome, PrefillJob, PrefillResult, PrefillRunner, future_notify

log = logging.getLogger("hybrid.prefill")


class PrefillLoop:
    def __init__(self, runner: PrefillRunner, max_batch: int | None = None,
                 max_batch_tokens: int | None = None, join_timeout_s: float = 30.0) -> None:
        self.runner = runner
        self.max_batch = max_batch or runner.max_batch
        self.max_batch_tokens = max_batch_tokens or runner.max_batch_tokens
        self.join_timeout_s = join_timeout_s
        self.stats: Counter = Counter(prefill_batches=0, prefill_batched_prompts=0)
        self._cv = threading.Condition()
        self._queue: deque[PrefillJob] = deque()
        self._running: list[PrefillJob] = []
        self._paused = self._closing = False
        self._dead: str | None = None  # why new jobs fail (Unavailable) once the loop is gone
        # Called once (loop thread) when the loop died of an error, not on close: a CUDA
        # error poisons the context, so the server stops serving and exits.
        self.on_death = None
        # Fault injection for tests: the Nth batch fails with a context-poisoning error.
        self.fault_crash_batches = int(os.environ.get("HYBRID_FAULT_PREFILL_CRASH_BATCHES", 0))
        short_gil_switch()  # the loop needs the GIL back as soon as a CUDA wait ends
        self._thread = threading.Thread(target=self._main, name="prefill-loop", daemon=True)
        self._thread.start()

    # ---- submitting (any thread) ----------------------------------------------------
    def submit(self, job: PrefillJob) -> PrefillJob:
        with self._cv:
            dead = self._dead
            if dead is None:
                self._queue.append(job)
                self._cv.notify()
        if dead is not None:
            job.settle(Unavailable(dead))
        return job

    def submit_async(self, ids: list[int], desc: Any, layout: str,
                     params: SamplingParams) -> tuple[PrefillJob, asyncio.Future]:
        """From the asyncio loop: the job and the future its outcome resolves."""
        aloop = asyncio.get_running_loop()
        fut = aloop.create_future()
        # A handler whose client left may stop awaiting this (a second cancel while it
        # waits for the loop to let go): the outcome is then of no interest, but asyncio
        # would log "Future exception was never retrieved" with a traceback for each.
        fut.add_done_callback(_seen)
        job = PrefillJob(ids, desc, layout, params, _asyncio_notify(aloop, fut))
        return self.submit(job), fut

    def run_sync(self, ids: list[int], desc: Any, layout: str, params: SamplingParams,
                 timeout_s: float | None = None) -> PrefillResult:
        """Submit and block until done (warm-up). Never from the loop thread itself."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("run_sync from the prefill loop thread would deadlock")
        box: concurrent.futures.Future = concurrent.futures.Future()
        self.submit(PrefillJob(ids, desc, layout, params, future_notify(box)))
        return box.result(timeout_s)

    def cancel(self, job: PrefillJob) -> None:
        """Stop `job`: dropped at once if still queued, else at its next layer."""
        job.cancel.set()
        with self._cv:
            queued = job in self._queue
            if queued:
                self._queue.remove(job)
        if queued:
            job.settle(Cancelled("prefill cancelled while queued"))

    # ---- control -------------------------------------------------------------------
    def pause(self) -> None:
        """Take no new batch until resume() (the batch in flight finishes). Lets tests
        queue several jobs and see them run as one batch, without sleeping."""
        with self._cv:
            self._paused = True

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        """Stop the thread after its batch in flight (bounded join); every job not run
        fails with Unavailable."""
        with self._cv:
            self._closing = True
            self._dead = self._dead or "prefill service is shutting down"
            self._cv.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(self.join_timeout_s)
            if self._thread.is_alive():
                log.error("prefill loop still busy after %.0f s; closing without it",
                          self.join_timeout_s)
            elif (close := getattr(self.runner, "close", None)) is not None:
                close()  # no batch in flight: stop the ready helper thread too
        self._fail(self._drain_queue())

    # ---- the loop thread -----------------------------------------------------------
    def _main(self) -> None:
        reason = None
        try:
            self._bind_device()
            while (batch := self._take()) is not None:
                if batch:
                    self._run(batch)
        except BaseException as e:  # a bug or an interpreter exit: never die silently
            reason = f"prefill loop died: {type(e).__name__}: {e}"
            log.critical("%s", reason, exc_info=True)
        finally:
            with self._cv:
                self._dead = self._dead or reason or "prefill loop stopped"
                left, self._running = self._running + list(self._queue), []
                self._queue.clear()
            self._fail(left)
        if reason is not None and self.on_death is not None:  # the server stops and exits
            try:
                self.on_death(Unavailable(reason))
            except Exception:
                log.exception("prefill loop on_death hook failed")

    def _bind_device(self) -> None:
        """CUDA's current device is per thread: make the model's device current here."""
        device = self.runner.lm.device
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)

    def _take(self) -> list[PrefillJob] | None:
        """Wait for work; the next batch (possibly empty when every waiting job had been
        cancelled), or None when closing."""
        with self._cv:
            while not self._closing and (self._paused or not self._queue):
                self._cv.wait()
            if self._closing:
                return None
            batch, dropped = self._pick()
            self._running = batch
        for job in dropped:
            job.settle(Cancelled("prefill cancelled while queued"))
        return batch

    def _pick(self) -> tuple[list[PrefillJob], list[PrefillJob]]:
        """Oldest first, up to max_batch prompts and max_batch_tokens tokens; the first job
        always goes (however long), and a job that does not fit ends the batch (no
        overtaking, so a long prompt is never starved by short ones). Called locked."""
        batch: list[PrefillJob] = []
        dropped: list[PrefillJob] = []
        tokens = 0
        while self._queue and len(batch) < self.max_batch:
            job = self._queue[0]
            if job.cancel.is_set():  # cancelled through its event, not cancel()
                dropped.append(self._queue.popleft())
                continue
            if batch and tokens + len(job.ids) > self.max_batch_tokens:
                break
            batch.append(self._queue.popleft())
            tokens += len(job.ids)
        return batch, dropped

    def _run(self, batch: list[PrefillJob]) -> None:
        self.stats["prefill_batches"] += 1
        self.stats["prefill_batched_prompts"] += len(batch)
        prom.PREFILL_BATCH.observe(len(batch))
        try:
            if self.fault_crash_batches:  # fault injection: a CUDA error that poisons all
                self.fault_crash_batches -= 1
                if not self.fault_crash_batches:
                    raise RuntimeError("CUDA error: an illegal memory access was encountered "
                                       "(injected: HYBRID_FAULT_PREFILL_CRASH_BATCHES)")
            self.runner.run_batch(batch)
        except Exception as e:  # fails this batch only ...
            if is_fatal_device_error(e):
                raise  # ... unless nothing can run here any more: the loop dies
            if not isinstance(e, Cancelled):
                log.exception("prefill batch of %d failed", len(batch))
            for job in batch:
                job.settle(e)
        with self._cv:
            self._running = []

    def _drain_queue(self) -> list[PrefillJob]:
        with self._cv:
            left = list(self._queue)
            self._queue.clear()
        return left

    def _fail(self, jobs: list[PrefillJob]) -> None:
        reason = self._dead or "prefill loop stopped"
        for job in jobs:
            job.settle(Unavailable(reason))


def _seen(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


def _asyncio_notify(aloop: asyncio.AbstractEventLoop, fut: asyncio.Future):
    """A notify (called from the loop thread) that resolves `fut` on its own loop."""
    def resolve(outcome: Outcome) -> None:
        if fut.done():  # the awaiting side gave up
            return
        if isinstance(outcome, BaseException):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)

    def notify(outcome: Outcome) -> None:
        with contextlib.suppress(RuntimeError):  # that event loop closed: nobody waits
            aloop.call_soon_threadsafe(resolve, outcome)
    return notify
